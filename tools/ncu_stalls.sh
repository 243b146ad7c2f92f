#!/usr/bin/env bash
# Stall breakdown of the paged KIVI kernel (B8/32K, KIVI-2) on a GPU machine: bash tools/ncu_stalls.sh
m=""
for s in barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle wait not_selected dispatch_stall lg_throttle no_instruction selected branch_resolving; do
  m="$m,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio"
done
ncu --clock-control none -k regex:kivi_paged_kernel -s 2 -c 1 --metrics "${m#,},smsp__issue_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active" python3 tools/ncu_paged_probe.py 2>&1 | grep -E "stalled|issue_active|duration|warps_active"

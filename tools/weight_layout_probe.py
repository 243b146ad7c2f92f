"""Is the small-M W4 GEMM bound by its weight access pattern? The K loop of lowbit's GEMM with the weights as stored
(rows, ``row``) or tile-blocked (each program's BN x TILE/2 bytes contiguous per K tile, scales blocked alike, ``blk``),
and each layout streamed alone (``STREAM``: the bytes summed, no MMA), against the library's ``w4a8_gemm`` and cuBLAS
bf16 in the same process; CUDA graphs over rotating weight copies. (``row`` addresses rows as ``n * K/2`` computed in
the kernel, without the JIT's stride specialization, so it trails the library's kernel: compare ``blk`` with ``lib``.)

    PYTHONPATH=src python3 tools/weight_layout_probe.py out.json
"""
import itertools
import json
import sys

import torch
import triton
import triton.language as tl
from lowbit.kernels import gemm
from lowbit.kernels.gemm import _tile_ids, _weight_halves, _i32_to_f32, _store_or_reduce, WORKSPACE, repack_weight
from lowbit.kernels.layout import GemmConfig, plan_gemm
from lowbit.kernels.splitk import COUNTERS
from lowbit.bench.timing import bench_sets, rotating

@triton.jit
def _blocked_kernel(A, s_am, AS, s_asm, W, WS, BIAS, C, s_cm, PART, COUNT, M, N, K, TPS, SPLITS,
                    BLOCK_A: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BLOCKED: tl.constexpr, EVICT: tl.constexpr, STREAM_ONLY: tl.constexpr, SPLIT: tl.constexpr, ASM: tl.constexpr):
    pid_k = tl.program_id(1)
    tile_id = tl.program_id(0)
    pid_m, pid_n = _tile_ids(tile_id, M, N, BM, BN, 8)
    rm = pid_m * BM + tl.arange(0, BM)
    rl = tl.arange(0, BN)
    rn = pid_n * BN + rl
    mm = rm < M
    nm = rn < N
    KT = K // TILE
    KG = K // GROUP
    t0 = pid_k * TPS
    t1 = tl.minimum(t0 + TPS, KT)
    HALF: tl.constexpr = TILE // 2
    rk = tl.arange(0, HALF)
    a_ptr = A + rm[:, None] * s_am + rk[None, :]
    if BLOCKED:
        w_base = W + (pid_n * KT * BN) * HALF + rl[:, None] * HALF + rk[None, :]
        ws_base = WS + pid_n * KG * BN + rl
    else:
        w_base = W + rn[:, None] * (K // 2) + rk[None, :]
        ws_base = WS + rn * KG
    acc = tl.zeros((BM, BN), tl.float32)
    acc_s = tl.zeros((BN, HALF), tl.int32)
    for t in range(t0, t1):
        if BLOCKED:
            wptr = w_base + t * (BN * HALF)
        else:
            wptr = w_base + t * HALF
        if EVICT:
            wp = tl.load(wptr, eviction_policy="evict_first")
        else:
            wp = tl.load(wptr)
        if STREAM_ONLY:
            acc_s += wp.to(tl.int32)
        else:
            a_lo = tl.load(a_ptr + t * TILE, mask=mm[:, None], other=0)
            a_hi = tl.load(a_ptr + t * TILE + HALF, mask=mm[:, None], other=0)
            asc = tl.load(AS + rm * s_asm + (t * TILE) // BLOCK_A, mask=mm, other=0)
            w_lo, w_hi = _weight_halves(wp, W, 0, rn, nm, t, TILE, GROUP, False, ASM)
            acc_i = tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32)
            acc_i = tl.dot(a_hi, tl.trans(w_hi), acc=acc_i, out_dtype=tl.int32)
            if BLOCKED:
                wsc = tl.load(ws_base + ((t * TILE) // GROUP) * BN).to(tl.float32)
            else:
                wsc = tl.load(ws_base + (t * TILE) // GROUP).to(tl.float32)
            acc += _i32_to_f32(acc_i, True) * (asc[:, None] * wsc[None, :])
    if STREAM_ONLY:
        acc += tl.sum(acc_s, 1).to(tl.float32)[None, :]
    _store_or_reduce(acc, rm, rn, mm, nm, tile_id, pid_k, BIAS, C, s_cm, PART, COUNT, M, N, SPLITS, BM, BN, False, SPLIT)


def block_w(wk, bn, tile):
    n, kh = wk.shape
    half = tile // 2
    return wk.reshape(n // bn, bn, kh // half, half).permute(0, 2, 1, 3).contiguous()

def block_s(ws, bn):
    n, kg = ws.shape
    return ws.reshape(n // bn, bn, kg).permute(0, 2, 1).contiguous()

def run(m, n, k, bn, warps, stages, split, blocked, evict, stream_only, sets, codes, scale, out):
    plan = plan_gemm(m, n, k, 128, 132, GemmConfig(16, bn, warps, stages, split_k=split))
    part = WORKSPACE.get("splitk", (plan.split, m, n), torch.float32, "cuda", 0)
    cnt = COUNTERS.get(plan.tiles_mn, torch.device("cuda"), 0)
    def call(st):
        w, ws = (st[2], st[3]) if blocked else (st[0], st[1])
        _blocked_kernel[(plan.tiles_mn, plan.split)](codes, codes.stride(0), scale, scale.stride(0), w, ws, ws, out, out.stride(0),
            part, cnt, m, n, k, plan.tiles_per_split, plan.split, BLOCK_A=128, GROUP=128, TILE=128, BM=16, BN=bn,
            BLOCKED=blocked, EVICT=evict, STREAM_ONLY=stream_only, SPLIT=plan.split > 1, ASM=True, num_warps=warps, num_stages=stages)
    return bench_sets(call, sets) * 1e3, plan.split

rows = []
SH = [(1, 4096, 4096), (1, 28672, 4096), (1, 4096, 14336), (16, 4096, 14336)]
for m, n, k in SH:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    codes, scale = gemm.quantize_activation(x, 128)
    def make():
        qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        ws = (torch.rand(n, k // 128, device="cuda") * 0.02 + 0.001).half()
        wk = repack_weight(qw, 128)
        return wk, ws
    base, _ = rotating(make, n * k // 2, max_sets=16)
    outb = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    ref_t = bench_sets(lambda st: gemm.w4a8_gemm(codes, scale, 128, st[0], st[1], 128, out=outb, workspace=WORKSPACE), base) * 1e3
    bsets, _ = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2, max_sets=8)
    cub = bench_sets(lambda b: torch.nn.functional.linear(x, b), bsets) * 1e3
    print(f"== M{m} N{n} K{k}: lib gemm {ref_t:.2f} us, cuBLAS {cub:.2f} us ({n*k/2/ref_t/1e3:.0f} GB/s lib)", flush=True)
    for bn in (32, 64, 128):
        sets = [(wk, ws, block_w(wk, bn, 128), block_s(ws, bn)) for wk, ws in base]
        # correctness of blocked vs row at this bn
        o1 = torch.empty(m, n, device="cuda", dtype=torch.bfloat16); o2 = torch.empty_like(o1)
        ref = gemm.w4a8_gemm(codes, scale, 128, sets[0][0], sets[0][1], 128)
        for blocked, o in ((False, o1), (True, o2)):
            plan = plan_gemm(m, n, k, 128, 132, GemmConfig(16, bn, 4, 4))
            part = WORKSPACE.get("splitk", (plan.split, m, n), torch.float32, "cuda", 0)
            cnt = COUNTERS.get(plan.tiles_mn, torch.device("cuda"), 0)
            w, ws = (sets[0][2], sets[0][3]) if blocked else (sets[0][0], sets[0][1])
            _blocked_kernel[(plan.tiles_mn, plan.split)](codes, codes.stride(0), scale, scale.stride(0), w, ws, ws, o, o.stride(0),
                part, cnt, m, n, k, plan.tiles_per_split, plan.split, BLOCK_A=128, GROUP=128, TILE=128, BM=16, BN=bn,
                BLOCKED=blocked, EVICT=False, STREAM_ONLY=False, SPLIT=plan.split > 1, ASM=True, num_warps=4, num_stages=4)
        err = max((o1.float() - ref.float()).abs().max().item(), (o2.float() - ref.float()).abs().max().item())
        for warps, stages, split, blocked, evict, so in itertools.product((4,), (4, 6), (0, 8), (False, True), (False, True), (False, True)):
            if evict and so:
                continue
            try:
                us, sp = run(m, n, k, bn, warps, stages, split, blocked, evict, so, sets, codes, scale, torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
            except Exception as e:
                print("fail", bn, stages, split, blocked, repr(e)[:100]); continue
            r = dict(m=m, n=n, k=k, bn=bn, warps=warps, stages=stages, split=sp, split_req=split, blocked=blocked, evict=evict,
                     stream_only=so, us=us, lib_us=ref_t, cublas_us=cub, max_err_vs_lib=err)
            rows.append(r)
            print(f"BN{bn} s{stages} split{sp}({split}) {'blk' if blocked else 'row'} {'ev' if evict else '  '} {'STREAM' if so else 'gemm  '}: {us:.2f} us  ({n*k/2/us/1e3:.0f} GB/s)", flush=True)
        del sets
    del base, bsets
    torch.cuda.empty_cache()
json.dump(rows, open(sys.argv[1], "w"), indent=1)

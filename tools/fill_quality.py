#!/usr/bin/env python
"""Write the tables of ``tools/quality_runs.py``'s JSON into docs/QUALITY.md, docs/FMPQ.md and README.md.

    python tools/fill_quality.py OUT_DIR [--root REPO] [--allow-quick] [--dry-run]

Each placeholder line (``HELDOUT_KV``, ``ABLATION_KV``, ``HELDOUT_WA``, ``ABLATION_WA``, ``SWEEP_WA``,
``LIMITS_WA`` in docs/QUALITY.md, ``SWEEP_FMPQ`` in docs/FMPQ.md, ``QUALITY_README`` in README.md) is replaced
by its table between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers, so running it again with new JSON
replaces the tables in place. A placeholder whose section JSON is missing is left as it is. ``--quick`` runs
are refused unless ``--allow-quick`` (their numbers come from a 1-layer truncation and mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

SPLIT = 154691
TARGETS_WA = {"W4A16": 15.0, "FMPQ W4A8": 15.0, "FMPQ W4A4": 30.0}
KV_HELD = [160000, 200000, 240000, 280000]
KV_ORDER = ["fp16", "kivi:bits=2", "kivi:bits=2,sinks=4", "hfq:bits=2,group=32", "hfq:bits=2,group=32,axis_key=-1", "2bit",
            "kivi:bits=4", "hfq:bits=4,group=32,axis_key=-1", "4bit"]  # tools/quality_runs.py's KV_ROWS


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def pooled_ppl(ppls: list[float]) -> float:
    """Perplexity of equal-length stretches pooled: exp of the mean NLL."""
    return math.exp(sum(math.log(p) for p in ppls) / len(ppls))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def pct(x: float) -> str:
    return f"{x:+.1f} %"


MARKS = ["†", "‡", "§", "¶"]


def run_of(row: dict, meta: dict) -> tuple:
    """(where, torch, transformers) of one row: its own ``run``, else its file's meta (files of a single process)."""
    r = row.get("run") or {"where": meta.get("gpu") or meta.get("device"), "torch": meta.get("torch"),
                           "transformers": meta.get("transformers")}
    return r.get("where") or "?", r.get("torch"), r.get("transformers")


def runs(d: dict) -> dict[tuple, str]:
    """{run: mark}: the run that measured most rows unmarked, every other one marked †, ‡, ..."""
    counts = Counter(run_of(r, d["meta"]) for r in d["rows"])
    return {k: "" if i == 0 else MARKS[min(i, len(MARKS)) - 1] for i, (k, _) in enumerate(counts.most_common())}


def mark(d: dict, spec: str, offsets=None) -> str:
    """The marks of the runs that measured `spec`'s rows (at `offsets`)."""
    rs = runs(d)
    got = {rs[run_of(r, d["meta"])] for r in d["rows"] if r["spec"] == spec and (offsets is None or r["offset"] in offsets)}
    return "".join(sorted(got))


def where(run: tuple) -> str:
    return f"{'CPU' if run[0] == 'cpu' else run[0]}, torch {run[1]}, transformers {run[2]}"


def caption(d: dict) -> str:
    meta, rs = d["meta"], runs(d)
    first = next(iter(rs), run_of({}, meta))
    text = f"*{where(first)}, float32 compute{' (TF32 off)' if first[0] != 'cpu' else ''}, `tools/quality_runs.py`"
    for run, m in rs.items():
        if m:
            text += f"; rows marked {m} ran on {where(run)}"
    if len(rs) > 1:
        text += " (every KL and Δppl is against the unquantized model run in the same process, on the same device)"
    return text + f"{' — INCOMPLETE run' if not meta.get('complete') or d.get('skipped') else ''}.*"


def not_run(d: dict) -> list[str]:
    return [f"Not run: {', '.join(f'`{s}`' for s in d['skipped'])}."] if d.get("skipped") else []


def kv_stats(rows: list[dict], offsets: list[int]) -> dict[str, dict]:
    """Per spec: KL mean over `offsets`, pooled ppl and fp16-pooled ppl, top-1 mean, bits@4K, per-offset KL."""
    out = {}
    for spec in dict.fromkeys(r["spec"] for r in rows):
        rs = {r["offset"]: r for r in rows if r["spec"] == spec and r["offset"] in offsets}
        if not rs:
            continue
        got = [rs[o] for o in offsets if o in rs]
        out[spec] = {"label": got[0].get("label", spec), "kl": mean(r["kl_mean"] for r in got),
                     "ppl": pooled_ppl([r["ppl"] for r in got]), "ref": pooled_ppl([r["ppl_ref"] for r in got]),
                     "top1": mean(r["top1"] for r in got), "bits": got[0]["bits_at_4096"], "exact": got[0]["bytes_exact"],
                     "per": {o: rs[o]["kl_mean"] for o in offsets if o in rs}, "n": len(got)}
    return out


def bits(s: dict) -> str:
    return ("" if s["exact"] else "≤ ") + f"{s['bits']:.3f}"


def heldout_kv(d: dict) -> str:
    st = kv_stats(d["rows"], KV_HELD)
    head = "| method | bits/elt @4K | ppl | Δppl | KL(ref‖m) | " + " | ".join(f"KL @{o // 1000}K" for o in KV_HELD) + " | top-1 |"
    lines = [head, "|" + "---|" * (6 + len(KV_HELD))]
    for spec, s in sorted(st.items(), key=lambda kv: KV_ORDER.index(kv[0]) if kv[0] in KV_ORDER else len(KV_ORDER)):
        per = " | ".join(f"{s['per'][o]:.4f}" if o in s["per"] else "–" for o in KV_HELD)
        lines.append(f"| `{spec}`{mark(d, spec, KV_HELD)} | {bits(s)} | {s['ppl']:.3f} | {pct(100 * (s['ppl'] / s['ref'] - 1))} | {s['kl']:.4f} | {per} | {s['top1']:.3f} |")
    lines += ["", f"ppl: the four 256-token stretches pooled (exp of the mean NLL); KL and top-1: means over the four. "
              + caption(d)]
    lines += not_run(d)
    lines += ["", *kv_targets(st, d)]
    return "\n".join(lines)


def kv_targets(st: dict, d: dict | None = None) -> list[str]:
    out = []
    two, kivi = st.get("2bit"), st.get("kivi:bits=2")
    if two:
        out.append(f"* `2bit` at 4,096 tokens: {two['bits']:.3f} bits per element (target ≤ 3.25: {'met' if two['bits'] <= 3.25 else 'missed'}).")
    if two and kivi:
        r = two["kl"] / kivi["kl"]
        out.append(f"* `2bit` KL / KIVI-2 KL = {r:.2f} (target ≤ 0.5: {'met' if r <= 0.5 else 'missed'}).")
    for spec in ("hfq:bits=2,group=32", "hfq:bits=2,group=32,axis_key=-1"):
        if two and spec in st:
            h = st[spec]
            r = two["kl"] / h["kl"]
            per = ", ".join(f"{two['per'][o] / h['per'][o]:.2f}" for o in KV_HELD if o in two["per"] and o in h["per"])
            m = (mark(d, "2bit", KV_HELD), mark(d, spec, KV_HELD)) if d else ("", "")
            verdict = "missed" if r > 0.5 else "met" if h["n"] == two["n"] else "not settled: different offsets"
            out.append(f"* `2bit`{m[0]} KL {two['kl']:.4f} / `{spec}`{m[1]} KL {h['kl']:.4f} = {r:.2f} "
                       f"(per offset {per}; target ≤ 0.5: {verdict}).")
    if st.get("4bit") and st.get("kivi:bits=4"):
        out.append(f"* `4bit`: KL {st['4bit']['kl']:.4f} at {st['4bit']['bits']:.3f} bits vs KIVI-4 {st['kivi:bits=4']['kl']:.4f} "
                   f"at {st['kivi:bits=4']['bits']:.3f}.")
    return out


def ablation_kv(d: dict) -> str:
    tune = sorted({r["offset"] for r in d["rows"] if r["offset"] < SPLIT})
    held = sorted({r["offset"] for r in d["rows"] if r["offset"] >= SPLIT})
    t, h = kv_stats(d["rows"], tune), kv_stats(d["rows"], held)
    base_t, base_h = t.get("kivi:bits=2"), h.get("kivi:bits=2")
    lines = ["| variant | spec | bits/elt @4K | KL tuning | × KIVI-2 | KL held-out | × KIVI-2 | top-1 held-out |",
             "|---|---|---|---|---|---|---|---|"]
    for spec in dict.fromkeys(list(t) + list(h)):
        a, b = t.get(spec), h.get(spec)
        s = a or b

        def cell(x, base):
            return (f"{x['kl']:.4f}", f"{x['kl'] / base['kl']:.2f}×" if base else "–") if x else ("–", "–")

        top1 = f"{b['top1']:.3f}" if b else "–"
        lines.append(f"| {s['label']} | `{spec}`{mark(d, spec)} | {bits(s)} | {' | '.join(cell(a, base_t))} | {' | '.join(cell(b, base_h))} | {top1} |")
    held_text = f"the held-out ones ({', '.join(f'{o:,}' for o in held)})" if held else "the held-out ones (not run yet: –)"
    lines += ["", f"KL: mean over the tuning offsets ({', '.join(f'{o:,}' for o in tune)}) and {held_text}; "
              "512 tokens of prefill, 256 streamed. " + caption(d)] + not_run(d)
    return "\n".join(lines)


def wa_table(d: dict) -> tuple[dict, list[int]]:
    """{spec: {label, bits, bytes, mark, ppl: {offset: ppl}, ppl_fp: {offset: same device's fp ppl}}} and the offsets."""
    out, offsets = {}, sorted({r["offset"] for r in d["rows"]})
    for r in d["rows"]:
        e = out.setdefault(r["spec"], {"label": r["label"], "bits": r["linear_bits"], "bytes": r["bytes"],
                                       "mark": mark(d, r["spec"]), "ppl": {}, "ppl_fp": {}})
        e["ppl"][r["offset"]] = r["ppl"]
        if "ppl_fp" in r:  # rows without it come from one process with the section's fp row
            e["ppl_fp"][r["offset"]] = r["ppl_fp"]
    return out, offsets


def wa_delta(e: dict, fp: dict, offsets: list[int]) -> float:
    base = {**fp["ppl"], **e.get("ppl_fp", {})}
    have = [o for o in offsets if o in e["ppl"] and o in base]
    return 100 * (pooled_ppl([e["ppl"][o] for o in have]) / pooled_ppl([base[o] for o in have]) - 1) if have else float("nan")


def target_of(label: str) -> tuple[str, float] | None:
    for name, t in sorted(TARGETS_WA.items(), key=lambda kv: -len(kv[0])):
        if label.startswith(name + " ") or label.startswith(name + ":"):
            return name, t
    return None


def heldout_wa(d: dict) -> str:
    st, offsets = wa_table(d)
    held = [o for o in offsets if o >= SPLIT]
    tune = [o for o in offsets if o < SPLIT]
    fp = st["fp"]
    lines = ["| method | spec | bits/weight | model MiB | ppl held-out | Δppl held-out | Δppl tuning | target |",
             "|---|---|---|---|---|---|---|---|"]
    for spec, e in st.items():
        dh, dt = wa_delta(e, fp, held), wa_delta(e, fp, tune)
        tg = target_of(e["label"])
        mark = "–" if not tg or spec == "fp" else f"≤ +{tg[1]:.0f} %: {'met' if dh <= tg[1] else 'missed'}"
        lines.append(f"| {e['label']} | `{spec}`{e['mark']} | {e['bits']:.2f} | {e['bytes'] / 2**20:.1f} | {pooled_ppl([e['ppl'][o] for o in held]):.3f} | "
                     f"{'—' if spec == 'fp' else pct(dh)} | {'—' if spec == 'fp' else pct(dt)} | {mark} |")
    lines += ["", f"Full-sequence perplexity of {d['meta']['wa_tokens']:,} tokens in windows of 1,024 at offset "
              f"{', '.join(f'{o:,}' for o in held)} (held-out) and {', '.join(f'{o:,}' for o in tune)} (tuning; Δ pooled); "
              "bits/weight: every stored byte of the quantized linears (codes, fp16 scales, zeros, permutation, masks) "
              "per weight; model MiB: `model_nbytes` (fp16 embedding included). " + caption(d)] + not_run(d)
    return "\n".join(lines)


def ablation_wa(d: dict) -> str:
    st, offsets = wa_table(d)
    held, tune = [o for o in offsets if o >= SPLIT], [o for o in offsets if o < SPLIT]
    fp = st["fp"]
    lines = ["| variant | spec | bits/weight | Δppl tuning | Δppl held-out |", "|---|---|---|---|---|"]
    for spec, e in st.items():
        if spec != "fp":
            lines.append(f"| {e['label']} | `{spec}`{e['mark']} | {e['bits']:.2f} | {pct(wa_delta(e, fp, tune))} | {pct(wa_delta(e, fp, held))} |")
    lines += ["", "Δppl against the unquantized model on the same tokens (tuning: offsets "
              f"{', '.join(f'{o:,}' for o in tune)} pooled; held-out: {', '.join(f'{o:,}' for o in held)}). " + caption(d)] + not_run(d)
    return "\n".join(lines)


def sweep(d: dict) -> str:
    st, offsets = wa_table(d)
    held = [o for o in offsets if o >= SPLIT]
    fp = st["fp"]
    fracs, kinds = [], []
    for spec, e in st.items():
        m = re.match(r"int8_frac=(\S+) (.+)", e["label"])
        if m:
            fracs += [m.group(1)] if m.group(1) not in fracs else []
            kinds += [m.group(2)] if m.group(2) not in kinds else []
    by = {(re.match(r"int8_frac=(\S+) (.+)", e["label"]).groups()): e for s, e in st.items() if s != "fp"}
    lines = ["| FMPQ W4A4, g128 | " + " | ".join(f"int8_frac={f}" for f in fracs) + " |", "|---|" + "---|" * len(fracs)]
    for k in kinds:
        cells = []
        for f in fracs:
            e = by.get((f, k))
            cells.append(f"{pooled_ppl([e['ppl'][o] for o in held]):.2f} ({pct(wa_delta(e, fp, held))}){e['mark']}" if e else "–")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", f"Held-out perplexity (offset {', '.join(f'{o:,}' for o in held)}, {d['meta']['wa_tokens']:,} tokens; fp16 "
              f"{pooled_ppl([fp['ppl'][o] for o in held]):.3f}) and Δ against it. `GPTQ+rot+asym+clip` = "
              "`gptq=true,rotate=hadamard,sym=false,clip=true`. " + caption(d) + fp_elsewhere(d, held)] + not_run(d)
    return "\n".join(lines)


def fp_elsewhere(d: dict, held: list[int]) -> str:
    """The unquantized model's held-out ppl as each marked run measured it (its rows' Δ base)."""
    out = []
    for run, m in runs(d).items():
        got = {r["offset"]: r["ppl_fp"] for r in d["rows"] if m and run_of(r, d["meta"]) == run and "ppl_fp" in r}
        if got and all(o in got for o in held):
            out.append(f"fp16 as run {m}: {pooled_ppl([got[o] for o in held]):.3f}")
    return (" " + "; ".join(out) + ".") if out else ""


def limits_wa(d: dict) -> str:
    st, offsets = wa_table(d)
    held = [o for o in offsets if o >= SPLIT]
    fp = st["fp"]
    out = []
    for name, t in TARGETS_WA.items():
        rows = [(wa_delta(e, fp, held), e["label"], s) for s, e in st.items() if e["label"].startswith(name + " ")]
        if not rows:
            continue
        best = min(rows)
        verdict = "met" if best[0] <= t else "missed"
        out.append(f"* {name} at g128: best held-out Δppl {pct(best[0])} (`{best[2]}`); target ≤ +{t:.0f} % {verdict}.")
    return "\n".join(out)


def readme(kv: dict | None, wa: dict | None) -> str:
    parts = []
    if kv:
        st = kv_stats(kv["rows"], KV_HELD)
        lines = ["| KV method | bits/elt @4K | Δppl | KL(ref‖m) | top-1 |", "|---|---|---|---|---|"]
        for spec in ("fp16", "kivi:bits=2", "hfq:bits=2,group=32,axis_key=-1", "2bit", "kivi:bits=4", "4bit"):
            if spec in st:
                s = st[spec]
                lines.append(f"| `{spec}`{mark(kv, spec, KV_HELD)} | {bits(s)} | {pct(100 * (s['ppl'] / s['ref'] - 1))} | {s['kl']:.4f} | {s['top1']:.3f} |")
        parts.append("\n".join(lines + ["", "Streaming protocol at offsets 160,000 – 280,000 of WikiText-2 test (4 stretches, "
                                        "means). " + caption(kv)]))
    if wa:
        st, offsets = wa_table(wa)
        held = [o for o in offsets if o >= SPLIT]
        fp = st["fp"]
        lines = ["| W/A method (g128) | bits/weight | ppl | Δppl |", "|---|---|---|---|",
                 f"| fp16 | 16 | {pooled_ppl([fp['ppl'][o] for o in held]):.3f} | — |"]
        for name in TARGETS_WA:
            rows = [(wa_delta(e, fp, held), s, e) for s, e in st.items() if e["label"].startswith(name + " ")]
            for label in ("RTN", None):
                pick = [r for r in rows if r[2]["label"] == f"{name} RTN"] if label else [min(rows, key=lambda r: r[0])] if rows else []
                for dlt, s, e in pick:
                    lines.append(f"| {name} `{s}`{e['mark']} | {e['bits']:.2f} | {pooled_ppl([e['ppl'][o] for o in held]):.3f} | {pct(dlt)} |")
        parts.append("\n".join(lines + ["", f"Full-sequence perplexity, {wa['meta']['wa_tokens']:,} tokens at offset 160,000 "
                                        "(held-out); RTN and the best configuration of each method. " + caption(wa)]))
    return "\n\n".join(parts) + "\n\nSettings were chosen on the first half of the text; `docs/QUALITY.md` has every row, the ablations and the targets."


def replace(text: str, name: str, body: str) -> tuple[str, bool]:
    block = f"<!-- {name} -->\n{body.rstrip()}\n<!-- /{name} -->"
    marked = re.compile(rf"<!-- {name} -->\n.*?\n<!-- /{name} -->", re.S)
    if marked.search(text):
        return marked.sub(lambda _: block, text, count=1), True
    bare = re.compile(rf"^{name}$", re.M)
    if bare.search(text):
        return bare.sub(lambda _: block, text, count=1), True
    return text, False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="tools/quality_runs.py --out folder")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="repository root holding the docs")
    ap.add_argument("--allow-quick", action="store_true", help="accept --quick JSON (for testing this script)")
    ap.add_argument("--dry-run", action="store_true", help="print the tables, write nothing")
    args = ap.parse_args(argv)
    data = {n: load(args.out, n) for n in ("kv", "kv_ablation", "wa", "wa_ablation", "wa_sweep")}
    if not any(data.values()):
        ap.error(f"no section JSON in {args.out}")
    if not args.allow_quick and any(d and d["meta"].get("quick") for d in data.values()):
        ap.error("these are --quick results (a 1-layer truncation): pass --allow-quick to fill anyway (tests only)")
    tables = {
        ("docs/QUALITY.md", "HELDOUT_KV"): data["kv"] and heldout_kv(data["kv"]),
        ("docs/QUALITY.md", "ABLATION_KV"): data["kv_ablation"] and ablation_kv(data["kv_ablation"]),
        ("docs/QUALITY.md", "HELDOUT_WA"): data["wa"] and "### Held-out results (W/A)\n\n" + heldout_wa(data["wa"]),
        ("docs/QUALITY.md", "ABLATION_WA"): data["wa_ablation"] and "### Ablation (W/A)\n\n" + ablation_wa(data["wa_ablation"]),
        ("docs/QUALITY.md", "SWEEP_WA"): data["wa_sweep"] and sweep(data["wa_sweep"]),
        ("docs/QUALITY.md", "LIMITS_WA"): data["wa"] and limits_wa(data["wa"]),
        ("docs/FMPQ.md", "SWEEP_FMPQ"): data["wa_sweep"] and sweep(data["wa_sweep"]) + "\n\n`docs/QUALITY.md` has the other rows.",
        ("README.md", "QUALITY_README"): (data["kv"] or data["wa"]) and readme(data["kv"], data["wa"]),
    }
    texts: dict[str, str] = {}
    for (doc, name), body in tables.items():
        if not body:
            print(f"{doc}: {name} left as it is (no JSON for it)")
            continue
        if args.dry_run:
            print(f"== {doc} {name}\n{body}\n")
            continue
        text = texts.get(doc) or (args.root / doc).read_text()
        texts[doc], ok = replace(text, name, body)
        print(f"{doc}: {name} {'filled' if ok else 'NOT FOUND (neither the placeholder nor its markers)'}")
    for doc, text in texts.items():
        (args.root / doc).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

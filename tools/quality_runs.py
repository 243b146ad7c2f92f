#!/usr/bin/env python
"""Issue 16's held-out measurements (docs/QUALITY.md, docs/FMPQ.md, README.md) in one process.

One model load, the library's own functions, one JSON per section in --out (rewritten after every row, so a
run that is stopped keeps what it measured, and running the same command again resumes where it stopped):

* ``kv.json``           held-out KV rows, offsets 160,000 / 200,000 / 240,000 / 280,000 (streaming protocol)
* ``kv_ablation.json``  each kiviplus part alone and together, tuning half (0 / 50,000 / 100,000) and held-out
* ``wa.json``           held-out W/A rows: w4a16, w4a8, FMPQ W4A8, FMPQ W4A4 at g128, plain / gptq / rotate / both /
                        the doc's improved options (full-sequence ppl, 2,048 tokens in windows of 1,024)
* ``wa_ablation.json``  each W/A option alone and all-but-one, for FMPQ W4A4 and W4A16
* ``wa_sweep.json``     FMPQ W4A4's INT8-fraction sweep, plain / rotated / GPTQ + rotation + clip + asym

Every W/A row is scored at offsets 0 and 60,000 (tuning half) and 160,000 (held-out) from one quantized model.
The protocol is ``lowbit compare --offset N``'s: the same token slices, calibration and KV caches.

    PYTHONPATH=src python tools/quality_runs.py --model $MODEL --device cuda --out $OUT
    python tools/fill_quality.py $OUT            # writes the tables into the docs

``--quick``: a 1-layer truncation of the model, 8 streamed tokens after a 160-token prefill and 64 W/A tokens,
every row once (a smoke test of the whole pipeline: a few minutes on a CPU; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

KV_HELD = [160000, 200000, 240000, 280000]
KV_TUNE = [0, 50000, 100000]
WA_TUNE = [0, 60000]
WA_HELD = [160000]
HFQ = ["hfq:bits=2,group=32", "hfq:bits=2,group=32,axis_key=-1", "hfq:bits=4,group=32,axis_key=-1"]
KV_ROWS = ["fp16", "kivi:bits=2", "kivi:bits=2,sinks=4", HFQ[0], HFQ[1], "2bit", "kivi:bits=4", HFQ[2], "4bit"]
KV_ABLATION = [  # (what it shows, spec): kiviplus defaults are KIVI-2's (kgroup 32, vgroup 32, residual 128)
    ("KIVI-2", "kivi:bits=2"),
    ("sinks=4 alone", "kiviplus:sinks=4"),
    ("hi_channels=16 alone", "kiviplus:hi_channels=16"),
    ("rotate=v alone", "kiviplus:rotate=v"),
    ("rotate=v,vgroup=64 alone", "kiviplus:rotate=v,vgroup=64"),
    ("rotate=k alone", "kiviplus:rotate=k"),
    ("kbits=4 (4-bit keys)", "kiviplus:kbits=4"),
    ("vbits=4 (4-bit values)", "kiviplus:vbits=4"),
    ("all but sinks", "kiviplus:vgroup=64,rotate=v,hi_channels=16"),
    ("all but hi_channels", "kiviplus:sinks=4,vgroup=64,rotate=v"),
    ("all but rotate=v,vgroup=64", "kiviplus:sinks=4,hi_channels=16"),
    ("all, keys rotated too (rotate=kv)", "kiviplus:sinks=4,vgroup=64,rotate=kv,hi_channels=16"),
    ("all (= 2bit)", "2bit"),
]
IMPROVED = {"gptq": "true", "rotate": "hadamard", "sym": "false", "clip": "true"}  # evaluate.py's IMPROVED
W4A4_EXTRA = {"block": "32", "aclip": "0.9", "int8_frac": "0.5"}
WA_METHODS = [("W4A16", "w4a16"), ("W4A8", "w4a8"), ("FMPQ W4A8", "fmpq:w=4,a=8"), ("FMPQ W4A4", "fmpq:w=4,a=4")]
SWEEP_FRACS = ["0", "0.05", "0.1", "0.25", "0.5"]
SECTIONS = ("kv", "kv_ablation", "wa", "wa_ablation", "wa_sweep")


def spec(method: str, opts: dict | None = None) -> str:
    """``method`` plus options in one canonical order (identical configurations give identical strings)."""
    opts = opts or {}
    order = ["int8_frac", "block", "gptq", "rotate", "sym", "clip", "aclip"]
    items = [f"{k}={opts[k]}" for k in order if k in opts] + [f"{k}={v}" for k, v in opts.items() if k not in order]
    if not items:
        return method
    return method + ("," if ":" in method else ":") + ",".join(items)


def wa_rows() -> dict[str, list[tuple[str, str]]]:
    """{section: [(label, spec)]} of the W/A sections."""
    held = [("fp16", "fp"), ("W8A8", "w8a8")]
    variants = [("RTN", {}), ("GPTQ", {"gptq": "true"}), ("rotated", {"rotate": "hadamard"}),
                ("GPTQ + rotated", {"gptq": "true", "rotate": "hadamard"})]
    for name, method in WA_METHODS:
        extra = W4A4_EXTRA if method.endswith("a=4") else {}
        held += [(f"{name} {v}", spec(method, o)) for v, o in variants]
        more = " + block 32 + aclip 0.9 + int8_frac 0.5" if extra else ""
        held.append((f"{name} GPTQ + rotated + asym + clip{more}", spec(method, {**IMPROVED, **extra})))
    ablation = []
    for name, method, opts in (("FMPQ W4A4", "fmpq:w=4,a=4", {**IMPROVED, **W4A4_EXTRA}), ("W4A16", "w4a16", IMPROVED)):
        ablation.append((f"{name}: RTN", spec(method)))
        ablation += [(f"{name}: {k}={v} alone", spec(method, {k: v})) for k, v in opts.items()]
        ablation += [(f"{name}: all but {k}={v}", spec(method, {o: w for o, w in opts.items() if o != k})) for k, v in opts.items()]
        ablation.append((f"{name}: all", spec(method, opts)))
    sweep = []
    for frac in SWEEP_FRACS:
        for v, o in (("RTN", {}), ("rotated", {"rotate": "hadamard"}), ("GPTQ+rot+asym+clip", IMPROVED)):
            sweep.append((f"int8_frac={frac} {v}", spec("fmpq:w=4,a=4", {"int8_frac": frac, **o})))
    return {"wa": held, "wa_ablation": [("fp16", "fp")] + ablation, "wa_sweep": [("fp16", "fp")] + sweep}


class Runner:
    """Holds the model, the text and every result of this process (shared between sections)."""

    def __init__(self, args):
        from lowbit.eval import DEFAULT_TEXT, load_tokens
        from lowbit.eval.data import calibration_tokens
        from lowbit.eval.device import load_for_quality

        self.args, self.t0 = args, time.time()
        text = args.text or DEFAULT_TEXT
        self.model, self.tok = load_for_quality(args.model, args.device)
        if args.quick:
            truncate(self.model, 1)
        self.device = str(next(self.model.parameters()).device)
        self.ids = load_tokens(self.tok, text)  # [1, n]: the slices `lowbit compare --offset N` scores
        self.calib = calibration_tokens(self.tok, text)
        self.prefill, self.tokens = (160, 8) if args.quick else (512, 256)
        self.wa_tokens = 64 if args.quick else 2048
        self.refs: dict[int, object] = {}
        self.kv_done: dict[tuple[int, str], dict] = {}
        self.wa_done: dict[tuple[str, int], dict] = {}  # W/A rows shared between sections (one quantization per spec)
        self.stats = None
        self.fp_ppls: dict[int, float] = {}
        self.where = {"where": torch.cuda.get_device_name() if self.device.startswith("cuda") else self.device,
                      "torch": torch.__version__, "transformers": __import__("transformers").__version__}
        self.log(f"model {args.model} on {self.device} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.0f} M params, "
                 f"{self.model.config.num_hidden_layers} layers), text {self.ids.shape[1]} tokens, {time.time() - self.t0:.0f} s")

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f} s] {msg}", flush=True)

    def out_of_time(self) -> bool:
        return bool(self.args.budget_s) and time.time() - self.t0 > self.args.budget_s

    def meta(self, section: str) -> dict:
        from lowbit.eval.device import exact_float32

        return {"section": section, "model": self.args.model, "device": self.device, "quick": self.args.quick,
                "gpu": torch.cuda.get_device_name() if self.device.startswith("cuda") else None,
                "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "python": platform.python_version(), "float32": exact_float32(), "prefill": self.prefill,
                "tokens": self.tokens, "wa_tokens": self.wa_tokens, "wa_window": 1024, "calibration": list(self.calib.shape),
                "layers": self.model.config.num_hidden_layers}

    # ------------------------------------------------------------------ KV
    def kv(self, offset: int, kv: str) -> dict:
        from lowbit.eval import evaluate_kv, reference_run

        key = (offset, kv)
        if key in self.kv_done:
            return self.kv_done[key]
        ids = self.ids[:, offset : offset + self.prefill + self.tokens]
        if offset not in self.refs:
            self.refs[offset] = reference_run(self.model, ids, self.prefill, self.tokens)
        t = time.time()
        r = evaluate_kv(self.model, ids, kv, self.prefill, self.tokens, reference=self.refs[offset])
        row = {"spec": kv, "offset": offset, "ppl": r.ppl, "ppl_ref": r.ppl_ref, "kl_mean": r.kl_mean, "kl_max": r.kl_max,
               "top1": r.top1_agree, "kv_bytes": r.kv_bytes, "kv_bytes_fp16": r.kv_bytes_fp16,
               "bits_per_element": r.bits_per_element, "bits_at_4096": r.extra["bits_at_4096"],
               "bytes_exact": r.extra["bytes_exact"], "seconds": time.time() - t, "run": self.where}
        self.kv_done[key] = row
        return row

    # ------------------------------------------------------------------ W/A
    def wa_model(self, wa: str):
        """The quantized model (fake-quant path, as `lowbit compare`), from one shared calibration pass."""
        from lowbit.wa.model import collect_channel_stats, quantize_model, select_linears

        if wa == "fp":
            return self.model
        if self.stats is None:
            self.stats = collect_channel_stats(self.model, select_linears(self.model), self.calib)
        return quantize_model(copy.deepcopy(self.model), wa, stats=self.stats, mode="fake")

    def wa_ppl(self, model, offset: int) -> float:
        from lowbit.eval.wa import full_ppl

        return full_ppl(model, self.ids[0, offset : offset + self.wa_tokens], window=1024)

    def fp_ppl(self, offset: int) -> float:
        """The unquantized model's ppl on the same tokens, in this process (each row's Δ against its own device)."""
        if offset not in self.fp_ppls:
            self.fp_ppls[offset] = self.wa_ppl(self.model, offset)
        return self.fp_ppls[offset]


def truncate(model, n: int) -> None:
    """Keep the first `n` decoder layers (``--quick``)."""
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:n])
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]


def wa_bits(model) -> dict:
    """Bytes (``model_nbytes``: fp16 for every unquantized tensor) and bits per weight of the quantized linears."""
    from lowbit.wa import QuantLinear, model_nbytes
    from lowbit.wa.model import fp16_nbytes

    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    stored = sum(2 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
                 for m in q for n, t in m.named_buffers(recurse=False) if t is not None and n not in m._non_persistent_buffers_set)
    weights = sum(m.in_features * m.out_features for m in q)
    return {"bytes": model_nbytes(model), "bytes_fp16": fp16_nbytes(model),
            "linear_bits": 8 * stored / weights if weights else 16.0}


class Section:
    """One JSON file: rows keyed by (spec, offset), written after each row; existing rows are kept (resume)."""

    def __init__(self, runner: Runner, name: str):
        self.runner, self.name = runner, name
        self.path = Path(runner.args.out) / f"{name}.json"
        old = json.loads(self.path.read_text()) if self.path.exists() and not runner.args.force else {}
        same = old.get("meta", {}).get("quick") == runner.args.quick
        self.rows = old.get("rows", []) if same else []
        for r in self.rows:  # rows of an earlier process keep where they ran (the meta is this process's)
            r.setdefault("run", row_run(old["meta"]))
        self.skipped, self.errors = [], []
        self.have = {(r["spec"], r["offset"]) for r in self.rows}

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.have.add((row["spec"], row["offset"]))
        self.write()

    def write(self, done: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.runner.meta(self.name) | {"complete": done and not self.errors and not self.skipped
                                                and not self.runner.out_of_time()}
        payload = {"meta": meta, "rows": self.rows, "skipped": self.skipped, "errors": self.errors}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.path)

    def fail(self, what: str, exc: Exception) -> None:
        self.errors.append({"row": what, "error": f"{type(exc).__name__}: {exc}"})
        self.runner.log(f"  ERROR {what}: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stdout)
        self.write()


def row_run(meta: dict) -> dict:
    """A row's ``run`` (where, torch, transformers) from the meta of the file that held it."""
    return {"where": meta.get("gpu") or meta.get("device"), "torch": meta.get("torch"), "transformers": meta.get("transformers")}


def excluded(runner: Runner, spec: str) -> bool:
    return any(x in spec for x in runner.args.exclude)


def hfq_available() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def run_kv(runner: Runner, name: str) -> None:
    sec = Section(runner, name)
    if name == "kv":
        todo = [(label, kv, off) for kv in KV_ROWS for label in [kv] for off in KV_HELD]
    else:
        todo = [(label, kv, off) for label, kv in KV_ABLATION for off in KV_TUNE + KV_HELD]
    if not hfq_available() or runner.args.no_hfq:
        sec.skipped = sorted({kv for _, kv, _ in todo if kv.startswith("hfq")})
        todo = [t for t in todo if not t[1].startswith("hfq")]
        if sec.skipped:
            runner.log(f"{name}: skipping {', '.join(sec.skipped)} (optimum-quanto not installed or --no-hfq)")
    if skip := sorted({kv for _, kv, off in todo if excluded(runner, kv) and (kv, off) not in sec.have}):
        sec.skipped = sorted(set(sec.skipped) | set(skip))
        todo = [t for t in todo if not excluded(runner, t[1])]
        runner.log(f"{name}: --exclude skips {', '.join(skip)}")
    todo.sort(key=lambda t: t[2])  # one offset at a time: its reference stays warm
    for i, (label, kv, off) in enumerate(todo):
        if (kv, off) in sec.have:
            continue
        if runner.out_of_time():
            runner.log(f"{name}: --budget-s reached, stopping (run again to resume)")
            break
        try:
            row = dict(runner.kv(off, kv), label=label, half="held-out" if off >= 154691 else "tuning")
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            sec.fail(f"{kv} @ {off}", exc)
            continue
        sec.add(row)
        runner.log(f"{name} {i + 1}/{len(todo)} {kv} @ {off}: ppl {row['ppl']:.3f} (ref {row['ppl_ref']:.3f}) KL {row['kl_mean']:.4f} "
                   f"top-1 {row['top1']:.3f} bits@4K {row['bits_at_4096']:.3f} ({row['seconds']:.1f} s)")
    sec.write(done=True)


def run_wa(runner: Runner, name: str, rows: list[tuple[str, str]]) -> None:
    sec = Section(runner, name)
    offsets = WA_TUNE + WA_HELD
    for other in SECTIONS:  # identical specs measured by another W/A section (an earlier process): reuse them
        path = Path(runner.args.out) / f"{other}.json"
        if other.startswith("wa") and other != name and path.exists():
            d = json.loads(path.read_text())
            if d["meta"].get("quick") == runner.args.quick:
                for r in d["rows"]:
                    runner.wa_done.setdefault((r["spec"], r["offset"]), {**r, "run": r.get("run") or row_run(d["meta"])})
    sec.skipped = [wa for _, wa in rows if excluded(runner, wa) and not all((wa, off) in sec.have for off in offsets)]
    if sec.skipped:
        runner.log(f"{name}: --exclude skips {', '.join(sec.skipped)}")
    for i, (label, wa) in enumerate(rows):
        if all((wa, off) in sec.have for off in offsets) or wa in sec.skipped:
            continue
        if runner.out_of_time():
            runner.log(f"{name}: --budget-s reached, stopping (run again to resume)")
            break
        if all((wa, off) in runner.wa_done for off in offsets):
            for off in offsets:
                if (wa, off) not in sec.have:
                    sec.add(dict(runner.wa_done[(wa, off)], label=label))
            continue
        t = time.time()
        try:
            model = runner.wa_model(wa)
            qs = time.time() - t
            info = wa_bits(model) if wa != "fp" else {"bytes": None, "bytes_fp16": None, "linear_bits": 16.0}
            if wa == "fp":
                from lowbit.wa.model import fp16_nbytes

                info["bytes"] = info["bytes_fp16"] = fp16_nbytes(model)
            for off in offsets:
                if (wa, off) not in sec.have:
                    ppl = runner.wa_ppl(model, off)
                    sec.add({"spec": wa, "label": label, "offset": off, "half": "held-out" if off >= 154691 else "tuning",
                             "ppl": ppl, "ppl_fp": ppl if wa == "fp" else runner.fp_ppl(off), **info, "quant_seconds": qs,
                             "seconds": time.time() - t, "run": runner.where})
            del model
        except Exception as exc:  # noqa: BLE001
            sec.fail(wa, exc)
            continue
        runner.wa_done.update({(wa, r["offset"]): r for r in sec.rows if r["spec"] == wa})
        ppl = {r["offset"]: r["ppl"] for r in sec.rows if r["spec"] == wa}
        runner.log(f"{name} {i + 1}/{len(rows)} {wa}: ppl " + " / ".join(f"{ppl[o]:.2f}" for o in offsets)
                   + f" @ {offsets}, {info['linear_bits']:.2f} bits/weight ({qs:.1f} s quantize, {time.time() - t:.1f} s)")
        if runner.device.startswith("cuda"):
            torch.cuda.empty_cache()
    sec.write(done=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="bundled name, local HF dir or .gguf file")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (float32, TF32 off, reference KV path)")
    ap.add_argument("--out", default="quality-runs", help="folder for the section JSON files")
    ap.add_argument("--quick", action="store_true", help="1-layer smoke run: a few tokens per row")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--text", default=None, help="evaluation text (default: bundled WikiText-2 test)")
    ap.add_argument("--force", action="store_true", help="recompute rows already in --out (default: resume)")
    ap.add_argument("--no-hfq", action="store_true", help="skip the hfq (optimum-quanto) rows")
    ap.add_argument("--budget-s", type=float, default=0, help="start no new row after this many seconds (0: no limit)")
    ap.add_argument("--exclude", action="append", default=[], metavar="SUBSTRING",
                    help="skip rows whose spec contains SUBSTRING (repeatable; recorded as skipped, the run stays incomplete)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if bad := [s for s in sections if s not in SECTIONS]:
        ap.error(f"unknown sections {bad}: allowed are {', '.join(SECTIONS)}")
    if args.threads or (args.quick and args.device == "cpu"):  # tiny ops: extra threads only contend on a shared CPU
        torch.set_num_threads(args.threads or 1)
    runner = Runner(args)
    rows = wa_rows()
    for name in sections:
        runner.log(f"== {name}")
        if name.startswith("kv"):
            run_kv(runner, name)
        else:
            run_wa(runner, name, rows[name])
    runner.log(f"done: {', '.join(sections)} in {Path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lowbit eval``, ``compare``, ``quantize`` and ``generate``: option parsing and reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import QUIET_HELP, _calibration, _fail, _load, _quiet, _steps, _tokens, _validated, console

# `lowbit compare` (what `make demo` runs) is sized for a first run on a 2-core CPU (≈3 min); --full is the README table
DEMO_KV = ["fp16", "kivi:bits=4", "kivi:bits=2", "2bit"]
DEMO_WA = ["w8a8", "w4a4", "fmpq:w=4,a=4"]
DEMO_WA_TOKENS = 1024
DEFAULT_COMPARE = ["fp16", "kivi:bits=4", "4bit", "kivi:bits=2", "kivi:bits=2,sinks=4", "2bit"]
DEFAULT_LUT = ["silu:segments=16"]
IMPROVED = "gptq=true,rotate=hadamard,sym=false,clip=true"  # docs/QUALITY.md
DEFAULT_WA = ["w8a8", "w4a16", "w4a4", "fmpq:w=4,a=4", "fmpq:w=4,a=8", f"w4a16:{IMPROVED}", f"fmpq:w=4,a=8,{IMPROVED}",
              f"fmpq:w=4,a=4,{IMPROVED},block=32,aclip=0.9,int8_frac=0.5"]
DEFAULT_WA_KV = ["fmpq:w=4,a=4|kivi:bits=4"]
DEFAULT_BUDGET_METHODS = "streaming,h2o,kvmerger,kvmerger+kivi:bits=4"


def _run_variants(model, ids, variants, prefill: int, tokens: int, calib=None):
    """Reference once, then each variant through the streaming protocol; returns EvalResults."""
    from lowbit.eval import evaluate_kv, reference_run
    from lowbit.eval.variants import Variant, prepared

    results = []
    with _steps(len(variants) + 1) as steps:
        with steps.step("reference (uncompressed)", tokens - 1) as advance:
            ref = reference_run(model, ids, prefill, tokens, progress=advance)
        for variant in variants:
            same = variant == Variant()  # plain fp16 on the unmodified model: the reference run is that row
            try:
                with steps.step(variant.label + (" (= reference)" if same else ""), 0 if same else tokens - 1) as advance, \
                        prepared(model, variant, calib) as work:
                    result = evaluate_kv(work, ids, variant.kv, prefill, tokens, reference=ref, progress=advance, reuse_reference=same)
            except ValueError as exc:  # e.g. a LUT function the model does not use
                _fail(f"{variant.label}: {exc}")
            result.method = variant.label
            results.append(result)
    return results


def eval_cmd(
    model: str = typer.Option("smollm2", help="bundled name, local HF dir, .gguf file or hub id"),
    kv: str = typer.Option("fp16", help="KV method spec, e.g. kivi:bits=2,group=32,residual=128"),
    lut: Optional[str] = typer.Option(None, help="activation LUT spec, e.g. silu:segments=8"),
    wa: Optional[str] = typer.Option(None, help="weight/activation spec, e.g. fmpq:w=4,a=4 (COMET W4A4KV4 with --kv kivi:bits=4)"),
    text: Optional[Path] = typer.Option(None, help="UTF-8 text file (default: bundled WikiText-2 test)"),
    prefill: int = typer.Option(512, help="tokens processed in one forward into the cache"),
    tokens: int = typer.Option(256, help="tokens then fed one at a time and scored"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result as JSON here"),
    task: Optional[str] = typer.Option(None, help="long-context task instead of perplexity: passkey or kv-retrieval"),
    length: int = typer.Option(2048, help="task prompt length in tokens (up to the model's context)"),
    samples: int = typer.Option(10, help="task samples (seeded)"),
    depth: float = typer.Option(0.5, help="task: where the needle sits in the filler (0..1)"),
    seed: int = typer.Option(0, help="task: seed of the first sample"),
    compress: str = typer.Option("prompt", help="task: compress the whole 'prompt', or only the 'context' (question appended after, outside the budget)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    device: str = typer.Option("auto", help="auto (CUDA in bfloat16 with the Triton kernels when present, else CPU) | cpu | cuda: float32, TF32 off, PyTorch reference KV path (GPU figures match CPU ones)"),
):
    """Streaming perplexity / KL / top-1 of one method against the uncompressed model (or a --task)."""
    _quiet(quiet)
    from lowbit.eval.report import results_table, write_json
    from lowbit.eval.variants import Variant

    (variant,) = _validated([Variant(kv=kv, lut=lut, wa=wa)])
    if task is not None:
        if lut or wa:
            _fail("--task evaluates a KV method: combine it with --kv only")
        return _run_task(model, kv, task, length, samples, depth, seed, json_out, compress, device)
    m, tok = _load(model, device)
    ids = _tokens(tok, text, prefill + tokens)
    (result,) = _run_variants(m, ids, [variant], prefill, tokens, _calibration(tok, text) if wa else None)
    console.print(results_table([result], title=f"{model}: prefill {prefill}, {tokens} streamed tokens"))
    if json_out:
        write_json([result], json_out, {"model": model, "prefill": prefill, "tokens": tokens}, flat=result)
        console.print(f"wrote {json_out}")


def _run_task(model, kv, task, length, samples, depth, seed, json_out, compress="prompt", device="auto"):
    from rich.table import Table

    from lowbit.eval.tasks import TASKS, run_task

    if task not in TASKS:
        _fail(f"unknown task '{task}': allowed tasks are {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        _fail(f"--depth {depth} must be within 0..1")
    m, tok = _load(model, device)
    if length < 64 or length > m.config.max_position_embeddings:
        _fail(f"--length {length} must be within 64..{m.config.max_position_embeddings} (the model's context)")
    with _steps(1, "samples") as steps:
        try:
            with steps.step(f"{task} · {kv}", samples) as advance:
                result = run_task(m, tok, task, length, samples, kv, depth=depth, seed=seed, progress=advance, compress=compress)
        except ValueError as exc:
            _fail(str(exc))
    table = Table(title=f"{model} · {task} · {length} tokens · depth {depth}")
    for col in ("method", "accuracy", "correct", "KV bytes", "ratio"):
        table.add_column(col, justify="left" if col == "method" else "right")
    table.add_row(kv, f"{result.accuracy:.3f}", f"{result.correct}/{result.n}", f"{result.kv_bytes / 2**20:.2f} MiB", f"{result.compression:.2f}×")
    console.print(table)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2, default=str))
        console.print(f"wrote {json_out}")


def compare(
    model: str = typer.Option("smollm2", help="bundled name, local HF dir, .gguf file or hub id"),
    kv: Optional[list[str]] = typer.Option(None, help=f"KV methods to compare (repeat the option; default {', '.join(DEMO_KV)}; --full: {len(DEFAULT_COMPARE)} methods)"),
    lut: Optional[list[str]] = typer.Option(None, help=f"LUT rows (uncompressed KV, activation swapped); repeatable (default {DEFAULT_LUT[0]})"),
    wa: Optional[list[str]] = typer.Option(None, help=f"W/A rows, full-sequence perplexity; repeatable ('' for none; default {', '.join(DEMO_WA)}; --full: {len(DEFAULT_WA)} quantizers)"),
    wa_kv: Optional[list[str]] = typer.Option(None, help=f"'WA_SPEC|KV_SPEC' rows through the streaming protocol (default {DEFAULT_WA_KV[0]})"),
    wa_tokens: Optional[int] = typer.Option(None, help=f"tokens scored (windows of 1024) in the W/A section (default {DEMO_WA_TOKENS}; --full: 2048)"),
    full: bool = typer.Option(False, "--full", help="the full README table: every KV method, GPTQ/rotation W/A rows, 2048 W/A tokens (≈9 min on 2 CPU cores)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    budgets: Optional[str] = typer.Option(None, help="budget section: comma-separated budgets, e.g. 0.5,0.35"),
    budget_methods: str = typer.Option(DEFAULT_BUDGET_METHODS, help="budget section: comma-separated KV methods"),
    task: Optional[str] = typer.Option(None, help="budget section: also a retrieval task (passkey or kv-retrieval)"),
    task_length: int = typer.Option(512, help="budget section: task prompt length"),
    task_samples: int = typer.Option(8, help="budget section: task samples"),
    compress: str = typer.Option("prompt", help="budget section task: compress the 'prompt' or only the 'context'"),
    peers: Optional[str] = typer.Option(None, help="budget section task: also run a peer library's methods ('kvpress')"),
    presses: str = typer.Option("tova,observed,snapkv,streaming", help="--peers kvpress: which presses"),
    text: Optional[Path] = typer.Option(None, help="UTF-8 text file (default: bundled WikiText-2 test)"),
    prefill: int = typer.Option(512),
    tokens: int = typer.Option(256),
    offset: int = typer.Option(0, help="skip this many tokens of the text first (e.g. 160000: WikiText-2's held-out second half)"),
    out: Path = typer.Option(Path("lowbit-report"), help="folder for compare.json and compare.png"),
    device: str = typer.Option("auto", help="auto (CUDA in bfloat16 with the Triton kernels when present, else CPU) | cpu | cuda: float32, TF32 off, PyTorch reference KV path (GPU figures match CPU ones)"),
):
    """The main job: evaluate several methods on one model and text; table, JSON and plot.

    With --budgets, a budget section adds each budget method at each budget (streaming protocol, prompt
    compressed after prefill), optionally a retrieval task for fp16 and each of them, and
    compare-budget.png (quality vs budget).
    """
    from lowbit.eval import DEFAULT_TEXT
    from lowbit.eval.report import plot_quality_vs_bytes, results_table, write_json
    from lowbit.eval.variants import Variant

    _quiet(quiet)
    kv = list(kv or (DEFAULT_COMPARE if full else DEMO_KV))
    lut = list(lut or DEFAULT_LUT)
    wa = [w for w in (wa or (DEFAULT_WA if full else DEMO_WA)) if w]
    wa_kv = list(wa_kv or DEFAULT_WA_KV)
    wa_tokens = wa_tokens or (2048 if full else DEMO_WA_TOKENS)
    pairs = []
    for item in (x for x in wa_kv if x):
        w, sep, k = item.partition("|")
        if not sep:
            _fail(f"--wa-kv '{item}' must be 'WA_SPEC|KV_SPEC', e.g. 'fmpq:w=4,a=4|kivi:bits=4'")
        pairs.append(Variant(kv=k.strip(), wa=w.strip()))
    budget_rows = _budget_specs(budgets, budget_methods) if budgets else []
    if compress not in ("prompt", "context"):
        _fail(f"--compress {compress}: allowed protocols are prompt, context")
    peer_rows = _peer_rows(peers, presses, task, budgets) if peers else None
    kv = list(kv) + [spec for _, _, spec in budget_rows if spec not in kv]
    variants = _validated([Variant(kv=k) for k in kv] + [Variant(lut=spec) for spec in lut if spec] + pairs)
    _validated([Variant(wa=w) for w in wa])
    m, tok = _load(model, device)
    ids = _tokens(tok, text, offset + prefill + tokens)[:, offset:]
    calib = _calibration(tok, text) if (wa or pairs) else None
    results = _run_variants(m, ids, variants, prefill, tokens, calib)
    at = f" at token {offset}" if offset else ""
    title = f"{model} · {Path(text or DEFAULT_TEXT).name}{at} · prefill {prefill}, {tokens} streamed tokens"
    console.print(results_table(results, title=title))
    meta = {"model": model, "text": str(text or DEFAULT_TEXT), "offset": offset, "prefill": prefill, "tokens": tokens}
    wa_results = _wa_section(m, tok, text, wa, wa_tokens, calib, offset) if wa else []
    json_path = write_json(results, out / "compare.json", {**meta, "wa_tokens": wa_tokens, "wa": wa_results})
    kv_rows = [r for r, v in zip(results, variants) if v.kv != "fp16" or not (v.lut or v.wa)]
    plot_path = plot_quality_vs_bytes(kv_rows, out / "compare.png", title)
    if budget_rows:
        by_kv = {r.method: r for r in results}
        rows = _budget_section(m, tok, budget_rows, by_kv, task, task_length, task_samples, compress, peer_rows)
        data = json.loads(json_path.read_text())
        data["meta"]["budget_section"] = rows
        json_path.write_text(json.dumps(data, indent=2))
        from lowbit.eval.tasks import plot_quality_vs_budget

        console.print(f"wrote {plot_quality_vs_budget(rows, out / 'compare-budget.png')}")
    console.print(f"wrote {json_path} (JSON) and {plot_path} (plot)" + ("" if full else "; the full table: lowbit compare --full"))


def _budget_specs(budgets: str, methods: str) -> list[tuple[str, float, str]]:
    """(method label, budget, kv spec) rows; a method may carry a composition, e.g. kvmerger+kivi:bits=4."""
    try:
        values = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        _fail(f"--budgets '{budgets}' must be comma-separated fractions, e.g. 0.5,0.35")
    rows = []
    for method in (x.strip() for x in methods.split(",") if x.strip()):
        head, plus, rest = method.partition("+")
        for b in values:
            rows.append((method, b, f"{head}:budget={b}" + (f"+{rest}" if plus else "")))
    return rows


def _peer_rows(peers: str, presses: str, task, budgets: str):
    """Validate --peers/--presses; returns (press names, budgets) for the budget section."""
    from lowbit.eval.tasks.peers import PRESSES, kvpress_available

    if peers != "kvpress":
        _fail(f"--peers '{peers}': the only peer library is kvpress")
    if task is None or budgets is None:
        _fail("--peers compares retrieval accuracy: add --budgets and --task passkey (or kv-retrieval)")
    names = [p.strip() for p in presses.split(",") if p.strip()]
    if bad := [p for p in names if p not in PRESSES]:
        _fail(f"--presses {','.join(bad)}: allowed are {', '.join(PRESSES)}")
    if not kvpress_available():
        _fail("kvpress is not installed: pip install --no-deps kvpress==0.5.5 && pip install -e '.[kvpress]'")
    return names, [float(b) for b in budgets.split(",") if b.strip()]


def _budget_section(model, tok, budget_rows, by_kv, task, length, samples, compress="prompt", peers=None) -> list[dict]:
    """Rows for compare-budget.png / JSON: ppl and KL from the streaming results, plus task accuracy."""
    from rich.table import Table

    from lowbit.eval.tasks import TASKS, run_task

    if task is not None and task not in TASKS:
        _fail(f"unknown task '{task}': allowed tasks are {', '.join(TASKS)}")
    rows = [{"method": "fp16", "budget": 1.0, "kv": "fp16", "ppl": by_kv["fp16"].ppl, "kl_mean": 0.0}] if "fp16" in by_kv else []
    rows += [{"method": m, "budget": b, "kv": spec, "ppl": by_kv[spec].ppl, "kl_mean": by_kv[spec].kl_mean} for m, b, spec in budget_rows]
    if task is not None:
        if not rows or rows[0]["kv"] != "fp16":
            rows.insert(0, {"method": "fp16", "budget": 1.0, "kv": "fp16"})
        with _steps(len(rows) + bool(peers), "samples") as steps:
            for row in rows:
                try:
                    with steps.step(f"{task} · {row['kv']}", samples) as advance:
                        result = run_task(model, tok, task, length, samples, row["kv"], progress=advance, compress=compress)
                except ValueError as exc:
                    _fail(str(exc))
                row["accuracy"] = result.accuracy
            if peers:
                from lowbit.eval.tasks.peers import press_rows

                with steps.step(f"{task} · kvpress", samples * len(peers[0]) * len(peers[1])) as advance:
                    rows += press_rows(model, tok, task, length, samples, peers[1], peers[0], compress, advance)
    table = Table(title="KV budget section" + (f" · {task} at {length} tokens, {samples} samples, compress {compress}" if task else ""))
    for col in ("method", "budget", "ppl", "KL(ref‖m)") + (("accuracy",) if task else ()):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        cells = [r["method"], f"{r['budget']:.2f}", f"{r.get('ppl', float('nan')):.3f}", f"{r.get('kl_mean', float('nan')):.4f}"]
        table.add_row(*cells, *([f"{r['accuracy']:.3f}"] if task else []))
    console.print(table)
    return rows


def _wa_section(model, tok, text, specs, n_tokens, calib, offset: int = 0) -> list[dict]:
    """Full-sequence perplexity and weight bytes for each W/A spec, beside the unquantized model."""
    from rich.table import Table

    from lowbit.eval.wa import wa_rows

    ids = _tokens(tok, text, offset + n_tokens)[0, offset:]
    labels = ["fp16"] + [f"wa={s}" for s in specs]
    with _steps(len(labels), "quantizer") as steps:
        steps.begin(labels[0], 1)

        def done() -> None:  # wa_rows calls this after each spec: close its step, open the next
            steps.advance()
            if steps.index < len(labels):
                steps.begin(labels[steps.index], 1)

        rows = wa_rows(model, ["fp"] + list(specs), ids, calib, window=1024, progress=done)
    table = Table(title=f"weights/activations · full-sequence perplexity on {n_tokens} tokens (windows of 1024)")
    for col in ("method", "ppl", "Δppl %", "model bytes", "vs fp16"):
        table.add_column(col, justify="left" if col == "method" else "right")
    base = rows[0]
    for r in rows:
        table.add_row(
            "fp16" if r["spec"] == "fp" else r["spec"], f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / base['ppl'] - 1):+.1f}",
            f"{r['bytes'] / 2**20:.1f} MiB", f"{r['bytes'] / base['bytes']:.2f}×",
        )
    console.print(table)
    return rows


def quantize(
    model: str = typer.Option("smollm2", help="bundled name, local HF dir, .gguf file or hub id"),
    wa: str = typer.Option("fmpq:w=4,a=4", help="weight/activation spec"),
    out: Path = typer.Option(..., help="output folder (safetensors + JSON config)"),
    text: Optional[Path] = typer.Option(None, help="calibration text (default: bundled WikiText-2, second half)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Quantize a model's linear layers and save the packed result."""
    _quiet(quiet)
    from lowbit.eval.variants import Variant
    from lowbit.wa import model_nbytes, quantize_model, save_quantized

    _validated([Variant(wa=wa)])
    m, tok = _load(model)
    calib = _calibration(tok, text)
    with _steps(2, "step") as steps:
        with steps.step(f"quantize {wa}", 1) as advance:
            quantize_model(m, wa, calib=calib)
            advance()
        with steps.step(f"save {out}", 1) as advance:
            path = save_quantized(m, out)
            advance()
    console.print(f"wrote {path} ({model_nbytes(m) / 2**20:.1f} MiB of weights)")


def generate(
    prompt: str = typer.Argument(..., help="the prompt (chat template applied for instruct models)"),
    model: str = typer.Option("smollm2"),
    kv: str = typer.Option("fp16", help="KV method spec"),
    max_new_tokens: int = typer.Option(64, min=1),
    chat: bool = typer.Option(True, help="apply the tokenizer's chat template when it has one"),
):
    """Stream generated text with a (compressed) KV cache; greedy decoding."""
    from lowbit.eval.variants import Variant
    from lowbit.generation import generate_text

    _validated([Variant(kv=kv)])
    m, tok = _load(model)
    for piece in generate_text(m, tok, prompt, kv=kv, max_new_tokens=max_new_tokens, chat=chat, stream=True):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")

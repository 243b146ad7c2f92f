"""`lowbit bench engine`: the paged engine on a GPU, random-weight Llama-3-8B shape.

Two measurements, methods interleaved in one process:

* **workload** -- ``requests`` requests (random prompts of ``prompt`` tokens, ``output`` tokens each) all queued at
  once under one KV budget, per method (``fp16``, ``kivi4``, ``kivi2``): output tok/s (all output tokens over the
  wall time from the first request to the last token), TTFT and TPOT p50/p99, peak concurrent sequences, and
  ``vs_fp16_x``;
* **decode** -- the time of one decode step (CUDA-graph replay, greedy sampling included) at a fixed batch and
  context, per method, against HF transformers bf16 with a static cache, compiled with
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) -- the strongest plain baseline a user has -- and the
  engine's eager step (launches included), and the engine's whole step (``engine_step_ms``: scheduling, sampling,
  the host read-back; ``host_overhead_pct`` is its time beyond the graph replay). Repeats alternate between
  methods; medians reported.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Optional

from lowbit.bench.e2e import llama_config
from lowbit.kv.hf import cache_kwargs
from lowbit.bench.timing import Points, env_info, per_call_ms, write_json

WORKLOAD_COLUMNS = ["method", "requests", "prompt", "output", "kv_budget_gb", "output_tok_s", "vs_fp16_x", "ttft_p50_s",
                    "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "peak_concurrent", "peak_decode_tok_s",
                    "peak_vs_fp16_x", "prefill_pct"]
DECODE_COLUMNS = ["method", "batch", "context", "layers", "step_ms", "tokens_per_s", "vs_hf_static_x", "eager_step_ms",
                  "engine_step_ms", "host_overhead_pct"]


def random_model(layers: int):
    """A random-weight Llama-3-8B-shaped model in bf16 on the GPU (initialised there, quickly)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = llama_config(layers)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.eval()


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def decode_rates(history) -> dict:
    """Tokens/s of the steps that only decoded (no prefill in them), over all of them and over those at the peak
    batch (the pool at its fullest: what the budget buys once the queue keeps it full, without the first and last
    waves' partial batches)."""
    decode = [s for s in history if not s.prefilled and s.batch]
    peak = max((s.batch for s in decode), default=0)
    at_peak = [s for s in decode if s.batch == peak]

    def rate(steps):
        t = sum(s.step_s for s in steps)
        return round(sum(s.batch for s in steps) / t, 1) if t > 0 else None

    return {"decode_tok_s": rate(decode), "peak_decode_tok_s": rate(at_peak), "peak_decode_steps": len(at_peak)}


def time_split(history) -> dict:
    """Where the steps' time went: admitting and prefilling (``StepStats.admit_s``) against decoding, summed over
    the run, and the prefill share in percent."""
    admit = sum(s.admit_s for s in history)
    total = sum(s.step_s for s in history)
    return {"prefill_s": round(admit, 3), "decode_s": round(total - admit, 3),
            "prefill_pct": round(100 * admit / total, 1) if total > 0 else None}


def workload(model, method: str, requests: int, prompt: int, output: int, budget_gb: float, max_batch: int, seed=0,
             prefill_chunk: int | None = None) -> dict:
    """Run the workload once through a fresh engine (graphs captured before the clock starts)."""
    import torch

    from lowbit.engine import PagedEngine

    engine = PagedEngine(model, kv=method, kv_budget_mb=budget_gb * 1024, max_batch=max_batch,
                         max_tokens=prompt + output, prefill_chunk=prefill_chunk)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.config.vocab_size, (prompt,), generator=g).tolist() for _ in range(requests)]
    _sync()
    t0 = time.perf_counter()
    reqs = [engine.add(p, output) for p in prompts]
    engine.run()
    _sync()
    wall = time.perf_counter() - t0
    ttft = [r.t_first - r.t_arrive for r in reqs]
    tpot = [(r.t_done - r.t_first) / max(len(r.output) - 1, 1) * 1e3 for r in reqs]
    row = {"method": method, "requests": requests, "prompt": prompt, "output": output, "kv_budget_gb": budget_gb,
           "output_tok_s": round(requests * output / wall, 1), "wall_s": round(wall, 2),
           "ttft_p50_s": round(_pct(ttft, 50), 3), "ttft_p99_s": round(_pct(ttft, 99), 3),
           "tpot_p50_ms": round(_pct(tpot, 50), 2), "tpot_p99_ms": round(_pct(tpot, 99), 2),
           "peak_concurrent": max(s.batch for s in engine.history), "pool_blocks": engine.store.blocks - 1,
           "steps": len(engine.history), "prefill_chunk": prefill_chunk, **decode_rates(engine.history),
           **time_split(engine.history)}
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def engine_decoder(model, method: str, batch: int, context: int, steps: int):
    """An engine whose rows 0..batch-1 hold `context` tokens (storage left as allocated: timing only), a function
    that runs one decode step (graph replay + greedy sampling), its eager twin, and the engine's whole step
    (:meth:`PagedEngine.step` over `batch` running greedy requests: scheduling, position copy, graph replay,
    sampling, the host read-back and the per-request bookkeeping; positions reset each call)."""
    from lowbit.engine import PagedEngine, make_store
    from lowbit.engine.core import EngineRequest

    cfg = model.config
    tokens = context + steps + 8
    probe = make_store(method, layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                       rows=1, max_tokens=tokens, budget_bytes=1 << 40, dtype=model.dtype, device="meta")
    need = (probe.pages_for(tokens) * batch + 2) * probe.block_bytes() + batch * probe.row_bytes()
    engine = PagedEngine(model, kv=method, kv_budget_mb=need / 2**20, max_batch=batch, max_tokens=tokens)
    for row in range(batch):
        engine.store.reserve(row, tokens)
    engine.graphs.pos[:batch] = context
    engine.graphs.tokens[:batch] = 1

    def graph_step():
        engine.graphs.step(batch).argmax(-1)

    def eager_step():
        engine.runner.decode(engine.graphs.tokens[:batch], engine.graphs.pos[:batch]).argmax(-1)

    for row in range(batch):  # running greedy requests that never finish (no eos, no length limit in reach)
        engine.running.append(EngineRequest([1] * context, 1 << 62, id=row, row=row))

    def engine_step():
        engine.pos_host[:batch] = context
        engine.step()

    return engine, graph_step, eager_step, engine_step


def hf_static_decoder(model, batch: int, context: int):
    """HF bf16 with a StaticCache of context + 64 tokens, `torch.compile(mode="reduce-overhead")` on the
    forward; returns one decode step at position `context` (the cache content is random)."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + 64)
    ids = torch.ones(batch, 1, dtype=torch.long, device="cuda")
    # fill: one prefill chunk of random keys/values is too slow at 8B; write the cache tensors directly
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    pos = torch.tensor([context], device="cuda")
    posid = torch.full((batch, 1), context, device="cuda")

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # the static cache is updated in place between replays
        with torch.inference_mode():
            out = forward(input_ids=ids, **cache_kwargs(model, cache), cache_position=pos, position_ids=posid, use_cache=True)
        return out.logits[:, -1].argmax(-1)

    with torch.inference_mode():  # allocate the cache's layers with an eager call (outside the graphs), fill them
        model(input_ids=ids, **cache_kwargs(model, cache), cache_position=pos, position_ids=posid, use_cache=True)
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                if t is not None:
                    t.normal_()
    return step


def run_engine_bench(methods: list[str], layers: int = 32, requests: int = 64, prompt: int = 8192, output: int = 256,
                     budget_gb: float = 16.0, max_batch: int = 128, decode_batch: int = 64, decode_context: int = 8192,
                     decode_layers: int | None = None, steps: int = 30, repeats: int = 3, baseline: bool = True,
                     json_out: Optional[Path] = None, log=print, points=None, prefill_chunk: int | None = None) -> dict:
    import torch

    env = env_info()
    payload = {"env": env, "rows": [], "decode": []}
    model = random_model(layers)
    points = points or Points()
    points.start(len(methods) * (bool(requests) + 1 + repeats) + (1 + repeats) * baseline)  # workload, warm-up, repeats
    for m in methods if requests else ():  # workload: one run each (repeats would cost minutes); 0 requests: skip
        row = workload(model, m, requests, prompt, output, budget_gb, max_batch, prefill_chunk=prefill_chunk)
        payload["rows"].append(row)
        log(f"workload {row}")
        write_json(json_out, payload)
        points.advance()
    fp16 = next((r for r in payload["rows"] if r["method"] == "fp16"), None)
    for r in payload["rows"]:
        r["vs_fp16_x"] = round(r["output_tok_s"] / fp16["output_tok_s"], 2) if fp16 else None
        peak, base = r.get("peak_decode_tok_s"), fp16 and fp16.get("peak_decode_tok_s")
        r["peak_vs_fp16_x"] = round(peak / base, 2) if peak and base else None
    if decode_layers and decode_layers != layers:
        del model
        gc.collect()
        torch.cuda.empty_cache()
        model = random_model(decode_layers)
    dl = decode_layers or layers
    runs = {}
    for m in methods:
        engine, graph_step, eager_step, engine_step = engine_decoder(model, m, decode_batch, decode_context, steps)
        runs[m] = (engine, graph_step, eager_step, engine_step)
        graph_step(), eager_step(), engine_step()
        points.advance()
    hf = None
    if baseline:
        try:
            hf = hf_static_decoder(model, decode_batch, decode_context)
            for _ in range(3):
                hf()
            points.advance()
        except Exception as exc:  # noqa: BLE001 - report, keep the engine rows
            log(f"HF static+compile baseline failed: {type(exc).__name__}: {exc}")
            payload["baseline_error"] = f"{type(exc).__name__}: {exc}"
            hf = None
    samples = {m: ([], [], []) for m in methods}
    hf_ms = []
    for _ in range(repeats):
        for m in methods:
            samples[m][0].append(per_call_ms(runs[m][1], steps))
            samples[m][1].append(per_call_ms(runs[m][2], max(steps // 3, 3)))
            samples[m][2].append(per_call_ms(runs[m][3], steps))
            points.advance()
        if hf is not None:
            hf_ms.append(per_call_ms(hf, steps))
            points.advance()
    hf_step = statistics.median(hf_ms) if hf_ms else None
    if hf_step:
        payload["decode"].append({"method": "hf_static_compiled_bf16", "batch": decode_batch, "context": decode_context,
                                  "layers": dl, "step_ms": round(hf_step, 3),
                                  "tokens_per_s": round(decode_batch / hf_step * 1e3, 1), "vs_hf_static_x": 1.0,
                                  "eager_step_ms": None, "engine_step_ms": None, "host_overhead_pct": None})
    for m in methods:
        g_ms, e_ms, s_ms = (statistics.median(x) for x in samples[m])
        payload["decode"].append({"method": m, "batch": decode_batch, "context": decode_context, "layers": dl,
                                  "step_ms": round(g_ms, 3), "tokens_per_s": round(decode_batch / g_ms * 1e3, 1),
                                  "vs_hf_static_x": round(hf_step / g_ms, 2) if hf_step else None,
                                  "eager_step_ms": round(e_ms, 3), "engine_step_ms": round(s_ms, 3),
                                  # the engine step's time beyond the graph replay + argmax: host-side work not hidden
                                  "host_overhead_pct": round(100 * max(s_ms - g_ms, 0.0) / s_ms, 1)})
    write_json(json_out, payload)
    return payload

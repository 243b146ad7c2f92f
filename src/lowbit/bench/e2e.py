"""Decode tokens/s of a randomly initialised Llama-3-8B-shaped model (optionally fewer layers): HF bf16 with its
preallocated ``StaticCache`` (the strongest plain baseline; not ``DynamicCache``, which re-concatenates every step)
vs lowbit KIVI-2/4 through the kernels (and W4A8 / FMPQ-W4A4 linears). Every method is warmed the same way (one
full untimed point) and the timed repeats are interleaved across methods; each row is a median.
Triton and CUDA are imported lazily."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Optional

from lowbit.bench.attention import random_kivi_parts
from lowbit.kv.hf import cache_kwargs
from lowbit.bench.timing import Points, HEAD_DIM, HKV, HQ, env_info, write_json

TABLE_COLUMNS = ["method", "batch", "context", "layers", "tokens_per_s", "peak_GB"]
WA_SPECS = {"w4a8kv4": "fmpq:w=4,a=8", "fmpq4kv4": "fmpq:w=4,a=4,int8_frac=0.1"}


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=HEAD_DIM, max_position_embeddings=131072,
        rope_theta=500000.0, torch_dtype="bfloat16",
    )


def fill_static(model, cache, b: int):
    """Allocate a StaticCache's layers (one token at position 0) and fill them with random states."""
    import torch

    tok = torch.zeros(b, 1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        model(tok, **cache_kwargs(model, cache), use_cache=True, cache_position=torch.tensor([0], device="cuda"))
        for layer in cache.layers:
            for x in (layer.keys, layer.values):
                x.normal_()


def fill_dynamic(cache, cfg, b: int, t: int):
    import torch

    for i in range(cfg.num_hidden_layers):
        k = torch.randn(b, HKV, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, HKV, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        cache.update(k, v, i)


def fill_kivi(cache, b: int, t: int, steps: int):
    """Set every FusedKiviLayer to a random decoded state of `t` tokens, with room for `steps` more."""
    import torch

    for layer in cache.layers:
        parts = random_kivi_parts(b, t, layer.bits, layer.group, layer.residual)
        k0 = torch.zeros(b, HKV, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        layer.lazy_initialization(k0, k0)
        for name in ("qk_packed", "qk_scale", "qk_zero", "qv_packed", "qv_scale", "qv_zero", "res_k", "res_v"):
            setattr(layer, name, getattr(parts, name))
        layer.n_qk, layer.n_qv = parts.n_qk, parts.n_qv
        layer.reserve(t + steps + layer.residual)
        del parts


def decode_tps(model, cache, b: int, t: int, steps: int, static: bool = False) -> float:
    """Decode tokens/s over `steps` steps after 2 warm-up steps (a static cache also gets ``cache_position``)."""
    import torch

    tok = torch.randint(0, 1000, (b, 1), device="cuda")

    def extra(pos):
        return {"cache_position": torch.tensor([pos], device="cuda")} if static else {}

    with torch.no_grad():
        for i in range(2):  # warm-up (compiles kernels)
            model(tok, **cache_kwargs(model, cache), use_cache=True, position_ids=torch.full((b, 1), t + i, device="cuda"),
                  **extra(t + i))
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            model(tok, **cache_kwargs(model, cache), use_cache=True, position_ids=torch.full((b, 1), t + 2 + i, device="cuda"),
                  logits_to_keep=1, **extra(t + 2 + i))
        end.record()
        torch.cuda.synchronize()
    return b * steps / (start.elapsed_time(end) * 1e-3)


def per_seq_bytes(kind: str, layers: int, context: int) -> float:
    """Estimated KV bytes of one sequence of `context` tokens for `kind` (bf16 or a KIVI-`bits` kind)."""
    if kind.startswith("bf16"):
        return layers * 2 * HKV * HEAD_DIM * 2 * context
    nb = int(kind[-1])
    per_tok = layers * HKV * (2 * HEAD_DIM * nb / 8 + 2 * 2 * HEAD_DIM / 32 + 2 * 2 * HEAD_DIM / 32)
    return per_tok * context + layers * 2 * HKV * HEAD_DIM * 2 * 2 * 128


class DecodeBench:
    """The random bf16 model, its W4Ax copies (built on demand, one at a time), and one timed decode per point."""

    def __init__(self, layers: int, context: int, steps: int):
        import torch
        from transformers import LlamaForCausalLM

        self.layers, self.context, self.steps = layers, context, steps
        self.cfg = llama_config(layers)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            self.model = LlamaForCausalLM(self.cfg).eval()
        torch.set_default_dtype(torch.float32)
        self.model.config._attn_implementation = "sdpa"
        self.weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.wa_models: dict = {}

    def model_for(self, kind: str):
        """The bf16 model, or (built once, the previous one freed) a copy with QuantLinear layers (int mode:
        the Triton activation quantizer + W4A8 GEMM on CUDA). Channel statistics are random, as the weights are."""
        if kind not in WA_SPECS:
            return self.model
        if kind not in self.wa_models:
            import copy

            import torch

            from lowbit.wa.fuse import fuse_projections, sibling_stats
            from lowbit.wa.model import quantize_model, select_linears

            self.wa_models.clear()
            gc.collect()
            torch.cuda.empty_cache()
            qm = copy.deepcopy(self.model)
            names = select_linears(qm)
            stats = sibling_stats(names, lambda n: torch.rand(qm.get_submodule(n).in_features, device="cuda") + 0.1)
            quantize_model(qm, WA_SPECS[kind], mode="int", stats=stats)
            fuse_projections(qm)  # q/k/v and gate/up: one W4Ax GEMM each, as served
            self.wa_models[kind] = qm
        return self.wa_models[kind]

    def run(self, kind: str, b: int) -> tuple[float, float]:
        """(tokens/s, peak GB) of `kind` at batch `b`."""
        import torch
        from transformers import DynamicCache, StaticCache

        from lowbit.kv import FusedKiviCache, use_lowbit_attention

        gc.collect()
        torch.cuda.empty_cache()
        m = self.model_for(kind)
        static = kind == "bf16"
        if static:  # the strongest plain baseline: HF's preallocated static cache (not a re-concatenating one)
            self.model.config._attn_implementation = "sdpa"
            cache = StaticCache(config=self.model.config, max_cache_len=self.context + self.steps + 8)
            fill_static(self.model, cache, b)
        elif kind == "bf16-dynamic":  # HF's default cache, for reference (it concatenates every step)
            self.model.config._attn_implementation = "sdpa"
            cache = DynamicCache(config=self.model.config)
            fill_dynamic(cache, self.cfg, b, self.context)
        else:
            use_lowbit_attention(m)
            cache = FusedKiviCache(m.config, bits=int(kind[-1]))
            fill_kivi(cache, b, self.context, self.steps + 4)
        tps = decode_tps(m, cache, b, self.context, self.steps, static=static)
        peak = torch.cuda.max_memory_allocated() / 1e9
        del cache
        return tps, peak


def _record(bench: DecodeBench, kind: str, b: int, batch: int, rows: list, env: dict, json_out, log) -> bool:
    """Run one point into `rows`; False (and stop) on anything but a clean out-of-memory."""
    import torch

    common = {"method": kind, "batch": b, "context": bench.context, "layers": bench.layers}
    try:
        torch.cuda.reset_peak_memory_stats()
        tps, peak = bench.run(kind, b)
    except torch.cuda.OutOfMemoryError:
        log(f"{kind} B={b}: out of memory")
        gc.collect()
        torch.cuda.empty_cache()
        return True
    except Exception as exc:  # a CUDA error poisons the context: report and stop measuring
        log(f"{kind} B={b}: FAILED {repr(exc)[:300]}")
        rows.append({**common, "error": repr(exc)[:300]})
        return False
    rows.append({**common, "tokens_per_s": tps, "peak_GB": peak, "max_batch_row": b != batch})
    log(f"{kind:10s} B={b:4d} T={bench.context}: {tps:9.1f} tok/s  peak {peak:.1f} GB")
    write_json(json_out, {"env": env, "rows": rows, "partial": True})
    return True


def _medians(rows: list) -> list:
    """One row per (method, batch): the median tokens/s of its repeats (with the repeat count and spread)."""
    import statistics

    out, seen = [], {}
    for r in rows:
        seen.setdefault((r["method"], r["batch"]), []).append(r)
    for group in seen.values():
        ok = [r for r in group if "tokens_per_s" in r]
        if not ok:
            out.append(group[0])
            continue
        tps = [r["tokens_per_s"] for r in ok]
        out.append({**ok[0], "tokens_per_s": statistics.median(tps), "repeats": len(tps), "min_tokens_per_s": min(tps),
                    "max_tokens_per_s": max(tps), "peak_GB": max(r["peak_GB"] for r in ok)})
    return out


def run_e2e(methods: list[str], layers: int = 8, batch: int = 16, context: int = 16384, steps: int = 16,
            max_batch: bool = True, json_out: Optional[Path] = None, log=print, repeats: int = 3, points=None) -> dict:
    """Decode tokens/s per method at `batch`, then (with `max_batch`) at the largest batch estimated to fit;
    returns the JSON payload. Methods: bf16, kivi2, kivi4, w4a8kv4 (FMPQ W4A8 + KIVI-4), fmpq4kv4 (W4A4 + KIVI-4).

    Rows are written to `json_out` as they come (``"partial": True``); the caller writes the final payload.
    """
    import torch

    env = env_info()
    bench = DecodeBench(layers, context, steps)
    log(f"model: {layers} layers, {bench.weights / 1e9:.1f} GB bf16 weights")
    rows: list = []
    free_total = torch.cuda.mem_get_info()[1]
    points = points or Points()
    points.start(len(methods) * (1 + repeats + max_batch))  # warm-up, timed repeats, largest batch
    for kind in methods:  # every method warmed the same way (a full untimed point) before any timed repeat
        bench.run(kind, batch)
        points.advance()
    ok = True
    for _ in range(repeats):  # repeats interleaved across methods; the table keeps each point's median
        for kind in methods:
            ok = ok and _record(bench, kind, batch, batch, rows, env, json_out, log)
            points.advance()
    rows = _medians(rows)
    if ok and max_batch:
        for kind in methods:
            budget = free_total * 0.85 - bench.weights - 8e9
            b = max(batch, int(budget / per_seq_bytes(kind, layers, context)))
            points.advance()
            if not _record(bench, kind, b, batch, rows, env, json_out, log):
                break
    return {"env": env, "rows": rows, "weights_GB": bench.weights / 1e9}

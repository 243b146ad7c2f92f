"""One prefill of the random Llama-3-8B shape through the engine's runner (GPU): CUDA-event time per store kind,
SDPA with ``enable_gqa`` against K/V expanded to the query heads, and the top GPU ops (torch profiler), CPU time
beside GPU time to show whether the prefill is host-bound.

    python tools/prefill_probe.py [--tokens 1024] [--layers 32] [--kv fp16 kivi2:residual=32]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import lowbit.engine.runner as runner_mod
from lowbit.bench.engine import random_model
from lowbit.bench.timing import per_call_ms
from lowbit.engine import PagedEngine


def _sdpa_expanded(q, k, v, *args, enable_gqa=False, **kwargs):
    if enable_gqa and k.shape[1] != q.shape[1]:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    return F.scaled_dot_product_attention(q, k, v, *args, **kwargs)


class _ExpandedF:
    """torch.nn.functional with SDPA's K/V expanded (patched into the runner module)."""

    def __getattr__(self, name):
        return _sdpa_expanded if name == "scaled_dot_product_attention" else getattr(F, name)


def main(tokens: int, layers: int, kinds: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile

    model = random_model(layers)
    ids = torch.randint(0, model.config.vocab_size, (tokens,), device="cuda")
    with torch.inference_mode():
        fwd = lambda: model(ids[None], use_cache=False, logits_to_keep=1)  # noqa: E731
        fwd()
        print(f"HF forward (no cache, last logits): {per_call_ms(fwd, 5):.2f} ms", flush=True)
    for kind in kinds:
        engine = PagedEngine(model, kv=kind, kv_budget_mb=4096, max_batch=8, max_tokens=tokens + 8)
        engine.store.reserve(0, tokens + 8)
        run = lambda: engine.runner.prefill(0, ids)  # noqa: E731
        run()
        plain = per_call_ms(run, 5)
        runner_mod.F = _ExpandedF()
        try:
            run()
            expanded = per_call_ms(run, 5)
        finally:
            runner_mod.F = F
        print(f"{kind}: runner.prefill {plain:.2f} ms (SDPA enable_gqa), {expanded:.2f} ms (K/V expanded)", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv", nargs="+", default=["fp16", "kivi2:residual=32"])
    a = ap.parse_args()
    main(a.tokens, a.layers, a.kv)

"""q/k/v and gate/up of one Llama-3-8B-shaped layer as a decode step calls them (each projection on the layer's
normed input), W4Ax separate vs fused (:func:`lowbit.wa.fuse_projections`) vs cuBLAS bf16, graph and eager, and the
fused outputs against the separate ones: `python tools/fused_projection_probe.py` on a GPU
(``--spec``, ``--m``; ``--small`` for a quick run on any device)."""

from __future__ import annotations

import argparse
import copy

import torch


def build(small: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2) if small else \
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    cfg = LlamaConfig(vocab_size=256, num_hidden_layers=1, **dims)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()


def projections(layer):
    attn, mlp = layer.self_attn, layer.mlp
    return lambda h: (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), mlp.gate_proj(h), mlp.up_proj(h))


def main() -> None:
    from lowbit.bench.timing import bench_sets
    from lowbit.wa import fuse_projections, quantize_model, select_linears

    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="fmpq:w=4,a=8")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = build(args.small, device)
    sep = copy.deepcopy(base)
    names = select_linears(sep)
    stats: dict = {}
    for n in names:  # siblings read one input: the same statistics
        first = n.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        stats[n] = stats.get(first)
        if stats[n] is None:
            stats[n] = torch.rand(sep.get_submodule(n).in_features, device=device) + 0.1
    quantize_model(sep, args.spec, mode="int", stats=stats)
    fused = copy.deepcopy(sep)
    print(f"fused groups: {fuse_projections(fused)}", flush=True)
    calls = {"cublas_bf16": projections(base.model.layers[0]), "w4ax_separate": projections(sep.model.layers[0]),
             "w4ax_fused": projections(fused.model.layers[0])}
    hidden = base.config.hidden_size
    for m in [int(v) for v in args.m.split(",")]:
        sets = [torch.randn(m, hidden, device=device, dtype=torch.bfloat16) for _ in range(8)]
        with torch.no_grad():
            a, b = calls["w4ax_separate"](sets[0]), calls["w4ax_fused"](sets[0])
            err = max(((x.float() - y.float()).norm() / x.float().norm()).item() for x, y in zip(a, b))
            row = {}
            if device == "cuda":
                for name, fn in calls.items():
                    row[name] = (bench_sets(fn, sets) * 1e3, bench_sets(fn, sets, graph=False) * 1e3)
        text = "  ".join(f"{k} graph {g:.1f} us / eager {e:.1f} us" for k, (g, e) in row.items())
        if row:
            cb = row["cublas_bf16"]
            text += "  | x cuBLAS: " + ", ".join(f"{k} {cb[0] / g:.2f} / {cb[1] / e:.2f}" for k, (g, e) in row.items()
                                                 if k != "cublas_bf16")
        print(f"M={m}: fused vs separate max rel err {err:.2e}  {text}", flush=True)


if __name__ == "__main__":
    main()

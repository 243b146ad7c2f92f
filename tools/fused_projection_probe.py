"""One Llama-3-8B-shaped decoder layer's linear work at decode, as the modules are called: the input norm, q/k/v, o_proj
(on a stand-in attention output), the post-attention norm, gate/up, SiLU-and-multiply and down_proj. Variants: cuBLAS
bf16 (the HF modules), W4Ax with separate projections, W4Ax with fused projections
(:func:`lowbit.wa.fuse_projections`), and fused plus the one-launch permuted norm (``LOWBIT_FUSED_NORM``'s path).
Graph and eager timings, and each variant's output against the separate W4Ax layer's:
`python tools/fused_projection_probe.py` on a GPU (``--spec``, ``--m``, ``--json``; ``--small`` for a quick run anywhere).
``--only-projections`` times q/k/v and gate/up alone (stop 31's first measurement)."""

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


def layer_call(layer, only_projections: bool, fused_norm: bool | None = None):
    """The layer's linear work on ``x [M, hidden]`` (attention replaced by q's first columns, as a stand-in)."""
    from lowbit.wa import fold

    attn, mlp = layer.self_attn, layer.mlp

    def projections(h):
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), mlp.gate_proj(h), mlp.up_proj(h)

    def step(x):
        if fused_norm is not None:
            fold.FUSED_NORM = fused_norm
        h = layer.input_layernorm(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        x = x + attn.o_proj(q + 0)  # q's shape is o_proj's input; "+ 0": a fresh tensor, as attention writes
        h = layer.post_attention_layernorm(x)
        return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))

    return projections if only_projections else step


def main() -> None:
    from pathlib import Path

    from lowbit.bench.timing import bench_sets, env_info, write_json
    from lowbit.wa import fuse_projections, quantize_model, select_linears
    from lowbit.wa.fuse import sibling_stats

    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="fmpq:w=4,a=8")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--only-projections", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write env and rows (times, ratios to cuBLAS) here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = build(args.small, device)
    sep = copy.deepcopy(base)
    names = select_linears(sep)
    stats = sibling_stats(names, lambda n: torch.rand(sep.get_submodule(n).in_features, device=device) + 0.1)
    quantize_model(sep, args.spec, mode="int", stats=stats)
    fused = copy.deepcopy(sep)
    print(f"fused groups: {fuse_projections(fused)}", flush=True)
    only = args.only_projections
    calls = {"cublas_bf16": layer_call(base.model.layers[0], only),
             "w4ax_separate": layer_call(sep.model.layers[0], only, False),
             "w4ax_fused": layer_call(fused.model.layers[0], only, False)}
    if not only:
        calls["w4ax_fused_norm"] = layer_call(fused.model.layers[0], only, True)
    hidden = base.config.hidden_size
    rows = []
    for m in [int(v) for v in args.m.split(",")]:
        sets = [torch.randn(m, hidden, device=device, dtype=torch.bfloat16) for _ in range(8)]
        with torch.no_grad():
            ref = calls["w4ax_separate"](sets[0])
            ref = ref if isinstance(ref, tuple) else (ref,)
            errs = {}
            for name, fn in calls.items():
                got = fn(sets[0])
                got = got if isinstance(got, tuple) else (got,)
                errs[name] = max(((a.float() - b.float()).norm() / a.float().norm()).item() for a, b in zip(ref, got))
            row = {}
            if device == "cuda":
                for name, fn in calls.items():
                    row[name] = (bench_sets(fn, sets) * 1e3, bench_sets(fn, sets, graph=False) * 1e3)
        print(f"M={m}: rel. difference to the separate W4Ax layer: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
        if row:
            cb = row["cublas_bf16"]
            for name, (g, e) in row.items():
                print(f"   {name:16s} graph {g:7.1f} us (x{cb[0] / g:.2f})   eager {e:7.1f} us (x{cb[1] / e:.2f})",
                      flush=True)
                rows.append(dict(m=m, method=name, spec=args.spec, only_projections=only, graph_us=g, eager_us=e,
                                 graph_speedup=cb[0] / g, eager_speedup=cb[1] / e, rel_diff_vs_separate=errs[name]))
    if rows:
        write_json(args.json, {"env": env_info(), "rows": rows})


if __name__ == "__main__":
    main()

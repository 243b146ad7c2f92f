"""Tables, JSON and plots for evaluation results."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from lowbit.eval.streaming import EvalResult


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def results_table(results: list[EvalResult], title: str = "KV-cache methods") -> Table:
    """A rich table: method, ppl, Δppl %, KL, top-1, KV bytes, compression ratio, bits per element."""
    table = Table(title=title)
    for col in ("method", "ppl", "Δppl %", "KL(ref‖m)", "top-1", "KV bytes", "ratio", "bits/elt", "tok/s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        table.add_row(
            r.method,
            f"{r.ppl:.3f}",
            f"{r.delta_ppl_pct:+.1f}",
            f"{r.kl_mean:.4f}",
            f"{r.top1_agree:.3f}",
            _fmt_bytes(r.kv_bytes),
            f"{r.compression:.2f}×",
            f"{r.bits_per_element:.2f}",
            f"{r.tokens_per_s:.1f}",
        )
    return table


def write_json(results: list[EvalResult], path: str | Path, meta: dict | None = None, flat: EvalResult | None = None) -> Path:
    """Write ``{"meta", "results": [...]}``; `flat` also puts one result's keys at top level."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta or {}, "results": [r.to_dict() for r in results]}
    if flat is not None:
        payload.update(flat.to_dict())
    path.write_text(json.dumps(payload, indent=2))
    return path


def plot_quality_vs_bytes(results: list[EvalResult], path: str | Path, title: str = "") -> Path:
    """Two panels: perplexity and KL against KV bytes (log scale), one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "ppl", "perplexity"), (axes[1], "kl_mean", "mean KL(ref ‖ method)")):
        for r in results:
            x, y = r.kv_bytes / 2**20, getattr(r, key)
            ax.scatter([x], [y], s=40)
            ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("KV cache bytes held (MiB, log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if key == "kl_mean" and any(r.kl_mean > 0 for r in results):
        axes[1].set_yscale("symlog", linthresh=1e-3)
        axes[1].set_ylim(bottom=0)
    fig.suptitle(title or "quality vs KV bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Quality against KV budget, one line per method (matplotlib, Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

METRICS = (("kl_mean", "mean KL to fp16 (nats)"), ("ppl", "perplexity"), ("accuracy", "retrieval accuracy"))


def plot_quality_vs_budget(rows: list[dict], path: str | Path, metrics: tuple[str, ...] | None = None) -> Path:
    """Write a PNG/PDF of quality vs budget to `path`.

    Each row is a dict with ``method`` (e.g. "h2o", "kvmerger+kivi4"), ``budget`` (fraction kept, 1.0 for the
    uncompressed cache) and any of ``kl_mean``, ``ppl``, ``accuracy``. One panel per metric present (or per name in
    `metrics`), one line per method, points sorted by budget. Rows with ``method == "fp16"`` are drawn as a dashed
    horizontal reference line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no rows to plot")
    wanted = [(m, label) for m, label in METRICS if any(m in r for r in rows)] if metrics is None else [
        (m, dict(METRICS).get(m, m)) for m in metrics
    ]
    if not wanted:
        raise ValueError(f"rows hold none of the metrics {', '.join(m for m, _ in METRICS)}")
    fig, axes = plt.subplots(1, len(wanted), figsize=(4.5 * len(wanted), 3.6), squeeze=False)
    for ax, (metric, label) in zip(axes[0], wanted):
        series = defaultdict(list)
        for r in rows:
            if metric in r and r.get(metric) is not None:
                series[r["method"]].append((float(r.get("budget", 1.0)), float(r[metric])))
        for method, pts in sorted(series.items()):
            pts.sort()
            if method == "fp16":
                ax.axhline(pts[0][1], color="gray", linestyle="--", label="fp16")
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xlabel("KV budget (fraction of tokens kept)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

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
    """A rich table: method, ppl, Δppl %, KL, top-1, KV bytes, compression ratio, bits per element held and
    at 4,096 tokens (``≤`` marks a registry upper bound)."""
    table = Table(title=title)
    for col in ("method", "ppl", "Δppl %", "KL(ref‖m)", "top-1", "KV bytes", "ratio", "bits/elt", "bits@4K", "tok/s"):
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
            _bits_at(r),
            f"{r.tokens_per_s:.1f}",
        )
    return table


def _bits_at(r: EvalResult) -> str:
    bits = r.extra.get("bits_at_4096")
    if bits is None:
        return "–"
    return ("" if r.extra.get("bytes_exact", True) else "≤") + f"{bits:.2f}"


def family(r: EvalResult) -> str:
    """The frontier line of a result: its KV family, or ``W/A+KV`` / ``LUT`` for rows that change the model."""
    if r.method.startswith("wa="):
        return "W/A+KV"
    if r.method.startswith("lut="):
        return "LUT"
    return r.extra.get("family", r.method.split(":")[0])


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier of (bits, KL) points: sorted by bits, each with a lower KL than every cheaper point."""
    out = []
    for x, y in sorted(points):
        if not out or y < out[-1][1]:
            out.append((x, y))
    return out


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
    """Two panels: perplexity against KV bytes held (log scale, one labelled point per method), and the
    quality-vs-bytes frontier: KL against bits per element at 4,096 tokens (bits held when unknown), one line
    per family through its Pareto-optimal points, every point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in results:
        x = r.kv_bytes / 2**20
        left.scatter([x], [r.ppl], s=40)
        left.annotate(r.method, (x, r.ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
    left.set_xscale("log")
    left.set_xlabel("KV cache bytes held (MiB, log)")
    left.set_ylabel("perplexity")
    left.grid(alpha=0.3)
    families: dict[str, list[EvalResult]] = {}
    for r in results:
        families.setdefault(family(r), []).append(r)
    for name, rows in families.items():
        pts = [(r.extra.get("bits_at_4096", r.bits_per_element), r.kl_mean) for r in rows]
        if name == "fp16":
            right.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=120, color="black", label="fp16", zorder=3)
            continue
        line = frontier(pts)
        (handle,) = right.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=name)
        right.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, color=handle.get_color(), alpha=0.5)
        for r, (x, y) in zip(rows, pts):
            right.annotate(r.method, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color=handle.get_color())
    right.set_xlabel("bits per K/V element at 4,096 tokens (all overheads)")
    right.set_ylabel("mean KL(ref ‖ method)")
    if any(r.kl_mean > 0 for r in results):
        right.set_yscale("symlog", linthresh=1e-2)
        right.set_ylim(bottom=0)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    right.set_title("frontier: one line per family", fontsize=9)
    fig.suptitle(title or "quality vs KV bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

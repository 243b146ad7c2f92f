"""A small thread-safe metrics registry with Prometheus text exposition (format 0.0.4)."""

from __future__ import annotations

import math
import threading
from bisect import bisect_left

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, esc)) + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """Counters, gauges and histograms for the server; :meth:`render` writes the exposition."""

    def __init__(self, prefix: str = "lowbit"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {}
        self._gauges: dict[str, dict[tuple, float]] = {}
        self._hists: dict[str, Histogram] = {}
        self._help: dict[str, tuple[str, str]] = {}
        self._define()

    def _define(self) -> None:
        p = self.prefix
        for name, kind, text in [
            (f"{p}_requests_total", "counter", "HTTP requests to /v1 endpoints by endpoint and status code"),
            (f"{p}_prompt_tokens_total", "counter", "Prompt tokens processed (prefilled)"),
            (f"{p}_completion_tokens_total", "counter", "Completion tokens generated"),
            (f"{p}_sequences_finished_total", "counter", "Sequences that left the engine, by reason"),
            (f"{p}_decode_steps_total", "counter", "Batched decode forwards"),
            (f"{p}_decode_step_sequences_total", "counter", "Sum over decode steps of the sequences in the batch"),
            (f"{p}_model_faults_total", "counter", "Decode forwards that raised (their requests were recomputed)"),
            (f"{p}_queue_depth", "gauge", "Requests waiting for admission"),
            (f"{p}_running_sequences", "gauge", "Sequences in the running batch"),
            (f"{p}_running_sequences_peak", "gauge", "Most sequences ever running at once"),
            (f"{p}_kv_bytes_in_use", "gauge", "KV-cache bytes held by running sequences (as the method reports them)"),
            (f"{p}_kv_bytes_reserved", "gauge", "KV-cache bytes reserved by admission for running sequences"),
            (f"{p}_kv_budget_bytes", "gauge", "The KV-cache budget (--kv-budget-mb)"),
            (f"{p}_time_to_first_token_seconds", "histogram", "Arrival to first generated token"),
            (f"{p}_inter_token_latency_seconds", "histogram", "Time between consecutive tokens of a sequence"),
        ]:
            self._help[name] = (kind, text)
            if kind == "counter":
                self._counters[name] = {}
            elif kind == "gauge":
                self._gauges[name] = {}
        self._hists[f"{p}_time_to_first_token_seconds"] = Histogram(TTFT_BUCKETS)
        self._hists[f"{p}_inter_token_latency_seconds"] = Histogram(ITL_BUCKETS)

    def define(self, name: str, kind: str, text: str, buckets: tuple[float, ...] = ()) -> None:
        """Add a metric (``counter``, ``gauge`` or ``histogram`` with `buckets`) after construction: what only one
        engine reports (the paged engine's pages and steps) is defined by that engine."""
        full = f"{self.prefix}_{name}"
        with self._lock:
            self._help[full] = (kind, text)
            if kind == "histogram":
                self._hists[full] = Histogram(buckets)
            else:
                (self._counters if kind == "counter" else self._gauges).setdefault(full, {})

    # ------------------------------------------------------------------ updates
    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[f"{self.prefix}_{name}"]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._gauges[f"{self.prefix}_{name}"][key] = float(value)

    def set_max(self, name: str, value: float) -> None:
        with self._lock:
            series = self._gauges[f"{self.prefix}_{name}"]
            series[()] = max(series.get((), 0.0), float(value))

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._hists[f"{self.prefix}_{name}"].observe(value)

    # ------------------------------------------------------------------ reads
    def get(self, name: str, **labels) -> float:
        key = tuple(sorted(labels.items()))
        full = f"{self.prefix}_{name}"
        with self._lock:
            for table in (self._counters, self._gauges):
                if full in table:
                    return table[full].get(key, 0.0)
        raise KeyError(name)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in self._help.items():
                lines.append(f"# HELP {name} {text}")
                lines.append(f"# TYPE {name} {kind}")
                if kind in ("counter", "gauge"):
                    series = (self._counters if kind == "counter" else self._gauges)[name]
                    if not series and kind == "gauge":
                        series = {(): 0.0}
                    for key, value in sorted(series.items()):
                        lines.append(f"{name}{_labels(key)} {_fmt(value)}")
                else:
                    h = self._hists[name]
                    cumulative = 0
                    for bound, c in zip(self.buckets_of(h), h.counts):
                        cumulative += c
                        lines.append(f'{name}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
                    lines.append(f"{name}_sum {_fmt(h.sum)}")
                    lines.append(f"{name}_count {h.count}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def buckets_of(h: Histogram) -> tuple[float, ...]:
        return h.buckets + (math.inf,)


def parse_exposition(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` from Prometheus text (for tests and the bench)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value.replace("+Inf", "inf"))
    return out

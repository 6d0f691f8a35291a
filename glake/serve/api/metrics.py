"""ServeMetrics: the server's Prometheus metrics (``/metrics``), in a private registry.

Latencies (TTFT, TPOT, ITL, end-to-end) and token/request counters are recorded by the engine
thread as tokens come out; the gauges (running / waiting requests, KV usage, preemptions, prefix
cache hit rate) are read at scrape time from the snapshot the engine thread publishes after every
step, so a scrape never touches the engine. glake's own memory figures of this process
(:func:`glake.stats.prometheus.exposition`) follow when ``glake.stats`` can collect them.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "glake_serve"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# snapshot key -> (metric name, help, counter?)
_SNAPSHOT_METRICS = {
    "requests_running": ("num_requests_running", "Requests holding a KV slot", False),
    "requests_waiting": ("num_requests_waiting", "Requests queued for admission", False),
    "requests_swapped": ("num_requests_swapped", "Requests swapped out to host memory", False),
    "requests_tracked": ("num_requests_in_flight", "Requests the server is streaming back", False),
    "kv_slots_active": ("kv_slots_active", "Live KV slots (running sequences and prefix-cache entries)", False),
    "kv_chunks_active": ("kv_chunks_active", "KV chunks mapped in live slots", False),
    "kv_chunks_capacity": ("kv_chunks_capacity", "KV chunks the budget (or the whole cache) holds", False),
    "kv_usage": ("kv_cache_usage_ratio", "kv_chunks_active / kv_chunks_capacity", False),
    "preemptions": ("num_preemptions", "Sequences preempted (swap or recompute)", True),
    "steps": ("engine_steps", "Engine steps run", True),
}


class ServeMetrics:
    """The server's metrics; ``render()`` is the ``/metrics`` body.

    Parameters
    ----------
    snapshot
        Returns the engine thread's latest snapshot (a dict; see ``AsyncEngine._publish``); set
        later with :meth:`bind` when the engine is made after the metrics.
    include_glake_stats
        Append glake's memory figures of this process (``glake.stats.prometheus``).
    """

    def __init__(self, snapshot: Optional[Callable[[], Dict[str, float]]] = None,
                 include_glake_stats: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = snapshot or (lambda: {})
        self.include_glake_stats = include_glake_stats
        r = self.registry

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, buckets=_LATENCY_BUCKETS, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first generated token")
        self.tpot = hist("time_per_output_token_seconds", "Mean time per output token after the first, per completion")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of a completion")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to the end of a completion")
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens", registry=r)
        self.success = Counter(f"{PREFIX}_request_success", "Completions finished, by finish reason",
                               ["finished_reason"], registry=r)
        self.aborted = Counter(f"{PREFIX}_requests_aborted", "Requests aborted (client gone)", registry=r)
        r.register(_SnapshotCollector(self))

    def bind(self, snapshot: Callable[[], Dict[str, float]]) -> None:
        """Where the gauges are read from at scrape time."""
        self._snapshot = snapshot

    def finished(self, reason: Optional[str], e2e: float, first: Optional[float], last: float, n_out: int) -> None:
        """Records one finished completion (engine thread)."""
        if reason != "abort":
            self.success.labels(finished_reason=str(reason)).inc()
        self.e2e.observe(e2e)
        if first is not None and n_out > 1:
            self.tpot.observe((last - first) / (n_out - 1))

    def render(self) -> bytes:
        """The Prometheus text exposition: the server's metrics, then glake's memory figures."""
        text = generate_latest(self.registry)
        if self.include_glake_stats:
            try:
                from glake.stats import prometheus

                text += prometheus.exposition()
            except Exception:  # glake.stats cannot collect here (e.g. grpc missing): the serve metrics stand
                pass
        return text


class _SnapshotCollector:
    """Gauges and counters from the engine thread's snapshot, built at each scrape."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[object]:
        snap = self.metrics._snapshot()
        for key, (name, doc, counter) in _SNAPSHOT_METRICS.items():
            v = float(snap.get(key, 0.0))
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=v) if counter else \
                GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=v)
        prompt = self.metrics.prompt_tokens._value.get()
        hit = float(snap.get("prefix_cache_hit_tokens", 0.0))
        yield GaugeMetricFamily(f"{PREFIX}_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / "
                                "prompt tokens", value=hit / prompt if prompt else 0.0)
        yield CounterMetricFamily(f"{PREFIX}_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                  value=hit)

    def describe(self) -> list:
        return []

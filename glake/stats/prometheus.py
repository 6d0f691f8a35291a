"""The stats as Prometheus metrics (prometheus-client).

Every figure of every section becomes ``glake_<section>_<figure>`` (dots and other characters
made ``_``), labelled with the process id, the device (when the section has one) and the
section's labels (``pool``, ``backend``, ...). Monotone figures (``calls.*``, ``time_ns.*``,
``num_*``, ``*_created``, ``*_released``, ``allocation.all.allocated/freed``) are counters
(``..._total``); the rest are gauges. ``glake_section_up`` is 1 per section that answered and 0
per section whose source failed.

In this process::

    from glake.stats import prometheus
    prometheus.start_http_server(9400)            # http://127.0.0.1:9400/metrics
    # or prometheus.register() into your own prometheus_client registry

For other processes (an exporter): ``GlakeCollector(discover=True)`` (every live glake process of
this user) or ``GlakeCollector(targets=[pid, "127.0.0.1:50051"])``; ``glake stats PID --prometheus``
prints the exposition text once.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_COUNTER_PREFIXES = ("calls.", "time_ns.", "num_")
_COUNTER_SUFFIXES = ("_created", "_released", ".allocated", ".freed")
_BAD = re.compile(r"[^a-zA-Z0-9_]+")


def is_counter(key: str) -> bool:
    """Whether a figure only grows (a Prometheus counter) rather than goes up and down."""
    return key.startswith(_COUNTER_PREFIXES) or key.endswith(_COUNTER_SUFFIXES)


def metric_name(section: str, key: str) -> str:
    """``("allocator", "allocated_bytes.all.current")`` -> ``"glake_allocator_allocated_bytes_all_current"``."""
    name = _BAD.sub("_", f"glake_{section}_{key}").strip("_")
    return name if not name[0].isdigit() else "_" + name


def _label_name(name: str) -> str:
    n = _BAD.sub("_", name).strip("_") or "label"
    return n if not n[0].isdigit() else "_" + n


def families(replies: Iterable[Mapping[str, Any]]) -> List[Any]:
    """Metric families of GetStats replies (dicts as :meth:`StatsClient.get_stats` returns them)."""
    samples: Dict[Tuple[str, bool], List[Tuple[Dict[str, str], float, str]]] = {}
    up: List[Tuple[Dict[str, str], float]] = []
    for reply in replies:
        pid = str(reply["process"]["pid"])
        for s in reply["sections"]:
            labels = {"pid": pid, "section": s["name"]}
            labels["device"] = str(s["device"]) if s["device"] >= 0 else ""
            for k, v in s["labels"].items():
                labels.setdefault(_label_name(k), str(v))
            up.append((labels, 0.0 if s["error"] else 1.0))
            if s["error"]:
                continue
            for key, value in s["counters"].items():
                counter = is_counter(key) and value >= 0
                samples.setdefault((metric_name(s["name"], key), counter), []).append(
                    (labels, float(value), f"glake {s['name']} figure {key}"))
            for key, value in s["values"].items():
                samples.setdefault((metric_name(s["name"], key), False), []).append(
                    (labels, float(value), f"glake {s['name']} figure {key}"))
    out: List[Any] = []
    taken = set()
    for (name, counter), rows in sorted(samples.items()):
        exposed = name + "_total" if counter else name
        if exposed in taken:  # the same name as a counter in one section and a gauge in another
            continue
        taken.add(exposed)
        names = sorted({k for labels, _, _ in rows for k in labels})
        fam = (CounterMetricFamily if counter else GaugeMetricFamily)(name, rows[0][2], labels=names)
        for labels, value, _ in rows:
            fam.add_metric([labels.get(n, "") for n in names], value)
        out.append(fam)
    if up:
        names = sorted({k for labels, _ in up for k in labels})
        fam = GaugeMetricFamily("glake_section_up", "1 if the section's source answered, 0 if it failed",
                                labels=names)
        for labels, value in up:
            fam.add_metric([labels.get(n, "") for n in names], value)
        out.append(fam)
    return out


class GlakeCollector:
    """A prometheus-client collector of glake stats.

    Parameters
    ----------
    targets : sequence, optional
        Other processes to scrape (pids, socket paths, ``host:port``). Default: this process.
    discover : bool
        Scrape every live glake process of this user (found as ``glake ps`` finds them).
    timeout : float
        Seconds to wait for each process.
    """

    def __init__(self, targets: Optional[Sequence[Any]] = None, discover: bool = False, timeout: float = 2.0) -> None:
        self.targets = list(targets or [])
        self.discover = discover
        self.timeout = timeout

    def replies(self) -> List[Dict[str, Any]]:
        if self.discover:
            from glake.stats import discovery

            return [e.stats for e in discovery.discover(clean=False, timeout=self.timeout) if e.stats is not None]
        if self.targets:
            from glake.stats.client import StatsClient, StatsError

            out = []
            for t in self.targets:
                try:
                    with StatsClient(t, timeout=self.timeout) as c:
                        out.append(c.get_stats())
                except StatsError:
                    continue  # a process that went away has no metrics; the scrape goes on
            return out
        import time

        from glake.stats import collector

        return [{"process": collector.process_info(), "timestamp_unix_ns": time.time_ns(), "sequence": 0,
                 "sections": collector.collect_sections()}]

    def collect(self) -> Iterator[Any]:
        yield from families(self.replies())

    def describe(self) -> List[Any]:
        return []  # collected on each scrape: nothing to check at registration


def register(registry: Optional[CollectorRegistry] = None, **kwargs: Any) -> GlakeCollector:
    """Register a :class:`GlakeCollector` (keyword arguments passed on) into ``registry``
    (default: prometheus-client's global one); returns it."""
    from prometheus_client import REGISTRY

    c = GlakeCollector(**kwargs)
    (registry or REGISTRY).register(c)
    return c


def exposition(**kwargs: Any) -> bytes:
    """The Prometheus text exposition of glake stats (keyword arguments as :class:`GlakeCollector`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GlakeCollector(**kwargs))
    return generate_latest(registry)


def start_http_server(port: int = 9400, addr: str = "127.0.0.1", **kwargs: Any) -> Any:
    """Serve ``/metrics`` on ``addr:port`` (loopback by default) from a private registry holding a
    :class:`GlakeCollector` (keyword arguments passed on); returns what prometheus-client returns."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GlakeCollector(**kwargs))
    return _start_http_server(port, addr=addr, registry=registry)


__all__ = ["GlakeCollector", "families", "register", "exposition", "start_http_server", "metric_name", "is_counter"]

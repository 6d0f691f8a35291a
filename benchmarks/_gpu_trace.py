"""What a window of engine steps did on the GPU, from a torch.profiler trace: device time by kernel
class and by kernel, how busy the GPU was over the window, and where it idled (the gaps between
device activities, the largest of them with the kernels on either side).

Used by serve_offline's ``--trace``. Kernels inside CUDA graph replays are in the trace (CUPTI
records graph kernels), so a replayed decode step is seen kernel by kernel.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Dict, List, Tuple

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def device_events(trace: Dict[str, Any]) -> List[Tuple[float, float, str]]:
    """(start us, end us, name) of every device activity of a chrome trace, by start."""
    evs = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e.get("name", "?"))
           for e in trace.get("traceEvents", []) if e.get("cat") in DEVICE_CATS and e.get("ph") == "X"]
    return sorted(evs)


def summarize(events: List[Tuple[float, float, str]], steps: int, classify: Callable[[str], str],
              top: int = 12) -> Dict[str, Any]:
    """Per-step means over a window of ``steps`` steps: span (first start to last end), busy (the union
    of the activities), idle fraction, device ms by class and the ``top`` kernels, and the gaps."""
    if not events:
        return {"steps": steps, "span_ms": 0.0, "busy_ms": 0.0, "idle_frac": 0.0, "classes": {}, "kernels": [],
                "gaps": {}, "largest_gaps": []}
    busy, gaps = 0.0, []
    start, end, last = events[0]
    for s, e, name in events[1:]:
        if s > end:  # the device idled from ``end`` to ``s``
            busy += end - start
            gaps.append((s - end, last, name))
            start = s
        if e > end:
            end, last = e, name
    busy += end - start
    span = end - events[0][0]
    by_class: Dict[str, float] = {}
    by_kernel: Dict[str, List[float]] = {}
    for s, e, name in events:
        by_class[classify(name)] = by_class.get(classify(name), 0.0) + (e - s)
        k = by_kernel.setdefault(name, [0.0, 0])
        k[0] += e - s
        k[1] += 1
    bins = ((0, 2), (2, 5), (5, 20), (20, 100), (100, 1e12))
    gap_bins = {}
    for lo, hi in bins:
        sel = [g for g, _, _ in gaps if lo <= g < hi]
        label = f"{lo}-{hi:g} us" if hi < 1e12 else f">= {lo} us"
        gap_bins[label] = {"count_per_step": len(sel) / steps, "ms_per_step": sum(sel) / 1e3 / steps}
    largest = sorted(gaps, reverse=True)[:top]
    return {
        "steps": steps, "span_ms": span / 1e3 / steps, "busy_ms": busy / 1e3 / steps,
        "idle_frac": 1 - busy / span if span else 0.0,
        "activities_per_step": len(events) / steps,
        "classes": {c: v / 1e3 / steps for c, v in sorted(by_class.items(), key=lambda x: -x[1])},
        "kernels": [{"name": n[:90], "ms_per_step": v[0] / 1e3 / steps, "calls_per_step": v[1] / steps,
                     "mean_us": v[0] / v[1]} for n, v in sorted(by_kernel.items(), key=lambda x: -x[1][0])[:top]],
        "gaps": gap_bins,
        "largest_gaps": [{"us": round(g, 1), "after": a[:60], "before": b[:60]} for g, a, b in largest],
    }


def profile_steps(torch, step: Callable[[], Any], steps: int, classify: Callable[[str], str]) -> Dict[str, Any]:
    """Runs ``step`` ``steps`` times under torch.profiler (device activities only, so the host runs
    as it does unprofiled, apart from CUPTI's own cost) and summarizes the device trace."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    return summarize(device_events(trace), steps, classify)

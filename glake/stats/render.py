"""A picture of the memory map (PNG, matplotlib): what ``glake map PID --png FILE`` draws.

One horizontal band per segment or stitched range, in address order, its blocks coloured by
state (named as everywhere else: :data:`glake.stats.memmap.STATE_LABELS`); stitched ranges are
hatched and labelled S1, S2, ..., and brackets in the right margin join each one to the blocks
whose chunks it maps (where the map says which: ``Block.lent_to``), one lane per range, the
margin sized so the outermost lane fits. The title
gives the pool's figures: reserved, allocated, free and its largest piece, the fragmentation
(1 - largest free block / free bytes) and utilisation (allocated / reserved).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from glake.stats import memmap
from glake.stats.units import fmt_bytes

COLORS = {
    "allocated": "#3b75af",
    "pending": "#e15759",
    "free": "#e4e4e4",
    "lent": "#f28e2b",
    "held": "#c9a3d9",
    "detached": "#e4e4e4",
    "unknown": "#999999",
}
LABELS = memmap.STATE_LABELS  # one vocabulary with the text map
LANE_PT = 7.0           # horizontal step between the bracket lanes of successive stitched ranges, in points
LABEL_PX = 34.0         # room for the S1, S2 ... labels right of the bands, in pixels
STITCH_EDGE = "#6a3d9a"
MAX_BANDS = 64          # per pool; the rest is counted in the title, not drawn
AUTO_FIT_RATIO = 16     # auto scale: per-band when the largest band is this many times the smallest


def _band_label(seg: Mapping[str, Any], stitch_names: Dict[int, str]) -> str:
    name = stitch_names.get(seg["address"], "")
    kind = f"{name} stitched" if name else seg["kind"]
    return f"{kind:>11}  {fmt_bytes(seg['size']):>9}  0x{seg['address']:x}"


def _scale_mode(segments: Sequence[Mapping[str, Any]], scale: str) -> str:
    if scale != "auto":
        return scale
    sizes = [s["size"] for s in segments if s["size"]]
    return "fit" if sizes and max(sizes) > AUTO_FIT_RATIO * min(sizes) else "bytes"


def _pool_title(pool: Mapping[str, Any], drawn: int) -> str:
    m = memmap.summarize([pool])
    free_blocks = sum(1 for s in pool["segments"] if s["kind"] != "stitched"
                      for b in s["blocks"] if b["state"] == "free")
    lines = [
        f"{pool['name']} ({pool['backend']}, device {pool['device']}):  "
        f"fragmentation {m['fragmentation']:.2f}   utilization {m['utilization']:.0%}",
        f"reserved {fmt_bytes(m['reserved'])} in {m['segments']} segments ({m['chunks']} chunks of "
        f"{fmt_bytes(pool['granularity'])})   allocated {fmt_bytes(m['allocated'])}   "
        f"pending {fmt_bytes(m['pending'])}",
        f"free {fmt_bytes(m['free'])} in {free_blocks} blocks, largest {fmt_bytes(m['largest_free'])}   "
        f"stitched ranges {m['stitched_ranges']} (lent {fmt_bytes(m['lent'])}, held {fmt_bytes(m['held'])})",
    ]
    hidden = len(pool["segments"]) - drawn
    if hidden > 0:
        lines[0] += f"   [the last {hidden} of {len(pool['segments'])} bands are not drawn]"
    return "\n".join(lines)


def _draw_pool(ax, pool: Mapping[str, Any], scale: str) -> None:
    from matplotlib.patches import FancyArrowPatch

    segments = list(pool["segments"])[:MAX_BANDS]
    stitches = [s for s in segments if s["kind"] == "stitched"]
    stitch_names = {s["address"]: f"S{i + 1}" for i, s in enumerate(stitches)}
    mode = _scale_mode(segments, scale)
    longest = max((s["size"] for s in segments), default=1) or 1
    n = len(segments)
    y_of: Dict[int, float] = {}
    lent_centres: List[Tuple[int, float, float]] = []  # (stitch address, x, y)
    for i, seg in enumerate(segments):
        y = n - 1 - i
        y_of[seg["address"]] = y
        unit = (1.0 / seg["size"] if seg["size"] else 0.0) if mode == "fit" else 1.0 / longest
        stitched = seg["kind"] == "stitched"
        ax.add_patch(_rect((0, y - 0.36), seg["size"] * unit, 0.72, face="white",
                           edge=STITCH_EDGE if stitched else "#8c8c8c", lw=1.4 if stitched else 0.6, z=1))
        for b in seg["blocks"]:
            x = (b["address"] - seg["address"]) * unit
            w = b["size"] * unit
            state = memmap.shown_state(seg, b)
            ax.add_patch(_rect((x, y - 0.36), w, 0.72, face=COLORS.get(state, COLORS["unknown"]),
                               edge="#2b2b2b" if not stitched else STITCH_EDGE, lw=0.7, z=2,
                               hatch="///" if stitched else None))
            if b["state"] == "lent" and b.get("lent_to") in stitch_names:
                lent_centres.append((b["lent_to"], x + w / 2, y))
                if w > 0.06:
                    ax.text(x + w / 2, y, f"→{stitch_names[b['lent_to']]}", ha="center", va="center", fontsize=7,
                            color="#3d2200", zorder=4)
            elif stitched and w > 0.08:
                ax.text(x + w / 2, y, f"{stitch_names[seg['address']]}  {state}", ha="center",
                        va="center", fontsize=7, color="black", zorder=4,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        g = pool.get("granularity") or 0
        chunks = seg["size"] // g if g else 0
        if not stitched and 1 < chunks <= 128 and seg["size"] * unit / chunks > 0.004:
            for c in range(1, chunks):
                ax.plot([c * g * unit] * 2, [y - 0.36, y + 0.36], color="white", lw=0.6, alpha=0.7, zorder=3,
                        linestyle=(0, (2, 2)))
    # brackets in the right margin: each stitched range to the blocks it maps, one lane per range
    linked = sorted({a for a, _, _ in lent_centres if a in y_of})
    lane = {addr: k for k, addr in enumerate(linked)}
    for addr in linked:
        ax.text(1.005, y_of[addr], stitch_names[addr], ha="left", va="center", fontsize=7, color=STITCH_EDGE,
                fontweight="bold", clip_on=False)
    for addr, x, y in lent_centres:
        ys = y_of.get(addr)
        if ys is None or ys == y:
            continue
        arm = LANE_PT * (lane[addr] + 1)
        # "bar" arms are perpendicular to A->B: to the right when going down, so draw from the lower point
        a, b = ((1.0, y), (1.0, ys)) if y < ys else ((1.0, ys), (1.0, y))
        ax.add_patch(FancyArrowPatch(a, b, connectionstyle=f"bar,armA={arm},armB={arm},fraction=0",
                                     arrowstyle="-|>" if a[1] == ys else "<|-", mutation_scale=7, color=STITCH_EDGE,
                                     lw=0.9, alpha=0.75, zorder=1, clip_on=False, shrinkA=0, shrinkB=0))
    ax.set_xlim(0, 1.0)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_yticks([n - 1 - i for i in range(n)])
    ax.set_yticklabels([_band_label(s, stitch_names) for s in segments], fontsize=7, family="monospace")
    for tick, seg in zip(ax.get_yticklabels(), segments):
        if seg["kind"] == "stitched":
            tick.set_color(STITCH_EDGE)
            tick.set_fontweight("bold")
    if mode == "fit":
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xticklabels(["0", "25%", "50%", "75%", "100%"], fontsize=7)
        ax.set_xlabel("offset in the band, as a fraction of its size (bands differ widely in size: see the left)",
                      fontsize=7)
    else:
        ticks = [longest * f for f in (0, 0.25, 0.5, 0.75, 1.0)]
        ax.set_xticks([t / longest for t in ticks])
        ax.set_xticklabels([fmt_bytes(int(t)) for t in ticks], fontsize=7)
        ax.set_xlabel("offset in the band (all bands at the same scale)", fontsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)
    ax.set_title(_pool_title(pool, len(segments)), fontsize=8.5, loc="left")


def _rect(xy, w, h, face, edge, lw, z, hatch=None):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, facecolor=face, edgecolor=edge, linewidth=lw, zorder=z, hatch=hatch)


def auto_height(pools: Sequence[Mapping[str, Any]]) -> int:
    """A height in pixels that gives each band room."""
    bands = sum(min(len(p["segments"]), MAX_BANDS) for p in pools)
    return int(min(6000, max(420, 190 + 110 * len(pools) + 30 * bands)))


def _legend_columns(width: int) -> int:
    return 1 if width < 760 else 2 if width < 1300 else 4


def stitch_lanes(pools: Sequence[Mapping[str, Any]]) -> int:
    """The most bracket lanes one drawn pool needs (its stitched ranges that lend from drawn segments)."""
    most = 0
    for pool in pools:
        segments = list(pool["segments"])[:MAX_BANDS]
        drawn = {s["address"] for s in segments if s["kind"] == "stitched"}
        owners = {b.get("lent_to") for s in segments if s["kind"] != "stitched" for b in s["blocks"]
                  if b["state"] == "lent"}
        most = max(most, len(drawn & owners))
    return most


def build_figure(pools: Sequence[Mapping[str, Any]], process: Optional[Mapping[str, Any]] = None,
                 width: int = 1600, height: Optional[int] = None, scale: str = "auto", dpi: int = 100):
    """The memory map of ``pools`` as a matplotlib Figure of ``width`` x ``height`` pixels (see :func:`render_png`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if scale not in ("auto", "bytes", "fit"):
        raise ValueError(f"scale must be auto, bytes or fit, not {scale!r}")
    height = height or auto_height(pools)
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    who = ""
    if process:
        cmd = " ".join(process.get("argv") or [])[:90]
        who = f"pid {process.get('pid')}  {cmd}"
    m = memmap.summarize(pools)
    fig.suptitle(f"glake memory map   {who}\nfragmentation {m['fragmentation']:.2f}   ·   allocated / reserved "
                 f"{fmt_bytes(m['allocated'])} / {fmt_bytes(m['reserved'])} ({m['utilization']:.0%})   ·   "
                 f"{m['stitched_ranges']} stitched ranges", fontsize=11, x=0.01, y=1.0 - 8.0 / height, ha="left",
                 va="top", fontweight="bold")
    if not pools:
        fig.text(0.5, 0.5, "this process publishes no allocator: nothing to draw", ha="center", va="center",
                 fontsize=12)
    elif not any(p["segments"] for p in pools):
        fig.text(0.5, 0.5, f"{', '.join(p['name'] for p in pools)}: nothing is allocated or cached", ha="center",
                 va="center", fontsize=12)
    else:
        drawn = [p for p in pools if p["segments"]]
        ratios = [min(len(p["segments"]), MAX_BANDS) + 1 for p in drawn]
        top_px, gap_px = 110.0, 120.0
        bottom_px = 60.0 + 13.0 * -(-(len(memmap.SHOWN_STATES) + 1) // _legend_columns(width))  # titles above each pool, axis and legend below
        margin_px = LABEL_PX + (stitch_lanes(drawn) + 1) * LANE_PT * dpi / 72.0 + 12.0
        right = max(0.5, 1.0 - margin_px / width)
        label_chars = max(len(_band_label(seg, {seg["address"]: "S00"})) for p in drawn
                          for seg in list(p["segments"])[:MAX_BANDS])
        left = min(0.45, (label_chars * 7 * 0.62 * dpi / 72.0 + 14.0) / width)  # 7 pt monospace tick labels
        axes_px = max(40.0, (height - top_px - bottom_px - gap_px * (len(drawn) - 1)) / len(drawn))
        gs = fig.add_gridspec(len(drawn), 1, height_ratios=ratios, left=left, right=right, top=1.0 - top_px / height,
                              bottom=bottom_px / height, hspace=gap_px / axes_px)
        for i, pool in enumerate(drawn):
            _draw_pool(fig.add_subplot(gs[i]), pool, scale)
    handles = [Patch(facecolor=COLORS[s], edgecolor="#8c8c8c", label=LABELS[s]) for s in memmap.STATES]
    handles.append(Patch(facecolor="white", edgecolor=STITCH_EDGE, hatch="///", label="stitched range (S1, S2, ...)"))
    handles.append(Patch(facecolor=COLORS["detached"], edgecolor=STITCH_EDGE, hatch="///", label=LABELS["detached"]))
    fig.legend(handles=handles, loc="lower center", ncol=_legend_columns(width), fontsize=7.5, frameon=False)
    return fig


def render_png(path: str, pools: Sequence[Mapping[str, Any]], process: Optional[Mapping[str, Any]] = None,
               width: int = 1600, height: Optional[int] = None, scale: str = "auto", dpi: int = 100) -> Tuple[int, int]:
    """Draw the memory map of ``pools`` to a PNG of ``width`` x ``height`` pixels; returns the size.

    Parameters
    ----------
    scale : {"auto", "bytes", "fit"}
        ``bytes``: every band on one byte scale; ``fit``: each band spans the width; ``auto``:
        ``fit`` when the largest band is over 16 times the smallest.
    """
    fig = build_figure(pools, process, width, height, scale, dpi)
    w, h = fig.get_size_inches() * dpi
    fig.savefig(path, dpi=dpi, format="png")
    return int(round(w)), int(round(h))


__all__ = ["render_png", "build_figure", "auto_height", "stitch_lanes", "COLORS", "LABELS"]

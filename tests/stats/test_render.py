"""The memory-map picture: nothing drawn outside the figure, and the same state names as the text map."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("rich")

import glake  # noqa: E402
from glake.stats import collector, memmap, render, tables  # noqa: E402

from .child_server import fragmented_layout  # noqa: E402


@pytest.fixture(scope="module")
def pools():
    a = glake.Allocator(backend="host", name="render-test", chunk_bytes="2MiB")
    keep = fragmented_layout(a)
    yield collector.collect_pools("render-test")
    del keep


@pytest.mark.parametrize("width, height", [(900, 700), (1600, None), (500, 1400)])
def test_stitch_brackets_and_legend_stay_inside_the_picture(pools, width, height):
    from matplotlib.patches import FancyArrowPatch

    fig = render.build_figure(pools, {"pid": 1, "argv": ["train.py"]}, width=width, height=height)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    arrows = [p for ax in fig.axes for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) >= 3  # S1 lends blocks of three segments
    boxes = [p.get_window_extent(r) for p in arrows] + [lg.get_window_extent(r) for lg in fig.legends]
    for ax in fig.axes:
        boxes += [t.get_window_extent(r) for t in ax.texts]
    for b in boxes:
        assert b.x0 >= 0 and b.x1 <= fig.bbox.width and b.y0 >= 0 and b.y1 <= fig.bbox.height, (b, fig.bbox)


def test_picture_and_text_map_name_states_alike(pools):
    fig = render.build_figure(pools, width=1600)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    for state in memmap.SHOWN_STATES:
        assert memmap.STATE_LABELS[state] in legend
    in_band = {t.get_text().split()[-1] for ax in fig.axes for t in ax.texts if t.get_text().startswith("S")
               and "  " in t.get_text()}
    assert in_band and in_band <= set(memmap.SHOWN_STATES)  # e.g. "S1  held", "S2  detached"
    table = tables.map_table(pools[0])
    assert [c.header for c in table.columns][4:] == list(memmap.STATES)
    kinds = {seg["kind"] + (" · " + memmap.shown_state(seg, seg["blocks"][0]) if seg["kind"] == "stitched" else "")
             for seg in pools[0]["segments"]}
    assert {"stitched · held", "stitched · detached"} <= kinds
    assert all(memmap.STATE_LABELS[s] in table.caption for s in memmap.SHOWN_STATES)


def test_a_process_without_allocator_is_drawn_as_such():
    fig = render.build_figure([], {"pid": 1, "argv": ["x"]})
    texts = [t.get_text() for t in fig.texts]
    assert any("publishes no allocator" in t for t in texts)
    assert not any("nothing is allocated" in t for t in texts)

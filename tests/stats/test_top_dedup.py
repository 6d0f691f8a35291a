"""glake top's DEDUP column: the bytes a process saved by mapping other processes' weight chunks."""

from glake.stats.tables import NONE, TOP_COLUMNS, top_rows


def sample(pid, sections):
    return {"process": {"pid": pid, "argv": ["python", "serve.py"]}, "timestamp_unix_ns": 1, "sections": sections}


def test_dedup_column_shows_saved_bytes_or_nothing():
    dedup = {"name": "dedup", "error": "", "counters": {"saved_bytes": 3 << 30}, "values": {}, "labels": {}, "device": -1}
    rows = top_rows([sample(1, [dedup]), sample(2, [])], {})
    col = TOP_COLUMNS.index("DEDUP")
    assert all(len(r) == len(TOP_COLUMNS) for r in rows)
    assert rows[0][col] == "3.00 GiB" and rows[1][col] == NONE


def test_dedup_column_of_a_shim_process_shows_its_imported_chunks():
    """A shim process has no dedup section: its allocator's shared_imported_bytes (the stats page) count."""
    def allocator(device, imported):
        return {"name": "allocator", "error": "", "device": device, "labels": {"pool": f"cuda:{device}"},
                "values": {}, "counters": {"shared_imported_bytes": imported, "allocated_bytes.all.current": 0}}

    col = TOP_COLUMNS.index("DEDUP")
    rows = top_rows([sample(1, [allocator(0, 1 << 30), allocator(1, 1 << 30)]), sample(2, [allocator(0, 0)])], {})
    assert [r[col] for r in rows] == ["2.00 GiB", "2.00 GiB", NONE]

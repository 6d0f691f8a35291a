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

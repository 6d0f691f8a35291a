"""One configuration parser for every layer; its errors name the key, the value and where it came from."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import glake
import glake.multipath as mp
from glake import units
from glake.kvcache import KVCache


def test_keyword_argument_errors_say_keyword_argument(monkeypatch):
    monkeypatch.delenv("GLAKE_ALLOC_CONF", raising=False)
    with pytest.raises(glake.InvalidArgumentError) as e:
        glake.Allocator(backend="host", limit_bytes="-5")
    assert str(e.value).startswith("limit_bytes=-5 (keyword argument): not a byte count")
    assert "GLAKE_ALLOC_CONF" not in str(e.value)
    with pytest.raises(glake.InvalidArgumentError, match=r"^stitch=maybe \(keyword argument\): not a boolean"):
        glake.Allocator(backend="host", stitch="maybe")
    with pytest.raises(glake.InvalidArgumentError, match=r"memory_fraction=2 \(keyword argument\): must be"):
        glake.Allocator(backend="host", memory_fraction=2)


def test_environment_errors_say_glake_alloc_conf(monkeypatch):
    monkeypatch.setenv("GLAKE_ALLOC_CONF", "stitch:false,limit_bytes:-5")
    with pytest.raises(glake.InvalidArgumentError, match=r"^limit_bytes:-5 \(GLAKE_ALLOC_CONF\): not a byte count"):
        glake.Allocator(backend="host")
    monkeypatch.setenv("GLAKE_ALLOC_CONF", "stitch:false,limit_bytes")
    with pytest.raises(glake.InvalidArgumentError, match=r"GLAKE_ALLOC_CONF: 'limit_bytes' is not key:value"):
        glake.Allocator(backend="host")
    monkeypatch.setenv("GLAKE_ALLOC_CONF", "stitch:false,limit_bytes:64MB")
    a = glake.Allocator(backend="host", limit_bytes="1GiB")  # keywords win over the variable
    assert a.config["stitch"] == "false" and a.config["limit_bytes"] == str(1 << 30)


def test_the_global_allocator_reads_glake_alloc_conf_in_cpp():
    """glake.torch / glake.cupy's allocator is configured by C++ from the same variable, with the same words."""
    code = "import glake; from glake import _C\ntry:\n    _C.gmlake_global(0)\nexcept glake.InvalidArgumentError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, GLAKE_ALLOC_CONF="small_size:4MB", GLAKE_BACKEND="host"))
    assert out.stdout.strip() == "small_size:4MB (GLAKE_ALLOC_CONF): must be in [512 B, 1 MiB]", out.stderr


@pytest.mark.parametrize("text, expect", [("1048576", 1 << 20), ("512MB", 512 << 20), ("2GiB", 2 << 30),
                                          ("1.5G", 3 << 29), ("4 k", 4096), ("1T", 1 << 40)])
def test_one_byte_syntax_everywhere(text, expect):
    assert units.parse_bytes(text) == expect
    assert glake.Allocator(backend="host", limit_bytes=text).config["limit_bytes"] == str(expect)
    assert mp.parse_conf(f"small_copy_bytes:{text}") == {"small_copy_bytes": expect}


def test_kvcache_budget_takes_the_same_sizes_as_the_allocator():
    with KVCache(2, 2, 64, "float32", max_seqs=4, max_seq_len=256, backend="host", memory_budget="1GB") as kv:
        assert kv.memory_budget == 1 << 30
    with pytest.raises(glake.InvalidArgumentError, match=r"memory_budget=lots \(keyword argument\): not a byte count"):
        KVCache(2, 2, 64, "float32", max_seqs=4, max_seq_len=256, backend="host", memory_budget="lots")
    with pytest.raises(glake.InvalidArgumentError, match="memory_budget=-1"):
        KVCache(2, 2, 64, "float32", max_seqs=4, max_seq_len=256, backend="host", memory_budget=-1)


def test_one_byte_formatter():
    from glake.stats import units as stats_units

    assert stats_units.fmt_bytes is units.fmt_bytes
    assert units.fmt_bytes(1536) == "1.50 KiB" and units.fmt_bytes(0) == "0 B"


def test_one_backend_name():
    import glake.core

    assert glake.backend_name is glake.core.backend_name
    assert glake.backend_name("host") == "host"

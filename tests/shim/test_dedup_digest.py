"""dedup's content digest (csrc/shim/dedup_digest.h) on the host against a numpy reference of its
definition: lane l = sum over i of x[i] * (splitmix64(0x6C616B65 + 2*i + l) | 1) mod 2^64, x[i] the i-th
little-endian uint64 word; hex is lane 0 then lane 1, 16 digits each. The GPU kernel sums the same terms
with the same weight function (dedup_kernels.cu); checking it needs a GPU."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.shim.conftest import PROGRAMS, ROOT, compile_cpp

M64 = (1 << 64) - 1


def splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def reference(data: bytes) -> str:
    """The digest's hex by numpy (uint64 arithmetic wraps mod 2^64)."""
    x = np.frombuffer(data, dtype="<u8").astype(np.uint64)
    i = np.arange(len(x), dtype=np.uint64)
    lanes = []
    with np.errstate(over="ignore"):
        for lane in (0, 1):
            w = splitmix64(np.uint64(0x6C616B65) + np.uint64(2) * i + np.uint64(lane)) | np.uint64(1)
            lanes.append(int(np.sum(x * w, dtype=np.uint64)))
    return "".join(f"{v:016x}" for v in lanes)


def reference_int(data: bytes) -> str:
    """The same with Python integers, word by word (a check of the numpy reference on small inputs)."""
    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    words = [int.from_bytes(data[k:k + 8], "little") for k in range(0, len(data), 8)]
    return "".join(f"{sum(x * (mix(0x6C616B65 + 2 * i + lane) | 1) for i, x in enumerate(words)) & M64:016x}"
                   for lane in (0, 1))


@pytest.fixture(scope="module")
def digest_program(tmp_path_factory) -> Path:
    """tests/shim/programs/dedup_digest.cpp with csrc/shim/dedup_digest.cpp (no driver dependency)."""
    return compile_cpp(tmp_path_factory.mktemp("dedup_digest") / "dedup_digest",
                       [PROGRAMS / "dedup_digest.cpp", ROOT / "csrc" / "shim" / "dedup_digest.cpp"],
                       "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}")


def patterns() -> dict:
    rng = np.random.default_rng(20261201)
    chunk = 2 << 20
    random = rng.integers(0, 256, chunk, dtype=np.uint8).tobytes()
    flipped = bytearray(random)
    flipped[chunk // 2 + 3] ^= 0x10
    swapped = random[8:16] + random[:8] + random[16:]  # the same words, two of them in swapped places
    return {
        "zeros": bytes(chunk),
        "ones": b"\xff" * chunk,
        "counter": np.arange(chunk // 8, dtype="<u8").tobytes(),
        "random": random,
        "flipped": bytes(flipped),
        "swapped": swapped,
        "one_word": bytes(range(1, 9)),
        "odd_words": bytes(range(24)),
        "small_random": rng.integers(0, 256, 8 * 1001, dtype=np.uint8).tobytes(),
    }


def run(program: Path, files: list, **env: str) -> list:
    out = subprocess.run([str(program), *map(str, files)], capture_output=True, text=True, timeout=60,
                         env={**{k: v for k, v in os.environ.items() if k != "GLAKE_DEDUP_TEST_COLLIDE"}, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_numpy_reference_matches_the_definition_word_by_word():
    for data in (bytes(range(1, 9)), bytes(range(24)), b"\xff" * 64, np.arange(100, dtype="<u8").tobytes()):
        assert reference(data) == reference_int(data)


def test_host_digest_matches_the_reference(digest_program, tmp_path):
    cases = patterns()
    files = []
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        files.append(tmp_path / name)
    got = dict(zip(cases, run(digest_program, files)))
    for name, data in cases.items():
        assert got[name] == reference(data), name
        assert len(got[name]) == 32
    assert got["zeros"] == "0" * 32
    assert len({got[n] for n in ("random", "flipped", "swapped")}) == 3  # position and every bit count


def test_forced_collisions_make_every_digest_zero(digest_program, tmp_path):
    (tmp_path / "a").write_bytes(bytes(range(64)))
    (tmp_path / "b").write_bytes(b"\x07" * 64)
    assert run(digest_program, [tmp_path / "a", tmp_path / "b"], GLAKE_DEDUP_TEST_COLLIDE="1") == ["0" * 32] * 2
    assert run(digest_program, [tmp_path / "a"], GLAKE_DEDUP_TEST_COLLIDE="0") == [reference(bytes(range(64)))]

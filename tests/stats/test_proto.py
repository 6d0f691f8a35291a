"""The committed generated modules: they match proto/glake_stats.proto and run where the project runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT

PROTO = os.path.join(ROOT, "proto", "glake_stats.proto")
GEN = os.path.join(ROOT, "glake", "stats")
PINNED_TOOLS = "1.84.0"  # scripts/gen-proto.sh
# The oldest runtime the project must import the modules with: the GPU machines' grpcio 1.84.0
# (protobuf there is 7.36.2); CI installs the newest.
OLDEST_GRPCIO = (1, 84, 0)
OLDEST_PROTOBUF = (7, 35, 1)


def _read(name: str, root: str = GEN) -> str:
    with open(os.path.join(root, name)) as f:
        return f.read()


def test_version_floors_of_the_generated_code():
    grpc_mod = _read("glake_stats_pb2_grpc.py")
    (gen_grpc,) = re.findall(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_mod)
    assert tuple(map(int, gen_grpc.split("."))) <= OLDEST_GRPCIO, (
        f"generated for grpcio>={gen_grpc}: the GPU machines have 1.84.0; regenerate with scripts/gen-proto.sh")
    pb_mod = _read("glake_stats_pb2.py")
    m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
                  pb_mod)
    assert m, "no protobuf runtime version check found"
    assert tuple(map(int, m.groups())) <= OLDEST_PROTOBUF


@pytest.mark.parametrize("proto", ["glake_stats", "glake_control"])
def test_generated_modules_match_the_proto(tmp_path, proto):
    tools = pytest.importorskip("grpc_tools")
    del tools
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-Iglake/stats={os.path.dirname(PROTO)}",
                          f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                          os.path.join(os.path.dirname(PROTO), proto + ".proto")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    fresh_root = str(tmp_path / "glake" / "stats")

    def descriptor(text: str) -> bytes:
        (blob,) = re.findall(r"AddSerializedFile\((b'.*?')\)\n", text, re.S)
        return eval(blob)  # a bytes literal written by protoc

    assert descriptor(_read(f"{proto}_pb2.py", fresh_root)) == descriptor(_read(f"{proto}_pb2.py")), (
        f"glake/stats/{proto}_pb2.py is out of date: run scripts/gen-proto.sh")
    if version("grpcio-tools") == PINNED_TOOLS:  # the same generator: the files must be identical
        for name in (f"{proto}_pb2.py", f"{proto}_pb2_grpc.py"):
            assert _read(name, fresh_root) == _read(name), f"{name} is out of date: run scripts/gen-proto.sh"


def test_service_definition():
    pytest.importorskip("grpc")
    from glake.stats import glake_stats_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["GlakeStats"]
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in svc.methods}
    assert methods == {"GetStats": ("StatsRequest", "StatsReply", False),
                       "WatchStats": ("WatchStatsRequest", "StatsReply", True),
                       "GetMemoryMap": ("MemoryMapRequest", "MemoryMap", False)}
    assert pb.DESCRIPTOR.package == "glake.stats.v1"

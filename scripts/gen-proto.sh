#!/usr/bin/env bash
# Regenerates glake/stats/glake_{stats,control}_pb2.py and _pb2_grpc.py from proto/glake_{stats,control}.proto.
#
# The generated modules are committed (the GPU machines have grpcio but not grpcio-tools). Generate
# them with the grpcio-tools version pinned below: its code asks for grpcio >= 1.84.0 and protobuf
# >= 7.35.1 at import, which every machine the project runs on has; a newer grpcio-tools would
# raise that floor. Usage: scripts/gen-proto.sh [OUTPUT_ROOT]   (default: the repository root)
set -euo pipefail
GRPCIO_TOOLS_VERSION=1.84.0
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
python3 - "$GRPCIO_TOOLS_VERSION" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
want = sys.argv[1]
try:
    have = version("grpcio-tools")
except PackageNotFoundError:
    sys.exit(f"gen-proto: grpcio-tools is not installed (pip install grpcio-tools=={want})")
if have != want:
    sys.exit(f"gen-proto: grpcio-tools {have} is installed, {want} is pinned (pip install grpcio-tools=={want})")
PY
mkdir -p "$out/glake/stats"
# -Iglake/stats=proto names the file glake/stats/glake_stats.proto, so the generated grpc module
# imports its message module as `from glake.stats import glake_stats_pb2`.
for name in glake_stats glake_control; do
  python3 -m grpc_tools.protoc -Iglake/stats="$root/proto" --python_out="$out" --grpc_python_out="$out" \
    "$root/proto/$name.proto"
  echo "gen-proto: wrote $out/glake/stats/${name}_pb2.py and ${name}_pb2_grpc.py"
done

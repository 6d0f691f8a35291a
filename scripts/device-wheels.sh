#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels the GPU machine lacks, for its python3.12: what the
# serve API (fastapi, uvicorn, pydantic) and the stats service (grpcio, protobuf) import there.
# scripts/gpu-test.sh installs whatever .whl/ holds into /tmp/site first; a device call carries it
# when asked (carry: [".whl"]; about 11 MB of a call's 64 MiB). Run on a machine that reaches PyPI:
#
#   scripts/device-wheels.sh            # then: carry .whl in the device call that runs gpu-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# --no-deps: the list is the closure of what is missing there (the GPU machine has anyio, h11,
# typing-extensions, ...); fastapi 0.165 needs opentelemetry-api and annotated-doc as well.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types typing-inspection opentelemetry-api==1.45.2 annotated-doc \
  protobuf==7.36.2 grpcio==1.85.3
du -sh .whl

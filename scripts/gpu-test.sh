#!/usr/bin/env bash
# The one GPU entry point: build in place (no network), run the GPU tests, run the benchmarks named
# on the command line, and leave every log in $OUT/gpu-logs.tgz (or ./gpu-logs without $OUT).
#
#   scripts/gpu-test.sh                                   # build + pytest -m gpu
#   scripts/gpu-test.sh "vmm_latency --chunks 512"        # ... + benchmarks/vmm_latency.py --chunks 512
#   GLAKE_TEST_ALL=1 scripts/gpu-test.sh                  # the whole suite, not only -m gpu
#
# Wheels missing on the GPU machine can travel in .whl/ (see the device README); they are
# installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)/gpu-logs
mkdir -p "$LOGS"
export GLAKE_BENCH_DIR="$LOGS"
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$LOGS/nvidia-smi.txt"

echo "== build"
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1; then
  tail -n 60 "$LOGS/build.log"
  echo "BUILD FAILED"
  status=1
else
  tail -n 2 "$LOGS/build.log"
  echo "== tests"
  marker=(-m gpu)
  [ "${GLAKE_TEST_ALL:-0}" = 1 ] && marker=()
  python3 -m pytest -q -rs "${marker[@]}" tests 2>&1 | tee "$LOGS/pytest.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  for bench in "$@"; do
    name=${bench%% *}
    args=${bench#"$name"}
    echo "== benchmark $name$args"
    # shellcheck disable=SC2086
    python3 "benchmarks/$name.py" $args 2>&1 | tee "$LOGS/bench-$name.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
fi

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-logs.tgz" -C "$(dirname "$LOGS")" gpu-logs
else
  rm -rf gpu-logs && cp -r "$LOGS" gpu-logs
fi
echo "gpu-test.sh: exit $status"
exit $status

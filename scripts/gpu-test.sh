#!/usr/bin/env bash
# The one GPU entry point: build in place (no network), run the GPU tests, run the benchmarks named
# on the command line, and leave every log in $OUT/gpu-logs.tgz (or ./gpu-logs without $OUT).
#
#   scripts/gpu-test.sh                                   # build + pytest -m gpu
#   scripts/gpu-test.sh "vmm_latency --chunks 512"        # ... + benchmarks/vmm_latency.py --chunks 512
#   GLAKE_TEST_ALL=1 scripts/gpu-test.sh                  # the whole suite, not only -m gpu
#   scripts/gpu-test.sh --sanitize                        # the allocator's and kvcache's GPU tests under
#                                                         # compute-sanitizer memcheck (after a planted error)
#   scripts/gpu-test.sh --part 1/2 [...]; --part 2/2 [...]  # the GPU tests in two halves, for machines whose
#                                                         # calls are cut before the whole suite ends (570 s
#                                                         # of tests on a slow H200, 2026-12-03): part 1 the
#                                                         # allocator, kvcache, multipath and top-level tests,
#                                                         # part 2 shim, dedup, serve and stats; a commit is
#                                                         # verified when both parts have a line
#
# Passing tests append one line to docs/gpu-verified.txt (date, GPU, torch, "N passed, M failed", the
# commit: $GLAKE_COMMIT where the tree travels without .git, else git's HEAD with "+dirty" when the
# tree has uncommitted changes), before the benchmarks run; the file is copied to $OUT too. The exit
# status is non-zero when a test or a benchmark failed.
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
sanitize=0
if [ "${1:-}" = "--sanitize" ]; then
  sanitize=1
  shift
fi
part=""
PART2=(tests/shim tests/dedup tests/serve tests/stats)
targets=(tests)
if [ "${1:-}" = "--part" ]; then
  part=${2:-}
  shift 2
  case "$part" in
    1/2) targets=(tests); for d in "${PART2[@]}"; do targets+=("--ignore=$d"); done ;;
    2/2) targets=("${PART2[@]}") ;;
    *) echo "gpu-test.sh: --part takes 1/2 or 2/2, not '$part'"; exit 2 ;;
  esac
fi

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
  if [ "$sanitize" = 1 ]; then
    # The planted error must be found, or a clean run proves nothing.
    if compute-sanitizer --tool memcheck --error-exitcode 3 python3 scripts/sanitizer_planted.py \
        >"$LOGS/sanitizer-planted.log" 2>&1; then
      echo "compute-sanitizer did NOT report the planted out-of-bounds write"; status=1
    else
      grep -m1 -E "Invalid __global__ (write|read)" "$LOGS/sanitizer-planted.log" || { echo "planted run failed otherwise"; status=1; }
    fi
    export GLAKE_UNDER_SANITIZER=1
    # API errors are not memory errors: the OOM tests provoke out-of-memory on purpose (seen on the H200)
    compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all --report-api-errors no \
      python3 -m pytest -q -rs --durations=30 "${marker[@]}" tests/gmlake tests/kvcache 2>&1 | tee "$LOGS/pytest.log"
  else
    python3 -m pytest -q -rs --durations=30 "${marker[@]}" "${targets[@]}" 2>&1 | tee "$LOGS/pytest.log"
  fi
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  # the record is the tests' (written before the benchmarks, so a benchmark cut off by time cannot lose it)
  summary=$(grep -E "^[0-9]+ (passed|failed)|[0-9]+ passed" "$LOGS/pytest.log" 2>/dev/null | tail -n 1)
  passed=$(grep -oE "[0-9]+ passed" <<<"$summary" | grep -oE "[0-9]+")
  failed=$(grep -oE "[0-9]+ failed" <<<"$summary" | grep -oE "[0-9]+")
  if [ "$status" = 0 ] && [ -n "$passed" ]; then
    commit=${GLAKE_COMMIT:-}
    if [ -z "$commit" ] && git rev-parse HEAD >/dev/null 2>&1; then
      commit=$(git rev-parse --short=12 HEAD)
      [ -n "$(git status --porcelain --untracked-files=no)" ] && commit="$commit+dirty"
    fi
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
    torch_version=$(python3 -c "import torch; print(torch.__version__)" 2>/dev/null)
    mode=$([ "$sanitize" = 1 ] && echo " (compute-sanitizer memcheck)")$([ -n "$part" ] && echo " (part $part)")
    echo "$(date -u +%Y-%m-%dT%H:%MZ)  ${gpu}  torch ${torch_version}  ${passed} passed, ${failed:-0} failed${mode}  ${commit:-unknown}" \
      >>docs/gpu-verified.txt
    tail -n 1 docs/gpu-verified.txt
    [ -n "${OUT:-}" ] && cp docs/gpu-verified.txt "$OUT/gpu-verified.txt"
  fi
  for bench in "$@"; do
    name=${bench%% *}
    args=${bench#"$name"}
    echo "== benchmark $name$args"
    # shellcheck disable=SC2086
    python3 "benchmarks/$name.py" $args 2>&1 | tee "$LOGS/bench-$name.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    [ -n "${OUT:-}" ] && tar czf "$OUT/gpu-logs.tgz" -C "$(dirname "$LOGS")" gpu-logs
  done
fi

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-logs.tgz" -C "$(dirname "$LOGS")" gpu-logs
else
  rm -rf gpu-logs && cp -r "$LOGS" gpu-logs
fi
echo "gpu-test.sh: exit $status"
exit $status

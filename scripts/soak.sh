#!/usr/bin/env bash
# Heavy fuzz and soak runs, kept out of CI (which runs the same tests small): the hypothesis tests of
# the allocator (host and fake cuda backends) and the KV cache with many examples, then the sanitizer
# and fake-libcuda stress tests several times over. Any failure stops the run (hypothesis prints the shortest failing sequence).
#
#   scripts/soak.sh [EXAMPLES] [ROUNDS]      # defaults 2000 examples, 3 rounds (~10 min on 2 cores)
#
# On a GPU machine the cuda-backend KV state machine runs too (it is skipped without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLES=${1:-2000}
ROUNDS=${2:-3}
echo "== hypothesis: $EXAMPLES examples per test"
GLAKE_FUZZ_EXAMPLES=$EXAMPLES python3 -m pytest -q -x tests/gmlake/test_allocator_properties.py tests/kvcache/test_stateful.py \
  tests/test_fake_cuda_backend.py   # the last: the allocator property test again, on the fake libcuda
for i in $(seq 1 "$ROUNDS"); do
  echo "== stress round $i of $ROUNDS"
  python3 -m pytest -q -x tests/gmlake/test_gmlake_sanitizers.py tests/multipath/test_multipath_sanitizers.py \
    tests/multipath/test_multipath_fake_cuda.py tests/gmlake/test_gmlake_fake_cuda.py
done
echo "soak: all passed"

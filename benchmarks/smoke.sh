#!/usr/bin/env bash
# Every benchmark script at its smallest size, so that none of them rots unnoticed (they call modfx.cli's
# helpers, which the tests do not drive from here). Numbers from these runs mean nothing; CI only needs
# each script to finish. `.ci/run` runs it after the tests:
#
#     bash benchmarks/smoke.sh [python]      # default .venv/bin/python; about 5 minutes on 2 cores (cold caches)
#
# Not covered: peers.py (installs the peer package in its own environment; see RESULTS.md) and gpu.sh
# (needs CUDA). tests/test_isoflop.py runs isoflop.py and convert.py --quick; tests/test_cli.py runs `modfx bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
run() {
  local name=$1; shift
  local t=$SECONDS
  if ! "$PY" "$@" >"$OUT/$name.log" 2>&1; then
    echo "benchmark smoke run failed: $*"; tail -30 "$OUT/$name.log"; exit 1
  fi
  echo "ok $name ($((SECONDS - t)) s)"
}
TINY="--d-model 64 --heads 4 --seq 64 --batch 2"
run bench_routing benchmarks/bench_routing.py $TINY --repeat 1 --warmup 0 --ops --op-repeat 1
run bench_routing_backward benchmarks/bench_routing.py $TINY --repeat 1 --warmup 0 --ops --op-repeat 1 --backward
run capacity_sweep benchmarks/capacity_sweep.py --quick --out "$OUT"
run compile_time benchmarks/compile_time.py --layers 2 --d-model 64 --seq 32 --rounds 1 --list
run decode benchmarks/decode.py --quick
run ab_commit benchmarks/ab_commit.py --base HEAD --rounds 1

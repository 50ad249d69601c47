#!/usr/bin/env bash
# On a CUDA box: the GPU-only tests, then the benchmark at Qwen3-0.6B's shape (random init, no download).
# Logs and the benchmark's JSON go to OUT_DIR; extra arguments are forwarded to bench.py.
#   bash scripts/run_gpu_checks.sh
#   MODEL=/models/Qwen3-0.6B N_QUERIES=100 bash scripts/run_gpu_checks.sh
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if command -v python >/dev/null; then PYTHON="${PYTHON:-python}"; else PYTHON="${PYTHON:-python3}"; fi

# benchmark
MODEL="${MODEL:-qwen3-0.6b}"       # 'qwen3-0.6b' (real shape, random init) or a model folder
N_QUERIES="${N_QUERIES:-40}"       # x 12 items: enough pairs that eval.py's start-up cost is amortized
WHOLE_PROCESS="${WHOLE_PROCESS:-1}" # 0: skip timing eval.py as a fresh process

# outputs: a relative OUT_DIR is taken from where the script is called
OUT_DIR="${OUT_DIR:-$REPO_DIR/outputs/gpu_checks}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

bench_args=(--model "$MODEL" --n_queries "$N_QUERIES" --json "$OUT_DIR/bench.json")
if [ "$WHOLE_PROCESS" = "1" ]; then bench_args+=(--whole_process); fi

cd "$REPO_DIR"
# The benchmark runs even when a test fails (its numbers and the test log are both worth reading);
# the script's exit status is the tests', or the benchmark's if the tests passed.
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "note: no CUDA device here (or no torch for $PYTHON), so tests/test_gpu.py skips its tests and bench.py" \
       "measures this CPU" >&2
fi
tests_status=0
bench_status=0
# -o addopts="": one process, so pytest-xdist (the suite's -n 2) need not be installed on the GPU box
"$PYTHON" -m pytest -q -o addopts="" tests/test_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log" || tests_status=$?
"$PYTHON" bench.py "${bench_args[@]}" "$@" 2>&1 | tee "$OUT_DIR/bench.log" || bench_status=$?
if [ "$tests_status" -ne 0 ]; then exit "$tests_status"; fi
exit "$bench_status"

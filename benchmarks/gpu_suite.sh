#!/usr/bin/env bash
# Every GPU check and benchmark, for a lent GPU machine with torch, triton, ninja and pytest
# preinstalled and no network:
#   bash benchmarks/gpu_suite.sh OUTDIR [STAGE ...]
# Stages, in this order (all of them by default; name some to split the suite over two calls of a
# tool that limits one command to 10 minutes, on the same warm machine):
#   build      the extension in place (CUDA sources included when torch has CUDA)
#   tests      the GPU tests (tests/gpu), the Triton kernel tests and the attention tests, natively
#   conv-tf32  QuaternionConv2d/3d fwd, bwd, fwd+bwd: naive16, expanded (cuDNN), cuda,
#   conv-bf16  triton/hamilton, triton/fast8, auto; ratios to expanded
#   attention  the A-QCF block in bf16 (naive, SDPA-composed, ours), 256 to 16384 tokens
# Writes OUTDIR/{setup.log,tests.txt}, OUTDIR/{tf32,bf16}/conv.{md,json,png} and
# OUTDIR/attention/attention.{md,json,png}. (The device tool brings back 8 files: tar OUTDIR there.)
# Each stage runs even if an earlier one failed; the exit code is non-zero if any failed.
# Environment: PYTHON (default python3); CONV_CASES, a --cases filter for the conv grid (e.g.
# "2d 64q,3d 32q"); BENCH_ARGS, extra arguments for every benchmark (e.g. --no-memory);
# XDIST_WORKERS, pytest-xdist workers for the tests (default 8); TESTS_TIMEOUT, seconds (default 300).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR [build|tests|conv-tf32|conv-bf16|attention ...]}
shift
STAGES=${*:-build tests conv-tf32 conv-bf16 attention}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
stamp() { echo "[gpu_suite +$(($(date +%s) - t0))s] $*" | tee -a "$OUT/setup.log"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }

stamp "machine; stages: $STAGES"
{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; git rev-parse --short HEAD; } >>"$OUT/setup.log" 2>&1

if wants build; then
  stamp "building the extension (CUDA included)"
  if MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace >>"$OUT/setup.log" 2>&1; then
    stamp "build ok"
  else
    stamp "BUILD FAILED (see above)"; status=1
  fi
  "$PY" -c "import aqcf_kernels; print(aqcf_kernels.backends())" >>"$OUT/setup.log" 2>&1
fi

if wants tests; then
  stamp "GPU tests"
  # pytest-xdist, where installed, compiles kernels in parallel and turns a crashing test into a
  # failure (the worker is replaced) instead of ending the whole run.
  parallel=(); if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n "${XDIST_WORKERS:-8}"); fi
  if timeout "${TESTS_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${parallel[@]}" \
      tests/gpu tests/triton_kernels tests/attention -rs --durations=15 >"$OUT/tests.txt" 2>&1; then
    stamp "tests passed"
  else
    stamp "TESTS FAILED or timed out (see tests.txt)"; status=1
  fi
  tail -n 3 "$OUT/tests.txt" | tee -a "$OUT/setup.log"
fi

for mode in tf32 bf16; do
  wants "conv-$mode" || continue
  stamp "benchmark conv $mode"
  if [ "$mode" = tf32 ]; then args=(--dtype float32 --tf32); else args=(--dtype bfloat16); fi
  if [ -n "${CONV_CASES:-}" ]; then args+=(--cases "$CONV_CASES"); fi
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of words
  if ! timeout 300 "$PY" -m benchmarks.cli conv --device cuda --grid gpu --reps 10 --warmup 3 \
      "${args[@]}" ${BENCH_ARGS:-} --out "$OUT/$mode" >>"$OUT/setup.log" 2>&1; then
    stamp "BENCHMARK conv $mode FAILED or timed out"; status=1
  fi
done

if wants attention; then
  stamp "benchmark attention bf16"
  # shellcheck disable=SC2086
  if ! timeout 240 "$PY" -m benchmarks.cli attention --device cuda --dtype bfloat16 --grid full --reps 10 --warmup 3 \
      --naive-max-gib 20 ${BENCH_ARGS:-} --out "$OUT/attention" >>"$OUT/setup.log" 2>&1; then
    stamp "BENCHMARK attention FAILED or timed out"; status=1
  fi
fi
stamp "done, status $status"
exit $status

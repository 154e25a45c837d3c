#!/usr/bin/env bash
# Every GPU check and benchmark, for a lent GPU machine with torch, triton, ninja and pytest
# preinstalled and no network:
#   bash benchmarks/gpu_suite.sh OUTDIR [STAGE ...]
# Stages, in this order, most wanted first (all of them by default; name some to run only those):
#   build      the extension in place (its ATen host code is the cuda backend)
#   tests      the GPU tests (tests/gpu), the Triton kernel tests and the attention tests, natively, with
#              AQCF_TRITON_AUTOTUNE=first (one config per shape, untimed; test_autotune_configs.py runs
#              every config of every autotuned kernel); each failure is written to test-failures.txt as
#              it happens, so a run the budget cuts still names them
#   conv-bf16  QuaternionConv2d fwd, bwd, fwd+bwd on the target cases of --grid gpu (2d 16q, 64q, 128q):
#              naive16, expanded (cuDNN), cuda, triton/hamilton, triton/fast8, auto; ratios to expanded;
#              bf16, channels_last, the issue's GPU targets checked; then conv+bias+ReLU fused vs cuDNN +
#              torch.relu on 2d 64q
#   profile    one profiled fwd+bwd step of the conv target cases (2d 16q, 64q) per provider: wall time, device
#              busy time, kernels per step, top kernels; Chrome traces (benchmarks/gpu_stages.py profile)
#   model      the A-QCF-Net training step (aqcf-bench model --grid targets: 2D 128² B4, 3D 64³ B1) in bf16:
#              baseline (today's libraries), expanded, ours, the real twin; issue 14's GPU target (ours >=
#              1.3x baseline) checked; each build's device time per module family
#   host       a small conv's time per call, back to back (host-bound): one aten conv, the expanded-weight
#              baseline, ours with auto and each backend forced, fwd and fwd+bwd; a small A-QCF block against
#              the SDPA-composed block (benchmarks/gpu_stages.py host)
#   attention  the A-QCF block in bf16 (naive, SDPA-composed, ours = PyTorch's flash kernel through the
#              torch backend, ours/triton), 256 to 16384 tokens, time only; the 1k-16k target (>= 0.9x
#              SDPA) checked
#   norm       fused quaternion norm + GELU fwd+bwd (Triton kernels) vs the composite path, batch and
#              instance, 2d and 3d, fp32 and bf16; then a conv's backward passes: dL/dz + bias gradient in
#              one Triton pass vs aten's two, and a conv's weight + bias gradients from one Triton launch vs
#              the weight gradient then a sum (benchmarks/gpu_stages.py norm, passes)
#   rnn        QLSTM / QLiGRU layer fwd+bwd, 512 hidden, batch 8, 100 steps: the fused recurrence
#              (aqcf::rnn_sequence on the Triton cell kernels) vs the composite per-step loop, fp32 and bf16
#   conv-bf16-grid  the whole --grid gpu in bf16 (2d and 3d: `auto` >= 0.95x the best provider on every case)
#   conv-tf32  the conv grid in float32 with TF32 (no target: last)
# Writes OUTDIR/{setup.log,tests.txt,test-failures.txt,stages.md},
# OUTDIR/{bf16,bf16-relu,bf16-grid,tf32}/conv.{md,json,png},
# OUTDIR/profile/profile.{md,json} (and its traces), OUTDIR/model/model.{md,json,png}, OUTDIR/host/{host,block}.{md,json}, OUTDIR/attention/attention.{md,json,png}, OUTDIR/norm/{norm,activation_pass,wgrad_bias}.{md,json} and
# OUTDIR/rnn/rnn.{md,json}. (The device tool brings back 8 files: tar OUTDIR there.)
# Time: the whole suite gets SUITE_BUDGET seconds (default 360, the issue's 6 minutes); each stage runs
# under `timeout` for the smaller of its own cap and what is left, and a stage with under SUITE_MIN_STAGE
# seconds left (default 15) is skipped and reported. stages.md lists each stage's seconds and result (plan a second call from it).
# Each stage runs even if an earlier one failed; the exit code is non-zero if any failed or was cut.
# Environment: PYTHON (default python3); SUITE_BUDGET, SUITE_MIN_STAGE (above); CONV_CASES, a --cases filter for the conv grid (e.g.
# "2d 64q,3d 32q"; conv-bf16 defaults to the target cases); BENCH_ARGS, extra arguments for every benchmark
# (e.g. --no-memory); XDIST_WORKERS, pytest-xdist workers for the tests (default 16); SUITE_DEVICE=cpu, a dry run of every
# stage's command at tiny sizes on CPU (tests/benchmarks/test_gpu_suite.py; its numbers mean nothing).
set -uo pipefail
ALL_STAGES="build tests conv-bf16 profile model host attention norm rnn conv-bf16-grid conv-tf32"
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR [STAGE ...], stages: $ALL_STAGES}
shift
STAGES=${*:-$ALL_STAGES}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DEVICE=${SUITE_DEVICE:-cuda}
BUDGET=${SUITE_BUDGET:-360}
MIN_STAGE=${SUITE_MIN_STAGE:-15}
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
deadline=$((t0 + BUDGET))
stamp() { echo "[gpu_suite +$(($(date +%s) - t0))s] $*" | tee -a "$OUT/setup.log"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }
for s in $STAGES; do
  if [[ " $ALL_STAGES " != *" $s "* ]]; then
    echo "gpu_suite: unknown stage '$s' ($ALL_STAGES)" >&2
    exit 2
  fi
done
printf '| stage | seconds | limit | result |\n|:--|--:|--:|:--|\n' >"$OUT/stages.md"

# run NAME CAP LOG CMD...: CMD under `timeout` for min(CAP, the budget left), output appended to LOG;
# a line in stages.md either way.
run() {
  local name=$1 cap=$2 log=$3 left limit start rc result seconds
  shift 3
  left=$((deadline - $(date +%s)))
  if ((left < MIN_STAGE)); then
    stamp "SKIPPED $name: the suite's budget (${BUDGET}s) is spent"
    echo "| $name | 0 | 0 | skipped: budget spent |" >>"$OUT/stages.md"
    status=1
    return 1
  fi
  limit=$((cap < left ? cap : left))
  start=$(date +%s)
  stamp "$name (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124) result="TIMED OUT" ;;
    *) result="FAILED (exit $rc)" ;;
  esac
  ((rc == 0)) || status=1
  seconds=$(($(date +%s) - start))
  stamp "$name: $result after ${seconds}s"
  echo "| $name | $seconds | $limit | $result |" >>"$OUT/stages.md"
  return "$rc"
}

if [ "$DEVICE" = cuda ]; then
  CONV=(--device cuda --grid gpu --reps 10 --warmup 3 --min-time 0)
  RELU=(--cases "2d 64q k3 N32" --providers expanded+relu,triton/hamilton+relu)
  # no memory pass: its fresh process recompiles the kernels (cut at 100 s on the H200 after 73 s of timing)
  ATTENTION=(--device cuda --grid full --reps 10 --warmup 3 --naive-max-gib 20 --no-memory)
  TARGET_CASES="2d 64q k3 N32,2d 16q k3 N32,2d 128q k3 N32"
  # no memory pass (a fresh process: compiles and tunes again); peak memory is a CPU target only
  MODEL=(--device cuda --grid targets --reps 10 --warmup 3 --no-memory)
  SIZES=()
else # a dry run: the same commands, on CPU, at tiny sizes
  CONV=(--device "$DEVICE" --grid quick --reps 1 --warmup 0 --min-time 0)
  CONV_CASES=${CONV_CASES:-2d 16q}
  TARGET_CASES=$CONV_CASES
  RELU=(--cases "2d 16q" --providers expanded+relu) # (no Triton off CUDA)
  ATTENTION=(--device "$DEVICE" --tokens 256 --channels 8 --reps 1 --warmup 0)
  MODEL=(--device "$DEVICE" --grid host --reps 1 --warmup 0 --no-memory)
  SIZES=(--small)
fi

stamp "machine; stages: $STAGES; budget ${BUDGET}s; device $DEVICE"
{
  nvidia-smi
  timeout 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD
} >>"$OUT/setup.log" 2>&1

if wants build; then
  run build 150 "$OUT/setup.log" env MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
  timeout 60 "$PY" -c "import aqcf_kernels; print(aqcf_kernels.backends())" >>"$OUT/setup.log" 2>&1
fi

if wants tests; then
  # pytest-xdist, where installed, compiles kernels in parallel and turns a crashing test into a
  # failure (the worker is replaced) instead of ending the whole run.
  parallel=()
  # 16 workers: the H200 machine's cores (8 reached 61% of the tests in 180 s there, 2026-12-04). Each
  # failure goes to test-failures.txt as it happens: a cut run still names them (pytest_failure_log).
  if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n "${XDIST_WORKERS:-16}"); fi
  run tests 180 "$OUT/tests.txt" env AQCF_TRITON_AUTOTUNE=first AQCF_TEST_FAILURES="$OUT/test-failures.txt" \
    "$PY" -m pytest -q -p no:cacheprovider -p benchmarks.pytest_failure_log -m "not slow" "${parallel[@]}" \
    tests/gpu tests/triton_kernels tests/attention -rs --durations=15
  tail -n 3 "$OUT/tests.txt" | tee -a "$OUT/setup.log"
fi

if wants conv-bf16; then
  # the issue's GPU targets: bf16, channels_last activations, PASS/FAIL per target in the report; the
  # target cases only (75 s on the H200; the whole grid did not finish in 117 s): conv-bf16-grid has the rest
  args=(--dtype bfloat16 --channels-last --check-targets --cases "${CONV_CASES:-$TARGET_CASES}")
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of words
  run conv-bf16 150 "$OUT/setup.log" "$PY" -m benchmarks.cli conv "${CONV[@]}" "${args[@]}" ${BENCH_ARGS:-} \
    --out "$OUT/bf16"
  # shellcheck disable=SC2086
  run conv-bf16-relu 45 "$OUT/setup.log" "$PY" -m benchmarks.cli conv "${CONV[@]}" "${RELU[@]}" \
    --modes fwdbwd --dtype bfloat16 --channels-last --check-targets ${BENCH_ARGS:-} --out "$OUT/bf16-relu"
fi

if wants profile; then
  run profile 60 "$OUT/setup.log" "$PY" -m benchmarks.gpu_stages profile "$OUT/profile" --device "$DEVICE" "${SIZES[@]}"
fi

if wants model; then
  # shellcheck disable=SC2086
  run model 120 "$OUT/setup.log" "$PY" -m benchmarks.cli model "${MODEL[@]}" --modes fwdbwd --dtype bfloat16 \
    --check-targets ${BENCH_ARGS:-} --out "$OUT/model"
fi

if wants host; then
  run host 40 "$OUT/setup.log" "$PY" -m benchmarks.gpu_stages host "$OUT/host" --device "$DEVICE" "${SIZES[@]}"
fi

if wants attention; then
  # shellcheck disable=SC2086
  run attention 90 "$OUT/setup.log" "$PY" -m benchmarks.cli attention "${ATTENTION[@]}" --dtype bfloat16 \
    --check-targets ${BENCH_ARGS:-} --out "$OUT/attention"
fi

if wants norm; then
  run norm 45 "$OUT/setup.log" "$PY" -m benchmarks.gpu_stages norm "$OUT/norm" --device "$DEVICE" "${SIZES[@]}"
  run passes 40 "$OUT/setup.log" "$PY" -m benchmarks.gpu_stages passes "$OUT/norm" --device "$DEVICE" "${SIZES[@]}"
fi

if wants rnn; then
  run rnn 45 "$OUT/setup.log" "$PY" -m benchmarks.gpu_stages rnn "$OUT/rnn" --device "$DEVICE" "${SIZES[@]}"
fi

if wants conv-bf16-grid; then
  args=(--dtype bfloat16 --channels-last --check-targets)
  if [ -n "${CONV_CASES:-}" ]; then args+=(--cases "$CONV_CASES"); fi
  # shellcheck disable=SC2086
  run conv-bf16-grid 150 "$OUT/setup.log" "$PY" -m benchmarks.cli conv "${CONV[@]}" "${args[@]}" ${BENCH_ARGS:-} \
    --out "$OUT/bf16-grid"
fi

if wants conv-tf32; then
  args=(--dtype float32 --tf32)
  if [ -n "${CONV_CASES:-}" ]; then args+=(--cases "$CONV_CASES"); fi
  # shellcheck disable=SC2086
  run conv-tf32 90 "$OUT/setup.log" "$PY" -m benchmarks.cli conv "${CONV[@]}" "${args[@]}" ${BENCH_ARGS:-} \
    --out "$OUT/tf32"
fi

stamp "done in $(($(date +%s) - t0))s, status $status"
cat "$OUT/stages.md" | tee -a "$OUT/setup.log"
exit $status

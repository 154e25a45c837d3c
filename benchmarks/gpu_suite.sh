#!/usr/bin/env bash
# Every GPU check and benchmark, for a lent GPU machine with torch, triton, ninja and pytest
# preinstalled and no network:
#   bash benchmarks/gpu_suite.sh OUTDIR [STAGE ...]
# Stages, in this order (all of them by default; name some to split the suite over two calls of a
# tool that limits one command to 10 minutes, on the same warm machine):
#   build      the extension in place (its ATen host code is the cuda backend)
#   tests      the GPU tests (tests/gpu), the Triton kernel tests and the attention tests, natively
#   conv-tf32  QuaternionConv2d/3d fwd, bwd, fwd+bwd: naive16, expanded (cuDNN), cuda,
#   conv-bf16  triton/hamilton, triton/fast8, auto; ratios to expanded (bf16: channels_last, the GPU
#              targets checked; plus conv+bias+ReLU fused vs cuDNN + torch.relu on 2d 64q)
#   attention  the A-QCF block in bf16 (naive, SDPA-composed, ours = PyTorch's flash kernel through the
#              torch backend, ours/triton), 256 to 16384 tokens; the 1k-16k target (>= 0.9x SDPA) checked
#   norm       fused quaternion norm + GELU fwd+bwd (Triton kernels) vs the composite path, batch and
#              instance, 2d and 3d, fp32 and bf16 (~1 min); then the conv activation's backward pass
#              (dL/dz + bias gradient in one Triton pass vs aten's two), bf16, relu/gelu, both layouts, and a
#              conv's weight + bias gradients from one Triton launch vs the weight gradient then a sum
#   rnn        QLSTM / QLiGRU layer fwd+bwd, 512 hidden, batch 8, 100 steps: the fused recurrence
#              (aqcf::rnn_sequence on the Triton cell kernels) vs the composite per-step loop, fp32 and bf16
# Writes OUTDIR/{setup.log,tests.txt}, OUTDIR/{tf32,bf16,bf16-relu}/conv.{md,json,png},
# OUTDIR/attention/attention.{md,json,png}, OUTDIR/norm/{norm,activation_pass,wgrad_bias}.{md,json} and OUTDIR/rnn/rnn.{md,json}. (The device tool brings back 8 files: tar OUTDIR there.)
# Each stage runs even if an earlier one failed; the exit code is non-zero if any failed.
# Environment: PYTHON (default python3); CONV_CASES, a --cases filter for the conv grid (e.g.
# "2d 64q,3d 32q"); BENCH_ARGS, extra arguments for every benchmark (e.g. --no-memory);
# XDIST_WORKERS, pytest-xdist workers for the tests (default 8); TESTS_TIMEOUT, seconds (default 300).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR [build|tests|conv-tf32|conv-bf16|attention|norm|rnn ...]}
shift
STAGES=${*:-build tests conv-tf32 conv-bf16 attention norm rnn}
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
  stamp "building the extension"
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
  # bf16 runs the issue's GPU targets: channels_last activations, PASS/FAIL per target in the report
  if [ "$mode" = tf32 ]; then args=(--dtype float32 --tf32); else args=(--dtype bfloat16 --channels-last --check-targets); fi
  if [ -n "${CONV_CASES:-}" ]; then args+=(--cases "$CONV_CASES"); fi
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of words
  if ! timeout 300 "$PY" -m benchmarks.cli conv --device cuda --grid gpu --reps 10 --warmup 3 \
      "${args[@]}" ${BENCH_ARGS:-} --out "$OUT/$mode" >>"$OUT/setup.log" 2>&1; then
    stamp "BENCHMARK conv $mode FAILED or timed out"; status=1
  fi
  if [ "$mode" = bf16 ]; then
    stamp "benchmark conv+bias+ReLU bf16: the fused epilogue vs cuDNN + torch.relu"
    # shellcheck disable=SC2086
    if ! timeout 120 "$PY" -m benchmarks.cli conv --device cuda --grid gpu --cases "2d 64q k3 N32" --modes fwdbwd \
        --providers expanded+relu,triton/hamilton+relu "${args[@]}" --reps 10 --warmup 3 ${BENCH_ARGS:-} \
        --out "$OUT/bf16-relu" >>"$OUT/setup.log" 2>&1; then
      stamp "BENCHMARK conv+ReLU FAILED or timed out"; status=1
    fi
  fi
done

if wants attention; then
  stamp "benchmark attention bf16"
  # shellcheck disable=SC2086
  if ! timeout 240 "$PY" -m benchmarks.cli attention --device cuda --dtype bfloat16 --grid full --reps 10 --warmup 3 \
      --naive-max-gib 20 --check-targets ${BENCH_ARGS:-} --out "$OUT/attention" >>"$OUT/setup.log" 2>&1; then
    stamp "BENCHMARK attention FAILED or timed out"; status=1
  fi
fi
if wants norm; then
  stamp "benchmark norm fwd+bwd (triton fused vs composite)"
  mkdir -p "$OUT/norm"
  if ! timeout 180 "$PY" - "$OUT/norm" >>"$OUT/setup.log" 2>&1 <<'PYEOF'
import json, sys, torch
from aqcf_kernels import nn as qnn

out, rows = sys.argv[1], []
cases = [("2d", qnn.QuaternionBatchNorm2d, qnn.QuaternionInstanceNorm2d, (8, 256, 64, 64)),
         ("3d", qnn.QuaternionBatchNorm3d, qnn.QuaternionInstanceNorm3d, (2, 128, 32, 32, 32))]


def timed(fn, reps=20, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


for dims, bn, inorm, shape in cases:
    for kind, cls in (("batch", bn), ("instance", inorm)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device="cuda", dtype=dtype).requires_grad_()
            gy = torch.randn_like(x)
            res = {}
            for provider in ("fused", "composite"):
                m = cls(shape[1], activation="gelu", affine=True).cuda().to(dtype)
                m.fused = provider == "fused"
                x.grad = None
                y = m(x); y.backward(gy); res[provider + "_y"] = y.detach().float()
                res[provider + "_g"] = x.grad.float().clone()

                def step(m=m):
                    m(x).backward(gy)

                res[provider] = timed(step)
            err = ((res["fused_y"] - res["composite_y"]).norm() / res["composite_y"].norm()).item()
            gerr = ((res["fused_g"] - res["composite_g"]).norm() / res["composite_g"].norm()).item()
            rows.append(dict(dims=dims, norm=kind, dtype=str(dtype).split(".")[1], shape=list(shape),
                             fused_ms=res["fused"], composite_ms=res["composite"],
                             speedup=res["composite"] / res["fused"], rel_err_y=err, rel_err_dx=gerr))
            print(rows[-1], flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows),
          open(f"{out}/norm.json", "w"), indent=1)
with open(f"{out}/norm.md", "w") as f:
    f.write("| dims | norm | dtype | shape | fused ms | composite ms | speedup | rel err y | rel err dx |\n")
    f.write("|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        f.write(f"| {r['dims']} | {r['norm']} | {r['dtype']} | {tuple(r['shape'])} | {r['fused_ms']:.3f} | "
                f"{r['composite_ms']:.3f} | {r['speedup']:.2f}x | {r['rel_err_y']:.1e} | {r['rel_err_dx']:.1e} |\n")
PYEOF
  then
    stamp "BENCHMARK norm FAILED or timed out"; status=1
  fi
  stamp "benchmark a conv's backward passes: activation_grad_bias and qconv_weight_bias_grad vs two passes each"
  if ! timeout 150 "$PY" - "$OUT/norm" >>"$OUT/setup.log" 2>&1 <<'PYEOF'
import os, statistics, sys
from pathlib import Path

# Where a conv's backward gets its bias gradient without a read of its own, bf16, N32 64x64 (PASSES_DEVICE=cpu
# PASSES_BATCH=1: a dry run on the default backend):
# - activation_pass: dL/dz and the bias gradient of conv + bias + activation (the 2d 64q target layer's output)
#   from one Triton pass, against aten's activation backward then a sum;
# - wgrad_bias: the weight and bias gradients of the 2d 16q and 64q 3x3 layers (channels_last, hamilton, the
#   Triton backend) from one launch of its split-K weight-gradient GEMM, against the same GEMM then a sum.
device, batch = os.environ.get("PASSES_DEVICE", "cuda"), int(os.environ.get("PASSES_BATCH", "32"))
if device == "cuda":
    os.environ["AQCF_BACKEND"] = "triton"
import torch  # noqa: E402
from aqcf_kernels.ops import conv as conv_ops  # noqa: E402  (registers torch.ops.aqcf)
from benchmarks import common  # noqa: E402

out = Path(sys.argv[1])
env = dict(device=torch.cuda.get_device_name() if device == "cuda" else device, torch=torch.__version__)


def medians_ms(**steps):
    """Median ms of each step, 30 interleaved reps after 5 warmup rounds (benchmarks.common's clock)."""
    times = common.time_interleaved(steps, reps=30, warmup=5, device=device)
    return [statistics.median(times[name]) * 1e3 for name in steps]


def rel(a, ref):
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def write(name, rows, headers, cells):
    common.write_json(out / f"{name}.json", dict(env, rows=rows))
    (out / f"{name}.md").write_text(common.markdown_table(headers, [cells(r) for r in rows], align_left=2) + "\n")
    print(f"{name}:", *rows, sep="\n", flush=True)


rows = []
for activation in ("relu", "gelu"):
    for layout in ("channels_last", "nchw"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        z = torch.randn(batch, 256, 64, 64, device=device, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        y = torch.relu(z) if activation == "relu" else torch.nn.functional.gelu(z)
        pre = z if activation == "gelu" else z.new_empty(0)
        gy = torch.randn_like(y)

        def one_pass():
            return torch.ops.aqcf.activation_grad_bias(gy, y, pre, activation, 0.01)

        def two_passes():
            gz = conv_ops.activation_grad(gy, y, pre, activation, 0.01)
            return gz, gz.sum(dim=(0, 2, 3))

        (gz1, gb1), (gz2, gb2) = one_pass(), two_passes()
        ref = conv_ops.activation_grad(gy.float(), y.float(), pre.float(), activation, 0.01).sum(dim=(0, 2, 3))
        one_ms, two_ms = medians_ms(one_pass=one_pass, two_passes=two_passes)
        rows.append(dict(activation=activation, layout=layout, shape=list(z.shape), one_pass_ms=one_ms,
                         two_passes_ms=two_ms, speedup=two_ms / one_ms, gz_equal=bool(torch.equal(gz1, gz2)),
                         rel_err_bias_one=rel(gb1, ref), rel_err_bias_two=rel(gb2, ref)))
write("activation_pass", rows,
      ["activation", "layout", "shape (bf16)", "one pass ms", "two passes ms", "speedup", "dL/dz equal",
       "bias rel err (one / two)"],
      lambda r: [r["activation"], r["layout"], tuple(r["shape"]), f"{r['one_pass_ms']:.3f}",
                 f"{r['two_passes_ms']:.3f}", f"{r['speedup']:.2f}x", r["gz_equal"],
                 f"{r['rel_err_bias_one']:.1e} / {r['rel_err_bias_two']:.1e}"])

rows = []
for cq in (16, 64):
    x, gy = (torch.randn(batch, 4 * cq, 64, 64, device=device, dtype=torch.bfloat16)
             .contiguous(memory_format=torch.channels_last) for _ in range(2))
    args = (x, gy, [4, cq, cq, 3, 3], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, "hamilton")

    def one_launch():
        return torch.ops.aqcf.qconv_weight_bias_grad(*args)

    def two():
        return torch.ops.aqcf.qconv_weight_grad(*args), gy.sum(dim=(0, 2, 3))

    (gw1, gb1), (gw2, gb2) = one_launch(), two()
    ref = gy.float().sum(dim=(0, 2, 3))
    one_ms, two_ms = medians_ms(one_launch=one_launch, two=two)
    rows.append(dict(quaternions=cq, shape=list(x.shape), one_launch_ms=one_ms, two_ms=two_ms, speedup=two_ms / one_ms,
                     rel_diff_weight=rel(gw1, gw2), rel_err_bias_one=rel(gb1, ref), rel_err_bias_two=rel(gb2, ref)))
write("wgrad_bias", rows,
      ["quaternions", "shape (bf16)", "one launch ms", "wgrad + sum ms", "speedup", "weight rel diff",
       "bias rel err (one / two)"],
      lambda r: [r["quaternions"], tuple(r["shape"]), f"{r['one_launch_ms']:.3f}", f"{r['two_ms']:.3f}",
                 f"{r['speedup']:.2f}x", f"{r['rel_diff_weight']:.1e}",
                 f"{r['rel_err_bias_one']:.1e} / {r['rel_err_bias_two']:.1e}"])
PYEOF
  then
    stamp "BENCHMARK conv backward passes FAILED or timed out"; status=1
  fi
fi
if wants rnn; then
  stamp "benchmark rnn fwd+bwd (fused recurrence on Triton vs the composite per-step loop)"
  mkdir -p "$OUT/rnn"
  if ! timeout 180 "$PY" - "$OUT/rnn" >>"$OUT/setup.log" 2>&1 <<'PYEOF'
import json, os, sys, torch
from aqcf_kernels import nn as qnn
from aqcf_kernels.nn import recurrent

out, rows = sys.argv[1], []
device = os.environ.get("RNN_DEVICE", "cuda")  # (RNN_DEVICE=cpu RNN_SIZE=16: a dry run of this script)
size = int(os.environ.get("RNN_SIZE", "512"))
steps, batch = 100, 8
available = recurrent.rnn_cell_ops.available
calls = [0]  # Triton forward launches of the fused op: proof that the kernels served the "fused" rows
from aqcf_kernels.backends.triton import rnn_cell as triton_rnn
real_forward = triton_rnn.forward


def counting(*args):
    calls[0] += 1
    return real_forward(*args)


triton_rnn.forward = counting


def timed(fn, reps=10, warmup=3):
    import time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter(); fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


for name, cls in (("lstm", qnn.QuaternionLSTM), ("ligru", qnn.QuaternionLiGRU)):
    for dtype in (torch.float32, torch.bfloat16):
        layer = cls(size, size).to(device=device, dtype=dtype)
        x = torch.randn(steps, batch, size, device=device, dtype=dtype).requires_grad_()
        gy = torch.randn(steps, batch, size, device=device, dtype=dtype)
        res = {}
        calls[0] = 0
        for provider in ("fused", "composite"):
            # the composite provider: the layer's per-step loop (as when no fused kernel serves)
            recurrent.rnn_cell_ops.available = available if provider == "fused" else (lambda *args: False)
            x.grad = None
            y = layer(x)[0]; y.backward(gy)
            res[provider + "_y"], res[provider + "_g"] = y.detach().double(), x.grad.double().clone()

            def step():
                layer(x)[0].backward(gy)

            res[provider] = timed(step)
            if provider == "fused":
                triton_fwd, calls[0] = calls[0], 0
        recurrent.rnn_cell_ops.available = available
        err = ((res["fused_y"] - res["composite_y"]).norm() / res["composite_y"].norm()).item()
        gerr = ((res["fused_g"] - res["composite_g"]).norm() / res["composite_g"].norm()).item()
        rows.append(dict(layer=name, dtype=str(dtype).split(".")[1], steps=steps, batch=batch, hidden=size,
                         fused_ms=res["fused"], composite_ms=res["composite"],
                         speedup=res["composite"] / res["fused"], rel_err_y=err, rel_err_dx=gerr,
                         triton_forward_calls=triton_fwd, composite_triton_calls=calls[0]))
        print(rows[-1], flush=True)
json.dump(dict(device=torch.cuda.get_device_name() if device == "cuda" else device, torch=torch.__version__,
               rows=rows), open(f"{out}/rnn.json", "w"), indent=1)
with open(f"{out}/rnn.md", "w") as f:
    f.write("| layer | dtype | T x B x H | fused ms | composite ms | speedup | rel err y | rel err dx | triton calls |\n")
    f.write("|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        f.write(f"| {r['layer']} | {r['dtype']} | {r['steps']}x{r['batch']}x{r['hidden']} | {r['fused_ms']:.2f} | "
                f"{r['composite_ms']:.2f} | {r['speedup']:.2f}x | {r['rel_err_y']:.1e} | {r['rel_err_dx']:.1e} | "
                f"{r['triton_forward_calls']} |\n")
PYEOF
  then
    stamp "BENCHMARK rnn FAILED or timed out"; status=1
  fi
fi
stamp "done, status $status"
exit $status

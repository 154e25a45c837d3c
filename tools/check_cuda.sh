#!/usr/bin/env bash
# Build check of aqcf_kernels._C against a CUDA torch (`make check-cuda`, CI).
#
# The extension has no CUDA sources: the `cuda` backend runs its device-agnostic ATen host code
# (csrc/cpu/conv.cpp: conv_aten, conv_weight_grad_aten) on CUDA tensors, with cuDNN under
# at::convolution. What a GPU machine builds is therefore the same C++ compiled against its CUDA torch:
# this builds it through the project's own setup.py into a temporary directory against torch with CUDA,
# imports the result (which resolves every symbol against libtorch_cuda's ATen) and runs the entry
# points the cuda backend calls on CPU tensors, against the expanded conv. No GPU is needed or used.
# Then it runs the attention tests that need no GPU against this torch: the torch backend's calls of
# PyTorch's CUDA attention kernels (flash, memory-efficient) on meta tensors, through this torch's own
# meta functions of those aten ops, so a changed schema fails here rather than on a lent GPU; and the
# ONNX lowering's grouped convs through this torch's torch.export; and every Triton launcher compiled by this
# torch's triton.
#
# torch with CUDA lives in a separate venv (default .venv-cuda, created on first use) because the
# project's .venv has the CPU torch. Its default is the lent GPU machines' own torch (2.11.0+cu130, with
# triton 3.6): what their build stage compiles against, so a header or schema it lacks fails here first.
#
# Environment: AQCF_CUDA_VENV (venv path), AQCF_CUDA_TORCH (pip spec, default torch==2.11.0; e.g.
# torch==2.14.1 for the newest), MAX_JOBS (default 2), AQCF_KEEP_BUILD=1 (keep the build directory).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS

die() {
  echo "check-cuda: FAILED: $*" >&2
  exit 1
}

venv="${AQCF_CUDA_VENV:-$root/.venv-cuda}"
torch_spec="${AQCF_CUDA_TORCH:-torch==2.11.0}"
py="$venv/bin/python"
# (a venv made for another torch is made again: the check is of the torch it names)
want="${torch_spec#torch==}"
if [ -x "$py" ] && ! "$py" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$want')" 2>/dev/null; then
  echo "check-cuda: $venv does not hold torch $want: making it again"
  rm -rf "$venv"
fi
if ! { [ -x "$py" ] && "$py" -c "import torch, numpy, ninja, pybind11, setuptools" 2>/dev/null; }; then
  echo "check-cuda: creating $venv ($torch_spec numpy ninja pybind11 setuptools pytest)"
  "${PYTHON:-python3}" -m venv "$venv"
  # setuptools >= 77 reads pyproject.toml's SPDX license string (a fresh venv's own is older, and torch 2.11
  # asks only for < 82)
  "$py" -m pip install --quiet "$torch_spec" numpy ninja pybind11 "setuptools>=77" wheel pytest
fi
# (the export test imports the pipeline, whose data package reads volumes with nibabel and scipy)
"$py" -c "import pytest, nibabel, scipy" 2>/dev/null || "$py" -m pip install --quiet pytest nibabel scipy
"$py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" \
  || die "torch in $venv was built without CUDA ($("$py" -c 'import torch; print(torch.__version__)'))"
export MAX_JOBS="${MAX_JOBS:-2}"

compgen -G "csrc/cpu/*.cpp" >/dev/null || die "no csrc/cpu/*.cpp sources"
build="$(mktemp -d "${TMPDIR:-/tmp}/aqcf-check-cuda.XXXXXX")"
if [ "${AQCF_KEEP_BUILD:-0}" = 1 ]; then
  echo "check-cuda: keeping $build"
else
  trap 'rm -rf "$build"' EXIT
fi
echo "check-cuda: torch $("$py" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'), sources: $(ls csrc/cpu/*.cpp | tr '\n' ' ')"

# (AQCF_COMPILE_CHECK=1: -O0, the same headers, templates and symbols as the real build in under half its
# time, 2026-12-06)
AQCF_COMPILE_CHECK=1 "$py" setup.py --quiet build_ext --build-lib "$build/lib" --build-temp "$build/tmp" \
  || die "compile or link error (see above)"

"$py" - "$build/lib" <<'PYEOF' || die "the built extension does not import, or its ATen entry points fail"
import glob
import importlib.util
import sys

import torch

found = glob.glob(f"{sys.argv[1]}/aqcf_kernels/_C*.so")
assert len(found) == 1, f"expected one aqcf_kernels/_C*.so, found {found}"
spec = importlib.util.spec_from_file_location("aqcf_kernels._C", found[0])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)  # dlopen with RTLD_NOW: any unresolved symbol fails here
entries = ("conv", "conv_weight_grad", "conv_aten", "conv_weight_grad_aten")
missing = [f for f in entries if not hasattr(ext, f)]
assert not missing, f"{found[0]} lacks {missing}"
# The entry points the cuda backend calls, run on CPU tensors (same code; oneDNN instead of cuDNN).
g = torch.Generator().manual_seed(0)
x, w = torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 2, 2, 3, 3, generator=g, dtype=torch.float64)
args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
hamilton = ext.conv_aten(x, w, None, *args, False)
fast8 = ext.conv_aten(x, w, None, *args, True)
assert torch.allclose(hamilton, fast8, atol=1e-10), (hamilton - fast8).abs().max()
gw = [ext.conv_weight_grad_aten(x, hamilton, list(w.shape), *args, f) for f in (False, True)]
assert torch.allclose(gw[0], gw[1], atol=1e-9), (gw[0] - gw[1]).abs().max()
# The native attention ops' calls of PyTorch's CUDA kernels, through this torch's meta functions of them.
for kernel, dtype in (("flash", torch.bfloat16), ("efficient", torch.float32)):
    q = torch.empty(2, 3, 50, 16, dtype=dtype, device="meta")
    k, v = (torch.empty(2, 3, 37, 16, dtype=dtype, device="meta") for _ in range(2))
    out, lse = ext.attention_forward(kernel, q, k, v, 0.25)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (2, 3, 50) and lse.dtype == torch.float32
    grads = ext.attention_backward(kernel, torch.empty_like(out), q, k, v, out, lse, 0.25)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape], [g.shape for g in grads]
print(f"check-cuda: {found[0].rsplit('/', 1)[1]} imports; {', '.join(entries)} bound; the ATen path runs; "
      "the native attention's flash and efficient calls fit this torch's schemas")
PYEOF
# The package from the source tree on this torch; its extension is the project venv's build (another
# torch's ABI), so it is left out: the attention backend does not use it.
AQCF_NO_EXTENSION=1 PYTHONPATH="$root" "$py" -m pytest -q -p no:cacheprovider tests/attention/test_cuda_attention.py \
  || die "the CUDA attention calls do not match this torch's aten schemas (tests/attention/test_cuda_attention.py)"
# And the ONNX lowering's grouped convs under this torch's torch.export with dynamic sizes (2.11's export
# refused the eager layers' channel reorder on 1-d inputs; the file needs no conftest and no ONNX).
AQCF_NO_EXTENSION=1 AQCF_TUNING_CACHE=off PYTHONPATH="$root" "$py" -m pytest -q -p no:cacheprovider --noconftest \
  tests/pipeline/test_export_grouped.py \
  || die "the lowered grouped convs do not export with dynamic sizes on this torch (tests/pipeline/test_export_grouped.py)"
# Every Triton launcher's GPU launch path through this torch and the triton it brings (3.6 with 2.11: the GPU
# machines' pair), on the static tests' stand-in sm_90: bound, specialised and compiled as a launch is there,
# nothing run (tests/triton_kernels/_launch_with_triton36.py; CI's own runs use torch 2.13 with triton 3.6 beside).
if "$py" -c "import triton" 2>/dev/null; then
  env -u TRITON_INTERPRET TRITON_CACHE_DIR="$build/triton-cache" AQCF_NO_EXTENSION=1 \
    PYTHONPATH="$root:$root/tests/triton_kernels" "$py" tests/triton_kernels/_launch_with_triton36.py >"$build/launch.json" \
    || die "a Triton launcher fails to bind or compile on this torch and triton (see above)"
  "$py" - "$build/launch.json" <<'PYEOF' || die "a Triton launcher fails on this torch and triton (above)"
import json
import sys

import torch
import triton

out = json.loads(open(sys.argv[1]).read().splitlines()[-1])
failed = {name: error for name, error in out["results"].items() if error != "ok"}
assert out["results"] and not failed, "\n\n".join(f"{name}:\n{error}" for name, error in failed.items())
print(f"check-cuda: {len(out['results'])} Triton launches bound and compiled for sm_90 ({out['compiles']} compiles) "
      f"with torch {torch.__version__} and triton {triton.__version__}")
PYEOF
fi
echo "check-cuda: OK in $((SECONDS - start)) s"

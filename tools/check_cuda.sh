#!/usr/bin/env bash
# Compile-and-link check of the CUDA build of aqcf_kernels._C (`make check-cuda`, CI).
#
# Builds ALL extension sources (csrc/cpu/*.cpp + csrc/cuda/*.{cu,cpp}, with -DAQCF_WITH_CUDA) through the
# project's own setup.py into a temporary directory, then imports the result (which resolves every
# symbol) and checks that the binding exposes the CUDA entry points. No GPU is needed or used: a
# machine without one can only prove that the code compiles and links.
#
# torch with CUDA lives in a separate venv (default .venv-cuda, created on first use) because the
# project's .venv has the CPU torch, which cannot build CUDA extensions.
#
# Environment: AQCF_CUDA_VENV (venv path), AQCF_CUDA_TORCH (pip spec, default torch==2.14.1),
# CUDA_HOME (toolkit root; found from nvcc otherwise), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default 2), AQCF_KEEP_BUILD=1 (keep the build directory).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS

die() {
  echo "check-cuda: FAILED: $*" >&2
  exit 1
}

venv="${AQCF_CUDA_VENV:-$root/.venv-cuda}"
torch_spec="${AQCF_CUDA_TORCH:-torch==2.14.1}"
py="$venv/bin/python"
if ! { [ -x "$py" ] && "$py" -c "import torch, numpy, ninja, pybind11, setuptools" 2>/dev/null; }; then
  echo "check-cuda: creating $venv ($torch_spec numpy ninja pybind11 setuptools)"
  "${PYTHON:-python3}" -m venv "$venv"
  "$py" -m pip install --quiet "$torch_spec" numpy ninja pybind11 setuptools wheel
fi
"$py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" \
  || die "torch in $venv was built without CUDA ($("$py" -c 'import torch; print(torch.__version__)'))"

# The toolkit root: CUDA_HOME if it holds a real nvcc and libcudart, else follow `nvcc` on PATH
# through wrapper scripts (`exec /usr/local/cuda-X/bin/nvcc "$@"`) to the real binary. torch's own
# guess (the parent of the first nvcc on PATH) fails to link when that nvcc is a wrapper.
is_toolkit() {
  [ -x "$1/bin/nvcc" ] && ! head -c 2 "$1/bin/nvcc" | grep -q '#!' \
    && compgen -G "$1/lib*/libcudart.so*" >/dev/null
}
find_cuda_home() {
  if [ -n "${CUDA_HOME:-}" ] && is_toolkit "$CUDA_HOME"; then
    echo "$CUDA_HOME"
    return
  fi
  local nvcc
  nvcc="$(command -v nvcc || true)"
  for _ in 1 2 3 4 5; do
    [ -n "$nvcc" ] && [ -e "$nvcc" ] || break
    nvcc="$(readlink -f "$nvcc")"
    if head -c 2 "$nvcc" | grep -q '#!'; then  # a wrapper script: take the nvcc it runs
      nvcc="$(grep -oE '/[^[:space:]"'\'']*/bin/nvcc' "$nvcc" | head -n 1 || true)"
    else
      local home
      home="$(dirname "$(dirname "$nvcc")")"
      if is_toolkit "$home"; then
        echo "$home"
        return
      fi
      break
    fi
  done
  for home in /usr/local/cuda /usr/local/cuda-*; do
    if is_toolkit "$home"; then
      echo "$home"
      return
    fi
  done
  return 1
}
CUDA_HOME="$(find_cuda_home)" || die "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc and lib64/)"
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # arch detection needs a GPU
export MAX_JOBS="${MAX_JOBS:-2}"
unset AQCF_NO_CUDA
# CUDAContext.h needs the cuBLAS/cuSPARSE headers, which the pip CUDA torch ships under nvidia/cu13.
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for inc in "$site"/nvidia/cu*/include; do
  [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
done

compgen -G "csrc/cuda/*.cu" >/dev/null || die "no csrc/cuda/*.cu sources"
compgen -G "csrc/cpu/*.cpp" >/dev/null || die "no csrc/cpu/*.cpp sources"
build="$(mktemp -d "${TMPDIR:-/tmp}/aqcf-check-cuda.XXXXXX")"
if [ "${AQCF_KEEP_BUILD:-0}" = 1 ]; then
  echo "check-cuda: keeping $build"
else
  trap 'rm -rf "$build"' EXIT
fi
echo "check-cuda: torch $("$py" -c 'import torch; print(torch.__version__)'), CUDA_HOME=$CUDA_HOME," \
  "arch $TORCH_CUDA_ARCH_LIST, sources: $(ls csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cpp | tr '\n' ' ')"

# setup.py builds a CUDAExtension with -DAQCF_WITH_CUDA when torch has CUDA: the real build recipe.
"$py" setup.py --quiet build_ext --build-lib "$build/lib" --build-temp "$build/tmp" \
  || die "compile or link error (see above)"

"$py" - "$build/lib" <<'EOF' || die "the built extension does not import or lacks the CUDA entry points"
import glob
import importlib.util
import sys

import torch

found = glob.glob(f"{sys.argv[1]}/aqcf_kernels/_C*.so")
assert len(found) == 1, f"expected one aqcf_kernels/_C*.so, found {found}"
spec = importlib.util.spec_from_file_location("aqcf_kernels._C", found[0])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)  # dlopen with RTLD_NOW: any unresolved symbol fails here
missing = [f for f in ("conv", "conv_weight_grad", "cuda_conv", "cuda_conv_weight_grad") if not hasattr(ext, f)]
if missing:
    sys.exit(
        f"check-cuda: {found[0]} lacks {missing}: the binding file must call aqcf_register_cuda(m) "
        "under #ifdef AQCF_WITH_CUDA"
    )
# The bindings convert their arguments and reach the host code's checks without a GPU.
x, w = torch.zeros(1, 4, 3, 3), torch.zeros(4, 1, 1, 1, 1)
for call in (
    lambda: ext.cuda_conv(x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, False),
    lambda: ext.cuda_conv_weight_grad(x, x, [4, 1, 1, 1, 1], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, True),
):
    try:
        call()
    except RuntimeError as e:
        assert "must be a CUDA tensor" in str(e), e
    else:
        raise AssertionError("a CPU tensor was accepted by the CUDA entry point")
print(f"check-cuda: {found[0].rsplit('/', 1)[1]} imports; conv, conv_weight_grad, cuda_conv, cuda_conv_weight_grad bound")
EOF
echo "check-cuda: OK in $((SECONDS - start)) s"

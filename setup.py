"""Builds the compiled extension ``aqcf_kernels._C``.

CPU sources (csrc/cpu) always; CUDA sources (csrc/cuda) when torch was built with CUDA and
``AQCF_NO_CUDA`` is not set. Install with ``pip install -e . --no-build-isolation`` so the
extension builds against the torch already installed (build isolation would fetch another).
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - a clear message beats setuptools' traceback
    raise SystemExit(
        "aqcf-kernels builds against an installed torch: `pip install torch` first, then "
        "`pip install -e . --no-build-isolation`"
    ) from e

here = os.path.dirname(os.path.abspath(__file__))
cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
# csrc/cuda: kernels and launches in .cu (nvcc), host entry points in .cpp (the C++ compiler)
cuda_sources = sorted(f for ext in ("cu", "cpp") for f in glob.glob(os.path.join("csrc", "cuda", f"*.{ext}")))
# torch chooses the -std its headers need (C++20 from 2.14). -fno-trapping-math (nothing here enables
# floating-point traps) lets GCC turn per-element selects into vector blends (csrc/cpu/norm.cpp).
cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
ext_modules = []
if cpu_sources:
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and not os.environ.get("AQCF_NO_CUDA")
    if use_cuda:
        ext_modules.append(
            CUDAExtension(
                "aqcf_kernels._C",
                cpu_sources + cuda_sources,
                extra_compile_args={"cxx": cxx_flags + ["-DAQCF_WITH_CUDA"], "nvcc": ["-O3", "-DAQCF_WITH_CUDA"]},
                extra_link_args=["-fopenmp"],
            )
        )
    else:
        ext_modules.append(
            CppExtension("aqcf_kernels._C", cpu_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
        )

setup(
    packages=find_packages(include=["aqcf_kernels", "aqcf_kernels.*", "benchmarks", "benchmarks.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

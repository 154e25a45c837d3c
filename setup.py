"""Builds the compiled extension ``aqcf_kernels._C`` from csrc/cpu.

One C++ extension for every torch build: its CPU kernels, and the device-agnostic ATen host code the
``cuda`` backend runs on CUDA tensors (cuDNN under ``at::convolution``), which needs no CUDA sources.
Install with ``pip install -e . --no-build-isolation`` so the extension builds against the torch
already installed (build isolation would fetch another).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as e:  # pragma: no cover - a clear message beats setuptools' traceback
    raise SystemExit(
        "aqcf-kernels builds against an installed torch: `pip install torch` first, then "
        "`pip install -e . --no-build-isolation`"
    ) from e

cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
# torch chooses the -std its headers need (C++20 from 2.14). -fno-trapping-math (nothing here enables
# floating-point traps) lets GCC turn per-element selects into vector blends (csrc/cpu/norm.cpp). -g0: no
# debug information (Python's own flags ask for -g), which changes no code: the build takes 81 s instead of
# 143 s on 2 cores and the library is 1.8 MB instead of 42 MB (2026-12-06).
cxx_flags = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math"]
if os.environ.get("AQCF_COMPILE_CHECK") == "1":
    # tools/check_cuda.sh builds the extension only to prove it compiles and links against another torch:
    # unoptimised, the same headers, templates and symbols in a fraction of the time.
    cxx_flags += ["-O0"]
ext_modules = [CppExtension("aqcf_kernels._C", cpu_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])]
PRECOMPILED = os.path.abspath("csrc/cpu/precompiled.h")


class BuildWithPrecompiledHeader(BuildExtension):
    """torch's BuildExtension (ninja), with csrc/cpu/precompiled.h compiled once into a GCC precompiled header
    that every source gets with ``-include``: the 10 sources each spent ~8 s parsing ATen's headers (2-core AMD
    EPYC, 2026-12-07: the -O3 build took 171 CPU-seconds, 113 with the header; the -O0 compile check 129, 86).
    Built by the same compile call as the sources, so with the same compiler and flags (GCC ignores a header
    built with others: -Winvalid-pch says so); ninja rebuilds it only when a header it reads changes. Linux
    (GCC) only; AQCF_NO_PCH=1 skips it (the sources include what they use and build without it)."""

    def build_extension(self, ext):
        if sys.platform.startswith("linux") and os.environ.get("AQCF_NO_PCH") != "1":
            # (GCC's precompiled headers lose the headers' `#pragma GCC diagnostic`: c10's TypeSafeSignMath.h
            # silences -Wsign-compare around a comparison it means, which then warned once per source)
            ext.extra_compile_args = [*ext.extra_compile_args, "-Wno-sign-compare"]
            header = self._precompile(ext)
            ext.extra_compile_args = [*ext.extra_compile_args, "-Winvalid-pch", "-include", header]
        super().build_extension(ext)

    def _precompile(self, ext) -> str:
        folder = os.path.abspath(os.path.join(self.build_temp, "precompiled"))
        os.makedirs(folder, exist_ok=True)
        source = os.path.join(folder, "precompiled.cpp")  # (a .cpp: the compile call takes no headers)
        text = f'#include "{PRECOMPILED}"\n'
        if not os.path.exists(source) or open(source).read() != text:
            with open(source, "w") as f:
                f.write(text)
        # -x c++-header before the source: GCC writes a precompiled header where the object would go
        (built,) = self.compiler.compile(
            [source], output_dir=folder, macros=ext.define_macros, include_dirs=ext.include_dirs,
            debug=self.debug, extra_preargs=["-x", "c++-header"], extra_postargs=ext.extra_compile_args,
        )  # fmt: skip
        header = os.path.join(folder, "precompiled.h")
        stamp, built_at = header + ".built", str(os.stat(built).st_mtime_ns)
        if not os.path.exists(header + ".gch") or not os.path.exists(stamp) or open(stamp).read() != built_at:
            if os.path.exists(header + ".gch"):
                os.remove(header + ".gch")
            try:  # (a link: the header is hundreds of MB)
                os.link(built, header + ".gch")
            except OSError:
                shutil.copyfile(built, header + ".gch")
            shutil.copyfile(PRECOMPILED, header)  # (the sources depend on it: a new header rebuilds them)
            with open(stamp, "w") as f:
                f.write(built_at)
        return header


setup(
    # benchmarks/ installs as ``aqcf_bench`` (the ``aqcf-bench`` console script): a top-level ``benchmarks``
    # in site-packages would take the name from any other distribution's. Its modules refer to each other
    # relatively, so a source tree still runs them as ``python -m benchmarks.cli`` (gpu_suite.sh does).
    packages=[*find_packages(include=["aqcf_kernels", "aqcf_kernels.*"]), "aqcf_bench"],
    package_dir={"aqcf_bench": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildWithPrecompiledHeader.with_options(use_ninja=True)},
)

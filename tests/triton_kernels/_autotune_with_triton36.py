"""The implicit GEMM's autotuning as triton 3.6 runs it on the GPU machines, without a GPU (run as a
script with triton 3.6 first on the path; test_igemm_static.py does): a stand-in driver answers for an
sm_90 device, every compile is real (ptxas included) and counted with the thread it ran on, and nothing
is launched (the compiled kernels' launch is a no-op, the benchmarker runs each trial once and rates it
1 ms). Prints JSON: for ``AQCF_TRITON_AUTOTUNE`` ``on`` and ``first``, the configs the launcher kept for a
2d bf16 conv, and the compiles made while precompiling (and on how many threads) and after it.
"""

import json
import os
import sys
import threading

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import compiler as triton_compiler

from aqcf_kernels.backends.triton import common, igemm
from aqcf_kernels.params import ConvParams


class StandInDriver:
    """What triton's JIT and autotuner ask of the active driver before a launch."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_benchmarker(self):
        def bench(kernel_call, quantiles):
            kernel_call()  # a trial: the lookup (or compile) of its kernel, then the no-op launch
            return [1.0] * len(quantiles)

        return bench


COMPILES = []  # (thread name, while precompiling)
PRECOMPILING = threading.Event()
real_compile = triton_compiler.compile


def counting_compile(*args, **kwargs):
    COMPILES.append((threading.current_thread().name, PRECOMPILING.is_set()))
    return real_compile(*args, **kwargs)


def main() -> int:
    triton.runtime.driver.set_active(StandInDriver())
    triton.compiler.compile = triton_compiler.compile = counting_compile  # (the JIT binds it at first call)
    triton_compiler.CompiledKernel.launch_metadata = lambda self, *args: None
    triton_compiler.CompiledKernel.run = property(lambda self: lambda *args: None)
    real_precompile = common.precompile
    kept = []

    def watched_precompile(kernel, configs, named_args, meta):
        kept.append(len(configs))
        PRECOMPILING.set()
        try:
            real_precompile(kernel, configs, named_args, meta)
        finally:
            PRECOMPILING.clear()

    common.precompile = watched_precompile
    tuner, _ = common.AUTOTUNED["qconv_igemm_kernel"]
    p = ConvParams(2, (1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    results = {}
    for mode, cq in (("on", 64), ("first", 40)):  # (a width not a multiple of 16: new key, new specialisation)
        os.environ["AQCF_TRITON_AUTOTUNE"] = mode
        COMPILES.clear()
        kept.clear()
        x = torch.randn(2, 4 * cq, 16, 16, dtype=torch.bfloat16)
        w = torch.randn(4, cq, cq, 3, 3, dtype=torch.bfloat16)
        igemm.conv_igemm(x, w, torch.randn(4 * cq, dtype=torch.bfloat16), p)
        results[mode] = dict(
            kept=kept[0] if kept else 1,
            trials=len(tuner.configs_timings),
            compiles_precompiling=sum(pre for _, pre in COMPILES),
            compile_threads=len({name for name, pre in COMPILES if pre}),
            compiles_after=sum(not pre for _, pre in COMPILES),
            main_thread_compiles=sum(name == "MainThread" for name, _ in COMPILES),
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The implicit GEMM's autotuning as triton 3.6 runs it on the GPU machines, without a GPU (run as a
script with triton 3.6 first on the path; test_igemm_static.py does) on _standin_gpu.py's sm_90: every
compile is real and counted with the thread it ran on, nothing is launched, and the benchmarker runs each
trial once and rates it 1 ms. Prints JSON: for ``AQCF_TRITON_AUTOTUNE`` ``on`` and ``first``, the configs
the launcher kept for a 2d bf16 conv, and the compiles made while precompiling (on how many threads) and
after it, the config chosen; and the tiles kept per shape as the GPU suite's profile stage reports them.
With ``AUTOTUNE_AGAIN=1``, the ``on`` shape alone, as a later process on the same cache directory runs it.
"""

import json
import os
import sys
import threading
import time

import torch
from _standin_gpu import install

from aqcf_kernels.backends.triton import common, igemm
from aqcf_kernels.params import ConvParams

PRECOMPILING = threading.Event()


def main() -> int:
    compiles = install(on_compile=PRECOMPILING.is_set)  # (thread, while precompiling)
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
    # AUTOTUNE_AGAIN=1: a later process on the same TRITON_CACHE_DIR, the 64-channel shape alone
    phases = (("on", 64),) if os.environ.get("AUTOTUNE_AGAIN") else (("on", 64), ("first", 40))
    for mode, cq in phases:  # (40: a width not a multiple of 16, so a new key and a new specialisation)
        os.environ["AQCF_TRITON_AUTOTUNE"] = mode
        compiles.clear()
        kept.clear()
        x = torch.randn(2, 4 * cq, 16, 16, dtype=torch.bfloat16)
        w = torch.randn(4, cq, cq, 3, 3, dtype=torch.bfloat16)
        start = time.perf_counter()
        igemm.conv_igemm(x, w, torch.randn(4 * cq, dtype=torch.bfloat16), p)
        seconds = time.perf_counter() - start
        results[mode] = dict(
            kept=kept[0] if kept else 1,
            precompiles=len(kept),
            trials=len(getattr(tuner, "configs_timings", None) or {}),
            compiles_precompiling=sum(pre for _, pre in compiles),
            compile_threads=len({name for name, pre in compiles if pre}),
            compiles_after=sum(not pre for _, pre in compiles),
            main_thread_compiles=sum(name == "MainThread" for name, _ in compiles),
            chosen=str(next(iter(tuner.cache.values()))) if mode == "on" else None,
            seconds=seconds,  # (the first call's host time: compiles, trials, launch)
        )
        tuner.configs_timings = None  # (this phase's trials are not the next one's)
    # what the GPU suite's profile stage reports of these tunings (benchmarks.gpu_stages.autotune_picks)
    from benchmarks.gpu_stages import autotune_picks

    results["picks"] = [r for r in autotune_picks() if r["kernel"] == "qconv_igemm_kernel"]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

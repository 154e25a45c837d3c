"""How many Triton kernels the GPU suite's bf16 conv grid compiles, and how long that takes on this CPU,
without a GPU: each case of ``aqcf-bench conv --grid gpu`` (bf16, channels_last) through the Triton conv
backend, hamilton and fast8, forward with bias, input gradient and weight + bias gradient, autotuning as on
a GPU (every config that fits compiled, in parallel on ``AQCF_TRITON_COMPILE_THREADS`` threads), on the
stand-in sm_90 of tests/triton_kernels/_standin_gpu.py (real compiles, nothing launched).

    PYTHONPATH=.venv-triton36:. python tools/triton_compile_cost.py   # triton 3.6, the GPU machines' version
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "triton_kernels"))
from _standin_gpu import install  # noqa: E402

from aqcf_kernels.backends.triton import common  # noqa: E402
from aqcf_kernels.backends.triton.conv import TritonConvBackend  # noqa: E402
from aqcf_kernels.ops.conv import adjoint_params  # noqa: E402
from aqcf_kernels.params import ConvParams  # noqa: E402
from benchmarks.conv import GRIDS  # noqa: E402


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    compiles = install()
    backend = TritonConvBackend()
    started = time.perf_counter()
    for case in GRIDS["gpu"]():
        n, c = case.dims, case.channels
        layout = torch.channels_last if n == 2 else torch.channels_last_3d
        x = torch.empty(case.batch, 4 * c, *(case.size,) * n, dtype=torch.bfloat16).contiguous(memory_format=layout)
        w = torch.randn(4, c, c, *(3,) * n, dtype=torch.bfloat16)
        b = torch.randn(4 * c, dtype=torch.bfloat16)
        p = ConvParams(n, (1,) * n, (1,) * n, (1,) * n, False, (0,) * n, 1)
        before, case_started = len(compiles), time.perf_counter()
        for algorithm in ("hamilton", "fast8"):
            y = backend.conv(x, w, b, p, algorithm)
            backend.conv(y, w, None, adjoint_params(y.shape, w.shape, x.shape, p), algorithm)
            backend.conv_weight_bias_grad(x, y, list(w.shape), p, algorithm)
        print(f"{n}d {c}q: {len(compiles) - before} compiles, {time.perf_counter() - case_started:.1f} s", flush=True)
    threads = common.compile_threads()
    print(f"total: {len(compiles)} compiles in {time.perf_counter() - started:.1f} s, {threads} compile threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())

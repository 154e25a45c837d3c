"""The host time of the Triton conv and norm paths per call, without a GPU: what Python, torch's dispatch and triton's
launch machinery cost on the CPU before a kernel reaches the device, the part of a small layer's step that
no kernel speeds up (at 16q N32 64² a conv's device work is tens of microseconds).

Runs on the stand-in sm_90 of tests/triton_kernels/_standin_gpu.py with triton 3.6 (the GPU machines'
version): every launch binds, specialises and looks up its compiled kernel as on a GPU, then launches
nothing (triton's C launcher, a few µs a launch on a GPU, is not counted). The tensors are CPU tensors at a
tiny size (default 16q, N2 8×8), so the torch ops of the path (the weight's packing, layout views, empty
outputs) run for real but cost little; their CUDA launches would cost a few µs more each.

Rows: each Triton backend entry point once per call (the forward with bias, with a fused ReLU keeping the
pre-activation, the input gradient, the weight + bias gradient; hamilton and fast8), and a
``QuaternionConv2d`` forward+backward step through ``aqcf::qconv`` with the ``triton`` backend forced
(the stand-in GPU is let serve CPU tensors), and a quaternion batch norm's and instance norm's (+ ReLU)
forward+backward through ``aqcf::qnorm`` on its Triton kernels. Median µs per call over interleaved
rounds, one thread.

    PYTHONPATH=.venv-triton36:. python tools/triton_host_cost.py [--channels 16] [--rounds 7] [--calls 200] [--out P]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "triton_kernels"))
from _standin_gpu import start_for_tool  # noqa: E402


def _calls(cq: int) -> dict[str, Callable[[], object]]:
    from aqcf_kernels import backends
    from aqcf_kernels import nn as qnn
    from aqcf_kernels.backends.triton.conv import TritonConvBackend
    from aqcf_kernels.ops.conv import adjoint_params
    from aqcf_kernels.params import ConvParams

    bf16, cl = torch.bfloat16, torch.channels_last
    p = ConvParams(2, (1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    x = torch.randn(2, 4 * cq, 8, 8, dtype=bf16).contiguous(memory_format=cl)
    gy = torch.randn_like(x)
    w, b = torch.randn(4, cq, cq, 3, 3, dtype=bf16), torch.randn(4 * cq, dtype=bf16)
    backend, adjoint = TritonConvBackend(), adjoint_params(gy.shape, w.shape, x.shape, p)
    calls = {}
    for algorithm in ("hamilton", "fast8"):
        calls |= {
            f"{algorithm} forward + bias": lambda a=algorithm: backend.conv(x, w, b, p, a),
            f"{algorithm} forward + bias + ReLU, keep z": lambda a=algorithm: backend.conv_act(
                x, w, b, p, a, "relu", 0.0, True
            ),
            f"{algorithm} input gradient": lambda a=algorithm: backend.conv(gy, w, None, adjoint, a),
            f"{algorithm} weight + bias gradient": lambda a=algorithm: backend.conv_weight_bias_grad(
                x, gy, list(w.shape), p, a
            ),
        }
    layer = qnn.QuaternionConv2d(4 * cq, 4 * cq, 3, padding=1).to(bf16)
    leaf = x.detach().requires_grad_()

    def step() -> None:
        with backends.use("triton"):
            y = layer(leaf)
            y.backward(torch.ones_like(y))

    calls["QuaternionConv2d fwd+bwd (aqcf::qconv, triton forced)"] = step
    for norm in (
        qnn.QuaternionBatchNorm2d(4 * cq, activation="relu", dtype=bf16),
        qnn.QuaternionInstanceNorm2d(4 * cq, affine=True, activation="relu", dtype=bf16),
    ):
        calls[f"{type(norm).__name__} + ReLU fwd+bwd (aqcf::qnorm)"] = lambda m=norm: _step(m, leaf)
    return calls


def _step(module: torch.nn.Module, leaf: torch.Tensor) -> None:
    y = module(leaf)
    y.backward(torch.ones_like(y))


def measure(cq: int, rounds: int, calls_per_round: int, seed: int = 0) -> dict[str, float]:
    """Median µs per call of each row, its rounds interleaved in a shuffled order."""
    calls = _calls(cq)
    for call in calls.values():  # compile, tune (the stand-in's trials are free), remember
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            call = calls[name]
            start = time.perf_counter()
            for _ in range(calls_per_round):
                call()
            times[name].append((time.perf_counter() - start) / calls_per_round * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=16, help="quaternion channels in and out (default 16)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per row and round")
    parser.add_argument("--out", type=Path, help="also write OUT.md and OUT.json (the medians, machine, commit)")
    args = parser.parse_args(argv)
    if not start_for_tool(convs=True):
        return 2
    torch.set_num_threads(1)
    medians = measure(args.channels, args.rounds, args.calls)
    width = max(map(len, medians))
    table = "\n".join(
        [f"| {'call':{width}} | host µs |", f"|:{'-' * (width + 1)}|--:|"]
        + [f"| {name:{width}} | {us:.1f} |" for name, us in medians.items()]
    )
    print(table)
    if args.out:
        from benchmarks import common as bench_common

        env = bench_common.environment(torch.device("cpu"), threads=1)
        head = f"{bench_common.environment_line(env)}, {args.channels}q, stand-in sm_90 (no launch)"
        args.out.with_suffix(".md").write_text(f"{head}\n\n`{env['command']}`\n\n{table}\n")
        bench_common.write_json(args.out.with_suffix(".json"), dict(env, channels=args.channels, medians_us=medians))
    return 0


if __name__ == "__main__":
    sys.exit(main())

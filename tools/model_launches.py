"""Kernel launches of one A-QCF-Net training step per build, without a GPU: what a host-bound GPU step pays for.

A small network's training step on a GPU is bound by the host (each op's Python, dispatch and launch,
a few µs to tens of µs) rather than by its kernels, so the number of kernels a step launches predicts
its time there better than any CPU timing. This counts them for ``aqcf-bench model``'s builds on
``--grid host`` (2D 32², B1, features 8-32): the torch ops the step dispatches (the top-level ATen ops
the profiler records, less views, allocations and metadata queries: a launch each on a GPU, give or take
an op that launches two) plus the Triton launches.

The quaternion norms run on their Triton kernels, as on CUDA, through the stand-in sm_90 of
tests/triton_kernels/_standin_gpu.py (triton 3.6 first on the path: bound, specialised, compiled once,
not launched); everything else runs its CPU path, whose convs dispatch the same ATen calls from the
extension's C++ as the ``cuda`` backend does on a GPU (a packed weight, a conv). The CPU tensors' values
after a stand-in launch are whatever memory held: counts only, no numbers.

    PYTHONPATH=.venv-triton36:. python tools/model_launches.py [--builds ours baseline] [--out P]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "triton_kernels"))
sys.path.insert(0, str(ROOT))
from _standin_gpu import start_for_tool  # noqa: E402

#: ATen ops that launch no kernel: views, allocations, metadata
NOT_KERNELS = frozenset(
    "view reshape expand expand_as permute transpose t unsqueeze squeeze detach alias as_strided unflatten flatten "
    "select slice narrow movedim chunk split split_with_sizes unbind view_as _reshape_alias _unsafe_view lift_fresh "
    "contiguous to type_as result_type promote_types is_nonzero item _local_scalar_dense size stride is_same_size "
    "_has_compatible_shallow_copy_type empty empty_like empty_strided new_empty new_empty_strided resize_ "
    "_nnpack_available".split()
)


def count(build: str) -> dict[str, object]:
    """``{'torch_ops', 'triton', 'total', 'fused_norm_calls', 'top'}`` of one profiled training step of ``build``."""
    from triton.runtime import jit

    from aqcf_kernels.nn.norm import _QuaternionNorm
    from benchmarks import model as bench_model

    launches = collections.Counter()
    real_run = jit.JITFunction.run

    def counting_run(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return real_run(self, *args, **kwargs)

    case = bench_model.GRIDS["host"]()[0]
    model = bench_model.make_model(build, case, torch.float32, torch.device("cpu"))
    step = bench_model.make_step("fwdbwd", model, bench_model.make_inputs(case, torch.float32, torch.device("cpu")))
    for _ in range(3):  # choices measured, kernels compiled
        step()
    norm_calls = [0]
    hooks = [
        m.register_forward_pre_hook(lambda *_: norm_calls.__setitem__(0, norm_calls[0] + 1))
        for m in model.modules()
        if isinstance(m, _QuaternionNorm) and m.fused
    ]
    jit.JITFunction.run = counting_run
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
    finally:
        jit.JITFunction.run = real_run
        for hook in hooks:
            hook.remove()
    ops = collections.Counter(
        e.name.removeprefix("aten::")
        for e in prof.events()
        if e.name.startswith("aten::")
        and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
        and e.name.removeprefix("aten::") not in NOT_KERNELS
    )
    torch_ops, triton = sum(ops.values()), sum(launches.values())
    return {
        "torch_ops": torch_ops,
        "triton": triton,
        "total": torch_ops + triton,
        "fused_norm_calls": norm_calls[0],  # (a module shared by both streams runs twice)
        "top": ops.most_common(8),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", nargs="+", default=["ours", "baseline"], help="aqcf-bench model's builds")
    parser.add_argument("--out", type=Path, help="also write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if not start_for_tool(convs=False):
        return 2
    torch.set_num_threads(1)
    counts = {build: count(build) for build in args.builds}
    lines = ["| build | torch ops | Triton launches | total | most frequent torch ops |", "|:--|--:|--:|--:|:--|"]
    for build, c in counts.items():
        top = ", ".join(f"{name} {n}" for name, n in c["top"])
        lines.append(f"| {build} | {c['torch_ops']} | {c['triton']} | {c['total']} | {top} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        from benchmarks import common as bench_common

        env = bench_common.environment(torch.device("cpu"), threads=1)
        head = f"{bench_common.environment_line(env)}, A-QCF-Net training step, --grid host, norms on Triton (stand-in)"
        args.out.with_suffix(".md").write_text(f"{head}\n\n`{env['command']}`\n\n{table}\n")
        bench_common.write_json(args.out.with_suffix(".json"), dict(env, counts=counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

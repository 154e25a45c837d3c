"""``aqcf-bench rnn``: quaternion LiGRU and LSTM stacks, forward (+ backward), ours vs speechbrain's way.

Providers, the same layer and weights (built from one seed, batch-first, training mode):

* ``expanded``: :class:`benchmarks.baselines.SpeechbrainStyleRecurrent`, the layer computed as
  speechbrain's ``QLiGRU`` / ``QLSTM`` compute it: the input projection of all steps as one matmul on
  the expanded (16-block real) weight, then per time step ``QLinear(h)`` with its expanded weight
  rebuilt by ``torch.cat`` every step, and the composite cell — the baseline;
* ``ours``: :class:`aqcf_kernels.nn.QuaternionLiGRU` / ``QuaternionLSTM`` (input projection by
  ``aqcf.qconv`` with ``algorithm='auto'``, then each direction's recurrence in one ``aqcf::rnn_sequence``
  call on CPU: per step one GEMM on the quaternion weight's components and the fused cell, the
  backward through time in C++; see :mod:`aqcf_kernels.ops.rnn_cell`).

The issue's cases (``--grid targets``): 4 layers x 512 real hidden (128 quaternions), input 512,
batch 8, 500 steps, unidirectional, fp32, forward+backward. Targets on CPU: ours >= 1.5x expanded,
peak memory <= 1.0x. The baseline's backward keeps every step's rebuilt weight (4 MiB per step and
layer for the LSTM at 512), so its peak at the target size is several GiB.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aqcf_kernels.nn import QuaternionLiGRU, QuaternionLSTM

from . import common
from .baselines import SpeechbrainStyleRecurrent

MODES = ("fwd", "fwdbwd")
PROVIDERS = ("expanded", "ours")
BASELINE = "expanded"
CELLS = {"ligru": QuaternionLiGRU, "lstm": QuaternionLSTM}


@dataclass(frozen=True)
class Case:
    cell: str
    layers: int
    hidden: int
    batch: int
    steps: int
    input_size: int

    @property
    def name(self) -> str:
        return f"{self.cell} {self.layers}x{self.hidden} in{self.input_size} B{self.batch} T{self.steps}"


def _both(layers: int, hidden: int, batch: int, steps: int, input_size: int) -> list[Case]:
    return [Case(cell, layers, hidden, batch, steps, input_size) for cell in CELLS]


GRIDS: dict[str, Callable[[], list[Case]]] = {
    "quick": lambda: _both(2, 64, 4, 20, 64),
    "targets": lambda: _both(4, 512, 8, 500, 512),
    "full": lambda: _both(2, 64, 4, 20, 64) + _both(2, 256, 8, 200, 256) + _both(4, 512, 8, 500, 512),
}
TARGET_CASES = tuple(GRIDS["targets"]())


def make_model(name: str, case: Case, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The layer of ``case`` for one provider; both providers get the same weights (same seed)."""
    torch.manual_seed(0)
    layer = CELLS[case.cell](case.input_size, case.hidden, case.layers, batch_first=True, device=device, dtype=dtype)
    layer.train()
    return SpeechbrainStyleRecurrent(layer) if name == "expanded" else layer


@dataclass
class Inputs:
    x: Tensor
    grad: Tensor


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device) -> Inputs:
    gen = torch.Generator().manual_seed(case.steps)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    return Inputs(rand(case.batch, case.steps, case.input_size), rand(case.batch, case.steps, case.hidden))


def make_step(mode: str, model: nn.Module, inputs: Inputs) -> common.Step:
    params = list(model.parameters())
    if mode == "fwd":

        def step() -> None:
            with torch.no_grad():
                model(inputs.x)

        return step

    def step() -> None:
        for p in params:
            p.grad = None
        out, _ = model(inputs.x)
        out.backward(inputs.grad)

    return step


@dataclass
class Result(common.ProviderRatios):
    baseline = BASELINE
    case: Case
    mode: str
    timings: dict[str, common.Timing | None]
    errors: dict[str, float | None]
    peaks: dict[str, int | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "case": asdict(self.case),
            "mode": self.mode,
            "providers": {
                name: {
                    "median_s": t.median if t else None,
                    "iqr_s": t.iqr if t else None,
                    "samples_s": t.samples if t else None,
                    "ms_per_step": t.median / self.case.steps * 1e3 if t else None,
                    "speedup_vs_expanded": self.speedup(name),
                    "peak_bytes": self.peaks.get(name),
                    "peak_ratio_vs_expanded": self.peak_ratio(name),
                    "forward_rel_error_vs_expanded": self.errors.get(name),
                }
                for name, t in self.timings.items()
            },
        }


def _forward_errors(models: dict[str, nn.Module], inputs: Inputs) -> dict[str, float | None]:
    """Relative error of each provider's output against ``expanded`` (training mode, no gradients)."""
    if BASELINE not in models:
        return dict.fromkeys(models)
    with torch.no_grad():
        outs = {name: m(inputs.x)[0].double() for name, m in models.items()}
    ref = outs[BASELINE]
    return {name: ((o - ref).norm() / ref.norm()).item() for name, o in outs.items()}


def run(cases, modes, providers, reps, warmup, dtype, device, memory=True) -> list[Result]:
    results: list[Result] = []
    n, i, started = len(cases) * len(modes), 0, time.perf_counter()
    for case in cases:
        models = {name: make_model(name, case, dtype, device) for name in providers}
        inputs = make_inputs(case, dtype, device)
        errors = _forward_errors(models, inputs)
        for mode in modes:
            i += 1
            common.progress(i, n, f"time {case.name} {mode}", started)
            steps = {name: make_step(mode, m, inputs) for name, m in models.items()}
            times = common.time_interleaved(steps, reps, warmup, device)
            results.append(Result(case, mode, {p: common.Timing.of(times[p]) for p in providers}, errors))
        del models
    if memory:
        # The timing builds' freed memory (the baseline's per-step weights, GiBs at the target size) stays
        # in this process's malloc arenas: give it back before the worker allocates as much again (the
        # kernel's OOM killer took this process during the target grid's memory pass otherwise).
        _release_freed_memory()
        payload = common.memory_payload(cases, modes, providers, dtype, device)
        common.progress(n, n, "peak memory (fresh worker process)", started)
        measured = common.measure_memory_in_subprocess(__name__, payload)
        if measured is not None:
            for r, peaks in zip(results, measured["peaks"], strict=True):
                r.peaks.update(peaks)
    return results


def _release_freed_memory() -> None:
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: nothing to trim
            pass


def measure_memory(payload: dict[str, Any], pinned: bool) -> dict[str, Any]:
    """The memory pass of :func:`run`, in a fresh worker process (``benchmarks._memory_worker``)."""
    cases = [Case(**c) for c in payload["cases"]]
    return common.measure_builds_memory(payload, pinned, cases, make_inputs, make_model, make_step)


# ---------------------------------------------------------------------------------------------
# Targets (CPU, fp32, forward+backward): ours >= 1.5x expanded, peak memory <= expanded
# ---------------------------------------------------------------------------------------------

TARGETS = (
    ("speed ours >= 1.5x expanded", lambda r: r.speedup("ours"), lambda v: v >= 1.5),
    ("memory ours <= expanded", lambda r: r.peak_ratio("ours"), lambda v: v <= 1.0),
)


def check_targets(results: Sequence[Result]) -> list[dict[str, Any]]:
    checks = []
    for case in TARGET_CASES:
        hit = [r for r in results if r.case == case and r.mode == "fwdbwd"]
        for label, metric, ok in TARGETS:
            checks.append(common.target_verdict(f"{case.name}: {label}", metric(hit[0]) if hit else None, ok))
    return checks


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def markdown(results: Sequence[Result], env: dict[str, Any], checks) -> str:
    providers = list(results[0].timings) if results else []
    head = ["case", "mode", *providers]

    def ms(r: Result, p: str) -> str:
        return common.time_cell(r.timings.get(p), r.speedup(p), p == BASELINE, digits=1)

    def mib(r: Result, p: str) -> str:
        return common.memory_cell(r.peaks.get(p), r.peak_ratio(p), p == BASELINE, digits=1)

    def err(r: Result, p: str) -> str:
        e = r.errors.get(p)
        return "n/a" if e is None else f"{e:.1e}"

    parts = [
        "# Quaternion recurrent layers benchmark",
        "",
        common.environment_line(env),
        "",
        f"`{env['command']}`",
        "",
        "Training mode, batch-first, unidirectional; `expanded` = the same layer and weights computed the",
        "way speechbrain's q_RNN.py does (expanded-weight QLinear rebuilt every step, composite cell).",
        "",
        "## Time: median ms per sequence batch (speedup vs expanded: the median over reps of t_expanded / t, > 1 is "
        "faster)",
        "",
        common.markdown_table(head, [[r.case.name, r.mode, *(ms(r, p) for p in providers)] for r in results], 2),
        "",
        "## Peak memory: MiB above what was live before one step (ratio to expanded)",
        "",
        common.markdown_table(head, [[r.case.name, r.mode, *(mib(r, p) for p in providers)] for r in results], 2),
        "",
        "## Forward relative error vs expanded",
        "",
        common.markdown_table(
            ["case", *providers],
            [[r.case.name, *(err(r, p) for p in providers)] for r in results if r.mode == results[0].mode],
            1,
        ),
        *common.targets_lines(checks),
    ]
    return "\n".join(parts) + "\n"


def plot(path: Path, results: Sequence[Result], env: dict[str, Any]) -> None:
    common.plot_ratios(path, results, BASELINE, "aqcf-bench rnn — " + common.environment_line(env))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    grids = "quick (2x64, B4, T20; seconds), targets (4x512, B8, T500), full (quick, 2x256 T200, targets)"
    parser.add_argument("--grid", choices=list(GRIDS), default="quick", help=grids)
    parser.add_argument("--modes", type=lambda t: t.split(","), default=["fwdbwd"], help="fwd,fwdbwd (default fwdbwd)")
    parser.add_argument("--providers", type=lambda t: t.split(","), default=list(PROVIDERS),
                        help="expanded,ours (expanded, the baseline, always runs)")  # fmt: skip
    parser.add_argument("--cells", type=lambda t: t.split(","), default=list(CELLS),
                        help="ligru,lstm (default both)")  # fmt: skip
    parser.add_argument(
        "--check-targets", action="store_true", help="PASS/FAIL of the CPU speed targets (README, Benchmarks)"
    )


def main(args: argparse.Namespace) -> int:
    bad = [m for m in args.modes if m not in MODES] + [p for p in args.providers if p not in PROVIDERS]
    bad += [c for c in args.cells if c not in CELLS]
    if bad:
        known = f"modes {MODES}, providers {PROVIDERS}, cells {tuple(CELLS)}"
        return common.usage_error(args, f"unknown mode/provider/cell {bad}; {known}")
    cases = [c for c in GRIDS[args.grid]() if c.cell in args.cells]
    common.configure_torch(args.threads)
    device = torch.device(args.device)
    dtype = common.DTYPES[args.dtype]
    providers = [p for p in PROVIDERS if p in args.providers or p == BASELINE]
    env = common.environment(device, args.threads, args.load)
    common.warn_if_busy(env)
    with common.background_load(args.load):
        results = run(cases, args.modes, providers, args.reps, args.warmup, dtype, device, memory=not args.no_memory)
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    checks = common.skipped_outside(check_targets(results), dtype, device.type) if args.check_targets else None
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"modes": args.modes, "providers": providers, "reps": args.reps, "warmup": args.warmup,
              "dtype": args.dtype, "baseline": BASELINE, "layers": "batch_first, unidirectional, train"}  # fmt: skip
    common.write_json(args.out / "rnn.json", {"family": "rnn", "env": env, "config": config,
                      "results": [r.to_json() for r in results], "targets": checks})  # fmt: skip
    text = markdown(results, env, checks)
    (args.out / "rnn.md").write_text(text)
    plot(args.out / "rnn.png", results, env)
    print(text)
    print(f"wrote {args.out}/rnn.md, .json, .png", file=sys.stderr)  # stdout is the report alone, as conv's
    return 0

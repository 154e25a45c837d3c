"""Quaternion convolution benchmark (``aqcf-bench conv``).

Providers, all run on the same tensors in the same process, interleaved per case:

* ``naive16``  — :func:`aqcf_kernels.reference.quaternion_conv_naive`, 16 real convs;
* ``expanded`` — :func:`aqcf_kernels.reference.quaternion_conv_expanded`, Parcollet's expanded
  weight + one real conv: what every quaternion library does, and the baseline of every ratio;
* ``hamilton``, ``fast8``, ``auto`` — :func:`aqcf_kernels.functional.quaternion_conv` with that
  algorithm (the report says which backend and algorithm served the forward, the input gradient
  and the weight gradient: ``auto`` chooses each on its own).

Cases are stride-1, ``padding=kernel//2`` ("same") convs with bias, in = out channels. Modes:

* ``fwd``    — inference forward (``torch.no_grad``);
* ``bwd``    — gradients w.r.t. input, weight and bias, of a forward graph built beforehand;
* ``fwdbwd`` — a training step: forward, then those gradients. Its peak memory includes what
  autograd saves for backward;
* ``per-sample`` (not in the default modes) — each sample's weight and bias gradients, as DP-SGD
  clips them: ``torch.func.vmap(torch.func.grad(loss))`` over the batch, the loss one sample's
  ``<conv(x), grad_output>``. The references run through functorch's own rules for aten's conv; ours
  through its vmap rules (``aqcf_kernels.ops.func``), which fold the samples into the conv's batch for
  the forward and into its groups for the weight gradient (``ops.conv.FOLD_BYTES``: on CPU at most 4 MiB
  of folded copies a call, so a large sample's weight gradient is a call of its own on its own tensors).

Timing and memory start once ``auto`` (and a forced algorithm's choice among backends) has settled
its choices for the step (:func:`common.settle_choices`): the steady state. What measuring costs is
``tools/tuning_cost.py``'s to report.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aqcf_kernels import backends as _backends
from aqcf_kernels.functional import quaternion_conv
from aqcf_kernels.ops.conv import adjoint_params, fold_bytes, fold_chunk
from aqcf_kernels.params import check_conv_args
from aqcf_kernels.reference import quaternion_conv_expanded, quaternion_conv_naive

from . import common

ConvFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
MODES = ("fwd", "bwd", "fwdbwd", "per-sample")
DEFAULT_MODES = ("fwd", "bwd", "fwdbwd")
BASELINE = "expanded"


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A stride-1 'same' quaternion conv, ``channels`` quaternion channels in and out."""

    dims: int
    channels: int  # quaternion channels (real channels = 4x)
    size: int  # spatial extent, the same along every dim
    batch: int
    kernel: int = 3
    channels_last: bool = False  # input and output gradient in torch.channels_last(_3d) (2d and 3d)

    @property
    def name(self) -> str:
        spatial = "x".join([str(self.size)] * self.dims)
        return f"{self.dims}d {self.channels}q k{self.kernel} N{self.batch} {spatial}" + (
            " cl" if self.channels_last else ""
        )

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, 4 * self.channels, *([self.size] * self.dims))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (4, self.channels, self.channels, *([self.kernel] * self.dims))

    @property
    def gflop(self) -> float:
        """Forward GFLOP of the expanded real conv (2 x multiply-adds)."""
        return 2 * self.batch * self.size**self.dims * (4 * self.channels) ** 2 * self.kernel**self.dims / 1e9


# The target cases (QuaternionConv2d/3d layers).
TARGETS: dict[str, Case] = {
    "2d-64q": Case(dims=2, channels=64, size=64, batch=8),
    "2d-32q": Case(dims=2, channels=32, size=64, batch=8),
    "3d-32q": Case(dims=3, channels=32, size=32, batch=2),
}

# Full grid: every rank x channel count x (spatial size, batch), a large-spatial and a deep
# (small-spatial) shape per rank, up to FULL_MAX_GFLOP forward GFLOP per case (the largest would
# take minutes each on a 2-core CPU), plus the targets, which cover the big 2d/3d cases.
FULL_CHANNELS = (16, 32, 64, 128)
FULL_SHAPES: dict[int, tuple[tuple[int, int], ...]] = {  # dims -> ((size, batch), ...)
    1: ((4096, 8), (1024, 8)),
    2: ((64, 4), (16, 8)),
    3: ((32, 1), (8, 2)),
}
FULL_MAX_GFLOP = 16.0


def _full_grid() -> list[Case]:
    cases = [
        Case(dims, ch, size, batch)
        for dims, shapes in FULL_SHAPES.items()
        for ch in FULL_CHANNELS
        for size, batch in shapes
    ]
    cases = [c for c in cases if c.gflop <= FULL_MAX_GFLOP]
    cases += [t for t in TARGETS.values() if t not in cases]
    return sorted(cases, key=lambda c: (c.dims, c.channels, c.gflop))


GRIDS: dict[str, Callable[[], list[Case]]] = {
    "quick": lambda: [
        Case(dims=1, channels=16, size=1024, batch=8),
        Case(dims=1, channels=64, size=1024, batch=4),
        Case(dims=2, channels=16, size=32, batch=4),
        Case(dims=2, channels=32, size=32, batch=4),
        Case(dims=2, channels=64, size=32, batch=2),
        Case(dims=3, channels=16, size=16, batch=1),
    ],
    "targets": lambda: list(TARGETS.values()),
    "full": _full_grid,
    # GPU (benchmarks/gpu_suite.sh): 16q..256q; the GPU target is 2d 64q N=32 64x64.
    "gpu": lambda: [
        *(Case(dims=2, channels=ch, size=64, batch=32) for ch in (16, 32, 64, 128, 256)),
        *(Case(dims=3, channels=ch, size=32, batch=4) for ch in (16, 32, 64, 128)),
    ],
}


def target_name(case: Case) -> str | None:
    return next((name for name, t in TARGETS.items() if t == case), None)


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------


#: the computations each mode runs (what :meth:`Provider.served_by` reports for it)
MODE_KINDS = {
    "fwd": ("forward",),
    "bwd": ("input_grad", "weight_grad"),
    "fwdbwd": ("forward", "input_grad", "weight_grad"),
    "per-sample": ("forward", "per_sample_weight_grad"),
}
#: how :meth:`Provider.served_by` names the gradient computations
GRADIENT_TAGS = {"input_grad": "dx", "weight_grad": "dw", "per_sample_weight_grad": "dw per sample"}


@dataclass(frozen=True)
class Provider:
    """A reference function, or ours (:func:`quaternion_conv` with ``algorithm``)."""

    name: str
    reference: Callable[..., Tensor] | None = None
    algorithm: str | None = None
    backend: str | None = None  # forced backend (GPU providers); None: the registry's choice
    activation: str | None = None  # a ReLU after the conv: fused in ours, a separate op after a reference

    def build(self, case: Case) -> ConvFn:
        if self.reference is not None:
            conv = partial(self.reference, stride=1, padding=case.padding)
            return conv if self.activation is None else _then_relu(conv)
        kwargs = {} if self.activation is None else {"activation": self.activation}
        return partial(quaternion_conv, stride=1, padding=case.padding, algorithm=self.algorithm, **kwargs)

    def scope(self) -> contextlib.AbstractContextManager:
        """Where every call of a step runs: the forced backend, backward included (autograd
        selects the backend of the backward ops when they run, not when the forward ran)."""
        return contextlib.nullcontext() if self.backend is None else _backends.use(self.backend)

    def served_by(self, inputs: Inputs, case: Case, kinds: Sequence[str] = MODE_KINDS["fwdbwd"]) -> str:
        """``reference``, or the ``backend/algorithm`` pairs that serve ours in the computations
        ``kinds`` (those a mode runs, :data:`MODE_KINDS`): the first's, then in parentheses those
        that differ from it, tagged (``dx`` the input gradient, ``dw`` the weight gradient), e.g.
        ``cpp/hamilton (dw cpp/fast8)``: each is chosen on its own. A mode without the forward tags
        its first too: ``dx cpp/fast8 (dw cpp/hamilton)``.

        For ``auto``, asked after the timing: the choices its measurement made in this workload.
        """
        if self.algorithm is None:
            return "reference"
        x, w, gy = inputs.x, inputs.w, inputs.grad_out
        try:
            p, _ = check_conv_args(x, w, None, case.dims, 1, case.padding, 1, 1, False, 0, self.algorithm)
            # per sample: one weight gradient per n samples, each sample's channels a group (one sample: as is)
            n = fold_chunk(fold_bytes(x[0], gy[0]), x.shape[0], x.device)  # as the vmap rule asks
            calls = {  # computation -> (input, weight, geometry, kind)
                "forward": (x, w, p, "forward"),
                "input_grad": (gy, w, adjoint_params(gy.shape, w.shape, x.shape, p), "input_grad"),
                "weight_grad": (x, x.new_empty(1).expand(w.shape), p, "weight_grad"),  # the weight's shape, no data
                "per_sample_weight_grad": (  # the folded input is a dense copy (channels-first)
                    x[:1] if n == 1 else x.new_empty(1, n * x.shape[1], *x.shape[2:]),
                    x.new_empty(1).expand(4, n * w.shape[1], *w.shape[2:]),
                    replace(p, groups=n),
                    "weight_grad",
                ),
            }
            with self.scope():
                chosen = {}
                for computation in kinds:
                    a, b, params, kind = calls[computation]
                    backend, algorithm, *_ = _backends.resolve_conv(a, b, params, self.algorithm, kind)
                    chosen[computation] = f"{backend.name}/{algorithm}"
        except Exception as e:  # noqa: BLE001 - a report, not a check
            return f"unknown ({type(e).__name__})"
        (first, pair), *rest = chosen.items()
        others = [f"{GRADIENT_TAGS[k]} {c}" for k, c in rest if c != pair]
        lead = pair if first == "forward" or not others else f"{GRADIENT_TAGS[first]} {pair}"
        return lead + (f" ({', '.join(others)})" if others else "")


def _then_relu(conv: ConvFn) -> ConvFn:
    def conv_relu(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.relu(conv(x, w, b))

    return conv_relu


PROVIDERS: dict[str, Provider] = {
    "naive16": Provider("naive16", reference=quaternion_conv_naive),
    "expanded": Provider("expanded", reference=quaternion_conv_expanded),
    "hamilton": Provider("hamilton", algorithm="hamilton"),
    "fast8": Provider("fast8", algorithm="fast8"),
    "auto": Provider("auto", algorithm="auto"),
    # GPU providers: each backend forced (the registry would pick triton first)
    "cuda": Provider("cuda", algorithm="hamilton", backend="cuda"),
    # fast8 as 8 cuDNN convs on the operand combinations (the cuda backend's ATen path): half the FLOPs in
    # smaller convs, measured beside Triton's fast8 (issue 13's fast8 target names no implementation)
    "cuda/fast8": Provider("cuda/fast8", algorithm="fast8", backend="cuda"),
    "triton/hamilton": Provider("triton/hamilton", algorithm="hamilton", backend="triton"),
    "triton/fast8": Provider("triton/fast8", algorithm="fast8", backend="triton"),
    # conv + bias + ReLU (GPU target): cuDNN on the expanded weight then torch.relu, against the fused epilogue
    "expanded+relu": Provider("expanded+relu", reference=quaternion_conv_expanded, activation="relu"),
    "triton/hamilton+relu": Provider("triton/hamilton+relu", algorithm="hamilton", backend="triton", activation="relu"),
}
CPU_PROVIDERS = ("naive16", "expanded", "hamilton", "fast8", "auto")
GPU_PROVIDERS = ("naive16", "expanded", "cuda", "cuda/fast8", "triton/hamilton", "triton/fast8", "auto")


# ---------------------------------------------------------------------------------------------
# Inputs and steps
# ---------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    x: Tensor
    w: Tensor
    b: Tensor
    grad_out: Tensor

    @property
    def leaves(self) -> tuple[Tensor, Tensor, Tensor]:
        return (self.x, self.w, self.b)


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Inputs:
    """Seeded input, weight (fan-in scaled), bias and output gradient, all leaves needing grad."""
    g = torch.Generator().manual_seed(0)
    fan_in = 4 * case.channels * case.kernel**case.dims

    def rand(shape: Sequence[int], scale: float = 1.0, grad: bool = True, activation: bool = False) -> Tensor:
        t = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)
        if activation and case.channels_last and case.dims in CHANNELS_LAST:
            t = t.contiguous(memory_format=CHANNELS_LAST[case.dims])
        return t.requires_grad_(grad)

    return Inputs(
        x=rand(case.input_shape, activation=True),
        w=rand(case.weight_shape, 1 / math.sqrt(fan_in)),
        b=rand((4 * case.channels,), 0.1),
        grad_out=rand(case.input_shape, grad=False, activation=True),  # 'same' padding: output shape = input's
    )


#: the channels_last memory format of each rank (1d tensors have none)
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def make_step(
    mode: str,
    fn: ConvFn,
    inputs: Inputs,
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> common.Step:
    """The measured unit of ``mode``: a zero-argument callable, each call inside ``scope()``."""
    leaves, gy = inputs.leaves, inputs.grad_out
    if mode == "fwd":

        def fwd() -> None:
            with scope(), torch.no_grad():
                fn(*leaves)

        return fwd
    if mode == "fwdbwd":

        def fwdbwd() -> None:
            with scope():
                torch.autograd.grad(fn(*leaves), leaves, gy)

        return fwdbwd
    if mode == "bwd":
        with scope():
            y = fn(*leaves)  # built once, outside the timing; kept for every rep

        def bwd() -> None:
            with scope():
                torch.autograd.grad(y, leaves, gy, retain_graph=True)

        return bwd
    if mode == "per-sample":
        x, w, b = (t.detach() for t in leaves)

        def loss(w: Tensor, b: Tensor, x: Tensor, gy: Tensor) -> Tensor:  # one sample's
            return (fn(x[None], w, b)[0] * gy).sum()

        per_sample_grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))

        def per_sample() -> None:
            with scope():
                per_sample_grads(w, b, x, gy)

        return per_sample
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def forward_error(fn: ConvFn, ref: Tensor, inputs: Inputs) -> float:
    """max |y - y_ref| / max |y_ref| of one forward: a wrong kernel's timing means nothing."""
    with torch.no_grad():
        y = fn(*inputs.leaves)
        return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    mode: str
    timings: dict[str, common.Timing]
    peaks: dict[str, int | None]
    served_by: dict[str, str]
    errors: dict[str, float] = field(default_factory=dict)
    memory_method: str = "not measured"

    def speedup(self, provider: str, over: str = BASELINE) -> float | None:
        """``t_over / t_provider`` (> 1: the provider is faster), rep by rep (:func:`common.paired_ratio`)."""
        if provider not in self.timings or over not in self.timings:
            return None
        return common.paired_ratio(self.timings[over], self.timings[provider])

    def peak_ratio(self, provider: str, over: str = BASELINE) -> float | None:
        """``peak_provider / peak_over`` (< 1: the provider needs less memory)."""
        a, b = self.peaks.get(provider), self.peaks.get(over)
        return None if a is None or not b else a / b

    def to_json(self) -> dict[str, Any]:
        providers = {}
        for name, t in self.timings.items():
            peak = self.peaks.get(name)
            providers[name] = {
                "median_ms": t.median * 1e3,
                "q1_ms": t.q1 * 1e3,
                "q3_ms": t.q3 * 1e3,
                "iqr_ms": t.iqr * 1e3,
                "times_ms": [s * 1e3 for s in t.samples],
                "speedup_vs_expanded": self.speedup(name),
                "peak_mib": None if peak is None else peak / common.MiB,
                "peak_ratio_vs_expanded": self.peak_ratio(name),
                "served_by": self.served_by.get(name),
                "max_rel_err_fwd": self.errors.get(name),
            }
        case = {
            "name": self.case.name,
            "target": target_name(self.case),
            "dims": self.case.dims,
            "channels_q": self.case.channels,
            "size": self.case.size,
            "batch": self.case.batch,
            "kernel": self.case.kernel,
            "input_shape": list(self.case.input_shape),
            "weight_shape": list(self.case.weight_shape),
            "gflop_fwd": self.case.gflop,
        }
        return {"case": case, "mode": self.mode, "providers": providers}


def run(
    cases: Sequence[Case],
    modes: Sequence[str] = DEFAULT_MODES,
    providers: Sequence[str] = tuple(PROVIDERS),
    reps: int = 7,
    warmup: int = 2,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    memory: bool = True,
    min_time: float = 0.0,
) -> list[Result]:
    """Time every provider on every case and mode; then, if ``memory``, measure their peaks.

    Memory comes second, in a pass of its own: measuring it repeatably (on CPU) changes how glibc
    allocates (see ``benchmarks._memory_worker``), so it runs in a fresh process.
    """
    device = torch.device(device)
    n = len(cases) * len(modes) * (2 if memory else 1)
    results: list[Result] = []
    i, started = 0, time.perf_counter()
    for case in cases:
        inputs = make_inputs(case, dtype, device)
        fns = {name: PROVIDERS[name].build(case) for name in providers}
        errors = _forward_errors(case, fns, inputs, dtype)  # also the first call: auto measures its forward
        for mode in modes:
            i += 1
            common.progress(i, n, f"time {case.name} {mode}", started)
            with common.workload_tuning(f"{case.name} {mode}"):
                steps = {name: make_step(mode, fn, inputs, PROVIDERS[name].scope) for name, fn in fns.items()}
                common.settle_choices(steps)
                times = common.time_interleaved(steps, reps, warmup, device, min_time)
                served = {name: PROVIDERS[name].served_by(inputs, case, MODE_KINDS[mode]) for name in providers}
            timings = {k: common.Timing.of(v) for k, v in times.items()}
            results.append(Result(case, mode, timings, dict.fromkeys(fns), served, errors))
    memory_method = "not measured"
    if memory:
        payload = common.memory_payload(
            cases, modes, providers, dtype, device, progress=[i, n, time.perf_counter() - started]
        )
        measured = common.measure_memory_in_subprocess(__name__, payload)
        if measured is not None:
            for r, peaks in zip(results, measured["peaks"], strict=True):
                r.peaks.update(peaks)
            memory_method = measured["method"]
    for r in results:
        r.memory_method = memory_method
    return results


def measure_memory(payload: dict[str, Any], pinned: bool) -> dict[str, Any]:
    """The memory pass of :func:`run`, in the worker process: peaks per result, in run's order."""
    common.configure_torch(payload["threads"])
    device, dtype = torch.device(payload["device"]), common.DTYPES[payload["dtype"]]
    meter = common.PeakMemory(device)
    i, n, elapsed = payload["progress"]
    started = time.perf_counter() - elapsed
    peaks = []
    for case in (Case(**c) for c in payload["cases"]):
        inputs = make_inputs(case, dtype, device)
        fns = {name: PROVIDERS[name].build(case) for name in payload["providers"]}
        for mode in payload["modes"]:
            i += 1
            common.progress(i, n, f"memory {case.name} {mode}", started)
            row = {}
            with common.workload_tuning(f"{case.name} {mode}"):  # the timing's choices, from its cache file
                for name, fn in fns.items():
                    step = make_step(mode, fn, inputs, PROVIDERS[name].scope)  # one bwd graph alive at a time
                    common.settle_choices({name: step})  # first calls: oneDNN primitives, caches
                    row[name] = meter.measure(step)
                    del step
            peaks.append(row)
    return {"peaks": peaks, "method": meter.method(pinned)}


def _forward_errors(case: Case, fns: dict[str, ConvFn], inputs: Inputs, dtype: torch.dtype) -> dict[str, float]:
    if BASELINE not in fns:
        return {}
    with torch.no_grad():
        ref = fns[BASELINE](*inputs.leaves)
    errors = {}
    for name, fn in fns.items():
        with PROVIDERS[name].scope():
            errors[name] = forward_error(fn, ref, inputs)
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    for name, err in errors.items():
        if err > tol:
            print(f"WARNING: {name} differs from {BASELINE} on {case.name}: max rel err {err:.2e}", file=sys.stderr)
    return errors


# ---------------------------------------------------------------------------------------------
# Targets of the issue
# ---------------------------------------------------------------------------------------------

# (target case, provider auto is compared with, minimum speedup of auto), all in fwdbwd.
SPEED_TARGETS = (
    ("2d-64q", "expanded", 2.0),
    ("2d-64q", "naive16", 4.0),
    ("2d-32q", "expanded", 1.6),
    ("3d-32q", "expanded", 1.9),
)
AUTO_FLOOR = 0.95  # auto never slower than this fraction of expanded's speed, anywhere

#: ``--min-time`` by grid: seconds of timed calls per provider and case. The full grid's check asks
#: whether auto is within 5% of the best provider in every one of 21 cases, and 7 reps (what 0.5 s
#: gives a 60 ms step) cannot tell 5% on a 2-core machine. There, the same computations timed twice
#: in one run spread 0.94–1.10x (per-rep ratios; standard deviation 0.024–0.037 over three runs). At
#: 2 s (30–200 reps for steps under 300 ms) they spread 0.98–1.03x (0.011). The grid then takes
#: ~18 minutes instead of ~14 (AMD EPYC, 2026-12-04, benchmarks/results/...-full-min-time-2.*).
MIN_TIME_S = {"full": 2.0, "other": 0.5}


def min_time(grid: str, asked: float | None) -> float:
    """The ``--min-time`` a run uses: the one asked for, else :data:`MIN_TIME_S` for its grid."""
    if asked is not None:
        return asked
    return MIN_TIME_S["full" if grid == "full" else "other"]


# auto against the fastest of these in the same run (fwdbwd, every case): measuring must find it.
AUTO_BEST_OF = ("expanded", "hamilton", "fast8")
# With another process spinning on a core (--load): auto on these targets, fwdbwd, vs expanded.
LOADED_TARGETS = (("2d-64q", 1.3), ("3d-32q", 1.3))

# On a GPU (issue 13; bf16, channels_last, L2 flushed; benchmarks/gpu_suite.sh): (case, mode, provider,
# over, minimum speedup). The fused conv + bias + ReLU is against cuDNN on the expanded weight + torch.relu.
GPU_TARGET_64Q = Case(dims=2, channels=64, size=64, batch=32)
GPU_SPEED_TARGETS = (
    (GPU_TARGET_64Q, "fwd", "triton/hamilton", "expanded", 0.9),
    (GPU_TARGET_64Q, "fwdbwd", "triton/hamilton", "expanded", 0.9),
    (GPU_TARGET_64Q, "fwdbwd", "triton/hamilton+relu", "expanded+relu", 1.1),
    (Case(dims=2, channels=16, size=64, batch=32), "fwdbwd", "triton/hamilton", "expanded", 1.2),
    (GPU_TARGET_64Q, "fwdbwd", "triton/fast8", "expanded", 1.3),
    (Case(dims=2, channels=128, size=64, batch=32), "fwdbwd", "triton/fast8", "expanded", 1.3),
)
#: what auto may pick on a GPU, by dtype class: fast8 is opt-in in half precision (DESIGN.md)
GPU_AUTO_BEST_OF = {
    "half": ("expanded", "triton/hamilton", "cuda"),
    "full": ("expanded", "triton/hamilton", "triton/fast8", "cuda", "cuda/fast8"),
}


def best_of(r: Result, names: Sequence[str]) -> tuple[str, float] | None:
    """The one of ``names`` that ran on this case and mode that auto is slowest against, with auto's
    speedup over it (rep by rep, :meth:`Result.speedup`)."""
    ran = [(n, r.speedup("auto", over=n)) for n in names if n in r.timings and "auto" in r.timings]
    return min(ran, key=lambda p: p[1]) if ran else None


def _verdict(label: str, value: float | None, ok: bool, detail: str) -> dict[str, Any]:
    status = "SKIP" if value is None else ("PASS" if ok else "FAIL")
    return {"target": label, "status": status, "value": value, "detail": detail}


def check_gpu_targets(results: Sequence[Result], dtype: torch.dtype) -> list[dict[str, Any]]:
    """Issue 13's GPU targets: :data:`GPU_SPEED_TARGETS` (bf16 channels_last cases; SKIP in another dtype or
    layout, or where the case or a provider did not run), and auto against the best it may pick, every case."""
    by_key = {(r.case, r.mode): r for r in results}
    out = []
    for case, mode, provider, over, need in GPU_SPEED_TARGETS:
        label = f"{case.name} {mode}: {provider} >= {need}x {over} (bf16, channels_last)"
        r = by_key.get((replace(case, channels_last=True), mode)) if dtype == torch.bfloat16 else None
        value = r.speedup(provider, over) if r else None
        if value is not None:
            detail = f"{value:.2f}x"
        elif dtype != torch.bfloat16:
            detail = f"a {str(dtype).removeprefix('torch.')} run"
        else:
            detail = f"{provider} or {over} on {case.name} cl {mode} not in this run"
        out.append(_verdict(label, value, value is not None and value >= need, detail))
    names = GPU_AUTO_BEST_OF["half" if dtype in (torch.float16, torch.bfloat16) else "full"]
    out.append(_auto_against_the_best(results, names))
    return out


def _auto_against_the_best(results: Sequence[Result], names: Sequence[str]) -> dict[str, Any]:
    """auto's speed over the fastest of ``names`` in each fwdbwd case: the worst case's verdict."""
    vs_best = []
    for r in results:
        best = best_of(r, names)
        if r.mode == "fwdbwd" and best is not None:
            vs_best.append((best[1], best[0], r))
    worst = min(vs_best, key=lambda p: p[0], default=None)
    below = [(ratio, best, r) for ratio, best, r in vs_best if ratio < AUTO_FLOOR]
    # Below the floor while running exactly the best provider's pairs: the same computations timed
    # twice in one run, i.e. the machine's noise, not auto's choice. Said, not excused: the verdict
    # stays the ratio's.
    same = [
        r.case.name for _, best, r in below if r.served_by.get(best) and r.served_by.get("auto") == r.served_by[best]
    ]
    detail = "auto not run"
    if worst:
        of_medians = worst[2].timings[worst[1]].median / worst[2].timings["auto"].median
        detail = f"worst {worst[0]:.2f}x ({worst[2].case.name}, best {worst[1]}, ratio of medians {of_medians:.2f}x)"
    if below:
        detail += f"; {len(below)} of {len(vs_best)} cases below {AUTO_FLOOR}x"
        detail += f", {len(same)} of them running the best provider's own pairs" + (
            f" ({', '.join(same)})" if same else ""
        )
    return _verdict(
        _auto_best_label(names), worst[0] if worst else None, worst is not None and worst[0] >= AUTO_FLOOR, detail
    )


def _auto_best_label(names: Sequence[str]) -> str:
    return f"auto >= {AUTO_FLOOR}x the best of {', '.join(names)} in every case (fwdbwd)"


def check_targets(results: Sequence[Result], load: int = 0) -> list[dict[str, Any]]:
    """PASS / FAIL / SKIP (not in this run) for each CPU target, with the measured value."""
    verdict = _verdict

    by_key = {(r.case, r.mode): r for r in results}
    out = []
    for tname, over, need in SPEED_TARGETS:
        r = by_key.get((TARGETS[tname], "fwdbwd"))
        value = r.speedup("auto", over) if r else None
        detail = (
            f"{value:.2f}x" if value is not None else f"auto or {over} on {TARGETS[tname].name} fwdbwd not in this run"
        )
        out.append(
            verdict(f"{tname} fwdbwd: auto >= {need}x {over}", value, value is not None and value >= need, detail)
        )

    speed = [(r.speedup("auto"), r) for r in results]
    speed = [(s, r) for s, r in speed if s is not None]
    worst_s, worst_r = min(speed, key=lambda p: p[0], default=(None, None))
    out.append(
        verdict(
            f"auto >= {AUTO_FLOOR}x expanded in every case and mode",
            worst_s,
            worst_s is not None and worst_s >= AUTO_FLOOR,
            f"worst {worst_s:.2f}x ({worst_r.case.name} {worst_r.mode})" if worst_r else "auto and expanded not run",
        )
    )

    missing = [n for n in AUTO_BEST_OF if not any(n in r.timings for r in results)]
    if missing:  # the best of the others is not the best of these: a verdict would judge what did not run
        out.append(verdict(_auto_best_label(AUTO_BEST_OF), None, False, f"{', '.join(missing)} not in this run"))
    else:
        out.append(_auto_against_the_best(results, AUTO_BEST_OF))
    if load:
        for tname, need in LOADED_TARGETS:
            r = by_key.get((TARGETS[tname], "fwdbwd"))
            value = r.speedup("auto") if r else None
            detail = f"{value:.2f}x" if value is not None else f"{TARGETS[tname].name} fwdbwd not in this run"
            out.append(
                verdict(
                    f"{tname} fwdbwd with {load} busy process(es): auto >= {need}x expanded",
                    value,
                    value is not None and value >= need,
                    detail,
                )
            )

    mem = [(r.peak_ratio("auto"), r) for r in results if r.mode == "fwdbwd"]
    mem = [(m, r) for m, r in mem if m is not None]
    worst_m, worst_r = max(mem, key=lambda p: p[0], default=(None, None))
    out.append(
        verdict(
            "auto fwdbwd peak memory <= expanded's in every case",
            worst_m,
            worst_m is not None and worst_m <= 1.0,
            f"worst {worst_m:.2f}x expanded's ({worst_r.case.name})" if worst_r else "no fwdbwd peak memory measured",
        )
    )
    return out


def targets_text(checks: Sequence[dict[str, Any]]) -> str:
    return "\n".join(f"{c['status']:<4}  {c['target']}: {c['detail']}" for c in checks)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _ms(r: Result, name: str) -> str:
    if name not in r.timings:
        return "-"
    text = f"{r.timings[name].median * 1e3:.1f}"
    s = r.speedup(name)
    return text if name == BASELINE or s is None else f"{text} ({s:.2f}x)"


def _mib(r: Result, name: str) -> str:
    peak = r.peaks.get(name)
    if peak is None:
        return "n/a"
    ratio = r.peak_ratio(name)
    mib = peak / common.MiB
    text = f"{mib:.1f}" if mib < 100 else f"{mib:.0f}"
    return text if name == BASELINE or ratio is None else f"{text} ({ratio:.2f}x)"


def markdown(results: Sequence[Result], env: dict[str, Any], checks: Sequence[dict[str, Any]] | None = None) -> str:
    providers = list(results[0].timings) if results else []
    auto_ran = "auto" in providers  # then a column says which backend served it
    head = ["case", "mode"]
    time_rows = [
        [r.case.name, r.mode, *(_ms(r, p) for p in providers), *([r.served_by.get("auto", "-")] if auto_ran else [])]
        for r in results
    ]
    mem_rows = [[r.case.name, r.mode, *(_mib(r, p) for p in providers)] for r in results]
    parts = [
        "# Quaternion conv benchmark",
        "",
        common.environment_line(env),
        "",
        f"`{env['command']}`",
        "",
        "## Time: median ms (speedup vs expanded: the median over reps of t_expanded / t_provider, > 1 is faster)",
        "",
        common.markdown_table(head + providers + (["auto served by"] if auto_ran else []), time_rows, align_left=2),
        "",
        "## Peak memory: MiB above what was live before one step (ratio to expanded, < 1 is less)",
        "",
        common.markdown_table(head + providers, mem_rows, align_left=2),
    ]
    if checks:
        parts += ["", "## Targets", "", "```", targets_text(checks), "```"]
    return "\n".join(parts) + "\n"


def plot(path: Path, results: Sequence[Result], env: dict[str, Any]) -> None:
    """Speedup vs expanded per case (one panel per mode), then fwdbwd peak-memory ratio."""
    if not results:
        return
    providers = [p for p in results[0].timings if p != BASELINE]
    modes = list(dict.fromkeys(r.mode for r in results))
    cases = list(dict.fromkeys(r.case for r in results))
    by_key = {(r.case, r.mode): r for r in results}

    def series(mode: str, metric: Callable[[Result, str], float | None]) -> dict[str, list[float | None]]:
        return {p: [metric(by_key[(c, mode)], p) if (c, mode) in by_key else None for c in cases] for p in providers}

    panels = [
        (f"{mode}: speedup vs expanded (higher is better)", "t_expanded / t", series(mode, Result.speedup))
        for mode in modes
    ]
    mem_mode = "fwdbwd" if "fwdbwd" in modes else modes[-1]
    mem = series(mem_mode, Result.peak_ratio)
    if any(v is not None for vs in mem.values() for v in vs):
        panels.append((f"{mem_mode}: peak memory vs expanded (lower is better)", "peak / peak_expanded", mem))
    common.grouped_bars(path, [c.name for c in cases], panels, "aqcf-bench conv — " + common.environment_line(env))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} names none; give one or more of {', '.join(choices)}")
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad))}: not one of {', '.join(choices)}")
        return items

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``conv`` family's own options (besides :func:`common.add_common_arguments`)."""
    parser.add_argument(
        "--grid",
        choices=list(GRIDS),
        default="quick",
        help="quick: small cases, ~1 min; targets: the 3 cases of the speed targets (README, Benchmarks); "
        "full: every rank, channel count and shape (several minutes). Default quick",
    )
    parser.add_argument(
        "--modes",
        type=_csv(MODES),
        default=list(DEFAULT_MODES),
        help=f"comma-separated, of {', '.join(MODES)}; default {','.join(DEFAULT_MODES)}",
    )
    parser.add_argument(
        "--providers",
        type=_csv(list(PROVIDERS)),
        default=None,
        help=f"comma-separated; default: {', '.join(CPU_PROVIDERS)} on CPU, {', '.join(GPU_PROVIDERS)} on CUDA; "
        f"{BASELINE} is always run (ratios)",
    )
    parser.add_argument(
        "--cases",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=None,
        help="comma-separated substrings: keep the grid's cases whose name contains one (e.g. '2d 64q,3d')",
    )
    parser.add_argument(
        "--check-targets",
        action="store_true",
        help="report PASS/FAIL for the project's speed targets (README, Benchmarks), from this run's ratios",
    )
    parser.add_argument(
        "--min-time",
        type=common.non_negative_float,
        default=None,
        metavar="S",
        help="more reps for fast cases: about S seconds of timed calls per provider and case (at most "
        f"{common.MAX_REPS} reps; 0: exactly --reps). Default {MIN_TIME_S['full']} with --grid full, "
        f"{MIN_TIME_S['other']} otherwise",
    )
    parser.add_argument(
        "--tf32", action="store_true", help="CUDA float32: allow TF32 in cuDNN/cuBLAS and the Triton kernels"
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="2d/3d inputs and output gradients in channels_last memory format (the GPU targets' layout)",
    )
    parser.add_argument("--list", action="store_true", help="list the grid's cases and exit")


def main(args: argparse.Namespace) -> int:
    cases = GRIDS[args.grid]()
    if args.cases:
        cases = [c for c in cases if any(m in c.name for m in args.cases)]
        if not cases:
            return common.usage_error(args, f"no case of grid {args.grid!r} matches {args.cases}; see --list")
    if args.channels_last:
        cases = [replace(c, channels_last=True) if c.dims in CHANNELS_LAST else c for c in cases]
    if args.list:
        for case in cases:
            tag = target_name(case)
            print(f"{case.name:<28} {case.gflop:7.2f} GFLOP fwd" + (f"  [target {tag}]" if tag else ""))
        print(f"{len(cases)} cases, {sum(c.gflop for c in cases):.1f} GFLOP fwd in all")
        return 0
    common.configure_torch(args.threads)
    device = torch.device(args.device)
    wanted = args.providers or (GPU_PROVIDERS if device.type == "cuda" else CPU_PROVIDERS)
    providers = [p for p in PROVIDERS if p in wanted or p == BASELINE]
    for name in providers:
        forced = PROVIDERS[name].backend
        why = None if forced is None else common.forced_backend_refusal("conv", forced, device)
        if why is not None:
            return common.usage_error(args, f"--providers {name}: the {forced} backend cannot run here: {why}")
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = common.environment(device, args.threads, args.load)
    common.warn_if_busy(env)
    timed_s = min_time(args.grid, args.min_time)
    with common.background_load(args.load):
        results = run(
            cases,
            args.modes,
            providers,
            args.reps,
            args.warmup,
            common.DTYPES[args.dtype],
            device,
            memory=not args.no_memory,
            min_time=timed_s,
        )
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if not args.check_targets:
        checks = None
    elif device.type == "cuda":
        checks = check_gpu_targets(results, common.DTYPES[args.dtype])
    else:
        checks = common.skipped_outside(check_targets(results, args.load), common.DTYPES[args.dtype], device.type)

    args.out.mkdir(parents=True, exist_ok=True)
    memory_method = results[0].memory_method if results else "not measured"
    config = {
        "grid": args.grid,
        "modes": args.modes,
        "providers": providers,
        "reps": args.reps,
        "min_time_s": timed_s,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "tf32": bool(device.type == "cuda" and args.tf32),
        "baseline": BASELINE,
        "memory": memory_method,
        "conv": "stride 1, padding kernel//2, bias, in = out channels",
    }
    common.write_json(
        args.out / "conv.json",
        {
            "family": "conv",
            "env": env,
            "config": config,
            "results": [r.to_json() for r in results],
            "targets": checks,
        },
    )
    md = markdown(results, env, checks)
    (args.out / "conv.md").write_text(md)
    plot(args.out / "conv.png", results, env)
    print(md)
    print(f"wrote {args.out / 'conv.md'}, conv.json, conv.png", file=sys.stderr)
    return 0

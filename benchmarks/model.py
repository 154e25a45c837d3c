"""``aqcf-bench model``: one A-QCF-Net training step (forward + backward), four builds, time and peak memory.

Providers, all the same network (``aqcf_kernels.models.AQCFNet``, joint mode, CT and MRI both given,
training mode, A-QCF alphas set nonzero so the fusion path counts):

* ``baseline``: what a user assembles from today's libraries: ``expanded``'s convs and the
  quaternion norms composite, as speechbrain writes them, each followed by its activation as a
  separate pass (:func:`benchmarks.baselines.use_composite_norms`); same weights as ``ours``;
* ``expanded``: every quaternion conv and transposed conv (the A-QCF projections included) runs
  ``reference.quaternion_conv_expanded`` on its own weight (Parcollet's 16-block real weight and one
  real conv: what every other quaternion library does); same weights as ``ours`` — the ratio column's
  reference, built by :func:`benchmarks.baselines.use_expanded_convs`; norms as ``ours``;
* ``ours``: the model on this package's layers (``aqcf.qconv``, ``algorithm='auto'``, the fused
  quaternion norm + activation ``aqcf.qnorm``);
* ``real``: the real-valued twin, same topology and real channel counts with ``torch.nn`` layers
  (4x the parameters, the same conv FLOPs as ``expanded``).

The A-QCF attention and pooling are shared by all quaternion builds; ``ours`` / ``baseline`` is what the
package buys a user. Modes: ``fwdbwd`` (a training step: train mode, forward and backward) and ``fwd``
(inference: eval mode, no grad). For every build and mode, one extra profiled step splits the time
into convs, norms + activations, attention (the A-QCF blocks, their projections included) and rest
(:mod:`benchmarks.breakdown`). Cases: the issue's
2D 128² (4 levels, batch 4) and 3D 64³ (batch 1; features (16, 32, 64, 128), bottleneck 256 so a
3D step stays within seconds on a 2-core CPU). Timing starts once ``ours`` has settled its ``auto``
choices (:func:`common.settle_choices`); each time target also reports the most ``ours`` could gain
(:meth:`Result.time_bound`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from aqcf_kernels import nn as qnn
from aqcf_kernels.models import AQCFNet
from aqcf_kernels.nn.conv import _QuaternionConvNd
from aqcf_kernels.nn.norm import _QuaternionNorm

from . import breakdown, common
from .baselines import use_composite_norms, use_expanded_convs

MODES = ("fwd", "fwdbwd")
PROVIDERS = ("baseline", "expanded", "ours", "real")
BASELINE = "expanded"


@dataclass(frozen=True)
class Case:
    spatial_dims: int
    size: int
    batch: int
    features: tuple[int, ...] = (32, 64, 128, 256)
    bottleneck: int = 512

    @property
    def name(self) -> str:
        shape = "x".join([str(self.size)] * self.spatial_dims)
        return f"{self.spatial_dims}d {shape} B{self.batch} f{self.features[0]}-{self.features[-1]}/{self.bottleneck}"


F3D = {"features": (16, 32, 64, 128), "bottleneck": 256}
GRIDS: dict[str, Callable[[], list[Case]]] = {
    "quick": lambda: [Case(2, 64, 2), Case(3, 32, 2, **F3D)],
    "targets": lambda: [Case(2, 128, 4), Case(3, 64, 1, **F3D)],
    "full": lambda: [Case(2, 64, 2), Case(2, 128, 4), Case(3, 32, 2, **F3D), Case(3, 64, 1, **F3D)],
    # a step small enough to be bound by the host's time per op (Python, dispatch, launches), as a GPU
    # step of a small network is: what the op layer costs the training loop
    "host": lambda: [Case(2, 32, 1, features=(8, 16, 16, 32), bottleneck=32)],
}
TARGET_CASES = (Case(2, 128, 4), Case(3, 64, 1, **F3D))


def make_model(name: str, case: Case, dtype: torch.dtype, device: torch.device) -> AQCFNet:
    """The network of ``case`` for one provider; ``ours`` and ``expanded`` share their weights (same seed)."""
    torch.manual_seed(0)
    model = AQCFNet(
        case.spatial_dims,
        features=case.features,
        bottleneck=case.bottleneck,
        real_valued=name == "real",
        device=device,
        dtype=dtype,
    )
    if name in ("expanded", "baseline"):
        use_expanded_convs(model)
    if name == "baseline":
        use_composite_norms(model)
    with torch.no_grad():  # a trained model: the attention path contributes
        for m in model.modules():
            if isinstance(m, qnn.AQCFBlock):
                m.alpha_a.fill_(0.5)
                m.alpha_b.fill_(-0.5)
    return model


@dataclass
class Inputs:
    ct: Tensor
    mri: Tensor
    g_ct: Tensor
    g_mri: Tensor


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device) -> Inputs:
    gen = torch.Generator().manual_seed(case.size)
    shape = (case.batch, 1, *([case.size] * case.spatial_dims))
    grad_shape = (case.batch, 3, *shape[2:])

    def rand(s: tuple[int, ...]) -> Tensor:
        return torch.randn(s, generator=gen).to(device=device, dtype=dtype)

    return Inputs(rand(shape), rand(shape), rand(grad_shape), rand(grad_shape))


def _folded_unit(module: torch.nn.Module) -> bool:
    """A conv + norm unit running as one conv (eval mode: the norm folded in; its activation runs in place)."""
    return isinstance(module, qnn.QuaternionConvNormAct) and module.folds


#: The module families of the time breakdown (outermost wins: an A-QCF block's projections are attention).
FAMILIES: dict[str, tuple[breakdown.Member, ...]] = {
    "attention": (qnn.AQCFBlock,),
    "convs": (_QuaternionConvNd, torch.nn.modules.conv._ConvNd, _folded_unit),
    "norms+acts": (
        _QuaternionNorm,
        torch.nn.modules.batchnorm._NormBase,
        torch.nn.ReLU,
        torch.nn.LeakyReLU,
        torch.nn.GELU,
    ),
}


def make_step(mode: str, model: AQCFNet, inputs: Inputs) -> common.Step:
    params = list(model.parameters())
    if mode == "fwd":  # inference: eval mode (running statistics), no autograd

        def step() -> None:
            model.eval()
            with torch.no_grad():
                model(ct=inputs.ct, mri=inputs.mri)

        return step

    def step() -> None:
        model.train()
        for p in params:
            p.grad = None
        out = model(ct=inputs.ct, mri=inputs.mri)
        torch.autograd.backward([out["ct"], out["mri"]], [inputs.g_ct, inputs.g_mri])

    return step


@dataclass
class Result(common.ProviderRatios):
    baseline = BASELINE
    case: Case
    mode: str
    timings: dict[str, common.Timing | None]
    errors: dict[str, float | None]
    params: dict[str, int]
    peaks: dict[str, int | None] = field(default_factory=dict)
    components: dict[str, dict[str, float]] = field(default_factory=dict)  # provider -> family -> seconds
    conv_gflop: float | None = None  # the step's conv work, as torch's FLOP counter counts the baseline's
    peak_gflops: float | None = None  # this device's dense peak (common.dense_peak_gflops), same run

    def time_bound(self, over: str) -> float | None:
        """The most ``ours`` could be faster than ``over`` in this step (``t_over / t_ours`` at best).

        Ours' convs are credited with half of ``over``'s conv time (the 8-multiplication product does
        half the expanded conv's multiplications; the other convs, real stems and heads, cannot halve
        at all) or with half the step's conv FLOPs at the dense peak, whichever is less, and every
        other family (attention, norms + activations, rest) with the least any build spent on it.
        The first is the tighter when ``over``'s convs already run near the peak (see
        :data:`TARGETS`); the second keeps the bound honest where they do not.
        """
        comps, t = self.components, self.timings.get(over)
        if over not in comps or t is None:
            return None
        convs = CONV_WORK_FACTOR * comps[over]["convs"]
        if self.conv_gflop and self.peak_gflops:
            convs = min(convs, CONV_WORK_FACTOR * self.conv_gflop / self.peak_gflops)
        rest = sum(min(c[f] for c in comps.values()) for f in comps[over] if f != "convs")
        return t.median / (convs + rest)

    def to_json(self) -> dict[str, Any]:
        return {
            "case": asdict(self.case),
            "mode": self.mode,
            "providers": {
                name: {
                    "median_s": t.median if t else None,
                    "iqr_s": t.iqr if t else None,
                    "samples_s": t.samples if t else None,
                    "speedup_vs_expanded": self.speedup(name),
                    "peak_bytes": self.peaks.get(name),
                    "peak_ratio_vs_expanded": self.peak_ratio(name),
                    "parameters": self.params.get(name),
                    "forward_rel_error_vs_expanded": self.errors.get(name),
                    "components_s": self.components.get(name),
                    "speedup_bound_of_ours": self.time_bound(name) if name != "ours" else None,
                }
                for name, t in self.timings.items()
            },
            "conv_gflop": self.conv_gflop,
            "peak_gflops": self.peak_gflops,
        }


def _forward_errors(models: dict[str, AQCFNet], inputs: Inputs) -> dict[str, float | None]:
    """Relative error of each build's logits against ``expanded`` (same weights; ``real`` has its own: None).

    Evaluated in eval mode (running statistics, still at their init), so the check moves no buffers."""
    if BASELINE not in models:
        return dict.fromkeys(models)
    outs = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            out = model(ct=inputs.ct, mri=inputs.mri)
            model.train()
            outs[name] = torch.cat([out["ct"].flatten(), out["mri"].flatten()])
    ref = outs[BASELINE]
    return {name: None if name == "real" else ((o - ref).norm() / ref.norm()).item() for name, o in outs.items()}


def run(cases, modes, providers, reps, warmup, dtype, device, memory=True) -> list[Result]:
    results: list[Result] = []
    n, i, started = len(cases) * len(modes), 0, time.perf_counter()
    for case in cases:
        models = {name: make_model(name, case, dtype, device) for name in providers}
        inputs = make_inputs(case, dtype, device)
        errors = _forward_errors(models, inputs)
        params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
        for mode in modes:
            i += 1
            common.progress(i, n, f"time {case.name} {mode}", started)
            steps = {name: make_step(mode, m, inputs) for name, m in models.items()}
            common.settle_choices(steps)
            times = common.time_interleaved(steps, reps, warmup, device)
            timings = {p: common.Timing.of(times[p]) for p in providers}
            components = {
                p: breakdown.component_times(models[p], steps[p], FAMILIES, timings[p].median, device.type)
                for p in providers
                if timings[p] is not None
            }
            gflop = conv_gflop(steps[BASELINE])
            results.append(Result(case, mode, timings, errors, params, components=components, conv_gflop=gflop))
        del models
    peak = common.dense_peak_gflops(dtype, device)["peak"]
    for r in results:
        r.peak_gflops = peak
    if memory:
        payload = common.memory_payload(cases, modes, providers, dtype, device)
        common.progress(n, n, "peak memory (fresh worker process)", started)
        measured = common.measure_memory_in_subprocess(__name__, payload)
        if measured is not None:
            for r, peaks in zip(results, measured["peaks"], strict=True):
                r.peaks.update(peaks)
    return results


def conv_gflop(step: common.Step) -> float | None:
    """GFLOP of the convolutions (forward and, if the step has one, backward) of one call of ``step``,
    as torch's FLOP counter counts them (None if it counts none)."""
    with FlopCounterMode(display=False) as counter:
        step()
    flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    return flops / 1e9 or None


def _case_from_json(c: dict[str, Any]) -> Case:
    return Case(**{**c, "features": tuple(c["features"])})


def measure_memory(payload: dict[str, Any], pinned: bool) -> dict[str, Any]:
    """The memory pass of :func:`run`, in a fresh worker process (``benchmarks._memory_worker``)."""
    cases = [_case_from_json(c) for c in payload["cases"]]
    return common.measure_builds_memory(payload, pinned, cases, make_inputs, make_model, make_step)


# ---------------------------------------------------------------------------------------------
# Targets (issue 14). CPU, fp32: training step ours >= 1.6x baseline and >= 1.3x the real twin,
# inference forward >= 1.8x baseline, training peak memory <= 0.8x baseline. GPU, bf16
# (benchmarks/gpu_suite.sh): training step ours >= 1.3x baseline.
# ---------------------------------------------------------------------------------------------

#: (mode, label, metric, ok, the build a time ratio is over: its bound is reported)
Target = tuple[str, str, Callable[["Result"], float | None], Callable[[float], bool], str | None]
#: the issue's targets per device type: the dtype they are stated in, and the targets
TARGETS: dict[str, tuple[torch.dtype, tuple[Target, ...]]] = {
    "cpu": (torch.float32, (
        ("fwdbwd", "training step ours >= 1.6x baseline", lambda r: r.speedup("ours", "baseline"),
         lambda v: v >= 1.6, "baseline"),
        ("fwdbwd", "training step ours >= 1.3x real", lambda r: r.speedup("ours", "real"), lambda v: v >= 1.3,
         "real"),
        ("fwd", "inference ours >= 1.8x baseline", lambda r: r.speedup("ours", "baseline"), lambda v: v >= 1.8,
         "baseline"),
        ("fwdbwd", "training peak memory ours <= 0.8x baseline", lambda r: r.peak_ratio("ours", "baseline"),
         lambda v: v <= 0.8, None),
    )),
    "cuda": (torch.bfloat16, (
        ("fwdbwd", "training step ours >= 1.3x baseline", lambda r: r.speedup("ours", "baseline"),
         lambda v: v >= 1.3, "baseline"),
    )),
}  # fmt: skip
#: ours' conv work relative to the expanded conv's, at best (fast8: 8 of the 16 block products)
CONV_WORK_FACTOR = 0.5


def check_targets(
    results: Sequence[Result], device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[dict[str, Any]]:
    """PASS/FAIL per target of ``device`` (its type); a time target also reports :meth:`Result.time_bound`
    ("bound"), and says "unreachable" when even that bound misses it. A run in another dtype than the
    targets' is SKIP, saying so (its ratios are in the tables)."""
    if device not in TARGETS:
        return []
    stated, targets = TARGETS[device]
    checks = []
    for case in TARGET_CASES:
        for mode, label, metric, ok, over in targets:
            name = f"{case.name}: {label}"
            hit = [r for r in results if r.case == case and r.mode == mode]
            check = common.target_verdict(name, metric(hit[0]) if hit else None, ok)
            bound = hit[0].time_bound(over) if hit and over else None
            if bound is not None:
                check["bound"] = bound
                check["detail"] += f" (bound {bound:.2f}{'' if ok(bound) else ': unreachable'})"
            checks.append(check)
    return common.skipped_outside(checks, dtype, device, stated, device)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _ms(r: Result, name: str) -> str:
    return common.time_cell(r.timings.get(name), r.speedup(name), name == BASELINE, digits=0)


def _mib(r: Result, name: str) -> str:
    return common.memory_cell(r.peaks.get(name), r.peak_ratio(name), name == BASELINE, digits=0)


def markdown(results: Sequence[Result], env: dict[str, Any], checks) -> str:
    providers = list(results[0].timings) if results else []
    head = ["case", "mode", *providers]
    params = [
        [r.case.name, *(f"{r.params[p] / 1e6:.2f}M" for p in providers)] for r in results if r.mode == results[0].mode
    ]
    parts = [
        "# A-QCF-Net training step benchmark",
        "",
        common.environment_line(env),
        "",
        f"`{env['command']}`",
        "",
        "Joint mode (CT + MRI), training mode, loss gradient w.r.t. both logits; `expanded` = the same",
        "network and weights with expanded-weight reference convs, `real` = the real-valued twin.",
        "",
        "## Time: median ms (speedup vs expanded: the median over reps of t_expanded / t, > 1 is faster)",
        "",
        common.markdown_table(head, [[r.case.name, r.mode, *(_ms(r, p) for p in providers)] for r in results], 2),
        "",
        "## Peak memory: MiB above what was live before one step (ratio to expanded)",
        "",
        common.markdown_table(head, [[r.case.name, r.mode, *(_mib(r, p) for p in providers)] for r in results], 2),
        "",
        "## Where the time goes: ms per module family (share of the step), from one profiled step",
        "",
        *(
            [
                "On the GPU a family's time is the device time of the kernels its ops launched; `rest` is the rest of",
                "the step's wall time (kernels outside any family, and the device waiting on the host).",
                "",
            ]
            if str(env.get("device", "")).startswith("cuda")
            else []
        ),
        *_breakdown_tables(results, providers),
        "## Parameters",
        "",
        common.markdown_table(["case", *providers], params, 1),
        *common.targets_lines(checks),
    ]
    return "\n".join(parts) + "\n"


def _breakdown_tables(results: Sequence[Result], providers: Sequence[str]) -> list[str]:
    lines = []
    for r in results:
        rows = []
        for family in (*FAMILIES, breakdown.REST):
            cells = []
            for p in providers:
                c, t = r.components.get(p), r.timings.get(p)
                cells.append("n/a" if not c or t is None else f"{c[family] * 1e3:.0f} ({c[family] / t.median:.0%})")
            rows.append([family, *cells])
        lines += [f"{r.case.name}, {r.mode}:", "", common.markdown_table(["family", *providers], rows, 1), ""]
        lines += _throughput_lines(r)
    return lines


def _throughput_lines(r: Result) -> list[str]:
    """How close the baseline's convs run to the dense peak, and the speedup bounds (Result.time_bound)."""
    comps = r.components.get("baseline")
    if not (r.conv_gflop and r.peak_gflops and comps):
        return []
    bounds = [f"{over} {b:.2f}x" for over in ("baseline", "real") if (b := r.time_bound(over)) is not None]
    return [
        f"Convs: {r.conv_gflop:.1f} GFLOP per step; the baseline's ran at {r.conv_gflop / comps['convs']:.0f} "
        f"GFLOP/s, against a dense peak (matmul or 1×1 conv) of {r.peak_gflops:.0f} GFLOP/s. Most ours could gain "
        f"(convs at half the work, every other family at the fastest build's time): over {', '.join(bounds)}.",
        "",
    ]


def plot(path: Path, results: Sequence[Result], env: dict[str, Any]) -> None:
    common.plot_ratios(path, results, BASELINE, "aqcf-bench model — " + common.environment_line(env))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    grids = (
        "quick (2D 64² B2, 3D 32³ B2; ~1-2 min), targets (2D 128² B4, 3D 64³ B1), full (both), "
        "host (2D 32² B1, features 8-32: host-bound)"
    )
    parser.add_argument("--grid", choices=list(GRIDS), default="quick", help=grids)
    parser.add_argument("--modes", type=lambda t: t.split(","), default=["fwdbwd"], help="fwd,fwdbwd (default fwdbwd)")
    parser.add_argument("--providers", type=lambda t: t.split(","), default=list(PROVIDERS),
                        help="baseline,expanded,ours,real (expanded, the ratios' reference, always runs)")  # fmt: skip
    parser.add_argument("--dims", type=lambda t: [int(x) for x in t.split(",")], default=[2, 3],
                        help="spatial dims of the grid's cases to run: 2, 3 or 2,3 (default)")  # fmt: skip
    parser.add_argument("--check-targets", action="store_true",
                        help="PASS/FAIL of the model-step targets (README): CPU fp32, CUDA bf16")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    bad = [m for m in args.modes if m not in MODES] + [p for p in args.providers if p not in PROVIDERS]
    if bad:
        return common.usage_error(args, f"unknown mode/provider {bad}; modes {MODES}, providers {PROVIDERS}")
    cases = [c for c in GRIDS[args.grid]() if c.spatial_dims in args.dims]
    if not cases:
        return common.usage_error(args, f"no case of grid {args.grid!r} has spatial dims {args.dims}")
    common.configure_torch(args.threads)
    device = torch.device(args.device)
    dtype = common.DTYPES[args.dtype]
    providers = [p for p in PROVIDERS if p in args.providers or p == BASELINE]
    env = common.environment(device, args.threads, args.load)
    common.warn_if_busy(env)
    with common.background_load(args.load):
        results = run(cases, args.modes, providers, args.reps, args.warmup, dtype, device, memory=not args.no_memory)
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    checks = check_targets(results, device.type, dtype) if args.check_targets else None
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"modes": args.modes, "providers": providers, "reps": args.reps, "warmup": args.warmup,
              "dtype": args.dtype, "baseline": BASELINE,
              "model": "AQCFNet joint, train mode, norm='batch', down='conv', kv_pool=256, alphas +-0.5"}  # fmt: skip
    common.write_json(args.out / "model.json", {"family": "model", "env": env, "config": config,
                      "results": [r.to_json() for r in results], "targets": checks})  # fmt: skip
    text = markdown(results, env, checks)
    (args.out / "model.md").write_text(text)
    plot(args.out / "model.png", results, env)
    print(text)
    print(f"wrote {args.out}/model.md, .json, .png", file=sys.stderr)  # stdout is the report alone, as conv's
    return 0

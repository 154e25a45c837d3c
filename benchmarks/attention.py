"""``aqcf-bench attention``: the A-QCF block, ours against two composed baselines, time and peak memory.

Providers, all computing the same block with the same parameters (``AQCFBlock``, both directions,
gate and residual included):

* ``naive``: expanded-weight projections (Parcollet's 16-block weight, one real 1×1 conv) and a
  materialised ``softmax(QKᵀ)V`` — what a user writes without a fused attention;
* ``sdpa``: expanded-weight projections and PyTorch's ``scaled_dot_product_attention`` per direction
  (its flash kernel on CPU and CUDA) — the honest baseline;
* ``ours``: ``aqcf_kernels.nn.AQCFBlock`` (``aqcf.cross_attention`` + ``aqcf.gated_residual``), on the
  backend the registry picks (``torch``: PyTorch's own attention kernels through their aten ops);
* ``ours/triton`` (CUDA only, by default): the same block with the Triton attention kernels forced,
  the measurement that decides whether they may come first on CUDA.

Cases sweep the token count (N_a = N_b) from 256 to 16384 at 64 quaternion channels and 4 heads.
``naive`` is skipped where its N×N matrices would not fit (``--naive-max-gib``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aqcf_kernels import backends, reference
from aqcf_kernels.layout import merge_heads, qcat, qsplit, split_heads
from aqcf_kernels.nn import AQCFBlock

from . import common

MODES = ("fwd", "fwdbwd")
PROVIDERS = ("naive", "sdpa", "ours", "ours/triton")
CPU_PROVIDERS = ("naive", "sdpa", "ours")
BASELINE = "naive"
#: the backend a provider forces for its whole step (forward and backward); others take the registry's
FORCED_BACKEND = {"ours/triton": "triton"}


@dataclass(frozen=True)
class Case:
    tokens: int
    channels_q: int = 64
    heads: int = 4
    batch: int = 1

    @property
    def name(self) -> str:
        return f"N{self.tokens} {self.channels_q}q h{self.heads} B{self.batch}"

    def naive_gib(self, dtype: torch.dtype) -> float:
        """Rough peak of the materialised baseline: scores, probabilities and their gradients, both ways."""
        matrix = self.batch * self.heads * self.tokens**2 * torch.finfo(dtype).bits / 8
        return 2 * 4 * matrix / 2**30


GRIDS: dict[str, Callable[[], list[Case]]] = {
    "quick": lambda: [Case(n) for n in (256, 1024)],
    "targets": lambda: [Case(4096)],
    "full": lambda: [Case(n) for n in (256, 1024, 2048, 4096, 8192, 16384)],
}
TARGET_CASE = Case(4096)


def make_block(case: Case, dtype: torch.dtype, device: torch.device) -> AQCFBlock:
    block = AQCFBlock(4 * case.channels_q, heads=case.heads, device=device, dtype=dtype)
    with torch.no_grad():  # a trained block: the attention path contributes
        block.alpha_a.fill_(0.5)
        block.alpha_b.fill_(-0.5)
    return block


def _expanded(conv: torch.nn.Module, x: Tensor) -> Tensor:
    return reference.quaternion_conv_expanded(x, conv.weight, conv.bias)


def _materialised(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return reference.attention(q, k, v, q.shape[-1] ** -0.5)[0]


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def composed_block(block: AQCFBlock, attend: Callable[[Tensor, Tensor, Tensor], Tensor]):
    """The block's math from expanded-weight projections and ``attend`` (token gate, no pooling)."""
    cq = block.channels // 4

    def forward(f_a: Tensor, f_b: Tensor) -> tuple[Tensor, Tensor]:
        t_a, t_b = f_a.flatten(2), f_b.flatten(2)
        q_a, k_a, v_a = qsplit(_expanded(block.qkv_a, t_a), cq)
        q_b, k_b, v_b = qsplit(_expanded(block.qkv_b, t_b), cq)
        z_a = merge_heads(attend(*(split_heads(t, block.heads) for t in (q_a, k_b, v_b))))
        z_b = merge_heads(attend(*(split_heads(t, block.heads) for t in (q_b, k_a, v_a))))
        o_a, o_b = _expanded(block.out_a, z_a), _expanded(block.out_b, z_b)
        g_a, g_b = _expanded(block.gate_a, qcat([t_a, o_a])), _expanded(block.gate_b, qcat([t_b, o_b]))
        out_a = reference.gated_residual(t_a, o_a, g_a, block.alpha_a)
        out_b = reference.gated_residual(t_b, o_b, g_b, block.alpha_b)
        return out_a.view(f_a.shape), out_b.view(f_b.shape)

    return forward


def build(name: str, block: AQCFBlock):
    if name == "naive":
        return composed_block(block, _materialised)
    if name == "sdpa":
        return composed_block(block, _sdpa)
    return block


@dataclass
class Inputs:
    f_a: Tensor
    f_b: Tensor
    g_a: Tensor
    g_b: Tensor


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device) -> Inputs:
    gen = torch.Generator().manual_seed(case.tokens)

    def rand() -> Tensor:
        shape = (case.batch, 4 * case.channels_q, case.tokens)
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    f_a, f_b = rand().requires_grad_(), rand().requires_grad_()
    return Inputs(f_a, f_b, rand(), rand())


def _scope(name: str) -> contextlib.AbstractContextManager:
    forced = FORCED_BACKEND.get(name)
    return contextlib.nullcontext() if forced is None else backends.use(forced)


def make_step(mode: str, fn, block: AQCFBlock, inputs: Inputs, name: str = "ours") -> common.Step:
    params = list(block.parameters())
    if mode == "fwd":

        def step() -> None:
            with _scope(name), torch.no_grad():
                fn(inputs.f_a, inputs.f_b)

        return step

    def step() -> None:
        for t in (*params, inputs.f_a, inputs.f_b):
            t.grad = None
        with _scope(name):  # the backward too: autograd selects its backend when it runs
            out_a, out_b = fn(inputs.f_a, inputs.f_b)
            torch.autograd.backward([out_a, out_b], [inputs.g_a, inputs.g_b])

    return step


@dataclass
class Result(common.ProviderRatios):
    baseline = BASELINE
    case: Case
    mode: str
    timings: dict[str, common.Timing | None]
    errors: dict[str, float]
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
                    "peak_bytes": self.peaks.get(name),
                    "forward_rel_error": self.errors.get(name),
                }
                for name, t in self.timings.items()
            },
        }


def _runnable(case: Case, providers: Sequence[str], dtype: torch.dtype, naive_max_gib: float) -> list[str]:
    return [p for p in providers if p != "naive" or case.naive_gib(dtype) <= naive_max_gib]


def _forward_errors(fns: dict, inputs: Inputs) -> dict[str, float]:
    """Relative error of each provider's forward against the ``sdpa`` composition (double-checks ours)."""
    outs = {}
    for name, fn in fns.items():
        with _scope(name), torch.no_grad():
            outs[name] = torch.cat([o.flatten() for o in fn(inputs.f_a, inputs.f_b)])
    ref = outs.get("sdpa", next(iter(outs.values())))
    return {name: ((o - ref).norm() / ref.norm()).item() for name, o in outs.items()}


def run(cases, modes, providers, reps, warmup, dtype, device, naive_max_gib, memory=True) -> list[Result]:
    results: list[Result] = []
    n, i, started = len(cases) * len(modes), 0, time.perf_counter()
    for case in cases:
        block = make_block(case, dtype, device)
        inputs = make_inputs(case, dtype, device)
        names = _runnable(case, providers, dtype, naive_max_gib)
        fns = {name: build(name, block) for name in names}
        errors = _forward_errors(fns, inputs)
        for mode in modes:
            i += 1
            common.progress(i, n, f"time {case.name} {mode}", started)
            steps = {name: make_step(mode, fn, block, inputs, name) for name, fn in fns.items()}
            times = common.time_interleaved(steps, reps, warmup, device)
            timings = {p: (common.Timing.of(times[p]) if p in times else None) for p in providers}
            results.append(Result(case, mode, timings, errors))
    if memory:
        payload = common.memory_payload(cases, modes, providers, dtype, device, naive_max_gib=naive_max_gib)
        measured = common.measure_memory_in_subprocess(__name__, payload)
        if measured is not None:
            for r, peaks in zip(results, measured["peaks"], strict=True):
                r.peaks.update(peaks)
    return results


def measure_memory(payload: dict[str, Any], pinned: bool) -> dict[str, Any]:
    """The memory pass of :func:`run`, in a fresh worker process (``benchmarks._memory_worker``)."""
    common.configure_torch(payload["threads"])
    device, dtype = torch.device(payload["device"]), common.DTYPES[payload["dtype"]]
    meter = common.PeakMemory(device)
    peaks = []
    for case in (Case(**c) for c in payload["cases"]):
        block = make_block(case, dtype, device)
        inputs = make_inputs(case, dtype, device)
        names = _runnable(case, payload["providers"], dtype, payload["naive_max_gib"])
        for mode in payload["modes"]:
            row: dict[str, int | None] = dict.fromkeys(payload["providers"])
            for name in names:
                step = make_step(mode, build(name, block), block, inputs, name)
                step()  # first call: kernels, caches
                row[name] = meter.measure(step)
                del step
            peaks.append(row)
    return {"peaks": peaks, "method": meter.method(pinned)}


# ---------------------------------------------------------------------------------------------
# Targets (CPU, N = 4096, 64q, 4 heads, fp32, forward+backward)
# ---------------------------------------------------------------------------------------------

TARGETS = (
    ("memory ours <= naive / 10", lambda r: r.peak_ratio("ours"), lambda v: v <= 0.1),
    ("speed ours >= 1.8x naive", lambda r: r.speedup("ours"), lambda v: v >= 1.8),
    ("speed ours >= 0.9x sdpa", lambda r: r.speedup("ours", over="sdpa"), lambda v: v >= 0.9),
)


#: GPU (issue 13): the block at least 0.9x the SDPA-composed block at every token count from 1k to 16k
GPU_TOKENS = (1024, 16384)


def check_gpu_targets(results: Sequence[Result]) -> list[dict[str, Any]]:
    checks = []
    for name in ("ours", "ours/triton"):
        rows = [r for r in results if r.mode == "fwdbwd" and GPU_TOKENS[0] <= r.case.tokens <= GPU_TOKENS[1]]
        ratios = [(r.speedup(name, over="sdpa"), r.case.name) for r in rows]
        measured = [(v, c) for v, c in ratios if v is not None]
        worst = min(measured) if measured else None
        label = f"speed {name} >= 0.9x sdpa, fwdbwd, every case of {GPU_TOKENS[0]}-{GPU_TOKENS[1]} tokens"
        verdict = common.target_verdict(label, worst[0] if worst else None, lambda v: v >= 0.9)
        if worst:
            verdict["detail"] += f" (worst: {worst[1]})"
        checks.append(verdict)
    return checks


def check_targets(
    results: Sequence[Result], device_type: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[dict[str, Any]]:
    if device_type == "cuda":
        return check_gpu_targets(results)
    hit = [r for r in results if r.case == TARGET_CASE and r.mode == "fwdbwd"]
    checks = [common.target_verdict(label, metric(hit[0]) if hit else None, ok) for label, metric, ok in TARGETS]
    return common.skipped_outside(checks, dtype, device_type)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _ms(r: Result, name: str) -> str:
    return common.time_cell(r.timings.get(name), r.speedup(name), name == BASELINE, digits=1)


def _mib(r: Result, name: str) -> str:
    return common.memory_cell(r.peaks.get(name), r.peak_ratio(name), name == BASELINE, digits=1)


def markdown(results: Sequence[Result], env: dict[str, Any], checks) -> str:
    providers = list(results[0].timings) if results else []
    head = ["case", "mode", *providers, "ours vs sdpa"]

    def vs_sdpa(r: Result) -> str:
        s = r.speedup("ours", over="sdpa")
        return "-" if s is None else f"{s:.2f}x"

    parts = [
        "# A-QCF block benchmark",
        "",
        common.environment_line(env),
        "",
        f"`{env['command']}`",
        "",
        "## Time: median ms (speedup vs naive: the median over reps of t_naive / t, > 1 is faster)",
        "",
        common.markdown_table(
            head, [[r.case.name, r.mode, *(_ms(r, p) for p in providers), vs_sdpa(r)] for r in results], 2
        ),
        "",
        "## Peak memory: MiB above what was live before one step (ratio to naive)",
        "",
        common.markdown_table(head[:-1], [[r.case.name, r.mode, *(_mib(r, p) for p in providers)] for r in results], 2),
        *common.targets_lines(checks),
    ]
    return "\n".join(parts) + "\n"


def plot(path: Path, results: Sequence[Result], env: dict[str, Any]) -> None:
    """Time and peak memory against token count, log-log, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.mode for r in results))
    providers = list(results[0].timings) if results else []
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5 * (len(modes) + 1), 4), squeeze=False)
    mem_mode = "fwdbwd" if "fwdbwd" in modes else modes[-1]
    for ax, mode in zip(axes[0], [*modes, None], strict=True):
        for p in providers:
            rows = [r for r in results if r.mode == (mode or mem_mode)]
            if mode is None:
                pts = [(r.case.tokens, r.peaks[p] / common.MiB) for r in rows if r.peaks.get(p)]
            else:
                pts = [(r.case.tokens, r.timings[p].median * 1e3) for r in rows if r.timings.get(p)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per stream (N_a = N_b)")
        ax.set_ylabel("ms" if mode else "peak MiB")
        ax.set_title(f"{mode}: time" if mode else f"{mem_mode}: peak memory")
        ax.grid(alpha=0.3, which="both")
        # (the memory panel of a --no-memory run is empty)
        common.legend_or_note(ax, "not measured in this run", fontsize=8)
    title = common.wrap_title("aqcf-bench attention — " + common.environment_line(env), fig.get_figwidth(), 8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", choices=list(GRIDS), default="quick", help="quick (~1 min), targets, full")
    parser.add_argument("--tokens", type=common.positive_ints, default=None,
                        help="comma-separated token counts instead of the grid's")  # fmt: skip
    parser.add_argument("--channels", type=common.positive_int, default=64,
                        help="quaternion channels, a multiple of --heads (default 64)")  # fmt: skip
    parser.add_argument("--heads", type=common.positive_int, default=4, help="default 4")
    parser.add_argument("--batch", type=common.positive_int, default=1, help="default 1")
    parser.add_argument("--modes", type=lambda t: t.split(","), default=list(MODES), help="fwd,fwdbwd")
    parser.add_argument("--providers", type=lambda t: t.split(","), default=None,
                        help=f"comma-separated, of {','.join(PROVIDERS)}; default {','.join(CPU_PROVIDERS)} on CPU, "
                        "all on CUDA")  # fmt: skip
    parser.add_argument(
        "--naive-max-gib", type=common.non_negative_float, default=6.0, help="skip naive above this estimated peak"
    )
    parser.add_argument(
        "--check-targets",
        action="store_true",
        help="PASS/FAIL of the speed targets (README, Benchmarks; CPU: N=4096 fp32; CUDA: 1k-16k tokens vs sdpa)",
    )


def main(args: argparse.Namespace) -> int:
    if args.providers is None:
        args.providers = list(PROVIDERS if torch.device(args.device).type == "cuda" else CPU_PROVIDERS)
    bad = [m for m in args.modes if m not in MODES] + [p for p in args.providers if p not in PROVIDERS]
    if bad:
        return common.usage_error(args, f"unknown mode/provider {bad}; modes {MODES}, providers {PROVIDERS}")
    if args.channels % args.heads:  # AQCFBlock's rule, said before any work instead of as its traceback
        message = f"--channels {args.channels} is not a multiple of --heads {args.heads}: each head owns whole"
        return common.usage_error(args, message + " quaternion channels")
    tokens = args.tokens or [c.tokens for c in GRIDS[args.grid]()]
    cases = [Case(n, args.channels, args.heads, args.batch) for n in tokens]
    common.configure_torch(args.threads)
    device = torch.device(args.device)
    dtype = common.DTYPES[args.dtype]
    providers = [p for p in PROVIDERS if p in args.providers or p == BASELINE]
    for name in providers:
        forced = FORCED_BACKEND.get(name)
        why = None if forced is None else common.forced_backend_refusal("attention", forced, device)
        if why is not None:
            return common.usage_error(args, f"--providers {name}: the {forced} backend cannot run here: {why}")
    env = common.environment(device, args.threads, args.load)
    common.warn_if_busy(env)
    with common.background_load(args.load):
        results = run(cases, args.modes, providers, args.reps, args.warmup, dtype, device, args.naive_max_gib,
                      memory=not args.no_memory)  # fmt: skip
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    checks = check_targets(results, device.type, dtype) if args.check_targets else None
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"modes": args.modes, "providers": providers, "reps": args.reps, "warmup": args.warmup,
              "dtype": args.dtype, "baseline": BASELINE, "block": "AQCFBlock, gate='token', no kv_pool"}  # fmt: skip
    common.write_json(args.out / "attention.json", {"family": "attention", "env": env, "config": config,
                      "results": [r.to_json() for r in results], "targets": checks})  # fmt: skip
    text = markdown(results, env, checks)
    (args.out / "attention.md").write_text(text)
    plot(args.out / "attention.png", results, env)
    print(text)
    print(f"wrote {args.out}/attention.md, .json, .png", file=sys.stderr)  # stdout is the report alone, as conv's
    return 0

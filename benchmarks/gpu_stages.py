"""The GPU suite's timings that are no ``aqcf-bench`` family (``benchmarks/gpu_suite.sh``'s norm and rnn
stages): a fused Triton path against the composite or two-pass one it replaces, same process, interleaved
reps (:func:`common.time_interleaved`, CUDA events on a GPU), a Markdown table and JSON per table.

    python -m benchmarks.gpu_stages norm   OUTDIR   # QuaternionBatch/InstanceNorm + GELU fwd+bwd: fused vs composite
    python -m benchmarks.gpu_stages passes OUTDIR   # a conv's backward: one pass (activation_grad_bias,
                                                    # qconv_weight_bias_grad) vs two
    python -m benchmarks.gpu_stages rnn    OUTDIR   # QLSTM / QLiGRU: the fused recurrence vs the per-step loop
    python -m benchmarks.gpu_stages host   OUTDIR   # a small conv's time per call, back to back: what the op
                                                    # layer costs over one aten conv (host-bound; real on CPU too);
                                                    # and a small A-QCF block's against the SDPA-composed block
    python -m benchmarks.gpu_stages profile OUTDIR  # one profiled fwd+bwd step of the GPU target cases per
                                                    # provider: host time, device busy time, top kernels

``--device cpu --small``: a dry run at tiny sizes (CI runs it through gpu_suite.sh,
tests/benchmarks/test_gpu_suite.py); on CPU both sides of a row often run the same code, so its times mean
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import breakdown, common


def _medians_ms(device: str, reps: int, warmup: int, **steps: Callable[[], object]) -> list[float]:
    """Median ms of each step over ``reps`` interleaved reps after ``warmup`` rounds."""
    times = common.time_interleaved(steps, reps=reps, warmup=warmup, device=device)
    return [statistics.median(times[name]) * 1e3 for name in steps]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _environment(device: str) -> dict[str, Any]:
    return common.environment(torch.device(device), threads=torch.get_num_threads())


def _write(
    out: Path, name: str, env: Mapping[str, Any], rows: list[dict], headers: list[str], cells, align_left: int = 3
) -> None:
    common.write_json(out / f"{name}.json", dict(env, rows=rows))
    table = common.markdown_table(headers, [cells(r) for r in rows], align_left=align_left)
    (out / f"{name}.md").write_text(f"{common.environment_line(env)}\n\n`{env['command']}`\n\n{table}\n")
    print(f"{name}:", *rows, sep="\n", flush=True)


def norm_stage(out: Path, device: str, small: bool) -> None:
    """Fused quaternion norm + GELU (the Triton kernels on CUDA) against the composite path, forward and
    backward, batch and instance norm, 2d and 3d, fp32 and bf16."""
    from aqcf_kernels import nn as qnn

    shapes = (
        {"2d": (2, 16, 8, 8), "3d": (1, 16, 4, 4, 4)} if small else {"2d": (8, 256, 64, 64), "3d": (2, 128, 32, 32, 32)}
    )
    classes = {
        "2d": (qnn.QuaternionBatchNorm2d, qnn.QuaternionInstanceNorm2d),
        "3d": (qnn.QuaternionBatchNorm3d, qnn.QuaternionInstanceNorm3d),
    }
    rows = []
    for dims, shape in shapes.items():
        for kind, cls in zip(("batch", "instance"), classes[dims], strict=True):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
                gy = torch.randn_like(x)
                steps, results = {}, {}
                for provider in ("fused", "composite"):
                    m = cls(shape[1], activation="gelu", affine=True).to(device=device, dtype=dtype)
                    m.fused = provider == "fused"
                    x.grad = None
                    y = m(x)
                    y.backward(gy)
                    results[provider] = (y.detach(), x.grad.clone())

                    def step(m=m, x=x, gy=gy):
                        m(x).backward(gy)

                    steps[provider] = step
                fused_ms, composite_ms = _medians_ms(device, 20, 5, **steps)
                (yf, gf), (yc, gc) = results["fused"], results["composite"]
                rows.append(
                    dict(dims=dims, norm=kind, dtype=str(dtype).split(".")[1], shape=list(shape), fused_ms=fused_ms,
                         composite_ms=composite_ms, speedup=composite_ms / fused_ms, rel_err_y=_rel(yf, yc),
                         rel_err_dx=_rel(gf, gc))
                )  # fmt: skip
    _write(
        out, "norm", _environment(device), rows,
        ["dims", "norm", "dtype", "shape", "fused ms", "composite ms", "speedup", "rel err y", "rel err dx"],
        lambda r: [r["dims"], r["norm"], r["dtype"], tuple(r["shape"]), f"{r['fused_ms']:.3f}",
                   f"{r['composite_ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['rel_err_y']:.1e}",
                   f"{r['rel_err_dx']:.1e}"],
    )  # fmt: skip


def passes_stage(out: Path, device: str, small: bool) -> None:
    """Where a conv's backward gets its bias gradient without a read of its own, bf16, N32 64x64:

    * ``activation_pass``: dL/dz and the bias gradient of conv + bias + activation (the 2d 64q target
      layer's output) from one Triton pass, against aten's activation backward then a sum;
    * ``wgrad_bias``: the weight and bias gradients of the 2d 16q and 64q 3x3 layers (channels_last,
      hamilton) from one launch of the Triton split-K weight-gradient GEMM, against the same GEMM then a sum.
    """
    from aqcf_kernels.ops import conv as conv_ops  # (registers torch.ops.aqcf)

    batch, size = (1, 8) if small else (32, 64)
    env = _environment(device)
    rows = []
    for activation in ("relu", "gelu"):
        for layout in ("channels_last", "nchw"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            z = torch.randn(batch, 256, size, size, device=device, dtype=torch.bfloat16).contiguous(memory_format=fmt)
            y = torch.relu(z) if activation == "relu" else F.gelu(z)
            pre = z if activation == "gelu" else z.new_empty(0)
            gy = torch.randn_like(y)

            def one_pass(gy=gy, y=y, pre=pre, activation=activation):
                return torch.ops.aqcf.activation_grad_bias(gy, y, pre, activation, 0.01)

            def two_passes(gy=gy, y=y, pre=pre, activation=activation):
                gz = conv_ops.activation_grad(gy, y, pre, activation, 0.01)
                return gz, gz.sum(dim=(0, 2, 3))

            (gz1, gb1), (gz2, gb2) = one_pass(), two_passes()
            ref = conv_ops.activation_grad(gy.float(), y.float(), pre.float(), activation, 0.01).sum(dim=(0, 2, 3))
            one_ms, two_ms = _medians_ms(device, 30, 5, one_pass=one_pass, two_passes=two_passes)
            rows.append(
                dict(activation=activation, layout=layout, shape=list(z.shape), one_pass_ms=one_ms,
                     two_passes_ms=two_ms, speedup=two_ms / one_ms, gz_equal=bool(torch.equal(gz1, gz2)),
                     rel_err_bias_one=_rel(gb1, ref), rel_err_bias_two=_rel(gb2, ref))
            )  # fmt: skip
    _write(
        out, "activation_pass", env, rows,
        ["activation", "layout", "shape (bf16)", "one pass ms", "two passes ms", "speedup", "dL/dz equal",
         "bias rel err (one / two)"],
        lambda r: [r["activation"], r["layout"], tuple(r["shape"]), f"{r['one_pass_ms']:.3f}",
                   f"{r['two_passes_ms']:.3f}", f"{r['speedup']:.2f}x", r["gz_equal"],
                   f"{r['rel_err_bias_one']:.1e} / {r['rel_err_bias_two']:.1e}"],
    )  # fmt: skip

    rows = []
    for cq in (16, 64):
        x, gy = (
            torch.randn(batch, 4 * cq, size, size, device=device, dtype=torch.bfloat16).contiguous(
                memory_format=torch.channels_last
            )
            for _ in range(2)
        )
        args = (x, gy, [4, cq, cq, 3, 3], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, "hamilton")

        def one_launch(args=args):
            return torch.ops.aqcf.qconv_weight_bias_grad(*args)

        def two(args=args, gy=gy):
            return torch.ops.aqcf.qconv_weight_grad(*args), gy.sum(dim=(0, 2, 3))

        (gw1, gb1), (gw2, gb2) = one_launch(), two()
        ref = gy.float().sum(dim=(0, 2, 3))
        one_ms, two_ms = _medians_ms(device, 30, 5, one_launch=one_launch, two=two)
        rows.append(
            dict(quaternions=cq, shape=list(x.shape), one_launch_ms=one_ms, two_ms=two_ms, speedup=two_ms / one_ms,
                 rel_diff_weight=_rel(gw1, gw2), rel_err_bias_one=_rel(gb1, ref), rel_err_bias_two=_rel(gb2, ref))
        )  # fmt: skip
    _write(
        out, "wgrad_bias", env, rows,
        ["quaternions", "shape (bf16)", "one launch ms", "wgrad + sum ms", "speedup", "weight rel diff",
         "bias rel err (one / two)"],
        lambda r: [r["quaternions"], tuple(r["shape"]), f"{r['one_launch_ms']:.3f}", f"{r['two_ms']:.3f}",
                   f"{r['speedup']:.2f}x", f"{r['rel_diff_weight']:.1e}",
                   f"{r['rel_err_bias_one']:.1e} / {r['rel_err_bias_two']:.1e}"],
    )  # fmt: skip


def rnn_stage(out: Path, device: str, small: bool) -> None:
    """QLSTM / QLiGRU layer fwd+bwd, 512 hidden, batch 8, 100 steps: the fused recurrence
    (``aqcf::rnn_sequence``, on CUDA the Triton cell kernels) against the layer's composite per-step loop
    (what runs when no fused kernel serves), fp32 and bf16. The Triton forward launches are counted: proof
    of which path served each row."""
    from aqcf_kernels import nn as qnn
    from aqcf_kernels.backends.triton import rnn_cell as triton_rnn
    from aqcf_kernels.nn import recurrent

    size, steps, batch = (16, 5, 2) if small else (512, 100, 8)
    available = recurrent.rnn_cell_ops.available
    launches = [0]
    real_forward = triton_rnn.forward

    def counting(*args):
        launches[0] += 1
        return real_forward(*args)

    rows = []
    triton_rnn.forward = counting
    try:
        for name, cls in (("lstm", qnn.QuaternionLSTM), ("ligru", qnn.QuaternionLiGRU)):
            for dtype in (torch.float32, torch.bfloat16):
                layer = cls(size, size).to(device=device, dtype=dtype)
                x = torch.randn(steps, batch, size, device=device, dtype=dtype).requires_grad_()
                gy = torch.randn(steps, batch, size, device=device, dtype=dtype)
                results, times, calls = {}, {}, {}
                for provider in ("fused", "composite"):
                    fused = provider == "fused"
                    recurrent.rnn_cell_ops.available = available if fused else (lambda *args: False)
                    launches[0] = 0
                    x.grad = None
                    y = layer(x)[0]
                    y.backward(gy)
                    results[provider] = (y.detach(), x.grad.clone())

                    def step(layer=layer, x=x, gy=gy):
                        layer(x)[0].backward(gy)

                    (times[provider],) = _medians_ms(device, 10, 3, step=step)
                    calls[provider] = launches[0]
                recurrent.rnn_cell_ops.available = available
                (yf, gf), (yc, gc) = results["fused"], results["composite"]
                rows.append(
                    dict(layer=name, dtype=str(dtype).split(".")[1], steps=steps, batch=batch, hidden=size,
                         fused_ms=times["fused"], composite_ms=times["composite"],
                         speedup=times["composite"] / times["fused"], rel_err_y=_rel(yf, yc), rel_err_dx=_rel(gf, gc),
                         triton_forward_calls=calls["fused"], composite_triton_calls=calls["composite"])
                )  # fmt: skip
    finally:
        triton_rnn.forward = real_forward
        recurrent.rnn_cell_ops.available = available
    _write(
        out, "rnn", _environment(device), rows,
        ["layer", "dtype", "T x B x H", "fused ms", "composite ms", "speedup", "rel err y", "rel err dx",
         "triton calls"],
        lambda r: [r["layer"], r["dtype"], f"{r['steps']}x{r['batch']}x{r['hidden']}", f"{r['fused_ms']:.2f}",
                   f"{r['composite_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['rel_err_y']:.1e}",
                   f"{r['rel_err_dx']:.1e}", r["triton_forward_calls"]],
    )  # fmt: skip


def _conv_backend_runs_here(name: str) -> bool:
    """Whether conv backend ``name`` is registered and available on this machine."""
    from aqcf_kernels.backends import registered

    backend = registered("conv").get(name)
    return backend is not None and backend.unavailable() is None


def _per_call_us(
    device: str,
    small: bool,
    calls: int,
    fns: Mapping[str, Callable[[], object]],
    scopes: Mapping[str, Callable[[], contextlib.AbstractContextManager]] | None = None,
) -> dict[str, float]:
    """Median µs per call of each of ``fns``, called ``calls`` times back to back in each timed rep, inside
    its ``scopes`` entry if any (entered once per rep: e.g. a forced backend); reps of the functions
    interleaved, fewer with ``small``."""

    def back_to_back(name: str) -> None:
        with (scopes or {}).get(name, contextlib.nullcontext)():
            for _ in range(calls):
                fns[name]()

    steps = {name: (lambda name=name: back_to_back(name)) for name in fns}
    reps, warmup = (5, 2) if small else (15, 3)
    return {name: ms * 1e3 / calls for name, ms in zip(steps, _medians_ms(device, reps, warmup, **steps), strict=True)}


#: host_stage's conv: small enough that the device computes each call in microseconds, so calls issued back
#: to back are bound by the host's time per call (Python, dispatch, launches)
HOST_CASE = {"batch": 2, "channels_q": 4, "size": 8}
HOST_CALLS = 100  # calls per timed rep


def host_stage(out: Path, device: str, small: bool) -> None:
    """A small 2d quaternion conv (3x3, bias) called back to back, forward (no grad) and forward+backward:
    microseconds per call of one aten conv on a ready expanded weight (the floor), the expanded-weight
    baseline (the weight built per call, as the quaternion libraries do), and ours with ``auto`` and each
    backend forced. The device work of a call is a few microseconds, so these are host times: what the op
    layer (argument checks, backend resolution, weight packing, autograd) adds to each conv of a step.
    On CPU with one intra-op thread: the thread pool's hand-offs on microsecond ops are no host cost a GPU
    pays. The same sizes with ``--small`` (it is host time either way); fewer reps. Then a small A-QCF
    block's, against the SDPA-composed block (:func:`_block_host`, table ``block``)."""
    from aqcf_kernels import backends, reference
    from aqcf_kernels import functional as qF

    if device == "cpu":
        torch.set_num_threads(1)

    n, cq, size = HOST_CASE["batch"], HOST_CASE["channels_q"], HOST_CASE["size"]
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    x, w, b = leaf(n, 4 * cq, size, size), leaf(4, cq, cq, 3, 3, scale=0.2), leaf(4 * cq, scale=0.1)
    e = reference.expand_weight(w.detach()).requires_grad_()
    gy = torch.randn(n, 4 * cq, size, size, generator=g).to(device)
    providers: dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...], str | None]] = {
        "aten conv": (lambda x, e, b: F.conv2d(x, e, b, padding=1), (x, e, b), None),
        "expanded": (lambda x, w, b: reference.quaternion_conv_expanded(x, w, b, padding=1), (x, w, b), None),
        "auto": (lambda x, w, b: qF.quaternion_conv2d(x, w, b, padding=1), (x, w, b), None),
    }
    for name in ("torch", "cuda", "triton") if device == "cuda" else ("torch", "cpp"):
        if _conv_backend_runs_here(name):
            providers[f"{name}/hamilton"] = (
                lambda x, w, b: qF.quaternion_conv2d(x, w, b, padding=1, algorithm="hamilton"),
                (x, w, b),
                name,
            )
    ref = reference.quaternion_conv_naive(x.detach(), w.detach(), b.detach(), padding=1)

    def scope(forced: str | None) -> contextlib.AbstractContextManager:
        return backends.use(forced) if forced else contextlib.nullcontext()

    def call(fn, leaves, mode) -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(*leaves)
        else:
            torch.autograd.grad(fn(*leaves), leaves, gy)

    scopes = {name: (lambda forced=forced: scope(forced)) for name, (_, _, forced) in providers.items()}
    rows = []
    for mode in ("fwd", "fwdbwd"):
        calls = {name: (lambda fn=fn, leaves=leaves, mode=mode: call(fn, leaves, mode))
                 for name, (fn, leaves, _) in providers.items()}  # fmt: skip
        per_call = _per_call_us(device, small, HOST_CALLS, calls, scopes)
        for name, us in per_call.items():
            fn, leaves, forced = providers[name]
            with scope(forced), torch.no_grad():
                err = _rel(fn(*leaves), ref)
            floor = per_call["aten conv"]
            rows.append({"mode": mode, "provider": name, "us_per_call": us, "over_aten_us": us - floor, "rel_err": err})
    _write(
        out, "host", _environment(device), rows,
        ["mode", "provider", "µs per call", "over one aten conv, µs", "rel err y"],
        lambda r: [r["mode"], r["provider"], f"{r['us_per_call']:.0f}", f"{r['over_aten_us']:+.0f}",
                   f"{r['rel_err']:.1e}"],
    )  # fmt: skip
    _block_host(out, device, small)


#: _block_host's A-QCF block: 8 quaternion channels, 2 heads, 16 tokens a stream: device work is nil, as at
#: the low end of the block's target (1k tokens) on a GPU, where the host's time per op decides the step
BLOCK_HOST_CASE = {"channels": 32, "heads": 2, "tokens": 16}
BLOCK_HOST_CALLS = 20


def _block_host(out: Path, device: str, small: bool) -> None:
    """The small A-QCF block called back to back, forward (no grad) and forward+backward: µs per call of
    ours and of the SDPA-composed block (expanded-weight projections, ``F.scaled_dot_product_attention``,
    the gate in plain ops: :func:`benchmarks.attention.composed_block`), and their ratio (the block target's
    ``speedup = t_sdpa / t_ours``)."""
    from aqcf_kernels.nn import AQCFBlock

    from . import attention as ab

    torch.manual_seed(0)
    c, tokens = BLOCK_HOST_CASE["channels"], BLOCK_HOST_CASE["tokens"]
    block = AQCFBlock(c, heads=BLOCK_HOST_CASE["heads"], device=device)
    with torch.no_grad():  # a trained block: the attention path contributes
        block.alpha_a.fill_(0.5)
        block.alpha_b.fill_(-0.5)
    f_a, f_b = (torch.randn(1, c, tokens, device=device).requires_grad_() for _ in range(2))
    g_a, g_b = (torch.randn(1, c, tokens, device=device) for _ in range(2))
    leaves = [f_a, f_b, *block.parameters()]
    fns = {name: ab.build(name, block) for name in ("sdpa", "ours")}
    with torch.no_grad():
        outs = {name: torch.cat([o.flatten() for o in fn(f_a, f_b)]) for name, fn in fns.items()}

    def call(fn, mode) -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(f_a, f_b)
        else:
            torch.autograd.grad(fn(f_a, f_b), leaves, (g_a, g_b))

    rows = []
    for mode in ("fwd", "fwdbwd"):
        us = _per_call_us(
            device,
            small,
            BLOCK_HOST_CALLS,
            {name: (lambda fn=fn, mode=mode: call(fn, mode)) for name, fn in fns.items()},
        )
        rows.append({
            "mode": mode, "sdpa_us": us["sdpa"], "ours_us": us["ours"], "speedup": us["sdpa"] / us["ours"],
            "rel_err": _rel(outs["ours"], outs["sdpa"]),
        })  # fmt: skip
    _write(
        out, "block", _environment(device), rows,
        ["mode", "SDPA-composed block, µs per call", "ours, µs per call", "speedup (target ≥ 0.9x)", "rel err"],
        lambda r: [r["mode"], f"{r['sdpa_us']:.0f}", f"{r['ours_us']:.0f}", f"{r['speedup']:.2f}x",
                   f"{r['rel_err']:.1e}"],
        align_left=1,
    )  # fmt: skip


#: profile_stage's cases and providers: the issue's GPU target cases, the conv providers of the bf16 table
PROFILE_CASES = ("2d 16q k3 N32 64x64 cl", "2d 64q k3 N32 64x64 cl")
PROFILE_PROVIDERS = ("expanded", "cuda", "triton/hamilton", "triton/fast8", "auto")
PROFILE_STEPS = 3
PROFILE_TOP_KERNELS = 6


def profile_stage(out: Path, device: str, small: bool) -> None:
    """Where a fwd+bwd step of the GPU target cases goes (bf16, channels_last), per provider: the step's wall
    time, the device's busy time in it (the union of its kernels' intervals), the kernels' summed time and
    count, and the top kernels by time (on CPU: ops by self time), from :data:`PROFILE_STEPS` profiled
    steps after the choices settle (``torch.profiler``; one ``profile-*.json`` Chrome trace per case and
    provider alongside). Busy time well under the wall time is a host-bound step (launches, Python), kernels
    adding up to it a device-bound one. Then ``autotune.{md,json}``: the tiles the Triton autotuner kept for
    each shape it tuned (:func:`autotune_picks`). ``--small``: 2d 4q N2 8x8 on whatever device (a dry run)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from . import conv as conv_bench

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cases = [dataclasses.replace(c, channels_last=True) for c in conv_bench.GRIDS["gpu"]()]
    cases = [c for c in cases if c.name in PROFILE_CASES]
    if small:
        cases = [conv_bench.Case(dims=2, channels=4, size=8, batch=2, channels_last=True)]
    available = [
        name
        for name in PROFILE_PROVIDERS
        if conv_bench.PROVIDERS[name].backend is None or _conv_backend_runs_here(conv_bench.PROVIDERS[name].backend)
    ]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = []
    for case in cases:
        inputs = conv_bench.make_inputs(case, dtype=dtype, device=device)
        for name in PROFILE_PROVIDERS:
            if name not in available:
                continue
            provider = conv_bench.PROVIDERS[name]
            step = conv_bench.make_step("fwdbwd", provider.build(case), inputs, provider.scope)
            common.settle_choices({name: step})
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
            with breakdown.kineto_markers_dropped(), torch_profile(activities=activities) as prof:
                started = time.perf_counter()
                for _ in range(PROFILE_STEPS):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                wall = (time.perf_counter() - started) / PROFILE_STEPS
            trace = out / f"profile-{case.name.replace(' ', '_')}-{name.replace('/', '_')}.json"
            prof.export_chrome_trace(str(trace))
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA] if cuda else []
            busy = _union_us(kernels) / PROFILE_STEPS
            total = sum(e.time_range.elapsed_us() for e in kernels) / PROFILE_STEPS
            by_name: dict[str, float] = {}
            if cuda:  # kernels by device time
                for e in kernels:
                    by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us() / PROFILE_STEPS
            else:  # ops by self CPU time
                for avg in prof.key_averages():
                    by_name[avg.key] = avg.self_cpu_time_total / PROFILE_STEPS
            top = sorted(by_name.items(), key=lambda kv: -kv[1])[:PROFILE_TOP_KERNELS]
            rows.append({
                "case": case.name, "provider": name, "served_by": provider.served_by(inputs, case),
                "wall_us": wall * 1e6, "device_busy_us": busy, "kernel_us": total,
                "kernels_per_step": len(kernels) / PROFILE_STEPS, "top": [[k, round(v, 1)] for k, v in top],
            })  # fmt: skip
    _write(
        out, "profile", _environment(device), rows,
        ["case", "provider", "served by", "wall µs/step", "device busy µs", "kernel µs", "kernels/step",
         "top kernels, on CPU ops (µs/step)"],
        lambda r: [r["case"], r["provider"], r["served_by"], f"{r['wall_us']:.0f}", f"{r['device_busy_us']:.0f}",
                   f"{r['kernel_us']:.0f}", f"{r['kernels_per_step']:.0f}",
                   "; ".join(f"{k[:60]} {v}" for k, v in r["top"])],
    )  # fmt: skip
    _write_autotune_picks(out, device)


def autotune_picks() -> list[dict]:
    """What the Triton autotuner chose in this process: for each autotuned kernel (``common.AUTOTUNED`` of the
    Triton backend) and each shape it tuned, the key's values and the config it kept (tiles, warps, stages,
    and whether this process timed it or took an earlier process's timing from ``autotune_cache``),
    so that a GPU run shows which tiles won, next to the static issue shares of ``tools/triton_resources.py``.
    Empty without triton (nothing registered), and under the interpreter (one config, nothing tuned)."""
    from aqcf_kernels.backends.triton import autotune_cache
    from aqcf_kernels.backends.triton import common as triton_common

    rows = []
    for kernel, (tuner, _) in sorted(triton_common.AUTOTUNED.items()):
        for key, config in tuner.cache.items():  # (the key: the tuner's key arguments, then dtypes)
            shape = ", ".join(f"{n}={v}" for n, v in zip(tuner.keys, key, strict=False))
            tiles = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
            if config.kwargs.get("RUNS", 1) > 1:  # the weight gradient's column blocks a program
                tiles += f" x{config.kwargs['RUNS']} blocks"
            if config.kwargs.get("FAST8_PRODUCTS", 1) > 1:  # and its fast8 products a program
                tiles += f" x{config.kwargs['FAST8_PRODUCTS']} products"
            timed = "earlier process" if (id(tuner), key) in autotune_cache.from_disk else "this process"
            rows.append({
                "kernel": kernel, "key": shape, "tiles": tiles, "num_warps": config.num_warps,
                "num_stages": config.num_stages, "timed": timed,
            })  # fmt: skip
    return rows


def _write_autotune_picks(out: Path, device: str) -> None:
    rows = autotune_picks()
    if not rows:  # (a table that says why it is empty rather than none)
        rows = [{"kernel": "-", "key": "no autotuned launch in this process", "tiles": "-", "num_warps": 0,
                 "num_stages": 0, "timed": "-"}]  # fmt: skip
    _write(
        out, "autotune", _environment(device), rows,
        ["kernel", "key", "tiles (M x N x K)", "warps", "stages", "timed in"],
        lambda r: [r["kernel"], r["key"], r["tiles"], str(r["num_warps"]), str(r["num_stages"]), r["timed"]],
        align_left=3,
    )  # fmt: skip


def _union_us(events: list) -> float:
    """Microseconds during which at least one of ``events`` ran (overlapping kernels counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


STAGES: dict[str, Callable[[Path, str, bool], None]] = {
    "norm": norm_stage,
    "passes": passes_stage,
    "rnn": rnn_stage,
    "host": host_stage,
    "profile": profile_stage,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("out", type=common.output_folder, help="folder for the stage's tables (created)")
    parser.add_argument("--device", default="cuda", help="default cuda; cpu with --small: a dry run")
    parser.add_argument("--small", action="store_true", help="tiny sizes (a dry run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (a dry run: --device cpu --small)")
    try:  # (not the argument's type: the default, cuda, gets the dry-run hint above on a machine without one)
        args.device = common.device_name(args.device)
    except argparse.ArgumentTypeError as e:
        parser.error(f"argument --device: {e}")
    if args.device == "cuda" and args.stage == "passes":
        os.environ["AQCF_BACKEND"] = "triton"  # the Triton kernels these tables are about
    args.out.mkdir(parents=True, exist_ok=True)
    STAGES[args.stage](args.out, args.device, args.small)
    return 0


if __name__ == "__main__":
    sys.exit(main())

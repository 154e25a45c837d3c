"""Which (backend, algorithm) runs a conv call: :func:`choose_conv`, by measurement or by rule.

:func:`aqcf_kernels.backends.resolve_conv` lists the candidates — every (backend, algorithm) pair that
can serve the call, backends in the device's priority order (only the forced one under
``AQCF_BACKEND``/``use``), algorithms as each backend offers them for ``'auto'``
(:meth:`~aqcf_kernels.backends.base.ConvBackend.algorithms`, the accuracy contract) or the one the
caller named — and asks :func:`choose_conv` to pick when there is more than one.

:func:`choose_conv` first prunes the pairs the prior knows to be hopeless (:func:`plausible`), then
lets :mod:`aqcf_kernels.tuning` time the rest once per call signature (``tuning.mode='measure'``,
the default) or takes the rule measured once on one machine (:func:`heuristic`: the first
backend, fast8 where :func:`fast8_pays_off`), which is also the answer wherever nothing can be
timed (``torch.compile`` tracing, fake tensors, CUDA graph capture).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import tuning
from ..params import ConvParams, is_pointwise
from .base import ConvBackend, ConvKind

# Smallest quaternion channels per group from which fast8 beats the expanded conv (benchmark).
FAST8_MIN_CHANNELS_PER_GROUP = 32

#: Runs the call with one (backend, algorithm) pair and returns its result.
RunConv = Callable[[ConvBackend, str], Tensor]


def plausible(
    backend: ConvBackend, algorithm: str, candidates: Sequence[tuple[ConvBackend, str]], weight: Tensor, p: ConvParams
) -> bool:
    """Whether a pair is worth timing: False for what was measured hopeless, so measuring stays cheap."""
    names = {b.name for b, _ in candidates}
    if backend.name == "triton" and "torch" in names:
        # cuDNN on the expanded weight beat the Triton kernels in every case measured: the first design
        # by 2.5x and more (H100, H200), the second (implicit GEMMs, fast8 as 8 GEMMs) at 0.48-0.65x
        # (hamilton) and 0.27-0.50x (fast8) of it, bf16 on an H200 (2026-12-04,
        # benchmarks/results/conv-gpu-h200-bf16-2026-12-04.md); their first calls also autotune and
        # compile for seconds. They serve when forced.
        return False
    if backend.name == "torch" and (_offers(candidates, "cpp", algorithm) or _offers(candidates, "cuda", algorithm)):
        # The same algorithm, compiled. On CPU the cpp engine is the composite's computation without its
        # Python passes (and its fast8 runs its products in one parallel region). On CUDA the cuda backend
        # runs the composite's very convs (the extension's ATen path: cuDNN on the expanded weight, the
        # pointwise GEMM, fast8's products in sequence) behind C++ host code that the op then serves
        # without Python; the device work is the same, so timing the two measures host time and noise,
        # and a noisy win for torch would cost every later call the Python path (~0.1 ms of host time).
        # H200, bf16 (2026-12-04): cuda 0.91-1.01x of cuDNN-expanded fwd+bwd, torch 0.69-1.02x, auto
        # (served by torch/hamilton) 0.69-0.82x at 16q and 64q.
        return False
    if backend.name == "cpp_cl" and not _few_channels_3d(weight, p):
        # Only 3d convs on few channels gained from the channels_last copies (2-core EPYC, ms with the
        # copies; fwd / input grad / weight grad): 4q at 64³ 63/56/127 as called vs 55/57/107 (weight
        # grad alone, quiet: 122 vs 64), 8q at 32³ 13/13/42 vs 14/14/28, 16q at 16³ 30/26/19 vs
        # 22/27/26, 32q N2 at 32³ 345/351/481 vs 368/387/483 (none). In 2d the copies cost more than
        # oneDNN gains: the weight gradient 32->32 at 128² N4 13 -> 30 ms, 64->64 at 64² 17 -> 31; the
        # whole 2d model channels_last measured 1.00x training (README, issue 14). A third
        # candidate where it cannot win would only make measuring dearer.
        return False
    if algorithm == "fast8" and is_pointwise(weight.shape, p):
        # One GEMM on the expanded weight (the pointwise path) beat 8 batched GEMMs plus the
        # operand transforms at every size measured (64-192 quaternion channels, 1-8k tokens).
        return False
    return True


def _few_channels_3d(weight: Tensor, p: ConvParams) -> bool:
    """A 3d conv with fewer quaternion channels per group, in and out, than fast8 needs to pay off.

    The weight is (4, A, B, *k): A all of one side's channels, B the other side's per group (which
    side is which depends on ``transposed``, the per-group pair does not).
    """
    return p.spatial_dims == 3 and max(weight.shape[1] // p.groups, weight.shape[2]) < FAST8_MIN_CHANNELS_PER_GROUP


def _offers(candidates: Sequence[tuple[ConvBackend, str]], backend: str, algorithm: str) -> bool:
    return any(b.name == backend and a == algorithm for b, a in candidates)


def heuristic(
    candidates: Sequence[tuple[ConvBackend, str]], input: Tensor, weight: Tensor, params: ConvParams
) -> tuple[ConvBackend, str]:
    """The rule: the first backend, with fast8 where :func:`fast8_pays_off` (the prior of measuring)."""
    backend = candidates[0][0]
    offered = [algorithm for b, algorithm in candidates if b is backend]
    if "fast8" in offered and fast8_pays_off(input, weight, params):
        return backend, "fast8"
    return backend, offered[0]


def signature(input: Tensor, weight: Tensor, params: ConvParams, kind: ConvKind, names: Sequence[str]) -> str:
    """What a measured choice is valid for (the tuning cache's key).

    The computation (kind, geometry, shapes, dtype, memory format), where it runs (device model,
    threads) and what was on offer (the candidate pairs: forcing a backend changes them).
    """
    device = input.device
    if device.type == "cuda":
        where = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        where = f"{device.type}:{tuning.fingerprint()['cpu']}:{torch.get_num_threads()}t"
    layout = "cl" if suggest_memory_format(input) != torch.contiguous_format else "cf"
    if not input.is_contiguous(memory_format=suggest_memory_format(input)):
        layout += "-strided"
    p = params
    geometry = (
        f"s{list(p.stride)}p{list(p.padding)}d{list(p.dilation)}t{int(p.transposed)}"
        f"op{list(p.output_padding)}g{p.groups}"
    )
    return (
        f"{kind}|{where}|{str(input.dtype).removeprefix('torch.')}|x{list(input.shape)}|w{list(weight.shape)}|"
        f"{geometry}|{layout}|{','.join(names)}"
    )


def choose_conv(
    device_type: str,
    candidates: Sequence[tuple[ConvBackend, str]],
    input: Tensor,
    weight: Tensor,
    params: ConvParams,
    kind: ConvKind,
    run: RunConv | None = None,
) -> tuple[ConvBackend, str, Tensor | None, bool]:
    """The (backend, algorithm) that runs this call, among ``candidates`` (at least two, in preference order).

    ``input``, ``weight`` and ``params`` are those of the call (for ``kind='weight_grad'`` the conv's
    input and a data-less stand-in of the weight's shape; for ``'input_grad'`` the ``grad_output``
    and the adjoint geometry). ``run`` computes the call with a given pair: with it, a first call of
    a signature is measured and its result is returned as the third value (the call is done); without
    it (or when the choice was known) the third value is ``None``. Without ``run`` an unmeasured
    signature gets the heuristic's answer. The fourth value says whether the pair is final for the
    signature; it is not while a measured choice is still being refined (``tuning.DOUBT_MARGIN``), when
    later calls may run another pair, nor on the refining's last call when a pair that lost computed it.
    """
    offered = tuple((b.name, a) for b, a in candidates)
    fast_key = (kind, input.device, input.dtype, input.shape, input.stride(), weight.shape, params, offered)
    fast_key += (torch.get_num_threads(),)
    known, final = tuning.recall(fast_key), True
    if known is None:
        known, final = tuning.steady_leader(fast_key), False
    if known is not None:
        return next((b, a) for b, a in candidates if (b.name, a) == (known.backend, known.algorithm)) + (None, final)
    prior = heuristic(candidates, input, weight, params)
    kept = [c for c in candidates if c == prior or plausible(c[0], c[1], candidates, weight, params)]
    if len(kept) == 1:
        return (*kept[0], None, True)
    pairs = {tuning.Candidate(b.name, a): (b, a) for b, a in kept}
    key = signature(input, weight, params, kind, [str(c) for c in pairs])
    if run is None:
        known = tuning.lookup(key) if tuning.measuring() else None
        return (*pairs.get(known, prior), None, True) if known is not None else (*prior, None, True)
    choice, output = tuning.choose(
        key,
        list(pairs),
        tuning.Candidate(prior[0].name, prior[1]),
        lambda c: run(*pairs[c]),
        (input, weight),
        fast_key,
    )
    return (*pairs[choice.candidate], output, choice.final)


def fast8_pays_off(input: Tensor, weight: Tensor, p: ConvParams) -> bool:
    """The ``algorithm='auto'`` rule, from the CPU and GPU benchmarks (see README).

    fast8 only in fp32/fp64 (its component-wise error grows in half precision when real parts
    dominate) and only where each of its 8 products is a conv big enough for oneDNN to run at
    full speed, so halving the FLOPs halves the time.
    """
    if input.dtype not in (torch.float32, torch.float64):
        return False
    if input.device.type != "cpu":
        # Measured on GPUs: 8 convs lost to one cuDNN conv on the expanded weight (Triton fast8
        # 0.17-0.20x of it at 64 quaternion channels, benchmarks/results/conv-gpu-*).
        return False
    if is_pointwise(weight.shape, p):
        # One GEMM on the expanded weight (the pointwise path) beat 8 batched GEMMs plus the
        # operand transforms at every size measured (64-192 quaternion channels, 1-8k tokens).
        return False
    cq_out = weight.shape[2] * p.groups if p.transposed else weight.shape[1]
    cq_in = input.shape[1] // 4
    per_group = min(cq_in, cq_out) // p.groups
    if per_group >= FAST8_MIN_CHANNELS_PER_GROUP:
        return True
    # Below that, only 2d and 3d convs with 16 channels per group (one AVX-512 register of fp32) won,
    # in one-process A/B runs of fwd+bwd: 2d 1.20-1.44x (N4-8, 64-128², plain and 2x2 transposed); 3d
    # 1.04-1.34x (N1-4, 8³-32³, Intel Xeon, 2026-12-03: after the one-sample oneDNN routes and the
    # engine's paired operands; 0.13x before those, on PyTorch's im2col); 8, 24 and 40 channels did
    # not (0.79x, 0.89x, 1.06x), nor 1d with 16 (0.58-0.96x).
    return p.spatial_dims in (2, 3) and per_group == 16

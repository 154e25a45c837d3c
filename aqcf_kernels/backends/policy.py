"""Which (backend, algorithm) runs a conv call: :func:`choose_conv`, the one hook, and today's rule.

:func:`aqcf_kernels.backends.resolve_conv` lists the candidates — every (backend, algorithm) pair that
can serve the call, backends in the device's priority order (only the forced one under
``AQCF_BACKEND``/``use``), algorithms as each backend offers them for ``'auto'``
(:meth:`~aqcf_kernels.backends.base.ConvBackend.algorithms`, the accuracy contract) or the one the
caller named — and asks :func:`choose_conv` to pick when there is more than one.

Today the pick is a rule measured once (:func:`fast8_pays_off`): the first backend by priority, and
on it fast8 where the rule says it pays off. A measuring autotuner replaces the body of
:func:`choose_conv`; nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..params import ConvParams, is_pointwise
from .base import ConvBackend, ConvKind

# Smallest quaternion channels per group from which fast8 beats the expanded conv (benchmark).
FAST8_MIN_CHANNELS_PER_GROUP = 32


def choose_conv(
    device_type: str,
    candidates: Sequence[tuple[ConvBackend, str]],
    input: Tensor,
    weight: Tensor,
    params: ConvParams,
    kind: ConvKind,
) -> tuple[ConvBackend, str]:
    """The (backend, algorithm) that runs this call, among ``candidates`` (at least two, in preference order).

    ``input``, ``weight`` and ``params`` are those of the call (for ``kind='weight_grad'`` the conv's
    input and a data-less stand-in of the weight's shape; for ``'input_grad'`` the ``grad_output``
    and the adjoint geometry). Today: the first backend, with fast8 where :func:`fast8_pays_off`.
    """
    backend = candidates[0][0]
    offered = [algorithm for b, algorithm in candidates if b is backend]
    if "fast8" in offered and fast8_pays_off(input, weight, params):
        return backend, "fast8"
    return backend, offered[0]


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
    # Below that, only 2d convs with 16 channels per group (one AVX-512 register of fp32) won, in
    # one-process A/B runs of fwd+bwd: 1.20-1.44x (N4-8, 64-128², plain and 2x2 transposed); 8, 24
    # and 40 channels, and 3d with 16, did not (0.79x, 0.89x, 1.06x, 0.13x).
    return p.spatial_dims == 2 and per_group == 16

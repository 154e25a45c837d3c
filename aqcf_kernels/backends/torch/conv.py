"""The ``torch`` conv backend: composite PyTorch, any device, any floating dtype, always available.

``hamilton`` runs one real conv on the expanded weight (the 16 products fused into one dense
GEMM by oneDNN/cuDNN); ``fast8`` runs 8 dense real convs on transformed operands.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ...params import ConvParams, is_pointwise
from ...quaternion import (
    conjugate_components,
    expand_weight_grouped,
    fast8_product,
    fold_weight_grad_grouped,
    from_group_major,
    to_group_major,
)
from ..base import ConvBackend


def one_channel_as_channels_first(x: Tensor) -> Tensor:
    """``x``, or where it has one channel whose stride is not a channels-first map's (a channel sliced out of a
    channels_last map: fast8's component slices of a one-quaternion-channel input) the same memory with that stride
    (a dim of size 1 has no stride of its own): PyTorch takes the former for channels_last, and its float32 CPU conv
    (oneDNN's kernel; torch 2.13, AMD EPYC) computes garbage, ~100% off, for it where the output's last dim is 1 and
    strided over. The extension's twin: csrc/cpu/real_conv.cpp."""
    if x.dim() < 3 or x.shape[1] != 1 or x.stride(1) == x.shape[2] * x.stride(2):
        return x
    return x.as_strided(x.shape, (x.stride(0), x.shape[2] * x.stride(2), *x.stride()[2:]))


def real_conv(x: Tensor, w: Tensor, p: ConvParams, bias: Tensor | None = None) -> Tensor:
    """The real (transposed) conv that one quaternion product is made of."""
    # (the weight too: PyTorch runs channels_last where either is, and a channels_last weight would take x back there)
    x, w = one_channel_as_channels_first(x), one_channel_as_channels_first(w)
    n = p.spatial_dims
    if p.transposed:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
        return fn(x, w, bias, p.stride, p.padding, p.output_padding, p.groups, p.dilation)
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return fn(x, w, bias, p.stride, p.padding, p.dilation, p.groups)


def bf16_kernel_larger_than_input(x: Tensor, weight_shape, dilation) -> bool:
    """Whether PyTorch's CPU bf16 conv weight gradient is wrong for ``x`` and a weight of ``weight_shape``: oneDNN's
    kernel (torch 2.13, an AMD EPYC with avx512_bf16) gives garbage, 1 to 1e35 off, inf or NaN, where the kernel's
    dilated extent is larger than its input along some spatial dim (a depth-2 map under a 3-deep kernel: a 3d U-Net's
    bottleneck; a width-1 map under a 3-wide kernel, in 1d, 2d and 3d); its float32 one is right. The extension's
    twin, with the measurement: csrc/cpu/real_conv.cpp."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    return any(d * (k - 1) + 1 > n for k, d, n in zip(weight_shape[2:], dilation, x.shape[2:], strict=True))


def real_conv_weight_grad(x: Tensor, gy: Tensor, weight_shape, p: ConvParams) -> Tensor:
    """Gradient w.r.t. the weight of the NON-transposed real conv ``gy = conv(x, w)`` (in float32 where PyTorch's
    bf16 one is wrong: :func:`bf16_kernel_larger_than_input`)."""
    if bf16_kernel_larger_than_input(x, weight_shape, p.dilation):
        return real_conv_weight_grad(x.float(), gy.float(), weight_shape, p).to(x.dtype)
    dummy = gy.new_empty(1).expand(weight_shape)
    return torch.ops.aten.convolution_backward(
        gy,
        x,
        dummy,
        None,
        p.stride,
        p.padding,
        p.dilation,
        False,
        [0] * p.spatial_dims,
        p.groups,
        [False, True, False],
    )[1]


def add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return y
    return y + bias.view(1, -1, *([1] * (y.dim() - 2)))


def pointwise_conv(input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams) -> Tensor:
    """A pointwise (1×1) quaternion conv as ONE batched GEMM on the expanded weight.

    oneDNN runs a 1×1 conv well below its GEMM speed on these shapes (measured on CPU, 64q, 1k-4k
    tokens: a 1×1 conv1d took ~4x the time of ``torch.matmul`` with the same weight), and the
    A-QCF block's projections and ``quaternion_linear`` are all pointwise. A transposed
    pointwise conv is the transposed matrix.
    """
    e = expand_weight_grouped(weight, 1).flatten(1)
    e = e.t() if p.transposed else e
    x = input.reshape(input.shape[0], input.shape[1], -1)
    y = torch.matmul(e, x)
    if bias is not None:
        y = torch.add(y, bias[:, None])
    return y.view(input.shape[0], e.shape[0], *input.shape[2:])


def pointwise_weight_grad(input: Tensor, grad_output: Tensor, weight_shape) -> Tensor:
    """Weight gradient of the non-transposed :func:`pointwise_conv`: ``Σ_b gy_b x_bᵀ``, folded; one matmul
    over (sample, token) pairs (``torch.einsum`` does the same after ~5 µs of host time parsing)."""

    def samples_tokens(t: Tensor) -> Tensor:  # (C, B·N): views with batch 1, else a copy (as einsum's)
        return t.reshape(t.shape[0], t.shape[1], -1).transpose(0, 1).reshape(t.shape[1], -1)

    ge = samples_tokens(grad_output) @ samples_tokens(input).t()
    return fold_weight_grad_grouped(ge.reshape(ge.shape[0], ge.shape[1], *weight_shape[3:]), 1)


def as_nontransposed(p: ConvParams) -> ConvParams:
    return ConvParams(p.spatial_dims, p.stride, p.padding, p.dilation, False, (0,) * p.spatial_dims, p.groups)


class TorchConvBackend(ConvBackend):
    name = "torch"
    device_types = ("cpu", "cuda", "mps", "xpu")

    def unavailable(self) -> str | None:
        return None

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        return None

    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str) -> Tensor:
        if algorithm == "hamilton" and is_pointwise(weight.shape, p):
            return pointwise_conv(input, weight, bias, p)
        if algorithm == "hamilton":
            e = expand_weight_grouped(weight, p.groups)
            # the bias in the conv's call, in the conv's (group-major) channel order
            b = None if bias is None else to_group_major(bias.view(1, -1), p.groups).view(-1)
            return from_group_major(real_conv(to_group_major(input, p.groups), e, p, b), p.groups)
        # A transposed conv is the adjoint: conj(W) ⊗ x with conv_transpose products.
        w = weight.unbind(0)
        left = conjugate_components(w) if p.transposed else w
        out = fast8_product(left, input.chunk(4, dim=1), lambda wc, xc: real_conv(xc, wc, p))
        return add_bias(torch.cat(out, dim=1), bias)

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape, p: ConvParams, algorithm: str
    ) -> Tensor:
        # For a transposed conv y = convT(x, W), <gy, convT(x, W)> = <conv(gy, W), x>: its weight
        # gradient is the non-transposed one with the roles of input and grad_output swapped.
        if p.transposed:
            input, grad_output = grad_output, input
        q = as_nontransposed(p)
        if algorithm == "hamilton" and is_pointwise(weight_shape, q):
            return pointwise_weight_grad(input, grad_output, weight_shape)
        if algorithm == "hamilton":
            shape = [4 * weight_shape[1], 4 * weight_shape[2], *weight_shape[3:]]
            ge = real_conv_weight_grad(to_group_major(input, q.groups), to_group_major(grad_output, q.groups), shape, q)
            return fold_weight_grad_grouped(ge, q.groups)
        # gW = gy ⊗ conj(x), each product a weight-gradient correlation.
        wgrad = partial(real_conv_weight_grad, weight_shape=list(weight_shape[1:]), p=q)
        out = fast8_product(
            grad_output.chunk(4, dim=1),
            conjugate_components(input.chunk(4, dim=1)),
            lambda g, x: wgrad(x, g),
        )
        return torch.stack(out, dim=0)

"""Launchers for the Triton quaternion-conv kernels, and the ``triton`` conv backend.

Which kernel serves what:

* forward and input gradient (a conv or a transposed conv, with the fused bias + activation):
  the implicit GEMM of :mod:`.igemm` (channels_last, one ``tl.dot`` per K step): ``hamilton`` on the
  pre-packed expanded weight, ``fast8`` as 8 GEMMs on the operand combinations of :mod:`.fast8` with
  the butterfly in the epilogue;
* the weight gradient: the split-K GEMM ``dE = gyᵀ · im2col(x)`` (fast8: 8 of them, on the
  combinations of gy and conj(x)) and the reduce-and-fold kernel of :mod:`.igemm_wgrad`;
* tensors of 2**31 elements or more (the implicit GEMMs' offsets are int32): ``qconv_kernel`` and
  ``qconv_wgrad_kernel`` of :mod:`.conv_kernels`, the first design, whose element offsets are int64;
* nothing with 2**31 pixels or more (N × spatial size of the input or the output): every kernel's pixel
  index is int32 (:func:`cannot_index_pixels`).

Serves CUDA tensors; under ``TRITON_INTERPRET=1`` it also serves CPU tensors so the kernels are
proven on machines without a GPU (``AQCF_BACKEND=triton``). The interpreter must be chosen before
triton compiles anything: set the variable before importing ``aqcf_kernels``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...params import ConvParams, conv_output_shape
from ..base import ConvBackend
from . import common
from .common import triton

if triton is not None:
    from . import igemm, igemm_wgrad
    from .conv_kernels import qconv_kernel, qconv_wgrad_kernel


def _as_5d(t: Tensor) -> Tensor:
    """(N, C, *S) with 1-3 spatial dims -> (N, C, D, H, W); size-1 dims cost nothing."""
    while t.dim() < 5:
        t = t.unsqueeze(2)
    return t


def _spatial3(values, n: int, fill: int) -> tuple[int, int, int]:
    return (fill,) * (3 - n) + tuple(values)


# Interpreted programs cost per program and step, not per element: one config, big tiles.
INTERPRETER_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}
INTERPRETER_WGRAD_BLOCKS = {"BLOCK_O": 32, "BLOCK_C": 32, "BLOCK_P": 128}


def forward_gpu_configs() -> list:
    """Tile shapes the forward kernel is autotuned over on a GPU (per shape, dtype and variant).

    fast8 holds 8 fp32 accumulator tiles instead of 4, so the narrow-N configs are there for it;
    a config that runs out of registers or shared memory is simply never picked.
    """
    shapes = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 32, 32, 4, 4), (128, 32, 32, 4, 3), (32, 64, 32, 4, 4)]
    shapes += [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 4, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes
    ]


def wgrad_gpu_configs() -> list:
    """Tile shapes of the weight-gradient kernel on a GPU (per shape, dtype and variant).

    The first is the old fixed choice. On an H100 its fp32 hamilton variant took 25-98 ms where
    fast8 took 3-8 ms, and a static look at the sm_90 cubins (cuobjdump) shows every fp32 variant
    of it spilling (1.6-12.7 KB of stack per thread); the others spill far less there. Measuring
    decides which wins.
    """
    shapes = [(32, 32, 64, 4), (32, 32, 32, 8), (64, 64, 32, 8), (64, 32, 32, 4)]
    return [triton.Config({"BLOCK_O": o, "BLOCK_C": c, "BLOCK_P": p}, num_warps=w) for o, c, p, w in shapes]


# The autotuner re-benchmarks every config for each new key: the GEMM sizes and the constexpr
# variant (dtypes are added to the key by triton itself). The weight gradient accumulates with fp32
# atomics: the autotuner zeroes it before every trial.
if triton is not None:
    _qconv_forward = common.autotuned(
        qconv_kernel,
        gpu_configs=forward_gpu_configs(),
        interpreter_config=INTERPRETER_BLOCKS,
        key=["M", "CG_IN", "CG_OUT", "KD", "KH", "KW", "TRANSPOSED", "FAST8", "HAS_BIAS", "ACTIVATION", "STORE_PRE"],
    )
    _qconv_wgrad = common.autotuned(
        qconv_wgrad_kernel,
        gpu_configs=wgrad_gpu_configs(),
        interpreter_config=INTERPRETER_WGRAD_BLOCKS,
        key=["P", "CG_IN", "CG_OUT", "KD", "KH", "KW", "FAST8"],
        reset_to_zero=["gw_ptr"],
    )


ACTIVATION_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "gelu": 3}

#: Pixels (N × spatial size) from which the kernels' pixel index, an int32 from program ids and aranges, wraps.
PIXEL_LIMIT = 2**31


def cannot_index_pixels(input: Tensor, weight: Tensor, p: ConvParams) -> str | None:
    """Why no kernel here can index this call's pixels (``None`` if they can): the implicit GEMMs' rows and
    the first design's ``M`` and ``P`` are int32 pixel indices, of the output (forward, weight gradient) or of
    the input (the input gradient, a transposed conv whose output is the conv's input)."""
    out = conv_output_shape(input.shape, weight.shape, p)
    pixels = max(input.shape[0] * math.prod(input.shape[2:]), out[0] * math.prod(out[2:]))
    if pixels >= PIXEL_LIMIT:
        return f"{pixels} pixels: 2**31 or more (the kernels' pixel indices are int32)"
    return None


def conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p: ConvParams,
    algorithm: str,
    activation: str | None = None,
    negative_slope: float = 0.0,
    pre: Tensor | None = None,
) -> Tensor:
    """The conv with ``qconv_kernel``, ``activation`` applied in the epilogue; ``pre`` (if given) receives z."""
    n = p.spatial_dims
    out = torch.empty(conv_output_shape(input.shape, weight.shape, p), dtype=input.dtype, device=input.device)
    x5, y5 = _as_5d(input), _as_5d(out)
    w = weight.reshape(*weight.shape[:3], *_spatial3(weight.shape[3:], n, 1))
    cq_in, cq_out = input.shape[1] // 4, out.shape[1] // 4
    cg_in, cg_out = cq_in // p.groups, cq_out // p.groups
    if p.transposed:  # weight (4, Cq_in, Cq_out/G, *k)
        s_wo, s_wc, w_group = w.stride(2), w.stride(1), cg_in * w.stride(1)
    else:  # weight (4, Cq_out, Cq_in/G, *k)
        s_wo, s_wc, w_group = w.stride(1), w.stride(2), cg_out * w.stride(1)
    m = y5.shape[0] * y5.shape[2] * y5.shape[3] * y5.shape[4]
    dot_dtype, precision = common.dot_config(input.dtype)

    def grid(meta):
        return common.cdiv(m, meta["BLOCK_M"]), common.cdiv(cg_out, meta["BLOCK_N"]), p.groups

    _qconv_forward[grid](
        x5,
        w,
        bias if bias is not None else w,
        y5,
        m,
        cq_in,
        cq_out,
        cg_in,
        cg_out,
        *x5.shape[2:],
        *y5.shape[2:],
        *w.shape[3:],
        *x5.stride(),
        *y5.stride(),
        w.stride(0),
        s_wo,
        s_wc,
        *w.stride()[3:],
        w_group,
        *_spatial3(p.stride, n, 1),
        *_spatial3(p.padding, n, 0),
        *_spatial3(p.dilation, n, 1),
        _as_5d(pre) if pre is not None else y5,
        float(negative_slope),
        TRANSPOSED=p.transposed,
        FAST8=algorithm == "fast8",
        HAS_BIAS=bias is not None,
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
        ACTIVATION=ACTIVATION_CODES[activation],
        STORE_PRE=pre is not None,
    )
    return out


def conv_weight_grad(input: Tensor, grad_output: Tensor, weight_shape, p: ConvParams, algorithm: str) -> Tensor:
    # A transposed conv's weight gradient is the conv's with input and grad_output swapped.
    x, gy = (grad_output, input) if p.transposed else (input, grad_output)
    n = p.spatial_dims
    x5, g5 = _as_5d(x), _as_5d(gy)
    ks = _spatial3(weight_shape[3:], n, 1)
    gw = torch.zeros((*weight_shape[:3], *ks), dtype=torch.float32, device=x.device)
    cq_in, cq_out = x.shape[1] // 4, gy.shape[1] // 4
    cg_in, cg_out = cq_in // p.groups, cq_out // p.groups
    pix = g5.shape[0] * g5.shape[2] * g5.shape[3] * g5.shape[4]
    kvol = ks[0] * ks[1] * ks[2]
    # Split the pixel reduction until the grid has a few programs per SM (atomics combine them),
    # counted with 32 x 32 tiles and 32-pixel slices whatever tiles the autotuner picks.
    target = 1 if common.INTERPRET else 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    n_oc = common.cdiv(cg_out, 32) * common.cdiv(cg_in, 32)
    splits = max(1, min(common.cdiv(pix, 32), target // max(1, n_oc * kvol * p.groups)))
    dot_dtype, precision = common.dot_config(x.dtype)

    def grid(meta):
        tiles = common.cdiv(cg_out, meta["BLOCK_O"]) * common.cdiv(cg_in, meta["BLOCK_C"])
        return tiles, kvol, p.groups * splits

    _qconv_wgrad[grid](
        x5,
        g5,
        gw,
        pix,
        splits,
        cq_in,
        cq_out,
        cg_in,
        cg_out,
        *x5.shape[2:],
        *g5.shape[2:],
        *ks,
        *x5.stride(),
        *g5.stride(),
        *_spatial3(p.stride, n, 1),
        *_spatial3(p.padding, n, 0),
        *_spatial3(p.dilation, n, 1),
        FAST8=algorithm == "fast8",
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
    )
    return gw.reshape(weight_shape).to(x.dtype)


class TritonConvBackend(ConvBackend):
    name = "triton"
    device_types = ("cuda", "cpu")
    fuses_activation = True  # the activation runs in the forward kernel's epilogue

    def unavailable(self) -> str | None:
        return common.unavailable()

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        return common.cannot_serve_tensor(input) or cannot_index_pixels(input, weight, params)

    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str) -> Tensor:
        return conv_any(input, weight, bias, p, algorithm, None, 0.0, False)[0]

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str
    ) -> Tensor:
        if igemm_wgrad.cannot_serve(input, grad_output, algorithm, weight_shape) is None:
            return igemm_wgrad.conv_weight_grad_igemm(input, grad_output, weight_shape, p, algorithm=algorithm)[0]
        return conv_weight_grad(input, grad_output, weight_shape, p, algorithm)

    def conv_weight_bias_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str
    ) -> tuple[Tensor, Tensor]:
        """The implicit-GEMM weight gradient sums the bias gradient in its own launch (its bias programs read
        ``grad_output`` in the layout it converted it to, and the fold kernel reduces their splits)."""
        if igemm_wgrad.cannot_serve(input, grad_output, algorithm, weight_shape) is None:
            return igemm_wgrad.conv_weight_grad_igemm(
                input, grad_output, weight_shape, p, with_bias=True, algorithm=algorithm
            )
        return super().conv_weight_bias_grad(input, grad_output, weight_shape, p, algorithm)

    def conv_act(
        self,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        p: ConvParams,
        algorithm: str,
        activation: str,
        negative_slope: float,
        keep_pre: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Conv with the activation fused in the epilogue: ``(y, z)``, z written only if ``keep_pre``."""
        return conv_any(input, weight, bias, p, algorithm, activation, negative_slope, keep_pre)


def conv_any(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p: ConvParams,
    algorithm: str,
    activation: str | None,
    negative_slope: float,
    keep_pre: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(y, z)`` by the kernel that serves the call (see the module docstring); z only if ``keep_pre``."""
    if igemm.cannot_serve(input, weight, p, algorithm) is None:
        return igemm.conv_igemm(input, weight, bias, p, activation, negative_slope, keep_pre, algorithm)
    pre = None
    if keep_pre:
        pre = torch.empty(conv_output_shape(input.shape, weight.shape, p), dtype=input.dtype, device=input.device)
    return conv(input, weight, bias, p, algorithm, activation, negative_slope, pre), pre

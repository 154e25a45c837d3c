"""``torch.nn.functional``-style quaternion ops over ``torch.ops.aqcf``.

Arguments follow ``F.conv{1,2,3}d`` / ``F.conv_transpose{1,2,3}d``; channel counts are real
channels in the blocked ``[r|i|j|k]`` layout; the weight is ``(4, out/4, in/4/groups, *k)``
(transposed: ``(4, in/4, out/4/groups, *k)``). ``algorithm`` is 'auto', 'hamilton' or 'fast8'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.aqcf)
from ._fx import fx_leaf_function
from .ops.attention import composite_attention, composite_gate
from .ops.conv import ACTIVATIONS, call_qconv
from .ops.func import transforms_active
from .ops.lowerings import exporting_to_onnx
from .params import IntOrSeq, check_conv_args, same_dtype_under_autocast
from .quaternion import check_algorithm


@fx_leaf_function
def quaternion_conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrSeq = 1,
    padding: IntOrSeq | str = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    transposed: bool = False,
    output_padding: IntOrSeq = 0,
    algorithm: str = "auto",
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """Quaternion (transposed) conv of any spatial rank (taken from ``weight.dim() - 3``).

    ``activation`` ('relu', 'leaky_relu' with ``negative_slope``, 'gelu' (erf form), or None) is
    applied to every real output channel; the Triton backend fuses it into the conv's epilogue.
    ``algorithm='auto'`` is resolved per call by the backend registry (``aqcf_kernels.backends.policy``).
    """
    return _quaternion_conv(
        input, weight, bias, stride, padding, dilation, groups, transposed, output_padding, algorithm, activation,
        negative_slope,
    )  # fmt: skip


def _quaternion_conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: IntOrSeq,
    padding: IntOrSeq | str,
    dilation: IntOrSeq,
    groups: int,
    transposed: bool,
    output_padding: IntOrSeq,
    algorithm: str,
    activation: str | None,
    negative_slope: float,
) -> Tensor:
    """:func:`quaternion_conv` with every argument positional and no FX wrapper: what the functional convs
    and the conv modules call (each an FX leaf itself). A small conv's whole host time is a few tens of
    µs, and the wrapper and keyword passing cost a few of them per call."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"negative_slope must be a number, got {type(negative_slope).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    spatial_dims = weight.dim() - 3
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"weight must have 4, 5 or 6 dims (4, A, B, *kernel), got shape {tuple(weight.shape)}")
    if isinstance(input, Tensor) and input.dim() == spatial_dims + 1:  # one unbatched sample (C, *spatial), as F.conv*
        y = _quaternion_conv(
            input.unsqueeze(0), weight, bias, stride, padding, dilation, groups, transposed, output_padding, algorithm,
            activation, negative_slope,
        )  # fmt: skip
        return y.squeeze(0)
    p, extra = check_conv_args(
        input, weight, bias, spatial_dims, stride, padding, dilation, groups, transposed, output_padding, algorithm
    )
    if any(extra):  # 'same' with an even effective kernel, or output_padding >= stride (check_conv_args)
        input = F.pad(input, [v for e in reversed(extra) for v in (0, e)])
    # 'auto' goes to the op as is: the backend that serves the call picks the algorithm.
    args = (*p.as_op_args(), algorithm, activation, float(negative_slope), "forward")
    return call_qconv(input, weight, bias, *args)[0]


def _check_rank(name: str, weight: Tensor, spatial_dims: int) -> None:
    if isinstance(weight, Tensor) and weight.dim() != spatial_dims + 3:
        raise ValueError(
            f"{name}: weight must be {spatial_dims + 3}-D (4, A, B, *kernel_size), got shape {tuple(weight.shape)}"
        )


def _make_conv(spatial_dims: int):
    name = f"quaternion_conv{spatial_dims}d"

    def conv(
        input,
        weight,
        bias=None,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        *,
        algorithm="auto",
        activation=None,
        negative_slope=0.01,
    ):
        _check_rank(name, weight, spatial_dims)
        return _quaternion_conv(
            input, weight, bias, stride, padding, dilation, groups, False, 0, algorithm, activation, negative_slope
        )

    conv.__name__ = conv.__qualname__ = name
    conv.__doc__ = (
        f"Quaternion {spatial_dims}d conv ``y = W ⊗ x``; arguments as ``F.conv{spatial_dims}d``, plus "
        "``algorithm`` and a fused ``activation`` (see :func:`quaternion_conv`)."
    )
    return fx_leaf_function(conv)


def _make_conv_transpose(spatial_dims: int):
    name = f"quaternion_conv_transpose{spatial_dims}d"

    def conv_transpose(
        input,
        weight,
        bias=None,
        stride=1,
        padding=0,
        output_padding=0,
        groups=1,
        dilation=1,
        *,
        algorithm="auto",
        activation=None,
        negative_slope=0.01,
    ):
        _check_rank(name, weight, spatial_dims)
        return _quaternion_conv(
            input, weight, bias, stride, padding, dilation, groups, True, output_padding, algorithm, activation,
            negative_slope,
        )  # fmt: skip

    conv_transpose.__name__ = conv_transpose.__qualname__ = name
    conv_transpose.__doc__ = (
        f"Quaternion {spatial_dims}d transposed conv (the adjoint of the conv with the same weight); "
        f"arguments as ``F.conv_transpose{spatial_dims}d``."
    )
    return fx_leaf_function(conv_transpose)


quaternion_conv1d = _make_conv(1)
quaternion_conv2d = _make_conv(2)
quaternion_conv3d = _make_conv(3)
quaternion_conv_transpose1d = _make_conv_transpose(1)
quaternion_conv_transpose2d = _make_conv_transpose(2)
quaternion_conv_transpose3d = _make_conv_transpose(3)


@fx_leaf_function
def quaternion_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, algorithm: str = "auto") -> Tensor:
    """Quaternion linear map over the last dim (blocked ``[r|i|j|k]``); weight ``(4, out/4, in/4)``."""
    if not isinstance(weight, Tensor) or weight.dim() != 3 or weight.shape[0] != 4:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"quaternion_linear: weight must have shape (4, out/4, in/4), got {shape}")
    if not isinstance(input, Tensor) or input.dim() < 1:
        raise ValueError("quaternion_linear: input must be a Tensor with at least 1 dim (..., in_features)")
    if input.shape[-1] != 4 * weight.shape[2]:
        raise ValueError(
            f"quaternion_linear: input has {input.shape[-1]} features, weight expects {4 * weight.shape[2]}"
        )
    # checked here too, so the error names this function and not the 1x1 conv it runs
    check_algorithm("quaternion_linear", algorithm)
    if not input.is_floating_point():
        raise TypeError(f"quaternion_linear: input must be a floating-point tensor, got {input.dtype}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"quaternion_linear: bias must be a Tensor or None, got {type(bias).__name__}")
    if bias is not None and tuple(bias.shape) != (4 * weight.shape[1],):
        raise ValueError(f"quaternion_linear: bias must have shape ({4 * weight.shape[1]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not same_dtype_under_autocast(t, input) or t.device != input.device):
            raise TypeError(
                f"quaternion_linear: {name} is {t.dtype} on {t.device} but input is {input.dtype} on {input.device}"
            )
    lead, features = input.shape[:-1], input.shape[-1]
    x = input.reshape(-1, features)
    if x.shape[0] == 0:  # no rows: a batch of zero 1x1 convs keeps shapes and autograd intact
        y = quaternion_conv(x.unsqueeze(-1), weight.unsqueeze(-1), bias, algorithm=algorithm)
        return y.reshape(*lead, y.shape[1])
    # The M rows as the LENGTH of one 1x1 conv1d, (1, in, M) -> (1, out, M): one GEMM over all rows
    # whose four component blocks are contiguous slices (fast8 splits them without copies). Measured
    # on CPU against rows-as-batch (M, in, 1): forward + backward 1.1-3x faster (M from 16 to 8192,
    # 16 to 256 features, both algorithms), forward alone faster except hamilton at M=4096, 64x64.
    y = quaternion_conv(x.t().contiguous().unsqueeze(0), weight.unsqueeze(-1), bias, algorithm=algorithm)
    # Back to rows; contiguous like F.linear's output (views of it must keep working).
    return y.squeeze(0).t().contiguous().reshape(*lead, y.shape[1])


def _attention_args_plainly_fine(q_a, k_a, v_a, q_b, k_b, v_b) -> bool:
    """The common case in a few attribute reads (the full check took 8 µs a call, a quarter of the op's
    own host time): six 4-D tensors of q_a's floating dtype and device, batch, heads and head_dim, with
    tokens, and each stream's keys and values of one count. False sends the call to the full check."""
    if not (isinstance(q_a, Tensor) and q_a.dim() == 4 and q_a.is_floating_point()):
        return False
    b, h, n, e = q_a.shape
    dtype, device = q_a.dtype, q_a.device
    for t in (k_a, v_a, q_b, k_b, v_b):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.dtype != dtype or t.device != device:
            return False
        tb, th, tn, te = t.shape
        if tb != b or th != h or te != e or tn == 0:
            return False
    return n != 0 and k_a.shape[2] == v_a.shape[2] and k_b.shape[2] == v_b.shape[2]


def _check_attention_args(q_a, k_a, v_a, q_b, k_b, v_b) -> None:
    if _attention_args_plainly_fine(q_a, k_a, v_a, q_b, k_b, v_b):
        return
    named = {"q_a": q_a, "k_a": k_a, "v_a": v_a, "q_b": q_b, "k_b": k_b, "v_b": v_b}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"cross_attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"cross_attention: {name} must be (batch, heads, tokens, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"cross_attention: {name} must be floating point, got {t.dtype}")
        if not same_dtype_under_autocast(t, q_a) or t.device != q_a.device:
            raise ValueError(
                f"cross_attention: {name} is {t.dtype} on {t.device} but q_a is {q_a.dtype} on {q_a.device}"
            )
        if t.shape[0] != q_a.shape[0] or t.shape[1] != q_a.shape[1] or t.shape[3] != q_a.shape[3]:
            raise ValueError(
                f"cross_attention: {name} has shape {tuple(t.shape)}; every tensor needs q_a's batch, heads and "
                f"head_dim {tuple(q_a.shape[:2])}, {q_a.shape[3]} (expand a batch-1 stream first)"
            )
        if t.shape[2] == 0:
            raise ValueError(f"cross_attention: {name} has no tokens (softmax over an empty set is undefined)")
    for stream in "ab":
        if named[f"k_{stream}"].shape[2] != named[f"v_{stream}"].shape[2]:
            raise ValueError(
                f"cross_attention: k_{stream} has {named[f'k_{stream}'].shape[2]} tokens but v_{stream} has "
                f"{named[f'v_{stream}'].shape[2]}"
            )


@fx_leaf_function
def cross_attention(
    q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor, v_b: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Both directions of the A-QCF attention, never storing an ``N_a × N_b`` matrix.

    ``out_a = softmax(q_a k_bᵀ·scale) v_b`` and ``out_b = softmax(q_b k_aᵀ·scale) v_a``; every tensor is
    ``(B, H, N, E)``; keys and values of a stream have the same token count, which may differ from
    its queries' (pooled keys/values). ``scale``
    defaults to ``1/sqrt(E)``: with ``E = 4·d`` reals per head, that is the block's ``1/sqrt(4·d)``.
    """
    _check_attention_args(q_a, k_a, v_a, q_b, k_b, v_b)
    scale = q_a.shape[-1] ** -0.5 if scale is None else float(scale)
    # the composite attention: what torch.func transforms (see ops.func), and MatMul/Softmax/MatMul for
    # torch.onnx.export (see ops.lowerings)
    if transforms_active() or exporting_to_onnx():
        return composite_attention(q_a, k_b, v_b, scale), composite_attention(q_b, k_a, v_a, scale)
    out_a, out_b, _, _ = torch.ops.aqcf.cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale)
    return out_a, out_b


@fx_leaf_function
def gated_residual(f: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor) -> Tensor:
    """``f + alpha · sigmoid(gate_logits) ⊙ o`` in one fused pass; ``gate_logits`` may broadcast."""
    if f.shape != o.shape:
        raise ValueError(f"gated_residual: f {tuple(f.shape)} and o {tuple(o.shape)} must have the same shape")
    if not _broadcasts_to(gate_logits.shape, f.shape):
        raise ValueError(f"gated_residual: gate_logits {tuple(gate_logits.shape)} must broadcast to f {tuple(f.shape)}")
    if alpha.numel() != 1:
        raise ValueError(f"gated_residual: alpha must hold one value, got shape {tuple(alpha.shape)}")
    for name, t in (("o", o), ("gate_logits", gate_logits), ("alpha", alpha)):
        if not same_dtype_under_autocast(t, f) or t.device != f.device:
            raise ValueError(f"gated_residual: {name} is {t.dtype} on {t.device} but f is {f.dtype} on {f.device}")
    if transforms_active() or exporting_to_onnx():  # composite: for torch.func's transforms, and ONNX's ops
        return f + composite_gate(o, gate_logits, alpha)
    return torch.ops.aqcf.gated_residual(f, o, gate_logits, alpha)


def _broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without growing it (torch's rule: aligned from
    the right, each size equal or 1). ``torch.broadcast_shapes`` costs ~13 µs a call, twice an A-QCF block's
    forward."""
    if len(shape) > len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(reversed(shape), reversed(target), strict=False))

"""``QuaternionConvNormAct``: quaternion conv → quaternion norm (with its fused activation), one module.

In training it is exactly ``nn.Sequential(conv, norm)``. In eval mode a norm with running statistics
is an affine map per channel, and the shared-variance norm's scale is one scalar per *quaternion*
channel, ``s = γ / sqrt(running_var + eps)``. Scaling an output quaternion channel of ``W ⊗ x`` by a
real scalar is scaling that channel's four weight components, which is again a quaternion weight, so
the norm folds into the conv exactly (the same fold as ``torch.nn.utils.fusion.fuse_conv_bn_eval``):

    W'[:, a] = s_a · W[:, a]        b' = s ⊙ (b − μ) + β      (s repeated over the four blocks)

and the unit is one conv with the activation handed to it: the ``cpp`` backend applies it in the
conv's epilogue (oneDNN's post-op on the expanded conv, fast8's output pass), other backends after the
conv. The norm's pass over the tensor (and its output buffer) is gone, and the activation's too: the
unit's eval forward is what inference and ``aqcf-predict`` run. Measured on one unit (Intel Xeon, 2
threads, no grad, channels_last): 3D 4q 64³ 15.2 → 12.5 ms, 2D 8q 128² B4 4.2 → 3.6 ms with the
activation in place after the conv.

Several inputs (``unit(x, skip)``, a U-Net decoder's up-sampled features and skip) are the quaternion
concatenation ``qcat([x, skip])``, but it is never built: the conv is linear in its input, so it is
the sum of one conv per input, each with its slice of the weight's input channels, added in place
into the first's output. A concatenation costs a full copy of both (more in channels_last, where its
contiguous runs are one component's few channels: 10.6 ms for two 1×16×64³ maps, Intel Xeon), and
as much again in the backward. At 64³ the two convs cost what the one on the concatenation does
(two 1×32×64³ inputs, eval: 41 + 41 ms against 76–85, the concatenation 21 ms more); at 32³ the
concatenation is cheap (1.1 ms) and two half-width convs cost more than one (31 vs 22 ms). In
A-QCF-Net's training step the net gain is 2.6% (3D 64³) and 1.9% (2D 128² B4); inference is
unchanged within noise.

Nothing is folded (the two modules run in turn) in training mode, for a norm that uses the input's
statistics (instance norm without ``track_running_stats``), a whitening norm (its 4×4 ``γ L⁻¹``
mixes the components: not a quaternion scale), a composite norm (``fused = False``: the benchmarks'
baseline), a rotation conv (its weight is normalised inside) or a transposed conv. The weights
themselves are never changed: the folded ones are recomputed per call (a few small ops), so
``train()``/``eval()`` switch freely and gradients reach ``W``, ``γ`` and ``β`` through the fold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import tuning
from .._fx import fx_leaf
from ..layout import qcat, quaternion_channels
from .conv import _QuaternionConvNd
from .norm import _QuaternionNorm


def fold_eval_norm(
    weight: Tensor, bias: Tensor | None, norm: _QuaternionNorm, real_weight: bool
) -> tuple[Tensor, Tensor]:
    """``(W', b')``: a conv's weight and bias with ``norm`` (eval mode, running statistics, no whitening)
    folded in, ``W' = s·W`` per output channel and ``b' = s ⊙ (b − μ) + β``, ``s = γ / sqrt(running_var +
    eps)`` one real per quaternion channel. ``real_weight``: ``weight`` is a real conv's ``(4·Cq, in,
    *k)`` (the network's stem), else a quaternion conv's ``(4, Cq, in/4, *k)``."""
    # Each unit folds on every eval call, so in as few ops as the formula allows (a launch each on a GPU,
    # ~2 µs each on CPU): the blocked [r|i|j|k] channels as (4, Cq) views, where quaternion channel c is
    # real channel c + k·Cq, broadcast against the (Cq,) scale instead of repeating it 4 times.
    dtype, cq = weight.dtype, norm.running_var.shape[0]
    running_var, running_mean = norm.running_var, norm.running_mean
    if running_var.dtype != dtype:
        running_var, running_mean = running_var.to(dtype), running_mean.to(dtype)
    scale = torch.rsqrt(running_var + norm.eps)  # (Cq,)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -running_mean if bias is None else bias - running_mean  # (4·Cq,)
    if norm.bias is None:
        folded_bias = (shift.view(4, cq) * scale).view(-1)
    else:
        folded_bias = torch.addcmul(norm.bias.view(4, cq), shift.view(4, cq), scale).view(-1)
    if real_weight:
        # (a real conv's output channels split as (4, Cq): a view whatever the weight's memory format)
        scaled = weight.unflatten(0, (4, cq)) * scale.view(1, cq, *[1] * (weight.dim() - 1))
        return scaled.flatten(0, 1), folded_bias
    return weight * scale.view(1, -1, *[1] * (weight.dim() - 2)), folded_bias


def conv_and_norm(unit: nn.Sequential) -> tuple[nn.Module, nn.Module]:
    """``(unit[0], unit[1])`` of a two-module unit, read from its module dict (keys ``'0'`` and ``'1'``, as
    ``nn.Sequential`` names them): its integer indexing walks the modules, ~1 µs a lookup, and each call of
    a unit asked it up to ten times."""
    modules = unit._modules
    return modules["0"], modules["1"]


def folds_in_eval(unit: nn.Sequential) -> bool:
    """Whether ``unit`` = (conv, quaternion norm) runs folded now: both in eval mode, and a norm that is
    a per-channel affine then (running statistics, no whitening, the fused kind)."""
    conv, norm = conv_and_norm(unit)
    return (
        not unit.training
        and not norm.training
        and norm.track_running_stats
        and not norm.whiten
        and norm.fused
        and not getattr(conv, "rotation", False)
        and not getattr(conv, "transposed", False)
    )


class QuaternionConvNormAct(nn.Sequential):
    """``conv`` then ``norm`` (``self[0]``, ``self[1]``: the state-dict keys of ``nn.Sequential(conv, norm)``),
    with the norm folded into the conv in eval mode; ``unit(a, b, ...)`` is ``unit(qcat([a, b, ...]))``
    without the concatenation (see the module docstring)."""

    #: Several inputs are concatenated (``qcat``) and then convolved, instead of convolving each with
    #: its slice of the weight: what a network assembled from other libraries computes (the benchmarks'
    #: baseline sets it).
    concatenates_inputs: bool = False

    def __init__(self, conv: _QuaternionConvNd, norm: _QuaternionNorm) -> None:
        if not isinstance(conv, _QuaternionConvNd):
            raise TypeError(f"QuaternionConvNormAct: conv must be a quaternion conv, got {type(conv).__name__}")
        if not isinstance(norm, _QuaternionNorm):
            raise TypeError(f"QuaternionConvNormAct: norm must be a quaternion norm, got {type(norm).__name__}")
        if conv.out_channels != norm.num_features:
            raise ValueError(
                f"QuaternionConvNormAct: the conv has {conv.out_channels} output channels but the norm "
                f"num_features={norm.num_features}"
            )
        super().__init__(conv, norm)

    @property
    def folds(self) -> bool:
        """Whether :meth:`forward` runs the folded conv now (eval mode and a foldable pair)."""
        return folds_in_eval(self)

    def folded_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """``(W', b')``: the conv's weight and bias with the eval-mode norm folded in."""
        conv, norm = conv_and_norm(self)
        return fold_eval_norm(conv.weight, conv.bias, norm, real_weight=False)

    def _splits_inputs(self, inputs: tuple[Tensor, ...]) -> bool:
        """Whether ``inputs`` are convolved one by one (see the module docstring) rather than concatenated."""
        conv = conv_and_norm(self)[0]
        if len(inputs) == 1 or self.concatenates_inputs or conv.groups != 1 or conv.rotation or conv.transposed:
            return False
        widths = [4 * quaternion_channels(t, f"QuaternionConvNormAct: input {i}") for i, t in enumerate(inputs)]
        if sum(widths) != conv.in_channels:
            raise ValueError(
                f"QuaternionConvNormAct: the inputs have {' + '.join(map(str, widths))} = {sum(widths)} channels "
                f"together, the conv takes in_channels={conv.in_channels}"
            )
        # (batched inputs only: an unbatched one goes the concatenating way, where the norm decides)
        return all(t.dim() == conv._spatial_dims + 2 for t in inputs)

    def _conv_of_parts(self, inputs: tuple[Tensor, ...], weight: Tensor, bias: Tensor | None) -> Tensor:
        """``conv(qcat(inputs))`` with ``weight`` and ``bias``, as one conv per input on its weight slice."""
        conv, y, start = conv_and_norm(self)[0], None, 0
        for t in inputs:
            cq = t.shape[1] // 4
            part = conv(t, weight=weight[:, :, start : start + cq], bias=bias)
            y, bias, start = (part if y is None else y.add_(part)), None, start + cq
        return y

    @fx_leaf
    def forward(self, *inputs: Tensor) -> Tensor:
        if not inputs:
            raise TypeError("QuaternionConvNormAct: expected at least one input")
        conv, norm = conv_and_norm(self)
        if not self._splits_inputs(inputs):
            input = inputs[0] if len(inputs) == 1 else qcat(list(inputs))
            # An unbatched input goes the unfolded way: the norm decides whether it takes one.
            if not self.folds or conv._unbatched(input):
                return super().forward(input)
            return self._folded((input,), *self.folded_weight_and_bias(), split=False)
        if not self.folds:
            return norm(self._conv_of_parts(inputs, conv.weight, conv.bias))
        weight, bias = self.folded_weight_and_bias()
        if torch.is_grad_enabled():
            return self._folded(inputs, weight, bias, split=True)
        return self._measured_split(inputs, weight, bias)

    def _folded(self, inputs: tuple[Tensor, ...], weight: Tensor, bias: Tensor, split: bool) -> Tensor:
        """The eval-mode unit with the folded ``weight`` and ``bias``: the activation is handed to the conv,
        whose backend may apply it in the epilogue (cpp: oneDNN's post-op, fast8's output pass); a sum of
        per-input convs (``split``) is activated after, in place where autograd allows it (an activation of a sum is
        not a sum)."""
        conv, norm = conv_and_norm(self)
        if not split:
            input = inputs[0] if len(inputs) == 1 else qcat(list(inputs))
            return conv(input, weight=weight, bias=bias, activation=norm.activation, negative_slope=norm.negative_slope)
        y = self._conv_of_parts(inputs, weight, bias)
        if norm.activation == "relu":
            return F.relu_(y)
        if norm.activation == "leaky_relu":
            if norm.negative_slope < 0 and y.requires_grad:  # torch refuses that in-place backward (the output's
                return F.leaky_relu(y, norm.negative_slope)  # sign no longer tells which slope an element took)
            return F.leaky_relu_(y, norm.negative_slope)
        return F.gelu(y) if norm.activation == "gelu" else y

    def _measured_split(self, inputs: tuple[Tensor, ...], weight: Tensor, bias: Tensor) -> Tensor:
        """Inference with several inputs: split or concatenate, whichever ``aqcf_kernels.tuning`` measured
        faster for this call signature (remembered like a conv's choice; the rule, and ``'heuristic'``
        mode, split). Measured on the 3D model (Intel Xeon, 2 threads, eval): concatenating is 26 ms
        slower at 64³ and ~3 ms faster at 32³ and 16³, so no size rule would hold on another machine.
        A signature's first call runs both ways untimed first, so that each way's own conv choices are
        measured before the two are timed against each other."""
        if torch.compiler.is_compiling():  # the rule's way: a measurement is no part of a compiled graph
            return self._folded(inputs, weight, bias, split=True)
        key = _split_signature(conv_and_norm(self)[0], inputs)
        run = {
            SPLIT: lambda: self._folded(inputs, weight, bias, True),
            CONCAT: lambda: self._folded(inputs, weight, bias, False),
        }
        if tuning.measuring() and tuning.can_time(inputs) and tuning.lookup(key) is None and key not in _warmed:
            _warmed.add(key)
            run[CONCAT]()
            return run[SPLIT]()
        choice, output = tuning.choose(key, [SPLIT, CONCAT], SPLIT, lambda c: run[c](), inputs)
        return output if output is not None else run[choice.candidate]()


#: the two ways an inference unit may convolve several inputs (tuning candidates)
SPLIT, CONCAT = tuning.Candidate("unit", "split"), tuning.Candidate("unit", "concatenate")
_warmed: set[str] = set()  # signatures whose two ways have run once (untimed) in this process


def _split_signature(conv: _QuaternionConvNd, inputs: tuple[Tensor, ...]) -> str:
    """What the split-or-concatenate choice is valid for: the inputs (shapes, layout, dtype), the conv's
    geometry and algorithm, where it runs (CPU model, threads)."""
    x = inputs[0]
    where = f"{x.device}:{tuning.fingerprint()['cpu']}:{torch.get_num_threads()}t"
    parts = ";".join(f"{list(t.shape)}/{list(t.stride())}" for t in inputs)
    geometry = f"k{list(conv.kernel_size)}s{list(conv.stride)}p{conv.padding}d{list(conv.dilation)}"
    dtype = str(x.dtype).removeprefix("torch.")
    return f"unit_split|{where}|{dtype}|{parts}|{conv.out_channels}|{geometry}|{conv.algorithm}"


__all__ = ["QuaternionConvNormAct"]

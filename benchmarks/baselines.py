"""Baselines the benchmarks (and the tests) compare this package's layers against.

* ``Expanded*`` convs: a quaternion (transposed) conv computed as
  :func:`aqcf_kernels.reference.quaternion_conv_expanded` on the layer's own weight: Parcollet's
  16-block real weight and one real conv, what every other quaternion library does.
* :func:`use_expanded_convs`: switches a built network (an ``AQCFNet``, an ``AQCFBlock``, ...) over
  to them in place: the "expanded build", same parameters and outputs as the fused one.
* :class:`SpeechbrainStyleRecurrent`: a quaternion RNN / LSTM / LiGRU of ours computed as speechbrain's
  ``q_RNN.py`` computes it (expanded-weight ``QLinear`` rebuilt every time step, composite cell).

They live here, not in :mod:`aqcf_kernels`, because :mod:`aqcf_kernels.reference` is the test
oracle: the library never runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from aqcf_kernels import nn as qnn
from aqcf_kernels import reference
from aqcf_kernels.backends.base import activate
from aqcf_kernels.nn.conv import _QuaternionConvNd


class _ExpandedConvMixin:
    """Runs the conv as ``reference.quaternion_conv_expanded`` on this module's own weight.

    Only the computation changes: parameters, init, state dict and repr are the parent's, so a
    fused and an expanded build with the same weights compute the same function.
    """

    def _conv_forward(
        self,
        input: Tensor,
        output_padding: Sequence[int],
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> Tensor:
        if weight is None:
            weight, bias = self.weight, self.bias
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        y = reference.quaternion_conv_expanded(
            input,
            weight,
            bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            transposed=self.transposed,
            output_padding=output_padding,
        )
        return y if activation is None else activate(y, activation, negative_slope)  # a separate pass


class ExpandedQuaternionConv1d(_ExpandedConvMixin, qnn.QuaternionConv1d):
    """:class:`~aqcf_kernels.nn.QuaternionConv1d` computed with the expanded-weight reference conv."""


class ExpandedQuaternionConv2d(_ExpandedConvMixin, qnn.QuaternionConv2d):
    """:class:`~aqcf_kernels.nn.QuaternionConv2d` computed with the expanded-weight reference conv."""


class ExpandedQuaternionConv3d(_ExpandedConvMixin, qnn.QuaternionConv3d):
    """:class:`~aqcf_kernels.nn.QuaternionConv3d` computed with the expanded-weight reference conv."""


class ExpandedQuaternionConvTranspose1d(_ExpandedConvMixin, qnn.QuaternionConvTranspose1d):
    """:class:`~aqcf_kernels.nn.QuaternionConvTranspose1d` computed with the expanded-weight reference conv."""


class ExpandedQuaternionConvTranspose2d(_ExpandedConvMixin, qnn.QuaternionConvTranspose2d):
    """:class:`~aqcf_kernels.nn.QuaternionConvTranspose2d` computed with the expanded-weight reference conv."""


class ExpandedQuaternionConvTranspose3d(_ExpandedConvMixin, qnn.QuaternionConvTranspose3d):
    """:class:`~aqcf_kernels.nn.QuaternionConvTranspose3d` computed with the expanded-weight reference conv."""


_EXPANDED: dict[type, type] = {
    qnn.QuaternionConv1d: ExpandedQuaternionConv1d,
    qnn.QuaternionConv2d: ExpandedQuaternionConv2d,
    qnn.QuaternionConv3d: ExpandedQuaternionConv3d,
    qnn.QuaternionConvTranspose1d: ExpandedQuaternionConvTranspose1d,
    qnn.QuaternionConvTranspose2d: ExpandedQuaternionConvTranspose2d,
    qnn.QuaternionConvTranspose3d: ExpandedQuaternionConvTranspose3d,
}


def use_expanded_convs(module: nn.Module) -> nn.Module:
    """Make every quaternion (transposed) conv in ``module`` (the A-QCF blocks' projections included)
    compute with the expanded-weight reference conv; returns ``module``, changed in place.

    Each conv's class becomes its ``Expanded*`` subclass, which adds no state: parameters, buffers,
    state-dict keys and the RNG draws of construction stay exactly those of the fused build. A module
    without quaternion convs (e.g. ``AQCFNet(real_valued=True)``) is an error: there is nothing to expand.
    """
    expanded = 0
    for m in module.modules():
        cls = _EXPANDED.get(type(m))
        if cls is not None:
            m.__class__ = cls
        elif isinstance(m, _QuaternionConvNd) and not isinstance(m, _ExpandedConvMixin):
            raise TypeError(f"use_expanded_convs: no expanded-weight version of {type(m).__name__}")
        expanded += isinstance(m, _ExpandedConvMixin)
    if not expanded:
        raise ValueError(
            f"use_expanded_convs: {type(module).__name__} has no quaternion convs to expand "
            "(a real-valued model computes no quaternion products)"
        )
    return module


def use_composite_norms(module: nn.Module) -> nn.Module:
    """Make every quaternion norm in ``module`` compute as the quaternion libraries do: the composite
    PyTorch norm (several passes: mean, centring, squares per component, rsqrt, scale, shift; as
    speechbrain's ``QBatchNorm``), then the activation as a separate pass; and a conv unit given several
    inputs (a decoder's features and skip) convolves their ``qcat``, as code written with those
    libraries does. Returns ``module``, changed in place (no state added)."""
    norms = [m for m in module.modules() if isinstance(m, qnn.norm._QuaternionNorm)]
    if not norms:
        raise ValueError(f"use_composite_norms: {type(module).__name__} has no quaternion norms")
    for m in norms:
        m.fused = False
    for m in module.modules():  # and a U-Net decoder unit concatenates its inputs, then convolves
        if isinstance(m, qnn.QuaternionConvNormAct):
            m.concatenates_inputs = True
    return module


__all__ = [
    "ExpandedQuaternionConv1d",
    "ExpandedQuaternionConv2d",
    "ExpandedQuaternionConv3d",
    "ExpandedQuaternionConvTranspose1d",
    "ExpandedQuaternionConvTranspose2d",
    "ExpandedQuaternionConvTranspose3d",
    "use_composite_norms",
    "use_expanded_convs",
]


# ---------------------------------------------------------------------------------------------
# Recurrent layers the way speechbrain builds them (speechbrain/nnet/quaternion_networks/q_RNN.py)
# ---------------------------------------------------------------------------------------------


def speechbrain_qlinear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """speechbrain's ``QLinear`` forward on our ``(4, out/4, in/4)`` weight: the 4x4 block real matrix
    rebuilt by ``torch.cat`` on EVERY call, then one real matmul (``quaternion_linear_op``)."""
    out = input.matmul(reference.expand_weight(weight).t())
    return out if bias is None else out + bias


def speechbrain_qbatchnorm(x: Tensor, norm: nn.Module) -> Tensor:
    """speechbrain's ``QBatchNorm`` training-mode forward on rows ``(N, C)`` with ``norm``'s γ and β
    (composite: mean, centred squares per component, ``rsqrt``, ``repeat``); running statistics untouched."""
    mu = x.mean(0)
    delta = x - mu
    r, i, j, k = delta.chunk(4, dim=-1)
    var = (r**2 + i**2 + j**2 + k**2).mean(0)
    out = delta * torch.rsqrt(var + norm.eps).repeat(4)
    return norm.weight.repeat(4) * out + norm.bias


class SpeechbrainStyleRecurrent(nn.Module):
    """A :class:`~aqcf_kernels.nn.QuaternionRNN` / ``LSTM`` / ``LiGRU`` of ours, computed as speechbrain's
    ``QRNN`` / ``QLSTM`` / ``QLiGRU`` compute: the baseline of ``aqcf-bench rnn``.

    Same parameters (it holds ``layer``), same function (in training mode; dropout aside): the input
    projection of all steps by :func:`speechbrain_qlinear`, the LiGRU's batch norm by
    :func:`speechbrain_qbatchnorm`, then per time step :func:`speechbrain_qlinear` of the hidden state
    (its expanded weight rebuilt every step, as speechbrain's ``self.u(ht)``) and the composite cell on
    ``gates.chunk(4·G)`` re-concatenated four at a time. Batch-first ``(B, T, F)``, as speechbrain.
    One difference: speechbrain runs the reverse direction in the same batch with the SAME weights; ours
    has weights per direction, so here each direction runs on its own (the benchmark is unidirectional).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if not layer.batch_first:
            raise ValueError("SpeechbrainStyleRecurrent: the layer must be batch_first, as speechbrain's")
        self.layer = layer
        self.mode = {"QuaternionRNN": "rnn", "QuaternionLSTM": "lstm", "QuaternionLiGRU": "ligru"}[type(layer).__name__]

    def _act(self, v: Tensor) -> Tensor:
        nl = self.layer.nonlinearity
        if nl == "leaky_relu":
            return torch.nn.functional.leaky_relu(v, self.layer.negative_slope)
        return torch.tanh(v) if nl == "tanh" else torch.relu(v)

    def _direction(self, sfx: str, x: Tensor, reverse: bool) -> Tensor:
        layer = self.layer
        if reverse:
            x = x.flip(1)
        w = speechbrain_qlinear(x, getattr(layer, f"weight_ih{sfx}"), getattr(layer, f"bias_ih{sfx}", None))
        if self.mode == "ligru" and layer.normalization == "batchnorm":
            w = speechbrain_qbatchnorm(w.reshape(-1, w.shape[-1]), getattr(layer, f"norm{sfx}")).reshape(w.shape)
        w_hh, b_hh = getattr(layer, f"weight_hh{sfx}"), getattr(layer, f"bias_hh{sfx}", None)
        h = c = x.new_zeros(x.shape[0], layer.hidden_size)
        hiddens = []
        for t in range(w.shape[1]):
            gates = w[:, t] + speechbrain_qlinear(h, w_hh, b_hh)
            if self.mode == "rnn":
                h = self._act(gates)
            elif self.mode == "lstm":
                q = gates.chunk(16, 1)
                i, f, o = (torch.sigmoid(torch.cat(q[4 * g : 4 * g + 4], dim=-1)) for g in range(3))
                c = i * torch.tanh(torch.cat(q[12:], dim=-1)) + f * c
                h = o * torch.tanh(c)
            else:
                q = gates.chunk(8, 1)
                z = torch.sigmoid(torch.cat(q[4:], dim=-1))
                h = z * h + (1 - z) * self._act(torch.cat(q[:4], dim=-1))
            hiddens.append(h)
        out = torch.stack(hiddens, dim=1)
        return out.flip(1) if reverse else out

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        """``(output, None)``: the output sequence only (the benchmark's loss reads nothing else)."""
        layer = self.layer
        for lay in range(layer.num_layers):
            outs = [
                self._direction(f"_l{lay}" + ("_reverse" if d else ""), x, d == 1) for d in range(layer.num_directions)
            ]
            x = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return x, None


__all__ += ["SpeechbrainStyleRecurrent", "speechbrain_qlinear", "speechbrain_qbatchnorm"]

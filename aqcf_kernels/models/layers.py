"""The building blocks AQCFNet is made of, in two flavours with one topology.

* ``quaternion`` (the model): :mod:`aqcf_kernels.nn` layers; every conv is the fused
  ``aqcf.qconv`` op.
* ``real`` (the real-valued twin): ``torch.nn`` convs, norms, pools and dropout with the SAME real
  channel counts, so a C -> C conv has C² weights per tap instead of the quaternion conv's C²/4;
  the fusion block is :class:`RealAQCFBlock`.

The expanded-weight build (the benchmarks' baseline) is made from a built model by
``benchmarks.baselines.use_expanded_convs``; the library doesn't know about it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch._prims_common import suggest_memory_format

from .. import nn as qnn
from ..backends.base import activate
from ..nn.unit import conv_and_norm, fold_eval_norm, folds_in_eval
from ..ops.func import transforms_active
from .options import AQCFNetOptions

# ---------------------------------------------------------------------------------------------
# Real convs on oneDNN (the stem and the heads)
# ---------------------------------------------------------------------------------------------


class OneDNNConvMixin:
    """A ``torch.nn`` conv that runs float32 CPU inputs on oneDNN (``aten.mkldnn_convolution``, with
    its autograd) where PyTorch's rule would use its im2col kernel.

    PyTorch's CPU rule sends a conv with one sample, one group, a kernel of at most 3 and
    N·C·S₀·S₁ ≤ 20480 to ``slow_conv2d``/``slow_conv3d`` ("for some case, native is faster"): the
    stem of a batch-1 3D network (one image channel) is such a conv. Measured on an Intel Xeon, 2
    threads, 1×1×64³ → 16, kernel 3: forward 6.6 ms there, 1.4 ms on oneDNN; forward + weight
    gradient 14.5 → 8.5 ms; identical outputs. Everything else (other dtypes and devices, padding
    modes, unbatched input, tracing and export, where the standard op is what should be recorded,
    torch.func's transforms) goes the parent's way. Parameters, state dict and repr are the parent's.
    """

    def _on_onednn(self, input: Tensor, weight: Tensor) -> bool:
        return (
            not torch.compiler.is_compiling()  # first: torch.compile traces no mkldnn.is_available()
            and input.device.type == "cpu"
            and input.dtype == torch.float32
            and input.dim() == weight.dim()  # batched
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and torch.backends.mkldnn.is_available()
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and not transforms_active()  # torch.func batches and differentiates torch's own conv
        )

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self._on_onednn(input, weight):
            return torch.ops.aten.mkldnn_convolution(
                input, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(input, weight, bias)

    def forward(
        self,
        input: Tensor,
        *,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> Tensor:
        """The parent's forward; keyword-only ``weight``/``bias`` replace the module's own for one call
        (a norm folded in: :class:`RealConvNormAct`) and ``activation`` ('relu', 'leaky_relu' with
        ``negative_slope``, 'gelu') is applied to the output, as oneDNN's post-op where the conv runs
        on oneDNN (``mkldnn::_convolution_pointwise``, what Inductor fuses to) and no gradient is needed
        (that op has no autograd formula: through it torch's backward warns and returns none), else after
        it. Called through the module, so its hooks see the call."""
        if weight is None:
            weight, bias = self.weight, self.bias
        if activation is None:
            return self._conv_forward(input, weight, bias)
        if (
            self._on_onednn(input, weight)
            and input.dim() in (4, 5)
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and not _needs_grad(input, weight, bias)
        ):
            scalars = [negative_slope] if activation == "leaky_relu" else []
            algorithm = "none" if activation == "gelu" else None  # gelu's erf form, as F.gelu's default
            return torch.ops.mkldnn._convolution_pointwise(
                input.contiguous(memory_format=suggest_memory_format(input)), weight, bias, list(self.padding),
                list(self.stride), list(self.dilation), self.groups, activation, scalars, algorithm,
            )  # fmt: skip
        return activate(self._conv_forward(input, weight, bias), activation, negative_slope)


def _needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record an op on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Named at module level, as pickle (torch.save of a whole model, deepcopy's fallback, multiprocessing) finds a
# class by its module and name.
class OneDNNConv1d(OneDNNConvMixin, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with :class:`OneDNNConvMixin`."""


class OneDNNConv2d(OneDNNConvMixin, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with :class:`OneDNNConvMixin`."""


class OneDNNConv3d(OneDNNConvMixin, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with :class:`OneDNNConvMixin`."""


ONEDNN_CONVS: tuple[type[nn.Module], ...] = (OneDNNConv1d, OneDNNConv2d, OneDNNConv3d)


class RealConvNormAct(nn.Sequential):
    """The stem of the quaternion flavour: a real conv (:class:`OneDNNConvMixin`) → quaternion norm with
    its fused activation (``self[0]``, ``self[1]``: ``nn.Sequential``'s state-dict keys).

    In eval mode the norm is folded into the conv exactly, as in
    :class:`~aqcf_kernels.nn.QuaternionConvNormAct` (one real scale per quaternion channel, repeated
    over the four blocks of the conv's output channels), and the activation is the conv's oneDNN
    post-op: inference runs one pass over the stem's output instead of three. Measured (Intel Xeon,
    2 threads, 1×1×64³ → 16, channels_last output, eval): 3.2 → 1.5 ms. Training mode runs the two
    modules in turn.
    """

    def __init__(self, conv: OneDNNConvMixin, norm: nn.Module) -> None:
        if not isinstance(conv, OneDNNConvMixin):
            raise TypeError(f"RealConvNormAct: conv must be one of ONEDNN_CONVS, got {type(conv).__name__}")
        if not isinstance(norm, qnn.norm._QuaternionNorm):
            raise TypeError(f"RealConvNormAct: norm must be a quaternion norm, got {type(norm).__name__}")
        super().__init__(conv, norm)

    def forward(self, input: Tensor) -> Tensor:
        conv, norm = conv_and_norm(self)
        if not folds_in_eval(self) or input.dim() != conv.weight.dim():  # (unbatched: the modules decide)
            return super().forward(input)
        weight, bias = fold_eval_norm(conv.weight, conv.bias, norm, real_weight=True)
        return conv(input, weight=weight, bias=bias, activation=norm.activation, negative_slope=norm.negative_slope)


# ---------------------------------------------------------------------------------------------
# Real-valued A-QCF block (the real twin's fusion)
# ---------------------------------------------------------------------------------------------


class RealAQCFBlock(qnn.AQCFBlock):
    """The A-QCF block with real 1×1 projections: the real twin's fusion block.

    Same arguments, attention and gated residual as :class:`~aqcf_kernels.nn.AQCFBlock`; only the
    six quaternion projections become ``torch.nn.Conv1d`` with the same real channel counts (4x the
    weights). The block's head split and ``qcat`` are then fixed channel permutations of real
    features, which a real projection is indifferent to, so the attention is the real-valued
    attention of the same width (a head still owns ``channels / heads`` real channels).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, module in list(self.named_children()):
            if isinstance(module, qnn.QuaternionConv1d):
                w = module.weight
                real = nn.Conv1d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
                setattr(self, name, real.to(device=w.device, dtype=w.dtype))


# ---------------------------------------------------------------------------------------------
# One factory per flavour
# ---------------------------------------------------------------------------------------------


class LayerFactory:
    """Builds AQCFNet's layers for the spatial rank and flavour (quaternion or real) of ``options``.

    Quaternion activations are "split" activations (applied to every real component), as in
    Parcollet's and speechbrain's quaternion networks.
    """

    def __init__(self, options: AQCFNetOptions, device: Any = None, dtype: Any = None) -> None:
        self.options = options
        self.spatial_dims, self.real_valued = options.spatial_dims, options.real_valued
        self.factory = {"device": device, "dtype": dtype}
        # Keyword arguments of every conv and transposed conv of this flavour.
        self.conv_options = self.factory if self.real_valued else {**self.factory, "algorithm": options.algorithm}

    def _pick(self, quaternion: tuple[type, ...], real: tuple[type, ...]) -> type:
        return (real if self.real_valued else quaternion)[self.spatial_dims - 1]

    def stem(self, cin: int, cout: int) -> nn.Sequential:
        """real conv 3 (no bias: the norm's shift replaces it) → norm → activation; in the quaternion
        flavour a :class:`RealConvNormAct` (same children), which folds the norm in eval mode."""
        conv = self.real_conv(cin, cout, 3, padding=1, bias=False)
        if self.real_valued:
            return nn.Sequential(conv, *self.norm_act(cout))
        (norm,) = self.norm_act(cout)
        return RealConvNormAct(conv, norm)

    def real_conv(self, cin: int, cout: int, kernel_size: int, padding: int = 0, bias: bool = True) -> nn.Module:
        """A real conv in both flavours (the stem and the output heads): :class:`OneDNNConvMixin`."""
        cls = ONEDNN_CONVS[self.spatial_dims - 1]
        return cls(cin, cout, kernel_size, padding=padding, bias=bias, **self.factory)

    def conv(
        self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = False
    ) -> nn.Module:
        cls = self._pick(
            (qnn.QuaternionConv1d, qnn.QuaternionConv2d, qnn.QuaternionConv3d), (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        )
        return cls(cin, cout, kernel_size, stride=stride, padding=padding, bias=bias, **self.conv_options)

    def conv_transpose(self, cin: int, cout: int) -> nn.Module:
        """Kernel 2, stride 2: exactly doubles every spatial size."""
        cls = self._pick(
            (qnn.QuaternionConvTranspose1d, qnn.QuaternionConvTranspose2d, qnn.QuaternionConvTranspose3d),
            (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        )
        return cls(cin, cout, 2, stride=2, **self.conv_options)

    def norm(self, channels: int, **fused: Any) -> nn.Module:
        """The norm; ``fused`` (quaternion norms only): ``activation=``, ``negative_slope=``."""
        if self.options.norm == "batch":
            cls = self._pick(
                (qnn.QuaternionBatchNorm1d, qnn.QuaternionBatchNorm2d, qnn.QuaternionBatchNorm3d),
                (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
            )
            return cls(channels, **self.factory, **fused)
        cls = self._pick(
            (qnn.QuaternionInstanceNorm1d, qnn.QuaternionInstanceNorm2d, qnn.QuaternionInstanceNorm3d),
            (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
        )
        # Affine like MONAI's default instance norm, so both norms carry learnable scale and shift.
        return cls(channels, affine=True, **self.factory, **fused)

    def norm_act(self, channels: int) -> list[nn.Module]:
        """norm → activation: one quaternion norm with the activation fused in (``aqcf::qnorm``: one pass
        over the tensor instead of the norm's several plus the activation's), or the real norm and
        activation modules. Either way the norm is the first module, so parameter names don't change."""
        if self.real_valued:
            return [self.norm(channels), self.act()]
        # negative_slope 0.01: nn.LeakyReLU's default, what act() builds
        return [self.norm(channels, activation=self.options.act, negative_slope=0.01)]

    def act(self) -> nn.Module:
        if self.options.act == "relu":
            return nn.ReLU()
        if self.options.act == "leaky_relu":
            return nn.LeakyReLU(0.01)
        return nn.GELU()

    def max_pool(self) -> nn.Module:
        cls = self._pick(
            (qnn.QuaternionMaxPool1d, qnn.QuaternionMaxPool2d, qnn.QuaternionMaxPool3d),
            (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d),
        )
        return cls(2)

    def dropout(self) -> nn.Module:
        p = self.options.dropout
        return nn.Dropout(p) if self.real_valued else qnn.QuaternionDropout(p)

    def fusion(self, channels: int) -> nn.Module:
        cls = RealAQCFBlock if self.real_valued else qnn.AQCFBlock
        o = self.options
        return cls(
            channels, heads=o.heads_at(channels), kv_pool=o.kv_pool, gate=o.gate, algorithm=o.algorithm, **self.factory
        )

    def unit(self, cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        """conv 3 (no bias: the norm's shift replaces it) → norm → activation (:meth:`norm_act`).

        The norm sits between the conv and the activation, so the activation is fused into the norm,
        not the conv; no quaternion conv of the model is followed directly by an activation. In the
        quaternion flavour the unit is a :class:`~aqcf_kernels.nn.QuaternionConvNormAct` (an
        ``nn.Sequential`` with the same children), which folds the norm into the conv in eval mode.
        """
        conv = self.conv(cin, cout, 3, stride=stride, padding=1)
        if self.real_valued:
            return nn.Sequential(conv, *self.norm_act(cout))
        (norm,) = self.norm_act(cout)
        return qnn.QuaternionConvNormAct(conv, norm)

    def conv_block(self, cin: int, cout: int) -> ConvBlock:
        """Two units; dropout (whole quaternions in the quaternion flavour) at the end if ``dropout > 0``."""
        layers = [self.unit(cin, cout), self.unit(cout, cout)]
        if self.options.dropout > 0:
            layers.append(self.dropout())
        return ConvBlock(*layers)


class ConvBlock(nn.Sequential):
    """Its modules in turn, on one input or on the ``qcat`` of several (a decoder's features and skip).

    Several inputs go to a first :class:`~aqcf_kernels.nn.QuaternionConvNormAct` as they are: it
    convolves their concatenation without building it. Any other first module gets the ``qcat``.
    An ``nn.Sequential`` (same children, same state-dict keys), so hooks on the block see one call.
    """

    def forward(self, *inputs: Tensor) -> Tensor:
        first, *rest = self
        if isinstance(first, qnn.QuaternionConvNormAct):
            x = first(*inputs)
        else:
            x = first(inputs[0] if len(inputs) == 1 else qnn.qcat(list(inputs)))
        for module in rest:
            x = module(x)
        return x


__all__ = [
    "ONEDNN_CONVS",
    "ConvBlock",
    "LayerFactory",
    "OneDNNConv1d",
    "OneDNNConv2d",
    "OneDNNConv3d",
    "OneDNNConvMixin",
    "RealAQCFBlock",
]

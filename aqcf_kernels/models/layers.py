"""The building blocks AQCFNet is made of, in three flavours with one topology.

* ``quaternion`` (the model): :mod:`aqcf_kernels.nn` layers; every conv is the fused
  ``aqcf.qconv`` op.
* ``expanded`` (benchmark baseline): the same modules, parameters and state dict, but every
  quaternion (transposed) conv runs :func:`aqcf_kernels.reference.quaternion_conv_expanded` on its
  own weight: Parcollet's 16-block real weight and one real conv, what every other quaternion
  library does. :func:`use_expanded_convs` switches a built model over in place.
* ``real`` (the real-valued twin): ``torch.nn`` convs, norms, pools and dropout with the SAME real
  channel counts, so a C -> C conv has C² weights per tap instead of the quaternion conv's C²/4;
  the fusion block is :class:`RealAQCFBlock`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .. import nn as qnn
from .. import reference
from ..nn.conv import _QuaternionConvNd

# ---------------------------------------------------------------------------------------------
# Expanded-weight reference convs (benchmark baseline)
# ---------------------------------------------------------------------------------------------


class _ExpandedConvMixin:
    """Runs the conv as ``reference.quaternion_conv_expanded`` on this module's own weight.

    Only the computation changes: parameters, init, state dict and repr are the parent's, so a
    fused and an expanded build with the same weights compute the same function.
    """

    def _conv_forward(self, input: Tensor, output_padding: Any) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return reference.quaternion_conv_expanded(
            input,
            self.weight,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            transposed=self.transposed,
            output_padding=output_padding,
        )


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
    state-dict keys and the RNG draws of construction stay exactly those of the fused build.
    """
    for m in module.modules():
        cls = _EXPANDED.get(type(m))
        if cls is not None:
            m.__class__ = cls
        elif isinstance(m, _QuaternionConvNd) and not isinstance(m, _ExpandedConvMixin):
            raise TypeError(f"use_expanded_convs: no expanded-weight version of {type(m).__name__}")
    return module


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

ACTIVATIONS = ("relu", "leaky_relu", "gelu")
NORMS = ("batch", "instance")


class LayerFactory:
    """Builds AQCFNet's layers for one spatial rank and flavour (quaternion or real).

    Quaternion activations are "split" activations (applied to every real component), as in
    Parcollet's and speechbrain's quaternion networks.
    """

    def __init__(
        self,
        spatial_dims: int,
        real_valued: bool,
        norm: str,
        act: str,
        algorithm: str,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        self.spatial_dims, self.real_valued, self.norm_name, self.act_name = spatial_dims, real_valued, norm, act
        self.algorithm = algorithm
        self.factory = {"device": device, "dtype": dtype}

    def _pick(self, quaternion: tuple[type, ...], real: tuple[type, ...]) -> type:
        return (real if self.real_valued else quaternion)[self.spatial_dims - 1]

    def real_conv(self, cin: int, cout: int, kernel_size: int, padding: int = 0, bias: bool = True) -> nn.Module:
        """A real conv in both flavours (the stem and the output heads)."""
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.spatial_dims - 1]
        return cls(cin, cout, kernel_size, padding=padding, bias=bias, **self.factory)

    def conv(
        self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = False
    ) -> nn.Module:
        cls = self._pick(
            (qnn.QuaternionConv1d, qnn.QuaternionConv2d, qnn.QuaternionConv3d), (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        )
        extra = {} if self.real_valued else {"algorithm": self.algorithm}
        return cls(cin, cout, kernel_size, stride=stride, padding=padding, bias=bias, **self.factory, **extra)

    def conv_transpose(self, cin: int, cout: int) -> nn.Module:
        """Kernel 2, stride 2: exactly doubles every spatial size."""
        cls = self._pick(
            (qnn.QuaternionConvTranspose1d, qnn.QuaternionConvTranspose2d, qnn.QuaternionConvTranspose3d),
            (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        )
        extra = {} if self.real_valued else {"algorithm": self.algorithm}
        return cls(cin, cout, 2, stride=2, **self.factory, **extra)

    def norm(self, channels: int) -> nn.Module:
        if self.norm_name == "batch":
            cls = self._pick(
                (qnn.QuaternionBatchNorm1d, qnn.QuaternionBatchNorm2d, qnn.QuaternionBatchNorm3d),
                (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
            )
            return cls(channels, **self.factory)
        cls = self._pick(
            (qnn.QuaternionInstanceNorm1d, qnn.QuaternionInstanceNorm2d, qnn.QuaternionInstanceNorm3d),
            (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
        )
        # Affine like MONAI's default instance norm, so both norms carry learnable scale and shift.
        return cls(channels, affine=True, **self.factory)

    def act(self) -> nn.Module:
        if self.act_name == "relu":
            return nn.ReLU()
        if self.act_name == "leaky_relu":
            return nn.LeakyReLU(0.01)
        return nn.GELU()

    def max_pool(self) -> nn.Module:
        cls = self._pick(
            (qnn.QuaternionMaxPool1d, qnn.QuaternionMaxPool2d, qnn.QuaternionMaxPool3d),
            (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d),
        )
        return cls(2)

    def dropout(self, p: float) -> nn.Module:
        return nn.Dropout(p) if self.real_valued else qnn.QuaternionDropout(p)

    def fusion(self, channels: int, heads: int, kv_pool: int | None, gate: str) -> nn.Module:
        cls = RealAQCFBlock if self.real_valued else qnn.AQCFBlock
        return cls(channels, heads=heads, kv_pool=kv_pool, gate=gate, algorithm=self.algorithm, **self.factory)

    def unit(self, cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        """conv 3 (no bias: the norm's shift replaces it) → norm → activation."""
        return nn.Sequential(self.conv(cin, cout, 3, stride=stride, padding=1), self.norm(cout), self.act())

    def conv_block(self, cin: int, cout: int, dropout: float) -> nn.Sequential:
        """Two units; dropout (whole quaternions in the quaternion flavour) at the end if ``dropout > 0``."""
        layers = [self.unit(cin, cout), self.unit(cout, cout)]
        if dropout > 0:
            layers.append(self.dropout(dropout))
        return nn.Sequential(*layers)


__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "ExpandedQuaternionConv1d",
    "ExpandedQuaternionConv2d",
    "ExpandedQuaternionConv3d",
    "ExpandedQuaternionConvTranspose1d",
    "ExpandedQuaternionConvTranspose2d",
    "ExpandedQuaternionConvTranspose3d",
    "LayerFactory",
    "RealAQCFBlock",
    "use_expanded_convs",
]

"""Baselines the benchmarks (and the tests) compare this package's layers against.

* ``Expanded*`` convs: a quaternion (transposed) conv computed as
  :func:`aqcf_kernels.reference.quaternion_conv_expanded` on the layer's own weight: Parcollet's
  16-block real weight and one real conv, what every other quaternion library does.
* :func:`use_expanded_convs`: switches a built network (an ``AQCFNet``, an ``AQCFBlock``, ...) over
  to them in place: the "expanded build", same parameters and outputs as the fused one.

They live here, not in :mod:`aqcf_kernels`, because :mod:`aqcf_kernels.reference` is the test
oracle: the library never runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from aqcf_kernels import nn as qnn
from aqcf_kernels import reference
from aqcf_kernels.nn.conv import _QuaternionConvNd


class _ExpandedConvMixin:
    """Runs the conv as ``reference.quaternion_conv_expanded`` on this module's own weight.

    Only the computation changes: parameters, init, state dict and repr are the parent's, so a
    fused and an expanded build with the same weights compute the same function.
    """

    def _conv_forward(self, input: Tensor, output_padding: Sequence[int]) -> Tensor:
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


__all__ = [
    "ExpandedQuaternionConv1d",
    "ExpandedQuaternionConv2d",
    "ExpandedQuaternionConv3d",
    "ExpandedQuaternionConvTranspose1d",
    "ExpandedQuaternionConvTranspose2d",
    "ExpandedQuaternionConvTranspose3d",
    "use_expanded_convs",
]

"""Quaternion linear layer with the ``torch.nn.Linear`` signature."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._fx import fx_leaf
from ..functional import quaternion_linear
from ._base import (
    QuaternionModule,
    check_layer_options,
    check_quaternion_channels,
    check_real_dtype,
    check_rotation_options,
)
from .rotation import quaternion_rotation_linear, rotation_channel_blocks


class QuaternionLinear(QuaternionModule):
    """``y = W ⊗ x`` over the last dim (blocked ``[r|i|j|k]``); ``weight`` is ``(4, out/4, in/4)``.

    Arguments as ``torch.nn.Linear`` plus ``algorithm``, ``init`` ('quaternion', 'unitary' or 'random',
    see :func:`aqcf_kernels.nn.init.init_quaternion_`) and ``init_criterion``. Parcollet's
    linear layers store each component as ``(in/4, out/4)``; his state dicts load transposed.

    ``rotation=True`` (with ``quaternion_format`` and ``scale``, as on the conv layers) is Parcollet's
    ``QuaternionLinearAutograd(rotation=True)``: ``y = W ⊗ x ⊗ W⁻¹`` on the pure part, see
    :mod:`aqcf_kernels.nn.rotation`. speechbrain's ``QLinear(spinor=True)`` differs from it: its
    block matrix applies each rotation transposed (the rotation by ``W*``, not ``W``) and it normalises
    by ``|w| + 1e-4`` instead of ``sqrt(|w|² + 1e-4)``; its state dict loads, but computes the rotation
    by the conjugate weight unless the weight's i, j, k components are negated after loading.
    """

    _parcollet_transposed = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        algorithm: str = "auto",
        init_criterion: str = "glorot",
        init: str = "quaternion",
        rotation: bool = False,
        quaternion_format: bool = True,
        scale: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_layer_options(name, algorithm, init_criterion, init)
        check_real_dtype(name, dtype)
        check_rotation_options(name, rotation, quaternion_format, scale, algorithm)
        blocks = rotation_channel_blocks(quaternion_format)
        in_features = check_quaternion_channels(name, "in_features", in_features, blocks=blocks)
        out_features = check_quaternion_channels(name, "out_features", out_features, blocks=blocks)
        self.in_features, self.out_features = in_features, out_features
        self.algorithm, self.init_criterion, self.init = algorithm, init_criterion, init
        self.rotation, self.quaternion_format, self.scale = rotation, quaternion_format, scale
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((4, out_features // blocks, in_features // blocks), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        if scale:
            self.scale_param = nn.Parameter(torch.empty(self.weight.shape[1:], **factory))
        else:
            self.register_parameter("scale_param", None)
        self.reset_parameters()

    @classmethod
    def _args_from_component_shape(cls, shape: torch.Size, kwargs: dict[str, Any]) -> tuple:
        if len(shape) != 2:
            raise ValueError(f"{cls.__name__}.from_components: components must be (out/4, in/4), got {tuple(shape)}")
        blocks = rotation_channel_blocks(kwargs.get("quaternion_format", True))
        return blocks * shape[1], blocks * shape[0]

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        if self.rotation:
            return quaternion_rotation_linear(
                input, self.weight, self.bias, scale=self.scale_param, quaternion_format=self.quaternion_format
            )
        return quaternion_linear(input, self.weight, self.bias, algorithm=self.algorithm)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return s + self._options_repr()

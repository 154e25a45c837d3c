"""Quaternion linear layer with the ``torch.nn.Linear`` signature."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..functional import quaternion_linear
from ._base import QuaternionModule, check_layer_options, check_quaternion_channels


class QuaternionLinear(QuaternionModule):
    """``y = W ⊗ x`` over the last dim (blocked ``[r|i|j|k]``); ``weight`` is ``(4, out/4, in/4)``.

    Arguments as ``torch.nn.Linear`` plus ``algorithm``, ``init`` ('quaternion', 'unitary' or 'random',
    see :func:`aqcf_kernels.nn.init.init_quaternion_`) and ``init_criterion``. Parcollet's
    linear layers store each component as ``(in/4, out/4)``; his state dicts load transposed.
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
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_quaternion_channels(name, "in_features", in_features)
        check_quaternion_channels(name, "out_features", out_features)
        check_layer_options(name, algorithm, init_criterion, init)
        self.in_features, self.out_features = in_features, out_features
        self.algorithm, self.init_criterion, self.init = algorithm, init_criterion, init
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((4, out_features // 4, in_features // 4), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @classmethod
    def _args_from_component_shape(cls, shape: torch.Size, kwargs: dict[str, Any]) -> tuple:
        if len(shape) != 2:
            raise ValueError(f"{cls.__name__}.from_components: components must be (out/4, in/4), got {tuple(shape)}")
        return 4 * shape[1], 4 * shape[0]

    def forward(self, input: Tensor) -> Tensor:
        return quaternion_linear(input, self.weight, self.bias, algorithm=self.algorithm)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.algorithm != "auto":
            s += f", algorithm={self.algorithm!r}"
        if self.init != "quaternion":
            s += f", init={self.init!r}"
        if self.init_criterion != "glorot":
            s += f", init_criterion={self.init_criterion!r}"
        return s

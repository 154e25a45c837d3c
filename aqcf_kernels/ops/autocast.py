"""What ``torch.autocast`` does to the aqcf ops, as it does to aten's.

``aqcf::qconv`` is a convolution and ``aqcf::cross_attention`` an attention: autocast runs them in the
autocast dtype, like aten's convolutions and ``scaled_dot_product_attention`` (the lower-precision lists
of CPU and CUDA autocast), and ``aqcf::gated_residual``, which adds the attention's output to the
features with a float32 parameter, with them. Their floating inputs other than float64 are cast to
``torch.get_autocast_dtype(device)``, then the op runs with autocast off, so the backends see one dtype.
(Before, a bf16 feature map from a real conv met a quaternion conv's float32 weight and failed: so did
A-QCF-Net under ``aqcf-train``'s bf16 autocast.) The casts are differentiable: a parameter's gradient
arrives in its own dtype, as under torch's autocast.

With the compiled extension these kernels are its own (csrc/cpu/autocast.h: the same rule, aten's cast)
for the ops it defines, and the functions here serve only without it (:func:`register`).

The other ops keep their inputs' dtypes, as aten's norms and activations do under autocast. Their
inputs are the outputs of the ops before them, so inside a network they meet the convs' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..params import autocast_casts

#: ops run in the autocast dtype, like aten's convolutions and attention
LOWER_PRECISION = ("qconv", "cross_attention", "gated_residual")
DEVICE_TYPES = ("cpu", "cuda")

_library = torch.library.Library("aqcf", "IMPL")


def _cast(value: Any, device_type: str, dtype: torch.dtype) -> Any:
    """autocast's rule for one argument: floating tensors on the device, float64 excepted, in ``dtype``."""
    eligible = isinstance(value, Tensor) and value.device.type == device_type and autocast_casts(value)
    return value.to(dtype) if eligible else value


def cast_for_transforms(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """autocast's rule for a lower-precision op's arguments, applied by the callers that enter a
    torch.func ``autograd.Function`` (:func:`aqcf_kernels.ops.conv.call_qconv`): functorch runs such a
    Function as a higher-order operator whose autocast keys fall through, so the op inside never met
    its autocast kernel and got the caller's mixed dtypes (a bf16 feature map, a float32 weight).
    The casts are differentiable, so a parameter's gradient arrives in its own dtype."""
    tensor = next((a for a in args if isinstance(a, Tensor)), None)
    if tensor is None or tensor.device.type not in DEVICE_TYPES or not torch.is_autocast_enabled(tensor.device.type):
        return args
    dtype = torch.get_autocast_dtype(tensor.device.type)
    return tuple(_cast(a, tensor.device.type, dtype) for a in args)


def _lower_precision_kernel(op: torch._ops.OpOverload, device_type: str):  # noqa: ANN202
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(_keyset: Any, *args: Any, **kwargs: Any) -> Any:
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(_cast(a, device_type, dtype) for a in args)
        kwargs = {k: _cast(v, device_type, dtype) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args, **kwargs)

    return kernel


def register() -> None:
    """Registers the autocast kernels (once, when :mod:`aqcf_kernels.ops` is imported) the compiled
    extension has not: it registers its own for the ops it defines (csrc/cpu/autocast.h, the same rule
    with aten's cast, which casts a parameter once per autocast region), so those calls pass no Python."""
    for name in LOWER_PRECISION:
        op = getattr(torch.ops.aqcf, name).default
        for device_type in DEVICE_TYPES:
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aqcf::{name}", key):
                _library.impl(name, _lower_precision_kernel(op, device_type), key, with_keyset=True)

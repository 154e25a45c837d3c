"""Backend registry: who computes a quaternion conv on which device, and why not otherwise.

A backend implements two functions over resolved arguments (see :class:`Backend`) and says,
for any call, either ``None`` (it can serve) or a short reason it cannot. Selection: an explicit
``AQCF_BACKEND`` wins (and is an error if that backend cannot serve); otherwise the first backend
in the device's priority list that can serve.
"""

from __future__ import annotations

import os
from typing import Protocol

from torch import Tensor

from ..params import ConvParams


class Backend(Protocol):
    name: str
    #: device types this backend can ever serve ("cpu", "cuda", ...)
    device_types: tuple[str, ...]

    def unavailable(self) -> str | None:
        """Why this backend cannot run at all on this machine (``None`` if it can)."""

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        """Why this backend cannot run this particular call (``None`` if it can)."""

    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, params: ConvParams, algorithm: str) -> Tensor:
        """``y = W ⊗ x`` (or its transposed conv); ``algorithm`` is 'hamilton' or 'fast8'."""

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], params: ConvParams, algorithm: str
    ) -> Tensor:
        """Gradient of ``<grad_output, conv(input, W)>`` with respect to W."""


_REGISTRY: dict[str, Backend] = {}
# Priority per device type; GPU backends insert themselves in front of "torch".
PRIORITY: dict[str, list[str]] = {"cpu": ["cpp", "torch"], "cuda": ["triton", "cuda", "torch"]}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def registered() -> dict[str, Backend]:
    return dict(_REGISTRY)


class BackendError(RuntimeError):
    pass


def _reason(backend: Backend, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
    if input.device.type not in backend.device_types:
        return f"does not run on {input.device.type} tensors (serves {', '.join(backend.device_types)})"
    return backend.unavailable() or backend.cannot_serve(input, weight, params, algorithm)


def select(input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> Backend:
    forced = os.environ.get("AQCF_BACKEND", "").strip()
    if forced and forced != "auto":
        backend = _REGISTRY.get(forced)
        if backend is None:
            raise BackendError(f"AQCF_BACKEND={forced!r} is not a backend; known: {sorted(_REGISTRY)}")
        why = _reason(backend, input, weight, params, algorithm)
        if why:
            raise BackendError(f"AQCF_BACKEND={forced!r} cannot serve this call: {why}")
        return backend
    reasons = []
    for name in PRIORITY.get(input.device.type, []) + ["torch"]:
        backend = _REGISTRY.get(name)
        if backend is None:
            continue
        why = _reason(backend, input, weight, params, algorithm)
        if why is None:
            return backend
        reasons.append(f"{name}: {why}")
    raise BackendError(f"no backend serves {input.device.type} tensors: " + "; ".join(reasons))


def backends() -> str:
    """A table of every registered backend: devices, and why it is unavailable (if it is)."""
    rows = ["backend  devices     status", "-------  ----------  ------"]
    for name, backend in _REGISTRY.items():
        why = backend.unavailable()
        rows.append(f"{name:<8} {','.join(backend.device_types):<11} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(rows)


def _register_builtin() -> None:
    from . import cpp, torch_impl

    register(torch_impl.TorchBackend())
    register(cpp.CppBackend())


_register_builtin()

"""Backend registry: who computes a quaternion conv on which device, and why not otherwise.

A backend implements two functions over resolved arguments (see :class:`Backend`) and says,
for any call, either ``None`` (it can serve) or a short reason it cannot. Selection: an explicit
``AQCF_BACKEND`` wins (and is an error if that backend cannot serve); otherwise the first backend
in the device's priority list that can serve.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
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


_USE: list[str] = []  # stack of `use(...)` overrides; a module global, not a context variable,
# because autograd runs CUDA backward on its own threads


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Force backend ``name`` inside the block (over ``AQCF_BACKEND``); same errors if it can't serve."""
    if name not in _REGISTRY:
        raise BackendError(f"{name!r} is not a backend; known: {sorted(_REGISTRY)}")
    _USE.append(name)
    try:
        yield
    finally:
        _USE.pop()


def select(input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> Backend:
    forced = _USE[-1] if _USE else os.environ.get("AQCF_BACKEND", "").strip()
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


@dataclass(frozen=True)
class BackendStatus:
    name: str
    device_types: tuple[str, ...]
    reason: str | None  # why unavailable on this machine; None if available

    @property
    def available(self) -> bool:
        return self.reason is None


class BackendTable(list):
    """What :func:`backends` returns: a list of :class:`BackendStatus` that prints as a table."""

    def __repr__(self) -> str:
        rows = ["backend  devices            status", "-------  -----------------  ------"]
        for s in self:
            status = "available" if s.available else f"unavailable: {s.reason}"
            rows.append(f"{s.name:<8} {','.join(s.device_types):<18} {status}")
        return "\n".join(rows)

    __str__ = __repr__


def backends() -> BackendTable:
    """Every registered backend, the devices it serves and why it is unavailable (if it is)."""
    return BackendTable(BackendStatus(n, b.device_types, b.unavailable()) for n, b in _REGISTRY.items())


class _CallableModule(types.ModuleType):
    # `aqcf_kernels.backends()` prints the table while `aqcf_kernels.backends.select` etc. stay
    # reachable: the package and the function users call share one name.
    def __call__(self) -> BackendTable:
        return backends()


sys.modules[__name__].__class__ = _CallableModule


def _register_builtin() -> None:
    from ..triton.conv import TritonBackend
    from . import cpp, cuda, torch_impl

    register(torch_impl.TorchBackend())
    register(cpp.CppBackend())
    register(cuda.CudaBackend())
    register(TritonBackend())


_register_builtin()

"""Backend registry: who computes each op family on which device, and why not otherwise.

Two op families have backends: the quaternion conv (``conv``; see :class:`Backend`) and the
A-QCF attention (``attention``: the cross-attention and the gated residual, see
``aqcf_kernels.ops.attention``). A backend says, for any call, either ``None`` (it can serve) or a
short reason it cannot. Selection: an explicit ``AQCF_BACKEND`` (or :func:`use`) wins and is an
error if that backend cannot serve; a family with no backend of that name (``cpp`` has no
attention kernel) selects as if nothing were forced. Otherwise the first backend in the device's
priority list that can serve.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Callable, Iterator
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


class Family:
    """The backends of one op family and their priority per device type."""

    def __init__(self, name: str, priority: dict[str, list[str]]) -> None:
        self.name = name
        self.backends: dict[str, object] = {}
        self.priority = priority


# On CUDA the composite backend comes first: cuDNN on the expanded weight beat the fused Triton and
# CUDA kernels in every case measured on an H100 and an H200 (benchmarks/results/*-gpu-*), by 2.5x
# and more. Those two serve when forced (AQCF_BACKEND / use()).
CONV = Family("conv", {"cpu": ["cpp", "torch"], "cuda": ["torch", "triton", "cuda"]})
ATTENTION = Family("attention", {"cpu": ["torch"], "cuda": ["triton", "torch"]})
FAMILIES = {f.name: f for f in (CONV, ATTENTION)}
# The conv family's tables under their historical names (tests patch them).
_REGISTRY = CONV.backends
PRIORITY = CONV.priority


def register(backend: object, family: str = "conv") -> None:
    FAMILIES[family].backends[backend.name] = backend


def registered(family: str = "conv") -> dict:
    return dict(FAMILIES[family].backends)


class BackendError(RuntimeError):
    pass


_USE: list[str] = []  # stack of `use(...)` overrides; a module global, not a context variable,
# because autograd runs CUDA backward on its own threads


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Force backend ``name`` inside the block (over ``AQCF_BACKEND``); same errors if it can't serve."""
    if not any(name in f.backends for f in FAMILIES.values()):
        raise BackendError(f"{name!r} is not a backend; known: {_known()}")
    _USE.append(name)
    try:
        yield
    finally:
        _USE.pop()


def _known() -> list[str]:
    return sorted({n for f in FAMILIES.values() for n in f.backends})


def select_in(family: Family, device_type: str, why_not: Callable[[object], str | None]) -> object:
    """The backend of ``family`` for a call on ``device_type``; ``why_not(b)`` is b's own refusal."""

    def reason(backend) -> str | None:
        if device_type not in backend.device_types:
            return f"does not run on {device_type} tensors (serves {', '.join(backend.device_types)})"
        return backend.unavailable() or why_not(backend)

    forced = _USE[-1] if _USE else os.environ.get("AQCF_BACKEND", "").strip()
    if forced and forced != "auto":
        if not any(forced in f.backends for f in FAMILIES.values()):
            raise BackendError(f"AQCF_BACKEND={forced!r} is not a backend; known: {_known()}")
        backend = family.backends.get(forced)
        if backend is not None:
            why = reason(backend)
            if why:
                raise BackendError(f"AQCF_BACKEND={forced!r} cannot serve this call: {why}")
            return backend
    reasons = []
    for name in family.priority.get(device_type, []) + ["torch"]:
        backend = family.backends.get(name)
        if backend is None:
            continue
        why = reason(backend)
        if why is None:
            return backend
        reasons.append(f"{name}: {why}")
    raise BackendError(f"no {family.name} backend serves {device_type} tensors: " + "; ".join(reasons))


def select(input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> Backend:
    """The conv backend for this call."""
    return select_in(CONV, input.device.type, lambda b: b.cannot_serve(input, weight, params, algorithm))


@dataclass(frozen=True)
class BackendStatus:
    family: str
    name: str
    device_types: tuple[str, ...]
    reason: str | None  # why unavailable on this machine; None if available

    @property
    def available(self) -> bool:
        return self.reason is None


class BackendTable(list):
    """What :func:`backends` returns: a list of :class:`BackendStatus` that prints as a table."""

    def __repr__(self) -> str:
        rows = ["backend  family     devices            status", "-------  ---------  -----------------  ------"]
        for s in self:
            status = "available" if s.available else f"unavailable: {s.reason}"
            rows.append(f"{s.name:<8} {s.family:<10} {','.join(s.device_types):<18} {status}")
        return "\n".join(rows)

    __str__ = __repr__


def backends() -> BackendTable:
    """Every registered backend per op family, the devices it serves and why it is unavailable (if it is)."""
    return BackendTable(
        BackendStatus(f.name, n, b.device_types, b.unavailable())
        for f in FAMILIES.values()
        for n, b in f.backends.items()
    )


class _CallableModule(types.ModuleType):
    # `aqcf_kernels.backends()` prints the table while `aqcf_kernels.backends.select` etc. stay
    # reachable: the package and the function users call share one name.
    def __call__(self) -> BackendTable:
        return backends()


sys.modules[__name__].__class__ = _CallableModule


def _register_builtin() -> None:
    from ..triton.attention import TritonAttentionBackend
    from ..triton.conv import TritonBackend
    from . import cpp, cuda, torch_attention, torch_impl

    register(torch_impl.TorchBackend())
    register(cpp.CppBackend())
    register(cuda.CudaBackend())
    register(TritonBackend())
    register(torch_attention.TorchAttentionBackend(), family="attention")
    register(TritonAttentionBackend(), family="attention")


_register_builtin()

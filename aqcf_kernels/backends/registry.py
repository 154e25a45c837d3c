"""The backend registry: who computes each op family on which device, and why not otherwise.

Two op families have backends, each with its Protocol (``base.py``): the quaternion conv
(:data:`CONV`, :class:`~aqcf_kernels.backends.base.ConvBackend`) and the A-QCF attention
(:data:`ATTENTION`, :class:`~aqcf_kernels.backends.base.AttentionBackend`). Backends register
themselves (:func:`register`, called by each backend package's ``__init__``); :func:`discover` imports
every backend package.

Selection: an explicit ``AQCF_BACKEND`` (or :func:`use`) wins and is an error if that backend cannot
serve — never a silent fallback; a family with no backend of that name (``cpp`` has no attention
kernel) selects as if nothing were forced. Otherwise the backends in the device's priority list
(then ``torch``, which runs anywhere) that can serve, in that order. A registered backend that is in
no priority list serves only when forced.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

from .. import tuning
from ..params import ConvParams
from . import policy
from ._extension import announce_forced_backend, forget_native_choices
from .base import CONV_KINDS, AttentionBackend, Backend, ConvBackend, ConvKind, contract_algorithms, protocol_members

B = TypeVar("B", bound=Backend)


class BackendError(RuntimeError):
    pass


def forget_choices() -> None:
    """Drop what was derived from the registry, the forced backend and the tuning settings: the candidates
    of each call signature (:func:`resolve_conv`) and the choices the compiled extension serves itself."""
    _CONV_CANDIDATES.clear()
    forget_native_choices()


class _Announced(dict):
    """A dict whose item changes (``register``, tests' ``monkeypatch.setitem``) drop the remembered
    candidates and choices (:func:`forget_choices`): they were made with the old contents."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        forget_choices()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        forget_choices()


class Family(Generic[B]):
    """The backends of one op family, the Protocol they implement, and their priority per device type."""

    def __init__(self, name: str, protocol: type[B], priority: dict[str, list[str]]) -> None:
        self.name = name
        self.protocol = protocol
        self.backends: dict[str, B] = _Announced()
        #: device type -> backend names, most preferred first (the order measured to be fastest); replace
        #: a device's list rather than editing it in place, so remembered choices are dropped
        self.priority: dict[str, list[str]] = _Announced(priority)


# On CUDA cuDNN on the expanded weight comes first: it beat the fused Triton kernels in every case measured
# on an H100 and an H200 (benchmarks/results/*-gpu-*), by 1.5x and more; Triton serves when forced
# (AQCF_BACKEND / use()). Of the two backends that run it, ``cuda`` (the extension's ATen path) leads:
# its remembered signatures are served by the extension's CUDA kernels without Python (the ``torch``
# backend's Python path cost ~110-160 µs of host time a fwd+bwd, more than a small layer's device time),
# and a measured tie (the same cuDNN conv) goes to the first. ``torch`` serves where the extension is
# not built. On the CPU, ``cpp_cl`` (the same
# engine on channels_last copies) and ``cpp_im2col`` (the same engine on PyTorch's own real-conv kernels)
# are candidates ``auto`` measures, never the rule's pick. Ranking
# backends against each other is a measured, cross-backend decision, so it lives here and not in
# each backend.
CONV: Family[ConvBackend] = Family(
    "conv", ConvBackend, {"cpu": ["cpp", "cpp_cl", "cpp_im2col", "torch"], "cuda": ["cuda", "torch", "triton"]}
)
# Attention on CUDA: ``torch`` first, since it calls the kernels SDPA itself runs (flash, memory-efficient);
# the Triton attention kernels measured 0.35-0.68x of the SDPA-composed block on an H200 (issue 13), so
# they serve when forced until a GPU run shows them at least as fast.
ATTENTION: Family[AttentionBackend] = Family(
    "attention", AttentionBackend, {"cpu": ["torch"], "cuda": ["torch", "triton"]}
)
FAMILIES: dict[str, Family] = {f.name: f for f in (CONV, ATTENTION)}
tuning.on_change(forget_choices)
#: The backend tried last on every device (after the device's priority list): it runs anywhere.
FALLBACK = "torch"


def register(backend: Backend, family: str = "conv") -> None:
    """Add ``backend`` to ``family`` ('conv' or 'attention'), replacing a backend of the same name.

    A backend missing a member of the family's Protocol is refused here, at import, rather than
    failing on its first call.
    """
    fam = FAMILIES[family]
    missing = sorted(m for m in protocol_members(fam.protocol) if not hasattr(backend, m))
    if missing:
        raise TypeError(f"{backend!r} is not a {family} backend ({fam.protocol.__name__}): missing {missing}")
    fam.backends[backend.name] = backend


def registered(family: str = "conv") -> dict[str, Backend]:
    return dict(FAMILIES[family].backends)


def discover(package: str, path: Iterable[str]) -> None:
    """Import every backend package under ``path`` (the sub-packages of ``package`` whose names do
    not start with ``_``); each registers its backends when imported."""
    for module in pkgutil.iter_modules(path):
        if module.ispkg and not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")


# ----------------------------------------------------------------------------------------------
# Forcing a backend
# ----------------------------------------------------------------------------------------------

_USE: list[str] = []  # stack of `use(...)` overrides; a module global, not a context variable,
# because autograd runs CUDA backward on its own threads


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Force backend ``name`` inside the block (over ``AQCF_BACKEND``); same errors if it can't serve.

    What was chosen inside is kept for the next time the same backend is forced, and what was chosen
    outside for after the block: the candidates of a call are cached per forced backend, and the
    compiled extension puts the forced backend in every signature it remembers
    (:func:`~aqcf_kernels.backends._extension.announce_forced_backend`). So ``use`` may be entered
    around every step of a loop without sending each call back through Python's selection.
    """
    if not any(name in f.backends for f in FAMILIES.values()):
        raise BackendError(f"{name!r} is not a backend; known: {_known()}")
    _USE.append(name)
    _announce_use()
    try:
        yield
    finally:
        _USE.pop()
        _announce_use()


def _announce_use() -> None:
    """Tell the compiled extension which backend :func:`use` forces now; an extension that cannot be
    told (built before it could) forgets its choices instead, as every entry and exit once did."""
    if not announce_forced_backend(_USE[-1] if _USE else ""):
        forget_choices()


def _known() -> list[str]:
    return sorted({n for f in FAMILIES.values() for n in f.backends})


def forced() -> str | None:
    """The backend forced by :func:`use` or ``AQCF_BACKEND`` (``None``: the registry chooses)."""
    name = _USE[-1] if _USE else os.environ.get("AQCF_BACKEND", "").strip()
    if not name or name == "auto":
        return None
    if not any(name in f.backends for f in FAMILIES.values()):
        raise BackendError(f"AQCF_BACKEND={name!r} is not a backend; known: {_known()}")
    return name


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def serving(family: Family[B], device_type: str, why_not: Callable[[B], str | None]) -> Iterator[B]:
    """The backends of ``family`` that can serve a call on ``device_type``, in selection order.

    ``why_not(b)`` is b's own refusal of this call. Lazy: the first one costs only the checks of the
    backends before it. Raises :class:`BackendError` (with every backend's reason) if none can serve.
    """

    def reason(backend: B) -> str | None:
        if device_type not in backend.device_types:
            return f"does not run on {device_type} tensors (serves {', '.join(backend.device_types)})"
        return backend.unavailable() or why_not(backend)

    name = forced()
    if name is not None and name in family.backends:
        why = reason(family.backends[name])
        if why:
            raise BackendError(f"AQCF_BACKEND={name!r} cannot serve this call: {why}")
        yield family.backends[name]
        return
    reasons, served = [], False
    for name in dict.fromkeys([*family.priority.get(device_type, []), FALLBACK]):
        backend = family.backends.get(name)
        if backend is None:
            continue
        why = reason(backend)
        if why is None:
            served = True
            yield backend
        else:
            reasons.append(f"{name}: {why}")
    if not served:
        raise BackendError(f"no {family.name} backend serves {device_type} tensors: " + "; ".join(reasons))


def select_in(family: Family[B], device_type: str, why_not: Callable[[B], str | None]) -> B:
    """The backend of ``family`` for a call on ``device_type``: the first that can serve it."""
    return next(serving(family, device_type, why_not))


def resolve_conv(
    input: Tensor,
    weight: Tensor,
    params: ConvParams,
    algorithm: str,
    kind: ConvKind,
    run: policy.RunConv | None = None,
) -> tuple[ConvBackend, str, Tensor | None, bool]:
    """The conv backend and the algorithm (never 'auto') that run this call, maybe its result, and
    whether that pair is final for the call's signature (see :func:`policy.choose_conv`).

    ``algorithm`` is the caller's: 'hamilton', 'fast8' or 'auto'. The candidates are every
    (backend, algorithm) pair that can serve the call — backends as :func:`serving` orders them,
    algorithms from :meth:`ConvBackend.algorithms` within :func:`contract_algorithms` for 'auto' — and
    :func:`policy.choose_conv` picks among them, measuring when it is given ``run`` (which computes the
    call with one pair); a measured call's result is the third value (``None`` otherwise: run the pair yourself).
    ``kind`` says which computation of a conv this call is (forward, input gradient, weight
    gradient; for the weight gradient ``weight`` is a stand-in of its shape).
    """
    if kind not in CONV_KINDS:
        raise ValueError(f"kind must be one of {CONV_KINDS}, got {kind!r}")
    key = _candidates_key(input, weight, params, algorithm, kind)
    candidates = _CONV_CANDIDATES.get(key) if key is not None else None
    if candidates is None:
        candidates = _conv_candidates(input, weight, params, algorithm, kind)
        if key is not None:
            if len(_CONV_CANDIDATES) >= 4096:
                _CONV_CANDIDATES.clear()
            _CONV_CANDIDATES[key] = candidates
    if len(candidates) == 1:  # forced backend and algorithm: nothing to choose
        return (*candidates[0], None, True)
    return policy.choose_conv(input.device.type, candidates, input, weight, params, kind, run)


#: resolve_conv's candidates per call signature: listing them asks every backend (availability, refusals,
#: the accuracy contract), ~13 µs of host time a call on CPU with the cpp, cpp_cl and torch backends, three
#: calls a training step of each conv. Dropped by :func:`forget_choices`.
_CONV_CANDIDATES: dict[tuple, list[tuple[ConvBackend, str]]] = {}


def candidates_read_the_data(input: Tensor, algorithm: str) -> bool:
    """Whether the algorithms on offer for a call depend on its data, not only on what a signature holds: ``auto`` in
    half precision under ``tuning.half_fast8 = 'balanced'`` offers fast8 only where the components' balance guard
    passes (:func:`~aqcf_kernels.tuning.half_fast8_allowed`). Such a call's choice is neither cached here nor served
    by the extension for later calls of the signature."""
    return algorithm == "auto" and tuning.half_fast8 == "balanced" and input.dtype not in (torch.float32, torch.float64)


def _candidates_key(input: Tensor, weight: Tensor, params: ConvParams, algorithm: str, kind: ConvKind) -> tuple | None:
    """What the candidates of a call depend on, or None where they also depend on the data (the balance
    guard of fast8 in half precision, :func:`~aqcf_kernels.tuning.half_fast8_allowed`) or the sizes are
    symbolic (unhashable). Everything else a backend's refusal reads is in it: the device, dtype, shape
    and strides (the memory format), the weight's shape and the geometry; and the forced backend."""
    if candidates_read_the_data(input, algorithm):
        return None
    key = (kind, algorithm, forced(), input.device, input.dtype, input.shape, input.stride(), weight.shape, params)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _conv_candidates(
    input: Tensor, weight: Tensor, params: ConvParams, algorithm: str, kind: ConvKind
) -> list[tuple[ConvBackend, str]]:
    """Every (backend, algorithm) pair that can serve the call, in preference order (see :func:`resolve_conv`)."""
    offered: dict[str, list[str]] = {}  # backend name -> the algorithms it serves for this call
    # The contract is the call's, read once whatever the backends on offer (a weight gradient's "weight" is
    # a stand-in of the shape, no data).
    allowed = contract_algorithms(input, None if kind == "weight_grad" else weight) if algorithm == "auto" else ()

    def why_not(backend: ConvBackend) -> str | None:
        wanted = [a for a in backend.algorithms(input) if a in allowed] if algorithm == "auto" else (algorithm,)
        refusals = {a: backend.cannot_serve(input, weight, params, a) for a in wanted}
        offered[backend.name] = [a for a, why in refusals.items() if why is None]
        if offered[backend.name]:
            return None
        return "; ".join(dict.fromkeys(why for why in refusals.values() if why))

    return [(b, a) for b in serving(CONV, input.device.type, why_not) for a in offered[b.name]]


def select(input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> ConvBackend:
    """The conv backend that runs ``qconv(input, weight)`` with ``algorithm`` (see :func:`resolve_conv`)."""
    return resolve_conv(input, weight, params, algorithm, "forward")[0]


# ----------------------------------------------------------------------------------------------
# The table `aqcf_kernels.backends()` prints
# ----------------------------------------------------------------------------------------------


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
        width = max([len("backend"), *(len(s.name) for s in self)])
        rows = [f"{'backend':<{width}}  family     devices            status"]
        rows.append(f"{'-' * width}  ---------  -----------------  ------")
        for s in self:
            status = "available" if s.available else f"unavailable: {s.reason}"
            rows.append(f"{s.name:<{width}}  {s.family:<10} {','.join(s.device_types):<18} {status}")
        return "\n".join(rows)

    __str__ = __repr__


def backends() -> BackendTable:
    """Every registered backend per op family, the devices it serves and why it is unavailable (if it is)."""
    return BackendTable(
        BackendStatus(f.name, n, b.device_types, b.unavailable())
        for f in FAMILIES.values()
        for n, b in f.backends.items()
    )

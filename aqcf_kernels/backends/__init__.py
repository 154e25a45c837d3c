"""Backends: who computes each op family on which device, and why not otherwise.

Every sub-package here is one backend (``torch/``, ``cpp/``, ``cuda/``, ``triton/``): it implements
the Protocols of ``base.py`` and registers itself when imported; this package imports them all
(:func:`~aqcf_kernels.backends.registry.discover`). ``README.md`` next to this file is the recipe for
adding one. Selection and the table of backends live in ``registry.py``; the rule that turns
``algorithm='auto'`` into an algorithm in ``policy.py``.

``aqcf_kernels.backends()`` prints every backend with the reason it is unavailable, if it is.
"""

from __future__ import annotations

import sys
import types

from .base import AttentionBackend, Backend, ConvBackend, ConvKind
from .registry import (
    ATTENTION,
    CONV,
    FAMILIES,
    BackendError,
    BackendStatus,
    BackendTable,
    Family,
    backends,
    discover,
    forced,
    register,
    registered,
    resolve_conv,
    select,
    select_in,
    serving,
    use,
)

# The conv family's priority table under its historical name (tests patch it).
PRIORITY = CONV.priority

__all__ = [
    "ATTENTION",
    "CONV",
    "FAMILIES",
    "PRIORITY",
    "AttentionBackend",
    "Backend",
    "BackendError",
    "BackendStatus",
    "BackendTable",
    "ConvBackend",
    "ConvKind",
    "Family",
    "backends",
    "forced",
    "register",
    "registered",
    "resolve_conv",
    "select",
    "select_in",
    "serving",
    "use",
]


class _CallableModule(types.ModuleType):
    # `aqcf_kernels.backends()` prints the table while `aqcf_kernels.backends.select` etc. stay
    # reachable: the package and the function users call share one name.
    def __call__(self) -> BackendTable:
        return backends()


sys.modules[__name__].__class__ = _CallableModule

# Last, once the registry exists: each backend package registers itself on import. (Importing them
# binds the names `torch`, `triton`, ... in this namespace to those packages: nothing here may use
# the libraries of the same names.)
discover(__name__, __path__)

"""The compiled extension ``aqcf_kernels._C``, shared by the ``cpp`` and ``cuda`` backends and by the
native definitions of the conv ops (csrc/cpu/op.cpp).

Imported once; when it is missing (not built) both backends report the same reason and the conv ops
are defined in Python (aqcf_kernels/ops/conv.py). ``AQCF_NO_EXTENSION=1`` ignores a built extension,
so that path can be tested on a machine that has one.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType

import torch

_C: ModuleType | None = None
IMPORT_ERROR: str | None = None
if os.environ.get("AQCF_NO_EXTENSION", "").strip() == "1":
    IMPORT_ERROR = "extension aqcf_kernels._C ignored (AQCF_NO_EXTENSION=1)"
else:
    try:
        _C = importlib.import_module("aqcf_kernels._C")
    except ImportError as e:  # not built: `pip install -e . --no-build-isolation` (or `make ext`) builds it
        IMPORT_ERROR = f"extension aqcf_kernels._C not importable ({e}); build it with `make ext`"


#: the devices the extension's op kernels are registered for (they serve remembered signatures, ask Python
#: for the rest); other devices always run the Python implementations
NATIVE_DEVICES = ("cpu", "cuda")


def forget_native_choices() -> None:
    """Drop the choices the extension serves without asking Python (see csrc/cpu/op.h and
    attention_op.h): something that decides them changed (a backend registered or forced, the
    priorities, the tuning mode or memory)."""
    if _C is not None:
        _C._forget_conv_choices()
        for forget in ("_forget_attention_choices", "_forget_norm_choices"):  # (an extension built before them)
            if hasattr(_C, forget):
                getattr(_C, forget)()


def announce_forced_backend(name: str) -> bool:
    """Tell the extension the backend ``aqcf_kernels.backends.use`` forces now (``''``: none), which it puts
    in every signature it remembers (csrc/cpu/choices.h). False where it cannot be told: no extension, or
    one built before it could."""
    if _C is None or not hasattr(_C, "_set_forced_backend"):
        return _C is None  # (nothing is remembered without an extension)
    _C._set_forced_backend(name)
    return True


def define_ops(
    ops: Iterable[tuple[str, Callable, Callable]],
    native: bool,
    autograd: Mapping[str, tuple[Callable, Callable]] = {},  # noqa: B006 (read only)
) -> None:
    """The Python side of the ops ``ops``, each ``(name, implementation, fake)``.

    ``native`` (the extension defines them, with its own autograd): each Python implementation serves the
    devices the extension has no kernel for (its kernels ask it first for the others), and its fake
    implementation the meta tensors of tracing. Otherwise each is a ``torch.library.custom_op`` with its
    fake and, where ``autograd`` names it, its ``(backward, setup_context)``.
    """
    for name, impl, fake in ops:
        if native:
            torch.library.impl(name, "CompositeExplicitAutograd", impl)
            torch.library.register_fake(name, fake)
            continue
        op = torch.library.custom_op(name, impl, mutates_args=())
        op.register_fake(fake)
        if name in autograd:
            backward, setup_context = autograd[name]
            op.register_autograd(backward, setup_context=setup_context)

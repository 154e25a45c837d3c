"""The Triton kernels' alignment hints, checked where the interpreter runs them.

``tl.multiple_of(x, A)`` tells the compiler that every element of ``x`` is a multiple of ``A`` (with no
``tl.max_contiguous`` claim, every element is its own contiguous group); the compiler then issues
vectorised, 16-byte copies. A false claim is silent on a GPU: misaligned addresses or wrong data. The
interpreter, which runs every kernel of the suite on CPU tensors, ignores the hint (it only records it
on the value), so a wrong hint would pass every test. :func:`install` makes the interpreter check each
such claim on the values it is given and fail the test that made a false one.
"""

from __future__ import annotations

import numpy as np

#: the attribute ``tl.multiple_of`` sets (``tl.max_contiguous`` sets ``tt.contiguity``)
DIVISIBILITY = "tt.divisibility"


class FalseAlignmentHint(AssertionError):
    """A ``tl.multiple_of`` claim that the values do not satisfy."""


def check_divisibility(data: np.ndarray, values: list[int]) -> None:
    """Raise :class:`FalseAlignmentHint` unless every element of ``data`` is a multiple of every one of
    ``values`` (one per dimension, as ``tl.multiple_of`` takes them)."""
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.integer):
        return  # a hint on a float (a no-op for the compiler too)
    for value in values:
        bad = data % value != 0
        if bad.any():
            first = data.reshape(-1)[int(np.argmax(bad.reshape(-1)))]
            raise FalseAlignmentHint(
                f"tl.multiple_of(..., {value}) is false: {int(bad.sum())} of {data.size} values are not "
                f"multiples, e.g. {int(first)} (the compiler would vectorise copies on that claim)"
            )


def install() -> bool:
    """Wrap the interpreter's ``TensorHandle.set_attr`` so that every ``tl.multiple_of`` is checked.
    Returns False where triton (or its interpreter) is not there."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    handle = interpreter.TensorHandle
    if getattr(handle.set_attr, "checks_hints", False):
        return True
    original = handle.set_attr

    def set_attr(self, key, value):
        if key == DIVISIBILITY:
            check_divisibility(self.data, list(value))
        return original(self, key, value)

    set_attr.checks_hints = True
    handle.set_attr = set_attr
    return True

"""How the Triton kernels address quaternion channels, shared by the implicit GEMMs and fast8's pre-pass: a
channel run's alignment said to the compiler, and a quaternion component picked at compile time.

Launch-time specialisation tells the compiler of an integer argument only whether it is divisible by 16 (or
equal to 1). A channel run whose length is a multiple of 8 but not of 16 (40 quaternion channels, runs of
24) starts 16-byte aligned in half precision without the compiler's knowing, and it then copies 2 bytes at a
time: no ``cp.async`` in the GEMMs' K loops, scalar loads in the pre-pass. The launchers compute the
alignment (:func:`chan_align`) and pass it as a constexpr; the kernels state it (:func:`said_multiple`).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: The largest alignment of the channel runs said to the compiler (``CHAN_ALIGN``): 16 elements, as
#: launch-time specialisation says of integer arguments.
CHAN_ALIGN_MAX = 16


def chan_align(*run_lengths: int) -> int:
    """The largest power of two up to :data:`CHAN_ALIGN_MAX` dividing every one of ``run_lengths``."""
    return min(CHAN_ALIGN_MAX, *(n & -n for n in run_lengths))


@triton.jit
def said_multiple(value, ALIGN: tl.constexpr):
    """``value``, a multiple of ``ALIGN``, in a form the compiler knows to be one: ``value // ALIGN * ALIGN``
    (a few scalar instructions). ``tl.multiple_of`` marks an op, so it is lost on a kernel argument and on
    an op that canonicalisation folds away (``g·Cg + 0``); outside a loop this costs next to nothing."""
    return value // ALIGN * ALIGN


@triton.jit
def component(c: tl.constexpr, r, i, j, k):
    """The ``c``-th of four (a quaternion's components, in ``[r|i|j|k]`` order): a pick at compile time."""
    if c == 0:
        return r
    elif c == 1:
        return i
    elif c == 2:
        return j
    else:
        return k

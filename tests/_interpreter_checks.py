"""Checks the Triton interpreter does not make, installed for the whole suite where it runs the kernels.

The interpreter runs every Triton kernel of the suite on CPU tensors, so the suite proves their results;
two faults it cannot see would only show on a GPU:

* **A false alignment hint.** ``tl.multiple_of(x, A)`` tells the compiler that every element of ``x`` is a
  multiple of ``A`` (with no ``tl.max_contiguous`` claim, every element is its own contiguous group); the
  compiler then issues vectorised, 16-byte copies. A false claim means misaligned addresses or wrong
  data on a GPU; the interpreter only records the hint. Here each claim is checked on its values.
* **An access outside the kernel's tensors.** A load or store whose mask lets an address through reads or
  writes it, on a GPU too (an illegal-address fault, or another tensor's data). The interpreter does it
  with a raw pointer into host memory, where a small overrun lands in mapped memory and passes. Here every
  address a load or store lets through must lie, with its whole element, in the storage of one of the
  launch's tensor arguments.

* **A load that counts on its masked-off lanes without saying what they hold.** ``tl.load(p, mask)`` with no
  ``other`` leaves them undefined; the interpreter fills them with zeros, so a kernel that sums, multiplies or
  compares them as zeros passes here and reads whatever a GPU's registers held. Here they are NaN (floats)
  or the type's largest value (integers), so such a kernel fails its test.
* **A race between programs.** The interpreter runs a launch's programs one after another, so two
  programs that store to the same address, or one that loads what another stores in the same launch, get
  the sequential order's result; on a GPU the programs run at once and the order is undefined. Here every
  address stored (atomics aside) must be stored by one program of the launch only, and read by no other.

A failed check raises :class:`InterpreterCheckFailed`: inside the launch (the interpreter wraps it in its
``InterpreterError``), or for a race at its end, so the test that launched the kernel fails.
"""

from __future__ import annotations

import threading

import numpy as np

#: the attribute ``tl.multiple_of`` sets (``tl.max_contiguous`` sets ``tt.contiguity``)
DIVISIBILITY = "tt.divisibility"


class InterpreterCheckFailed(AssertionError):
    """A kernel did what would be wrong on a GPU (see the module docstring)."""


class FalseAlignmentHint(InterpreterCheckFailed):
    """A ``tl.multiple_of`` claim that the values do not satisfy."""


class OutOfBoundsAccess(InterpreterCheckFailed):
    """A load or store let through an address outside every tensor argument of the launch."""


class RaceBetweenPrograms(InterpreterCheckFailed):
    """Two programs of a launch store to one address, or one loads what another stores."""


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


def check_in_bounds(addresses: np.ndarray, mask: np.ndarray, itemsize: int, ranges: list[tuple[int, int]],
                    what: str) -> None:  # fmt: skip
    """Raise :class:`OutOfBoundsAccess` unless every address of ``addresses`` that ``mask`` lets through
    lies, with its ``itemsize`` bytes, in one of ``ranges`` (``[start, end)`` byte ranges)."""
    through = _through(addresses, mask)
    if through.size == 0:
        return
    starts = np.array(sorted(r[0] for r in ranges), dtype=np.uint64)
    ends = np.array([e for _, e in sorted(ranges)], dtype=np.uint64)
    slot = np.searchsorted(starts, through, side="right").astype(np.int64) - 1
    inside = slot >= 0
    inside[inside] &= through[inside] + np.uint64(itemsize) <= ends[slot[inside]]
    if not inside.all():
        bad = through[~inside]
        raise OutOfBoundsAccess(
            f"a {what} lets through {bad.size} of {through.size} addresses outside the launch's tensors, e.g. "
            f"{int(bad[0]):#x} ({itemsize}-byte elements; the tensors' storages: "
            f"{', '.join(f'[{s:#x}, {e:#x})' for s, e in sorted(ranges))})"
        )


def check_races(stores: list[tuple[int, np.ndarray]], loads: list[tuple[int, np.ndarray]]) -> None:
    """Raise :class:`RaceBetweenPrograms` if an address of ``stores`` (``(program, addresses)`` pairs of one
    launch) is stored by two programs, or one of ``loads`` reads an address another program stores."""
    if not stores:
        return
    written = _unique_pairs(stores)
    addresses, writers = np.unique(written[:, 0], return_counts=True)
    if (writers > 1).any():
        address = addresses[writers > 1][0]
        programs = sorted(int(p) for p in written[written[:, 0] == address, 1])
        raise RaceBetweenPrograms(
            f"{int((writers > 1).sum())} addresses are stored by more than one program of the launch, e.g. "
            f"{int(address):#x} by programs {programs} (on a GPU which one lands is undefined)"
        )
    if not loads:
        return
    order = np.argsort(written[:, 0])
    owner_address, owner = written[order, 0], written[order, 1]
    read = _unique_pairs(loads)
    slot = np.clip(np.searchsorted(owner_address, read[:, 0]), 0, len(owner_address) - 1)
    foreign = (owner_address[slot] == read[:, 0]) & (owner[slot] != read[:, 1])
    if foreign.any():
        address, reader = read[foreign][0]
        raise RaceBetweenPrograms(
            f"{int(foreign.sum())} loads read an address another program of the same launch stores, e.g. "
            f"{int(address):#x}, read by program {int(reader)} and stored by program "
            f"{int(owner[slot][foreign][0])} (on a GPU the read may come before or after the store)"
        )


def _unique_pairs(accesses: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """``(address, program)`` rows, each once."""
    rows = np.concatenate([np.stack([a, np.full(a.shape, p, dtype=np.uint64)], axis=1) for p, a in accesses])
    return np.unique(rows, axis=0)


#: per thread, the running launch: .ranges (byte ranges of its tensor arguments), .stores and .loads
#: (``(program, addresses)`` of each access its masks let through)
_launch = threading.local()


def _poison(dtype: np.dtype):
    """What an undefined lane holds here: NaN for floats, the largest value for integers (and True)."""
    if np.issubdtype(dtype, np.floating):
        return np.nan
    if dtype == np.bool_:
        return True
    return np.iinfo(dtype).max


def _program(builder) -> int:
    x, y, z = builder.grid_idx
    nx, ny, _ = builder.grid_dim
    return x + nx * (y + ny * z)


def _through(addresses, mask) -> np.ndarray:
    return np.broadcast_to(np.asarray(addresses, dtype=np.uint64), np.shape(mask))[np.asarray(mask, dtype=bool)]


def _storage_ranges(args, kwargs) -> list[tuple[int, int]]:
    ranges = []

    def visit(arg):
        if isinstance(arg, (tuple, list)):
            for a in arg:
                visit(a)
        elif hasattr(arg, "untyped_storage"):
            storage = arg.untyped_storage()
            ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        elif hasattr(arg, "base") and hasattr(arg.base, "untyped_storage"):  # a tensor descriptor
            visit(arg.base)

    visit(list(args))
    visit(list(kwargs.values()))
    return ranges


def install() -> bool:
    """Install both checks in the interpreter. Returns False where triton (or its interpreter) is not there."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    if getattr(interpreter.TensorHandle.set_attr, "checked", False):
        return True

    set_attr = interpreter.TensorHandle.set_attr

    def checked_set_attr(self, key, value):
        if key == DIVISIBILITY:
            check_divisibility(self.data, list(value))
        return set_attr(self, key, value)

    init_args = interpreter.GridExecutor._init_args_hst

    def recording_init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _launch.ranges = _storage_ranges(args_hst, kwargs_hst)  # the host copies the kernel runs on
        _launch.stores, _launch.loads = [], []
        return args_hst, kwargs_hst

    restore_args = interpreter.GridExecutor._restore_args_dev

    def race_checked_restore(self, *args):  # after the launch's last program
        check_races(_launch.stores, _launch.loads)
        _launch.stores, _launch.loads = [], []
        return restore_args(self, *args)

    builder = interpreter.InterpreterBuilder
    masked_load, masked_store, atomic_rmw = (
        builder.create_masked_load,
        builder.create_masked_store,
        builder.create_atomic_rmw,
    )

    def checked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        np_dtype = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty()))
        check_in_bounds(ptrs.data, mask.data, np_dtype.itemsize, getattr(_launch, "ranges", []), "load")
        if other is None:  # undefined lanes: poisoned, not the interpreter's zeros
            other = interpreter.TensorHandle(np.full(np.shape(ptrs.data), _poison(np_dtype), dtype=np_dtype),
                                             ptrs.get_element_ty())  # fmt: skip
        if getattr(_launch, "loads", None) is not None:
            _launch.loads.append((_program(self), np.unique(_through(ptrs.data, mask.data))))
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def checked_store(self, ptrs, value, mask, cache_policy):
        check_in_bounds(ptrs.data, mask.data, value.data.dtype.itemsize, getattr(_launch, "ranges", []), "store")
        if getattr(_launch, "stores", None) is not None:
            _launch.stores.append((_program(self), np.unique(_through(ptrs.data, mask.data))))
        return masked_store(self, ptrs, value, mask, cache_policy)

    def checked_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        check_in_bounds(ptr.data, mask.data, val.data.dtype.itemsize, getattr(_launch, "ranges", []), "atomic")
        return atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope)

    checked_set_attr.checked = True
    interpreter.TensorHandle.set_attr = checked_set_attr
    interpreter.GridExecutor._init_args_hst = recording_init_args
    interpreter.GridExecutor._restore_args_dev = race_checked_restore
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    builder.create_atomic_rmw = checked_atomic_rmw
    return True

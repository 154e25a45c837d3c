"""The checks the suite adds to the Triton interpreter (tests/_interpreter_checks.py): a true
``tl.multiple_of`` passes and a false one fails the launch; an access inside the launch's tensors passes
and one past a tensor's end (by one element, masked or not) fails it; programs that store their own
outputs pass, two storing one address or one reading another's output fail; a masked load without
``other`` gives NaN in its masked-off lanes. Every Triton test of the suite runs with the checks installed."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import _interpreter_checks  # noqa: E402  (tests/, on sys.path through tests/conftest.py)
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's check")


@triton.jit
def _copy_runs(src, dst, RUN: tl.constexpr, ALIGN: tl.constexpr):
    """Copies one run of RUN elements per program, its start said to be a multiple of ALIGN."""
    start = tl.multiple_of(tl.program_id(0) * RUN, ALIGN)
    offs = start + tl.arange(0, RUN)
    tl.store(dst + offs, tl.load(src + offs))


def test_the_check_is_installed() -> None:
    from triton.runtime import interpreter

    assert getattr(interpreter.TensorHandle.set_attr, "checked", False)


def test_a_true_hint_passes() -> None:
    src = torch.randn(3 * 16)
    dst = torch.empty_like(src)
    _copy_runs[(3,)](src, dst, RUN=16, ALIGN=16)
    assert torch.equal(dst, src)


def test_a_false_hint_fails_the_launch() -> None:
    """Runs of 8 elements said to start at multiples of 16: the second program's start, 8, is not."""
    src = torch.randn(3 * 8)
    with pytest.raises(Exception) as caught:
        _copy_runs[(3,)](src, torch.empty_like(src), RUN=8, ALIGN=16)
    # (the interpreter wraps an exception raised inside a kernel in its InterpreterError)
    assert isinstance(caught.value, _interpreter_checks.FalseAlignmentHint) or isinstance(
        caught.value.__cause__, _interpreter_checks.FalseAlignmentHint
    ), repr(caught.value)


@pytest.mark.parametrize(
    ("data", "values", "ok"),
    [([0, 16, -32], [16], True), ([0, 8], [16], False), ([48], [16, 8], True), ([24], [8, 16], False)],
)
def test_check_divisibility(data, values, ok) -> None:
    import numpy as np

    if ok:
        _interpreter_checks.check_divisibility(np.array(data, dtype=np.int32), values)
    else:
        with pytest.raises(_interpreter_checks.FalseAlignmentHint, match="is false"):
            _interpreter_checks.check_divisibility(np.array(data, dtype=np.int32), values)


@triton.jit
def _copy_masked(src, dst, n, BLOCK: tl.constexpr, SLACK: tl.constexpr):
    """Copies n elements in one block; its mask lets SLACK elements past n through (0: a correct kernel)."""
    offs = tl.arange(0, BLOCK)
    keep = offs < n + SLACK
    tl.store(dst + offs, tl.load(src + offs, mask=keep), mask=keep)


def _raised(caught) -> BaseException:
    return caught.value.__cause__ if caught.value.__cause__ is not None else caught.value


def test_accesses_inside_the_tensors_pass() -> None:
    src = torch.randn(13)
    dst = torch.empty_like(src)
    _copy_masked[(1,)](src, dst, 13, BLOCK=16, SLACK=0)
    assert torch.equal(dst, src)
    view = torch.randn(40)[8:21]  # a view: its storage is the whole tensor, which a kernel may address
    _copy_masked[(1,)](view, dst, 13, BLOCK=16, SLACK=0)
    assert torch.equal(dst, view)


def test_a_load_past_the_end_fails_the_launch() -> None:
    src = torch.randn(13)
    with pytest.raises(Exception) as caught:
        _copy_masked[(1,)](src, torch.empty(14), 13, BLOCK=16, SLACK=1)  # reads src[13]: one past the end
    assert isinstance(_raised(caught), _interpreter_checks.OutOfBoundsAccess), repr(caught.value)
    assert "load" in str(_raised(caught))


def test_a_store_past_the_end_fails_the_launch() -> None:
    src = torch.randn(14)
    with pytest.raises(Exception) as caught:
        _copy_masked[(1,)](src, torch.empty(13), 13, BLOCK=16, SLACK=1)  # writes dst[13]
    assert isinstance(_raised(caught), _interpreter_checks.OutOfBoundsAccess), repr(caught.value)
    assert "store" in str(_raised(caught))


def test_check_in_bounds_counts_whole_elements() -> None:
    import numpy as np

    ranges = [(1000, 1016), (2000, 2008)]
    ok = np.array([1000, 1012, 2004], dtype=np.uint64)
    _interpreter_checks.check_in_bounds(ok, np.ones(3, dtype=bool), 4, ranges, "load")
    straddles = np.array([1014], dtype=np.uint64)  # its last 2 bytes are past 1016
    with pytest.raises(_interpreter_checks.OutOfBoundsAccess):
        _interpreter_checks.check_in_bounds(straddles, np.ones(1, dtype=bool), 4, ranges, "load")
    masked_out = np.array([1000, 5000], dtype=np.uint64)
    _interpreter_checks.check_in_bounds(masked_out, np.array([True, False]), 4, ranges, "store")


@triton.jit
def _shift_runs(src, dst, RUN: tl.constexpr, WRITE_SHIFT: tl.constexpr, READ_DST: tl.constexpr):
    """Program p copies run p of src to run p + WRITE_SHIFT of dst; with READ_DST it also reads dst's run
    p + WRITE_SHIFT + 1 (what the next program stores)."""
    p = tl.program_id(0)
    offs = tl.arange(0, RUN)
    value = tl.load(src + p * RUN + offs)
    if READ_DST:
        value += tl.load(dst + (p + WRITE_SHIFT + 1) * RUN + offs)
    tl.store(dst + (p + WRITE_SHIFT) * RUN + offs, value)


def test_programs_with_their_own_outputs_pass() -> None:
    src = torch.randn(4 * 8)
    dst = torch.zeros(5 * 8)
    _shift_runs[(4,)](src, dst, RUN=8, WRITE_SHIFT=1, READ_DST=False)
    assert torch.equal(dst[8:], src)


@triton.jit
def _store_run_zero(src, dst, RUN: tl.constexpr):
    """Every program stores its run of src to dst's run 0."""
    offs = tl.arange(0, RUN)
    tl.store(dst + offs, tl.load(src + tl.program_id(0) * RUN + offs))


def test_two_programs_storing_one_address_fail() -> None:
    src = torch.randn(3 * 8)
    with pytest.raises(_interpreter_checks.RaceBetweenPrograms, match="stored by more than one program"):
        _store_run_zero[(3,)](src, torch.zeros(8), RUN=8)


def test_a_program_reading_another_programs_output_fails() -> None:
    src = torch.randn(4 * 8)
    with pytest.raises(_interpreter_checks.RaceBetweenPrograms, match="another program of the same launch"):
        _shift_runs[(4,)](src, torch.zeros(6 * 8), RUN=8, WRITE_SHIFT=1, READ_DST=True)


def test_check_races_rules() -> None:
    import numpy as np

    def a(*addresses):
        return np.array(addresses, dtype=np.uint64)

    _interpreter_checks.check_races([(0, a(0, 4)), (1, a(8)), (0, a(0))], [(0, a(0, 4, 100)), (1, a(8, 100))])
    with pytest.raises(_interpreter_checks.RaceBetweenPrograms):
        _interpreter_checks.check_races([(0, a(0)), (1, a(0))], [])
    with pytest.raises(_interpreter_checks.RaceBetweenPrograms):
        _interpreter_checks.check_races([(0, a(0))], [(1, a(0))])


@triton.jit
def _masked_sum(src, out, n, BLOCK: tl.constexpr, SAY_ZERO: tl.constexpr):
    """The sum of src's n elements in one block; its masked-off lanes enter the sum as loaded."""
    offs = tl.arange(0, BLOCK)
    if SAY_ZERO:
        x = tl.load(src + offs, mask=offs < n, other=0.0)
    else:
        x = tl.load(src + offs, mask=offs < n)  # the masked-off lanes are undefined
    tl.store(out, tl.sum(x, 0))


def test_undefined_masked_lanes_are_poisoned() -> None:
    src, out = torch.randn(13), torch.empty(1)
    _masked_sum[(1,)](src, out, 13, BLOCK=16, SAY_ZERO=True)
    torch.testing.assert_close(out[0], src.sum())
    _masked_sum[(1,)](src, out, 13, BLOCK=16, SAY_ZERO=False)  # the interpreter's zeros would pass
    assert torch.isnan(out[0])

"""The interpreter checks the kernels' alignment hints (tests/_interpreter_hints.py): a true
``tl.multiple_of`` passes, a false one fails the launch, naming the claim; every Triton test of the suite
runs with the check installed."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import _interpreter_hints  # noqa: E402  (tests/, on sys.path through tests/conftest.py)
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

    assert getattr(interpreter.TensorHandle.set_attr, "checks_hints", False)


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
    assert isinstance(caught.value, _interpreter_hints.FalseAlignmentHint) or isinstance(
        caught.value.__cause__, _interpreter_hints.FalseAlignmentHint
    ), repr(caught.value)


@pytest.mark.parametrize(
    ("data", "values", "ok"),
    [([0, 16, -32], [16], True), ([0, 8], [16], False), ([48], [16, 8], True), ([24], [8, 16], False)],
)
def test_check_divisibility(data, values, ok) -> None:
    import numpy as np

    if ok:
        _interpreter_hints.check_divisibility(np.array(data, dtype=np.int32), values)
    else:
        with pytest.raises(_interpreter_hints.FalseAlignmentHint, match="is false"):
            _interpreter_hints.check_divisibility(np.array(data, dtype=np.int32), values)

"""The suite's shortcut in the Triton interpreter (tests/_interpreter_patch_once.py): a launch patches
``triton.language`` once, however many ``@triton.jit`` helpers its programs call; the helpers compute what
they did; the language is restored when the launch ends, also when it fails."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import _interpreter_patch_once  # noqa: E402  (tests/, on sys.path through tests/conftest.py)
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's shortcut")


@triton.jit
def _affine(x, scale):
    return x * scale + tl.full(x.shape, 1.0, x.dtype)


@triton.jit
def _affine_thrice(src, dst, N: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    y = tl.load(src + offs)
    for _ in tl.static_range(3):
        y = _affine(y, 2.0)
    tl.store(dst + offs, y)


@triton.jit
def _copy(src, dst, N: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    tl.store(dst + offs, tl.load(src + offs))


@pytest.fixture
def builtin_patches(monkeypatch) -> list:
    """Records each ``_patch_builtin`` call of triton's own ``_patch_lang`` (one per module it patches)."""
    from triton.runtime import interpreter

    calls = []
    real = interpreter._patch_builtin

    def counted(pkg, *args):
        calls.append(pkg)
        return real(pkg, *args)

    monkeypatch.setattr(interpreter, "_patch_builtin", counted)
    return calls


def test_installed() -> None:
    assert _interpreter_patch_once.install()  # (conftest installed it; a second install is a no-op)


def test_a_launch_patches_once_whatever_its_helpers(builtin_patches) -> None:
    src = torch.randn(4 * 8)
    dst = torch.empty_like(src)
    _copy[(4,)](src, dst, N=8)
    per_launch = len(builtin_patches)
    assert per_launch > 0
    builtin_patches.clear()
    _affine_thrice[(4,)](src, dst, N=8)  # 12 helper calls, each of which patched the language again
    assert len(builtin_patches) == per_launch
    torch.testing.assert_close(dst, ((src * 2 + 1) * 2 + 1) * 2 + 1)


def test_the_language_is_restored_after_a_launch_and_a_failed_one() -> None:
    src = torch.randn(2 * 8)
    _affine_thrice[(2,)](src, torch.empty_like(src), N=8)
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.full)
    with pytest.raises(Exception):  # noqa: B017 - the interpreter wraps what the kernel raised
        _affine_thrice[(2,)](src, torch.empty(3), N=8)  # (past dst's end: the suite's bounds check)
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.full)
    dst = torch.empty_like(src)
    _affine_thrice[(2,)](src, dst, N=8)  # and the next launch patches again
    torch.testing.assert_close(dst, ((src * 2 + 1) * 2 + 1) * 2 + 1)

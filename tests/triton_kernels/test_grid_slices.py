"""Launch grids within CUDA's limits: a grid's second and third axes may not exceed 65535 programs, and the
Triton kernels whose axis 1 or 2 runs over samples, statistic groups or (batch, head) pairs (the norm's six,
the conv activation's backward pass, the attention's three) launch once per slice of at most
``common.GRID_YZ_MAX`` (``common.axis_slices``), the kernel adding the slice's first index to its program
id. A batch norm over ``(N, C)`` features with N past 65535 (point clouds, large MLP batches) or an
attention over 65536 (batch, head) pairs would fail to launch on a GPU otherwise.

Here the limit is lowered to 2 (a real one would need 65536 samples in the interpreter): every launch stays
within it, several slices run, and the results are bit for bit those of one slice per launch."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime import interpreter  # noqa: E402

from aqcf_kernels.backends.triton import activation_grad, common, norm  # noqa: E402
from aqcf_kernels.backends.triton import attention as triton_attention  # noqa: E402

pytestmark = pytest.mark.skipif(not common.INTERPRET, reason="the interpreter records the grids")
LIMIT = 2


@pytest.fixture
def grids(monkeypatch):
    """The grids of the interpreted launches, in order."""
    seen: list[tuple[int, int, int]] = []
    set_grid_dim = interpreter.InterpreterBuilder.set_grid_dim

    def record(self, nx, ny, nz):
        seen.append((nx, ny, nz))
        return set_grid_dim(self, nx, ny, nz)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "set_grid_dim", record)
    return seen


def _sliced(monkeypatch, grids, run):
    """``run()`` once as is and once with the grid limit at LIMIT: both results, and the second run's grids."""
    whole = run()
    monkeypatch.setattr(common, "GRID_YZ_MAX", LIMIT)
    grids.clear()
    sliced = run()
    return whole, sliced, list(grids)


def _assert_identical(whole, sliced) -> None:
    for i, (w, s) in enumerate(zip(whole, sliced, strict=True)):
        assert (w is None) == (s is None), i
        if w is not None:
            assert torch.equal(w, s), f"output {i}: max difference {(w - s).abs().max().item():.3e}"


def _assert_within_limit(launched, axis_total: int) -> None:
    assert launched and all(ny <= LIMIT and nz <= LIMIT for _, ny, nz in launched), launched
    assert len(launched) > 1, f"one launch: the {axis_total} programs of the axis were not sliced"


def test_axis_slices() -> None:
    assert common.axis_slices(5) == [(0, 5)]
    assert common.axis_slices(0) == [(0, 0)]  # an empty launch, as an axis of 0 programs was
    limit = common.GRID_YZ_MAX
    assert common.axis_slices(2 * limit + 3) == [(0, limit), (limit, limit), (2 * limit, 3)]


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
@pytest.mark.parametrize("shape", [(5, 8, 3, 2), (7, 8)], ids=["nchw", "features"])
def test_norm_forward_and_backward_sliced(monkeypatch, grids, per_sample, shape) -> None:
    """Samples on axis 1 or 2 of the statistics, apply, sums and input-gradient kernels, statistic groups
    (an instance norm's samples) on axis 1 of the pooling and coefficient kernels."""
    if per_sample and len(shape) == 2:
        pytest.skip("an instance norm has spatial positions to average")
    g = torch.Generator().manual_seed(3)
    x, gy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w, b = torch.rand(shape[1] // 4, generator=g) + 0.5, torch.randn(shape[1], generator=g)

    def run():
        y, mean, var = norm.forward(x, w, b, None, None, True, per_sample, 1e-5, "leaky_relu", 0.1)
        grads = norm.backward(gy, x, w, b, mean, var, True, per_sample, 1e-5, "leaky_relu", 0.1, [True, True, True])
        return [y, mean, var, *grads]

    whole, sliced, launched = _sliced(monkeypatch, grids, run)
    _assert_identical(whole, sliced)
    _assert_within_limit(launched, shape[0])


def test_activation_pass_sliced(monkeypatch, grids) -> None:
    g = torch.Generator().manual_seed(4)
    grad, gate = torch.randn(5, 8, 3, generator=g), torch.randn(5, 8, 3, generator=g)
    whole, sliced, launched = _sliced(
        monkeypatch, grids, lambda: activation_grad.activation_grad_bias(grad, gate, "gelu", 0.01)
    )
    _assert_identical(whole, sliced)
    _assert_within_limit(launched, 5)


def test_attention_sliced(monkeypatch, grids) -> None:
    """(batch, head) pairs on axis 1 of the forward and both backward kernels: 2 x 3 of them here."""
    g = torch.Generator().manual_seed(5)
    q_a, k_a, v_a = (torch.randn(2, 3, n, 16, generator=g) for n in (7, 5, 5))
    q_b, k_b, v_b = (torch.randn(2, 3, n, 16, generator=g) for n in (4, 6, 6))
    d_a, d_b = torch.randn(2, 3, 7, 16, generator=g), torch.randn(2, 3, 4, 16, generator=g)

    def run():
        out_a, out_b, lse_a, lse_b = triton_attention.cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, 0.25)
        grads = triton_attention.cross_attention_backward(
            d_a, d_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, 0.25
        )
        return [out_a, out_b, lse_a, lse_b, *grads]

    whole, sliced, launched = _sliced(monkeypatch, grids, run)
    _assert_identical(whole, sliced)
    _assert_within_limit(launched, 6)

"""Quaternion max / average pooling and dropout: whole quaternions are kept, moved and dropped together."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.testing import assert_close

from aqcf_kernels.nn import (
    QuaternionAvgPool1d,
    QuaternionAvgPool2d,
    QuaternionAvgPool3d,
    QuaternionDropout,
    QuaternionMaxPool1d,
    QuaternionMaxPool2d,
    QuaternionMaxPool3d,
    quaternion_dropout,
    quaternion_max_pool,
)

F64 = torch.float64
MAXPOOL = {1: QuaternionMaxPool1d, 2: QuaternionMaxPool2d, 3: QuaternionMaxPool3d}
AVGPOOL = {1: QuaternionAvgPool1d, 2: QuaternionAvgPool2d, 3: QuaternionAvgPool3d}
MAX_POOL_F = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


pytestmark = pytest.mark.usefixtures("single_threaded")


def qrandn(*shape: int, seed: int, dtype: torch.dtype = F64, transpose: bool = False) -> torch.Tensor:
    """Fresh normal values; with ``transpose`` the last two dims are made non-contiguous (same shape)."""
    g = torch.Generator().manual_seed(seed)
    if transpose:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=dtype).transpose(-1, -2)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _tuple(v, n: int) -> tuple[int, ...]:
    return (v,) * n if isinstance(v, int) else tuple(v)


def naive_max_pool(
    x: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> tuple[torch.Tensor, list[tuple[int, int, tuple[int, ...], tuple[int, ...]]]]:
    """Loop reference: every window, every position in it, the quaternion of largest r²+i²+j²+k².

    Returns the output and the (sample, quaternion channel, output position, chosen input position)
    choices. Padding positions are never chosen; ties go to the first position in row-major order.
    """
    n, c = x.shape[:2]
    cq = c // 4
    spatial = x.shape[2:]
    nd = len(spatial)
    k, s, p, d = (_tuple(v, nd) for v in (kernel, stride, padding, dilation))
    out_sizes = []
    for size, kk, ss, pp, dd in zip(spatial, k, s, p, d, strict=True):
        span = size + 2 * pp - dd * (kk - 1) - 1
        o = (math.ceil(span / ss) if ceil_mode else span // ss) + 1
        if ceil_mode and (o - 1) * ss >= size + pp:  # torch drops a last window that starts in the padding
            o -= 1
        out_sizes.append(o)
    out = torch.empty(n, c, *out_sizes, dtype=x.dtype)
    choices = []
    for b in range(n):
        for q in range(cq):
            for opos in itertools.product(*(range(o) for o in out_sizes)):
                best, best_pos = -1.0, None
                for kpos in itertools.product(*(range(kk) for kk in k)):
                    ipos = tuple(o * ss - pp + kk * dd for o, ss, pp, kk, dd in zip(opos, s, p, kpos, d, strict=True))
                    if any(i < 0 or i >= size for i, size in zip(ipos, spatial, strict=True)):
                        continue
                    modulus = sum(x[(b, a * cq + q, *ipos)].item() ** 2 for a in range(4))
                    if modulus > best:
                        best, best_pos = modulus, ipos
                for a in range(4):
                    out[(b, a * cq + q, *opos)] = x[(b, a * cq + q, *best_pos)]
                choices.append((b, q, opos, best_pos))
    return out, choices


CASES = [
    # dims, input spatial, kernel, stride, padding, dilation, ceil_mode
    (1, (11,), 3, 2, 1, 1, True),
    (2, (7, 9), 2, 2, 0, 1, False),
    (2, (7, 9), 3, 2, 1, 1, True),
    (2, (8, 7), 3, 1, 0, 2, False),
    (3, (5, 6, 5), 2, 2, 0, 1, True),
    (3, (5, 4, 5), 3, 2, 1, 1, False),
]


@pytest.mark.parametrize("dims, spatial, kernel, stride, padding, dilation, ceil_mode", CASES)
def test_max_pool_picks_the_largest_modulus_quaternion(dims, spatial, kernel, stride, padding, dilation, ceil_mode):
    x = qrandn(2, 12, *spatial, seed=dims + kernel, transpose=dims >= 2)
    pool = MAXPOOL[dims](kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    y = pool(x)
    expected, _ = naive_max_pool(x, kernel, stride, padding, dilation, ceil_mode)
    assert y.shape == expected.shape
    assert_close(y, expected, rtol=0, atol=0)
    # A per-component max pool would differ: it mixes components of different positions.
    per_component = F.max_pool3d if dims == 3 else F.max_pool2d if dims == 2 else F.max_pool1d
    assert not torch.equal(per_component(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode), y)


@pytest.mark.parametrize("dims, spatial, kernel, stride, padding, dilation, ceil_mode", [c for c in CASES if c[0] > 1])
def test_max_pool_of_channels_last_input_is_channels_last(dims, spatial, kernel, stride, padding, dilation, ceil_mode):
    """As torch's max pool: a channels_last(_3d) input gives a channels_last output (and indices), with the values,
    indices and gradient of the same input laid out channels-first."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    x = qrandn(2, 12, *spatial, seed=40 + dims + kernel)
    pool = MAXPOOL[dims](kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    x_cl = x.contiguous(memory_format=fmt).requires_grad_()
    y_cl, idx_cl = pool(x_cl)
    expected, _ = naive_max_pool(x, kernel, stride, padding, dilation, ceil_mode)
    assert_close(y_cl, expected, rtol=0, atol=0)
    assert y_cl.is_contiguous(memory_format=fmt) and idx_cl.is_contiguous(memory_format=fmt)
    x_cf = x.clone().requires_grad_()
    y_cf, idx_cf = pool(x_cf)
    assert torch.equal(idx_cl, idx_cf)
    g = qrandn(*y_cf.shape, seed=41)
    assert_close(torch.autograd.grad(y_cl, x_cl, g)[0], torch.autograd.grad(y_cf, x_cf, g)[0], rtol=0, atol=0)


def test_max_pool_keeps_components_of_one_quaternion_together() -> None:
    # Craft a window where the largest |r| and the largest |q| sit at different positions.
    x = torch.zeros(1, 4, 1, 2, dtype=F64)
    x[0, :, 0, 0] = torch.tensor([3.0, 0.1, 0.1, 0.1])  # |q|^2 = 9.03, largest real part
    x[0, :, 0, 1] = torch.tensor([1.0, 2.0, 2.0, 2.0])  # |q|^2 = 13, the one to keep
    y = QuaternionMaxPool2d((1, 2))(x)
    assert_close(y.flatten(), torch.tensor([1.0, 2.0, 2.0, 2.0], dtype=F64))


@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 1)], ids=["disjoint", "overlapping"])
def test_max_pool_gradient_reaches_only_the_chosen_quaternions(kernel: int, stride: int) -> None:
    x = qrandn(2, 8, 7, 6, seed=30, transpose=True).requires_grad_()
    y = QuaternionMaxPool2d(kernel, stride)(x)
    g = qrandn(*y.shape, seed=31)
    y.backward(g)
    _, choices = naive_max_pool(x.detach(), kernel, stride, 0, 1, False)
    expected = torch.zeros_like(x)
    for b, q, opos, ipos in choices:  # each window sends its output gradient to its quaternion, all 4 parts
        for a in range(4):
            expected[(b, a * 2 + q, *ipos)] += g[(b, a * 2 + q, *opos)]
    assert_close(x.grad, expected)
    assert (x.grad == 0).any()  # something was not chosen


def test_max_pool_gradcheck() -> None:
    # Random data: no ties, so the function is smooth locally. fast_mode (random projections of the
    # Jacobian) because the full Jacobian takes ~1000 calls; the exact gradient is checked entry by
    # entry against the loop reference above.
    x = qrandn(2, 8, 5, 6, seed=32).requires_grad_()
    assert gradcheck(lambda x: quaternion_max_pool(x, 2, 3, 2, 1), (x,), fast_mode=True)


def test_max_pool_indices_unpool_whole_quaternions() -> None:
    x = qrandn(2, 8, 6, 8, seed=33)
    y, idx = QuaternionMaxPool2d(2, return_indices=True)(x)
    assert idx.shape == y.shape
    assert torch.equal(idx.unflatten(1, (4, 2))[:, 0], idx.unflatten(1, (4, 2))[:, 3])
    restored = nn.MaxUnpool2d(2)(y, idx, output_size=x.shape[-2:])
    kept = restored != 0
    assert_close(restored[kept], x[kept])
    # Each kept position keeps all four components: the mask is the same across components.
    mask = kept.unflatten(1, (4, 2))
    assert torch.equal(mask.all(1), mask.any(1))
    assert kept.sum().item() == y.numel()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_max_pool_unbatched_input(dims: int) -> None:
    spatial = {1: (9,), 2: (5, 7), 3: (4, 5, 3)}[dims]
    x = qrandn(3, 8, *spatial, seed=34)
    pool = MAXPOOL[dims](2, padding=1)
    y = pool(x)
    assert_close(pool(x[1]), y[1])


def test_max_pool_low_precision_picks_by_float32_modulus() -> None:
    # In fp16, 300^2 overflows to inf: both quaternions would tie at inf without an upcast.
    x = torch.zeros(1, 4, 1, 2, dtype=torch.float16)
    x[0, :, 0, 0] = torch.tensor([300.0, 0.0, 0.0, 0.0])
    x[0, :, 0, 1] = torch.tensor([0.0, 300.0, 300.0, 0.0])
    y = quaternion_max_pool(x, 2, (1, 2))
    assert y.flatten().tolist() == [0.0, 300.0, 300.0, 0.0]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_avg_pool_is_the_componentwise_average(dims: int) -> None:
    spatial = {1: (9,), 2: (5, 7), 3: (4, 5, 3)}[dims]
    x = qrandn(2, 8, *spatial, seed=35, transpose=dims >= 2)
    pool = AVGPOOL[dims](3, 2, 1, ceil_mode=True, count_include_pad=False)
    avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    assert_close(pool(x), avg(x, 3, 2, 1, True, False))
    assert_close(pool(x[0]), pool(x)[0])


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_avg_pool3d_in_half_precision(dtype: torch.dtype, channels_last: bool) -> None:
    """PyTorch's CPU avg_pool3d has no fp16/bf16 kernel (torch 2.13: NotImplementedError, which the layer raised):
    the layer averages in float32 and rounds once, so output and input gradient are within one rounding of the
    float64 average, in the layout float32 gives."""
    x64 = qrandn(2, 8, 4, 5, 3, seed=36)
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    x.requires_grad_()
    pool = QuaternionAvgPool3d(3, 2, 1, ceil_mode=True, count_include_pad=False)
    y = pool(x)
    gy = qrandn(*y.shape, seed=37).to(dtype)
    (gx,) = torch.autograd.grad(y, x, gy)
    x_ref = x.detach().double().requires_grad_()
    y_ref = F.avg_pool3d(x_ref, 3, 2, 1, True, False)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, gy.double())
    assert y.dtype == gx.dtype == dtype and y.stride() == pool(x.detach().float()).stride()  # float32's layout
    eps = torch.finfo(dtype).eps
    for got, want in ((y, y_ref), (gx, gx_ref)):
        assert_close(got.double(), want, rtol=eps, atol=eps * want.abs().max().item())


def dropout_ratios(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y / x).unflatten(1, (4, x.shape[1] // 4))  # (N, 4, Cq, ...); x is never zero


def test_dropout_drops_whole_quaternions() -> None:
    torch.manual_seed(0)
    x = qrandn(4, 12, 9, 7, seed=36, transpose=True)
    y = QuaternionDropout(0.4).train()(x)
    r = dropout_ratios(x, y)
    assert_close(r, r[:, :1].expand_as(r))  # the same mask value for r, i, j, k
    kept = r[:, 0]
    assert set(torch.unique(kept.round(decimals=6)).tolist()) == {0.0, round(1 / 0.6, 6)}
    assert 0.3 < (kept == 0).double().mean().item() < 0.5  # about p of the quaternions, not of all values


def test_dropout_of_one_unbatched_vector() -> None:
    # nn.Dropout takes a (C,) vector, and QuaternionLinear does: its channels are dim 0
    torch.manual_seed(2)
    x = qrandn(64, seed=37)
    layer = QuaternionDropout(0.5)
    y = layer(x)
    assert y.shape == x.shape
    kept = (y / x).view(4, 16)
    assert_close(kept, kept[:1].expand_as(kept))  # whole quaternions
    assert set(torch.unique(kept.round(decimals=6)).tolist()) == {0.0, 2.0}
    assert layer.eval()(x) is x


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_max_pool_output_sizes_and_errors_match_torch(dims: int) -> None:
    # torch's output-size rule (ceil_mode included) on a grid of small geometries; where torch's max pool
    # has a window of padding only (its output -inf) ours refuses the call instead of gathering out of range
    shapes = {1: [(5,), (1,), (2,)], 2: [(5, 3), (1, 2)], 3: [(3, 1, 2)]}[dims]
    for spatial, kernel, stride, padding, dilation, ceil_mode in itertools.product(
        shapes, [1, 2, 3], [1, 2, 3], [0, 1], [1, 2], [False, True]
    ):
        if padding > (dilation * (kernel - 1) + 1) // 2:
            continue  # torch refuses it too, with its own message
        x = torch.randn(1, 8, *spatial)
        args = (kernel, stride, padding, dilation)
        try:
            expected = MAX_POOL_F[dims](x, *args, ceil_mode=ceil_mode)
        except RuntimeError:
            expected = None
        if expected is None or torch.isinf(expected).any():
            with pytest.raises(ValueError, match="too small|only padding"):
                MAXPOOL[dims](*args, ceil_mode=ceil_mode)(x)
        else:
            assert MAXPOOL[dims](*args, ceil_mode=ceil_mode)(x).shape == expected.shape


def test_dropout_channelwise_drops_whole_feature_maps() -> None:
    torch.manual_seed(1)
    x = qrandn(6, 16, 5, 7, seed=37)
    y = QuaternionDropout(0.5, channelwise=True).train()(x)
    r = dropout_ratios(x, y)
    assert_close(r, r[:, :1, :, :1, :1].expand_as(r))  # constant over components and space
    assert (r == 0).any() and (r != 0).any()


def test_dropout_preserves_the_expectation() -> None:
    torch.manual_seed(2)
    x = qrandn(1, 8, 3, 3, seed=38)
    mean = torch.stack([quaternion_dropout(x, 0.3) for _ in range(4000)]).mean(0)
    # Each entry is x * Bernoulli(0.7) / 0.7: std of the mean = |x| sqrt(0.3 / 0.7 / 4000) ~ 0.01 |x|.
    assert_close(mean, x, rtol=0.06, atol=0.0)


def test_dropout_eval_p0_p1_and_inplace() -> None:
    x = qrandn(2, 8, 5, seed=39)
    layer = QuaternionDropout(0.5)
    assert layer.eval()(x) is x
    assert QuaternionDropout(0.0).train()(x) is x
    assert torch.equal(QuaternionDropout(1.0).train()(x), torch.zeros_like(x))
    torch.manual_seed(3)
    expected = QuaternionDropout(0.5).train()(x)
    x2 = x.clone()
    torch.manual_seed(3)
    out = QuaternionDropout(0.5, inplace=True).train()(x2)
    assert out is x2 and torch.equal(x2, expected)


def test_dropout_gradient_uses_the_same_mask() -> None:
    torch.manual_seed(4)
    x = qrandn(3, 8, 4, 5, seed=40).requires_grad_()
    y = quaternion_dropout(x, 0.5)
    y.backward(torch.ones_like(y))
    assert_close(x.grad, (y / x).detach())


def test_reprs() -> None:
    assert repr(QuaternionMaxPool2d(3, 2, 1)) == (
        "QuaternionMaxPool2d(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False)"
    )
    assert repr(QuaternionAvgPool3d(2)) == "QuaternionAvgPool3d(kernel_size=2, stride=2, padding=0)"
    assert repr(QuaternionDropout(0.2, channelwise=True)) == "QuaternionDropout(p=0.2, inplace=False, channelwise=True)"


@pytest.mark.parametrize(
    "layer, x, match",
    [
        (
            QuaternionMaxPool2d(2),
            torch.randn(2, 6, 4, 4),
            r"QuaternionMaxPool2d: input must have a positive multiple of 4",
        ),
        (
            QuaternionMaxPool2d(2),
            torch.randn(6, 4, 4),
            r"QuaternionMaxPool2d: input must have a positive multiple of 4 .* dim 0",
        ),
        (
            QuaternionMaxPool3d(2),
            torch.randn(2, 8, 4, 4),
            r"QuaternionMaxPool3d: input must have a positive multiple of 4",
        ),
        (
            QuaternionMaxPool2d(2),
            torch.randn(2, 8, 4, 4, 4),
            r"QuaternionMaxPool2d: expected 3D \(unbatched\) or 4D \(batched\) input \(got 5D",
        ),
        (QuaternionMaxPool1d(2), torch.randn(8, 4, 4, 4), r"QuaternionMaxPool1d: expected 2D \(unbatched\) or 3D"),
        (
            QuaternionAvgPool2d(2),
            torch.randn(2, 10, 4, 4),
            r"QuaternionAvgPool2d: input must have a positive multiple of 4",
        ),
        (QuaternionAvgPool3d(2), torch.randn(8, 4), r"QuaternionAvgPool3d: expected 4D \(unbatched\) or 5D"),
        (QuaternionDropout(0.5), torch.randn(2, 7, 3), r"QuaternionDropout: input must have a positive multiple of 4"),
        (QuaternionDropout(0.5), torch.randn(7), r"QuaternionDropout: input must have a positive multiple of 4"),
        (
            QuaternionMaxPool2d(3),
            torch.randn(1, 8, 2, 2),
            r"QuaternionMaxPool2d: input of shape \(1, 8, 2, 2\) with kernel_size=\(3, 3\).* is too small: the "
            r"output size would be \(0, 0\)",
        ),
        (
            QuaternionMaxPool1d(2, stride=1, padding=1, dilation=2),
            torch.randn(1, 8, 1),
            r"QuaternionMaxPool1d: .* a pooling window holds only padding, no quaternion to select",
        ),
    ],
)
def test_errors(layer: nn.Module, x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        layer(x)


def test_argument_errors() -> None:
    with pytest.raises(
        ValueError, match=r"QuaternionDropout: dropout probability has to be between 0 and 1, but got 1.5"
    ):
        QuaternionDropout(1.5)
    with pytest.raises(ValueError, match=r"quaternion_dropout: dropout probability .* got -0.1"):
        quaternion_dropout(torch.randn(2, 8), -0.1)
    with pytest.raises(ValueError, match=r"quaternion_max_pool: input must have a positive multiple of 4"):
        quaternion_max_pool(torch.randn(1, 5, 4, 4), 2, 2)

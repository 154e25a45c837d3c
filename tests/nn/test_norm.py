"""Quaternion batch / instance norm against a naive per-quaternion-channel loop, and its defining properties."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

from aqcf_kernels import reference as ref
from aqcf_kernels.nn import (
    QuaternionBatchNorm1d,
    QuaternionBatchNorm2d,
    QuaternionBatchNorm3d,
    QuaternionInstanceNorm1d,
    QuaternionInstanceNorm2d,
    QuaternionInstanceNorm3d,
    quaternion_batch_norm,
    quaternion_instance_norm,
)

F64 = torch.float64
BN = {1: QuaternionBatchNorm1d, 2: QuaternionBatchNorm2d, 3: QuaternionBatchNorm3d}
IN = {1: QuaternionInstanceNorm1d, 2: QuaternionInstanceNorm2d, 3: QuaternionInstanceNorm3d}
ODD = {0: (), 1: (7,), 2: (5, 7), 3: (3, 5, 4)}


pytestmark = pytest.mark.usefixtures("single_threaded")


def qrandn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def correlated(n: int, cq: int, spatial: tuple[int, ...], seed: int, transpose: bool = True) -> torch.Tensor:
    """Blocked ``(n, 4cq, *spatial)`` data whose components are correlated and offset, per quaternion channel.

    Each quaternion is ``A_c z + b_c`` with ``z`` iid normal, so the 4x4 covariance ``A_c A_cᵀ`` is far from
    diagonal and isotropic (a per-component or shared-variance normaliser cannot whiten it). With ``transpose``
    the last two spatial dims are generated swapped and transposed back: a non-contiguous input.
    """
    g = torch.Generator().manual_seed(seed)
    sp = tuple(spatial)
    if transpose and len(sp) >= 2:
        sp = (*sp[:-2], sp[-1], sp[-2])
    z = torch.randn(n, 4, cq, *sp, generator=g, dtype=F64)
    a = torch.randn(cq, 4, 4, generator=g, dtype=F64) + 2 * torch.eye(4, dtype=F64)
    b = 3 * torch.randn(4, cq, generator=g, dtype=F64)
    x = torch.einsum("cij,njc...->nic...", a, z) + b.view(1, 4, cq, *(1,) * len(sp))
    x = x.flatten(1, 2)
    if transpose and len(sp) >= 2:
        x = x.transpose(-1, -2)
    return x


# --------------------------------------------------------------------------------------------------
# The naive reference: one quaternion channel (and, for instance norm, one sample) at a time.
# --------------------------------------------------------------------------------------------------


def gram_schmidt_whiten(d: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows ``d`` (4, M) centred components -> ``L⁻¹ d`` with ``V + eps·I = L Lᵀ``, without any linalg call.

    Cholesky whitening is Gram-Schmidt in the order r, i, j, k under ``<u, v> = mean(u·v)``. The ``eps``
    ridge is the Gram matrix of four extra columns ``sqrt(eps·M)·I`` appended to the rows, so the
    orthonormalised first M columns are exactly ``L⁻¹ d``.
    """
    m = d.shape[1]
    rows = torch.cat([d, (eps * m) ** 0.5 * torch.eye(4, dtype=d.dtype)], dim=1)
    basis: list[torch.Tensor] = []
    for a in range(4):
        v = rows[a].clone()
        for u in basis:
            v = v - (v @ u) / m * u
        basis.append(v / ((v @ v) / m) ** 0.5)
    return torch.stack(basis)[:, :m]


def naive_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    whiten: bool,
    per_sample: bool,
) -> torch.Tensor:
    """Loops over (sample groups) x (quaternion channels); statistics of each written out plainly."""
    n, c = x.shape[:2]
    cq = c // 4
    out = torch.empty_like(x)
    groups = [[i] for i in range(n)] if per_sample else [list(range(n))]
    for samples in groups:
        for q in range(cq):
            chans = [q, cq + q, 2 * cq + q, 3 * cq + q]  # r, i, j, k of quaternion channel q
            comps = torch.stack([x[samples, ch].reshape(-1) for ch in chans])  # (4, M)
            d = comps - comps.mean(dim=1, keepdim=True)
            if whiten:
                y = gram_schmidt_whiten(d, eps)
                if weight is not None:
                    y = weight[q] @ y
            else:
                var = sum((d[a] ** 2).mean() for a in range(4))  # E|x - mu|^2, one number per quaternion
                y = d / torch.sqrt(var + eps)
                if weight is not None:
                    y = weight[q] * y
            if bias is not None:
                y = y + bias[chans].unsqueeze(1)
            for a, ch in enumerate(chans):
                out[samples, ch] = y[a].reshape(x[samples, ch].shape)
    return out


def randomise(layer: torch.nn.Module, seed: int) -> None:
    # The init (gamma = 1 or I/2, beta = 0) would hide a mis-wired parameter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
@pytest.mark.parametrize("kind, dims", [("bn", 0), ("bn", 1), ("bn", 2), ("bn", 3), ("in", 1), ("in", 2), ("in", 3)])
def test_matches_naive_reference(kind: str, dims: int, whiten: bool) -> None:
    layer_cls = (BN if kind == "bn" else IN)[max(dims, 1)]
    layer = layer_cls(12, eps=1e-3, affine=True, whiten=whiten, dtype=F64)
    randomise(layer, seed=dims)
    x = correlated(3, 3, ODD[dims], seed=10 + dims)
    y = layer.train()(x)
    expected = naive_norm(x, layer.weight.detach(), layer.bias.detach(), 1e-3, whiten, per_sample=kind == "in")
    assert y.shape == x.shape
    assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
@pytest.mark.parametrize("kind, dims", [("bn", 2), ("bn", 3), ("in", 2), ("in", 3)])
def test_channels_last_input_gives_channels_last_output(kind: str, dims: int, whiten: bool) -> None:
    """As torch.nn.BatchNorm2d/3d keep channels_last: in both modes, the values those of the naive reference."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    layer = (BN if kind == "bn" else IN)[dims](12, eps=1e-3, affine=True, whiten=whiten, dtype=F64)
    randomise(layer, seed=20 + dims)
    x = correlated(3, 3, ODD[dims], seed=30 + dims).contiguous(memory_format=fmt)
    y = layer.train()(x)
    expected = naive_norm(x, layer.weight.detach(), layer.bias.detach(), 1e-3, whiten, per_sample=kind == "in")
    assert y.is_contiguous(memory_format=fmt)
    assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composite"])
@pytest.mark.parametrize("kind, dims", [("bn", 2), ("bn", 3), ("in", 2), ("in", 3)])
def test_channels_last_of_one_sample_one_row_stays_channels_last(kind: str, dims: int, fused: bool) -> None:
    """A batch of 1 whose spatial dims but the last are 1: the composite path's elementwise ops, on the (N, 4, Cq, *S)
    view, took its strides for a channels-first tensor's and wrote a channels-first output (found by
    tests/nn/test_norm_grid.py)."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    layer = (BN if kind == "bn" else IN)[dims](12, eps=1e-3, affine=True, dtype=F64)
    randomise(layer, seed=40 + dims)
    layer.fused = fused
    x = correlated(1, 3, (1,) * (dims - 1) + (3,), seed=50 + dims).contiguous(memory_format=fmt)
    y = layer.train()(x)
    expected = naive_norm(x, layer.weight.detach(), layer.bias.detach(), 1e-3, False, per_sample=kind == "in")
    assert y.is_contiguous(memory_format=fmt) and y.stride() == x.stride()
    assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
@pytest.mark.parametrize("fn", [quaternion_batch_norm, quaternion_instance_norm], ids=["batch", "instance"])
def test_gradcheck_train_mode(fn, whiten: bool) -> None:
    cq = 2
    x = correlated(2, cq, (3, 4), seed=1).requires_grad_()
    w = (torch.eye(4, dtype=F64) + 0.3 * qrandn(cq, 4, 4, seed=2)) if whiten else qrandn(cq, seed=2)
    w.requires_grad_()
    b = qrandn(4 * cq, seed=3).requires_grad_()
    # Running statistics are updated as a side effect: they must not disturb the gradient.
    rm = torch.zeros(4 * cq, dtype=F64)
    rv = torch.eye(4, dtype=F64).repeat(cq, 1, 1) if whiten else torch.ones(cq, dtype=F64)
    if fn is quaternion_batch_norm:

        def f(x, w, b):
            return fn(x, rm, rv, w, b, training=True, eps=1e-3, whiten=whiten)
    else:

        def f(x, w, b):
            return fn(x, rm, rv, w, b, use_input_stats=True, eps=1e-3, whiten=whiten)

    assert gradcheck(f, (x, w, b))


@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
def test_gradgradcheck_batch_norm(whiten: bool) -> None:
    # Everything is composed of differentiable torch ops (no custom backward): second order works too.
    x = correlated(2, 1, (3, 3), seed=4).requires_grad_()
    assert gradgradcheck(lambda x: quaternion_batch_norm(x, None, None, training=True, eps=1e-3, whiten=whiten), (x,))


@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
def test_gradcheck_eval_mode_parameters(whiten: bool) -> None:
    layer = QuaternionBatchNorm2d(8, whiten=whiten, dtype=F64)
    randomise(layer, 5)
    layer.train()(correlated(4, 2, (3, 3), seed=5))
    layer.eval()
    x = correlated(2, 2, (3, 2), seed=6).requires_grad_()
    assert gradcheck(
        lambda x, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,)),
        (x, layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()),
    )


def manual_stats(batches: list[torch.Tensor], momentum: float | None, whiten: bool, per_sample: bool):
    """Running mean / var / cov after ``batches``, computed per channel with explicit loops."""
    cq = batches[0].shape[1] // 4
    rm = torch.zeros(4 * cq, dtype=F64)
    rv = torch.eye(4, dtype=F64).repeat(cq, 1, 1) / 4 if whiten else torch.ones(cq, dtype=F64)
    for t, x in enumerate(batches, start=1):
        factor = 1.0 / t if momentum is None else momentum
        groups = [[i] for i in range(x.shape[0])] if per_sample else [list(range(x.shape[0]))]
        new_m = torch.zeros_like(rm)
        new_v = torch.zeros_like(rv)
        for samples in groups:
            for q in range(cq):
                chans = [q, cq + q, 2 * cq + q, 3 * cq + q]
                comps = torch.stack([x[samples, ch].reshape(-1) for ch in chans])
                m = comps.shape[1]
                mu = comps.mean(1)
                d = comps - mu.unsqueeze(1)
                for a, ch in enumerate(chans):
                    new_m[ch] += mu[a] / len(groups)
                if whiten:
                    new_v[q] += (d @ d.T) / (m - 1) / len(groups)
                else:
                    new_v[q] += (d**2).sum() / (m - 1) / len(groups)
        rm = (1 - factor) * rm + factor * new_m
        rv = (1 - factor) * rv + factor * new_v
    return rm, rv


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_running_stats_match_manual(momentum: float | None, whiten: bool, per_sample: bool) -> None:
    cls = QuaternionInstanceNorm2d if per_sample else QuaternionBatchNorm2d
    layer = cls(8, momentum=momentum, track_running_stats=True, whiten=whiten, dtype=F64).train()
    # Different batch sizes and spatial sizes: the unbiased factor n/(n-1) changes from batch to batch.
    batches = [correlated(b, 2, (h, w), seed=20 + b) for b, h, w in [(2, 3, 5), (3, 4, 3), (5, 2, 3)]]
    for x in batches:
        layer(x)
    rm, rv = manual_stats(batches, momentum, whiten, per_sample)
    assert layer.num_batches_tracked.item() == 3
    assert_close(layer.running_mean, rm)
    assert_close(layer.running_cov if whiten else layer.running_var, rv)
    assert not hasattr(layer, "running_var" if whiten else "running_cov")


@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
def test_train_eval_parity(whiten: bool) -> None:
    # Batches from one fixed distribution (same mixing matrices and offsets: same seed for those);
    # with the cumulative average, the running statistics converge to the population ones.
    layer = QuaternionBatchNorm2d(12, momentum=None, whiten=whiten, dtype=F64)
    randomise(layer, 7)
    g = torch.Generator().manual_seed(8)
    a = torch.randn(3, 4, 4, generator=g, dtype=F64) + 2 * torch.eye(4, dtype=F64)
    b = 3 * torch.randn(1, 4, 3, 1, 1, generator=g, dtype=F64)

    def batch(n: int) -> torch.Tensor:
        z = torch.randn(n, 4, 3, 6, 5, generator=g, dtype=F64)
        return (torch.einsum("cij,njc...->nic...", a, z) + b).flatten(1, 2)

    layer.train()
    with torch.no_grad():
        for _ in range(60):
            layer(batch(16))
    x = batch(64)
    with torch.no_grad():
        y_train = layer.train()(x)
        y_eval = layer.eval()(x)
    centred = (y_train - layer.bias.view(1, 12, 1, 1)).norm()

    def rel(y: torch.Tensor) -> float:
        return ((y - y_train).norm() / centred).item()

    # Sampling error of ~2000 values per channel, against 1920 in the test batch: a few percent.
    assert rel(y_eval) < 0.08
    # The running statistics really moved away from their initial values (so this cannot pass by accident).
    fresh = QuaternionBatchNorm2d(12, whiten=whiten, dtype=F64).eval()
    fresh.load_state_dict({k: v for k, v in layer.state_dict().items() if "running" not in k}, strict=False)
    with torch.no_grad():
        assert rel(fresh(x)) > 0.5


def test_untrained_eval_is_identity() -> None:
    x = correlated(2, 2, (3, 4), seed=9)
    for whiten in (False, True):
        layer = QuaternionBatchNorm2d(8, eps=0.0, whiten=whiten, dtype=F64).eval()
        assert_close(layer(x), x)


def component_covariance(y: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """(Cq, 4, 4) (or (N, Cq, 4, 4)) covariance of the components of each quaternion channel, by loops."""
    n, c = y.shape[:2]
    cq = c // 4
    groups = [[i] for i in range(n)] if per_sample else [list(range(n))]
    out = torch.empty(len(groups), cq, 4, 4, dtype=y.dtype)
    for gi, samples in enumerate(groups):
        for q in range(cq):
            comps = torch.stack([y[samples, a * cq + q].reshape(-1) for a in range(4)])
            d = comps - comps.mean(1, keepdim=True)
            out[gi, q] = d @ d.T / comps.shape[1]
    return out if per_sample else out[0]


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_whitened_output_has_identity_covariance(per_sample: bool) -> None:
    x = correlated(4, 3, (5, 6), seed=11)
    fn = quaternion_instance_norm if per_sample else quaternion_batch_norm
    kw = {"use_input_stats": True} if per_sample else {"training": True}
    y = fn(x, None, None, eps=0.0, whiten=True, **kw)
    eye = torch.eye(4, dtype=F64).expand(*((4,) if per_sample else ()), 3, 4, 4)
    assert_close(component_covariance(y, per_sample), eye, rtol=0, atol=1e-10)
    # The input was far from white: a per-component or shared-variance normaliser would fail this.
    assert (component_covariance(x, per_sample) - eye).abs().max() > 1.0
    # The module's default gamma = I/2 gives covariance I/4: E|y - beta|^2 = 1, as in the shared mode.
    # (a batch norm refuses eps = 0 with batch statistics, as torch's: 1e-14 moves the covariance by ~1e-13 here)
    layer = (QuaternionInstanceNorm2d if per_sample else QuaternionBatchNorm2d)(12, eps=1e-14, affine=True, whiten=True)
    y = layer.to(F64).train()(x)
    assert_close(component_covariance(y, per_sample), eye / 4, rtol=0, atol=1e-10)


def test_cholesky_whitening_is_lower_triangular() -> None:
    # Cholesky (not ZCA) whitening: the output r depends on the input r only, i on (r, i), and so on.
    # Hence a lower-triangular (positive diagonal) mixing plus offset of the input leaves it unchanged.
    x = correlated(3, 2, (4, 5), seed=12)
    y = quaternion_batch_norm(x, None, None, training=True, eps=0.0, whiten=True)
    g = torch.Generator().manual_seed(13)
    t = torch.randn(2, 4, 4, generator=g, dtype=F64).tril(-1) + torch.diag_embed(1 + torch.rand(2, 4, generator=g))
    x4 = x.unflatten(1, (4, 2))
    x2 = (torch.einsum("cij,njc...->nic...", t, x4) + 5.0).flatten(1, 2)
    y2 = quaternion_batch_norm(x2, None, None, training=True, eps=0.0, whiten=True)
    assert_close(y2, y, rtol=0, atol=1e-9)
    # ... and an upper-triangular one does change it (the test can tell the two apart).
    x3 = (torch.einsum("cij,njc...->nic...", t.mT, x4)).flatten(1, 2)
    y3 = quaternion_batch_norm(x3, None, None, training=True, eps=0.0, whiten=True)
    assert (y3 - y).abs().max() > 0.1


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_shared_variance_output_has_unit_modulus_variance(per_sample: bool) -> None:
    x = correlated(4, 3, (5, 6), seed=14)
    fn = quaternion_instance_norm if per_sample else quaternion_batch_norm
    kw = {"use_input_stats": True} if per_sample else {"training": True}
    y = fn(x, None, None, eps=0.0, **kw)
    cov_y, cov_x = component_covariance(y, per_sample), component_covariance(x, per_sample)
    trace = cov_y.diagonal(dim1=-2, dim2=-1).sum(-1)  # E|y - E y|^2 per quaternion channel
    assert_close(trace, torch.ones_like(trace), rtol=0, atol=1e-12)
    # One divisor per quaternion: the component covariance keeps its shape, only its scale changes.
    scale = cov_x.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert_close(cov_y, cov_x / scale[..., None, None], rtol=0, atol=1e-12)


def test_shared_variance_commutes_with_unit_quaternion_rotation() -> None:
    # |q ⊗ (x - μ)| = |x - μ| for a unit quaternion q, so the shared variance is unchanged and the
    # layer commutes with left multiplication: BN(q ⊗ x) = q ⊗ BN(x) (beta = 0, scalar gamma).
    # Per-component normalisation does not (each component would get its own divisor).
    x = correlated(3, 2, (4, 5), seed=15)
    q = qrandn(1, 4, 1, 1, seed=16)
    q = q / q.norm()
    q = q.repeat_interleave(2, dim=1)  # the same q for both quaternion channels (blocked layout)
    layer = QuaternionBatchNorm2d(8, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(qrandn(2, seed=17))
    y_rot = layer(ref.hamilton_product(q, x))
    assert_close(y_rot, ref.hamilton_product(q, layer(x)))
    per_component = torch.nn.BatchNorm2d(8, affine=False, dtype=F64)
    assert (per_component(ref.hamilton_product(q, x)) - ref.hamilton_product(q, per_component(x))).abs().max() > 0.1


def test_whitening_degenerate_components_stay_finite() -> None:
    # Pure quaternions (r = 0 exactly) and a duplicated component: singular covariance, regularised by eps.
    x = correlated(3, 2, (4, 5), seed=18)
    x4 = x.unflatten(1, (4, 2)).clone()
    x4[:, 0] = 0.0
    x4[:, 3] = 2.0 * x4[:, 2]
    x = x4.flatten(1, 2).requires_grad_()
    y = quaternion_batch_norm(x, None, None, training=True, eps=1e-5, whiten=True)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert_close(y.unflatten(1, (4, 2))[:, 0], torch.zeros_like(y.unflatten(1, (4, 2))[:, 0]))


@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
def test_eval_uses_the_running_statistics(whiten: bool) -> None:
    layer = QuaternionBatchNorm1d(8, eps=1e-3, whiten=whiten, dtype=F64)
    randomise(layer, 19)
    g = torch.Generator().manual_seed(20)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(8, generator=g, dtype=F64))
        if whiten:
            a = torch.randn(2, 4, 4, generator=g, dtype=F64)
            layer.running_cov.copy_(a @ a.mT + torch.eye(4, dtype=F64))
        else:
            layer.running_var.copy_(torch.rand(2, generator=g, dtype=F64) + 0.5)
    x = qrandn(5, 8, 7, seed=21)
    y = layer.eval()(x)
    x4 = (x - layer.running_mean.view(1, 8, 1)).unflatten(1, (4, 2))
    if whiten:
        chol = torch.linalg.cholesky(layer.running_cov + 1e-3 * torch.eye(4, dtype=F64))
        m = layer.weight @ torch.linalg.inv(chol)
        expected = torch.einsum("cij,njcl->nicl", m, x4)
    else:
        expected = x4 * (layer.weight / (layer.running_var + 1e-3).sqrt()).view(1, 1, 2, 1)
    assert_close(y, expected.flatten(1, 2) + layer.bias.view(1, 8, 1))
    assert layer.num_batches_tracked.item() == 0  # eval does not count batches


def test_instance_norm_defaults_and_unbatched_input() -> None:
    layer = QuaternionInstanceNorm2d(8)
    assert layer.weight is None and layer.bias is None and layer.running_mean is None
    x = correlated(3, 2, (5, 4), seed=22).float()
    y = layer(x)
    for i in range(3):
        assert_close(layer(x[i]), y[i])
    # Statistics are per sample: scaling one sample does not change any output.
    x2 = x.clone()
    x2[1] *= 10.0
    assert_close(layer(x2), y, rtol=1e-4, atol=1e-4)
    # Eval mode without running statistics still normalises with the input's own statistics.
    assert_close(layer.eval()(x), y)


def test_batch_norm_without_running_stats_uses_batch_stats_in_eval() -> None:
    layer = QuaternionBatchNorm3d(4, track_running_stats=False, dtype=F64).eval()
    assert layer.running_mean is None and layer.num_batches_tracked is None
    x = correlated(2, 1, (3, 4, 5), seed=23)
    assert_close(layer(x), naive_norm(x, layer.weight, layer.bias, 1e-5, False, per_sample=False))


def test_low_precision_input_is_normalised_in_float32() -> None:
    # bf16 has no Cholesky and its squares lose most digits: the statistics are taken in float32, so
    # the only error left is rounding the output to bf16 (relative 2^-8).
    x = correlated(4, 2, (6, 5), seed=24).to(torch.bfloat16)
    for whiten in (False, True):
        y16 = quaternion_batch_norm(x, None, None, training=True, whiten=whiten)
        y64 = quaternion_batch_norm(x.double(), None, None, training=True, whiten=whiten)
        assert y16.dtype == torch.bfloat16
        assert_close(y16.double(), y64, rtol=2**-8, atol=1e-2)


def test_parameter_shapes_state_dict_and_repr() -> None:
    shared = QuaternionBatchNorm2d(16)
    whiten = QuaternionBatchNorm2d(16, momentum=None, whiten=True)
    assert shared.weight.shape == (4,) and shared.bias.shape == (16,) and shared.running_var.shape == (4,)
    assert whiten.weight.shape == (4, 4, 4) and whiten.running_cov.shape == (4, 4, 4)
    assert set(whiten.state_dict()) == {"weight", "bias", "running_mean", "running_cov", "num_batches_tracked"}
    assert_close(whiten.weight, torch.eye(4).expand(4, 4, 4) / 2)
    assert repr(shared) == "QuaternionBatchNorm2d(16, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"
    assert repr(whiten).endswith("momentum=None, affine=True, track_running_stats=True, whiten=True)")


@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
def test_a_state_dict_without_the_batch_count_loads_as_torch_nn_loads_it(whiten: bool) -> None:
    """torch.nn.BatchNorm2d loads a dict with running statistics but no ``num_batches_tracked`` (older torch's,
    hand-made ones) and keeps its own count; so do ours (they reported it as a missing key)."""
    source = QuaternionBatchNorm2d(16, whiten=whiten)
    source(torch.randn(3, 16, 4, 4))
    state = {k: v for k, v in source.state_dict().items() if k != "num_batches_tracked"}
    layer, real = QuaternionBatchNorm2d(16, whiten=whiten), torch.nn.BatchNorm2d(16)
    layer.num_batches_tracked.fill_(5)
    real.num_batches_tracked.fill_(5)
    layer.load_state_dict(state)
    real.load_state_dict({k: v for k, v in torch.nn.BatchNorm2d(16).state_dict().items() if "num_batches" not in k})
    assert layer.num_batches_tracked.item() == real.num_batches_tracked.item() == 5
    for name, value in state.items():
        assert torch.equal(layer.state_dict()[name], value), name


@pytest.mark.parametrize(
    "layer, x, match",
    [
        (
            QuaternionBatchNorm2d(8),
            torch.randn(2, 6, 3, 3),
            r"QuaternionBatchNorm2d: input must have a positive multiple of 4",
        ),
        (
            QuaternionBatchNorm2d(8),
            torch.randn(2, 12, 3, 3),
            r"QuaternionBatchNorm2d: input has 12 channels .*num_features=8",
        ),
        (QuaternionBatchNorm2d(8), torch.randn(8, 3, 3), r"QuaternionBatchNorm2d: expected 4D input \(got 3D input\)"),
        (QuaternionBatchNorm1d(8), torch.randn(2, 8, 3, 3), r"QuaternionBatchNorm1d: expected 2D or 3D input \(got 4D"),
        (QuaternionBatchNorm3d(8), torch.randn(2, 8, 3, 3), r"QuaternionBatchNorm3d: expected 5D input \(got 4D"),
        (QuaternionInstanceNorm2d(8), torch.randn(8, 3), r"QuaternionInstanceNorm2d: expected 3D or 4D input \(got 2D"),
        (
            QuaternionInstanceNorm3d(8),
            torch.randn(5, 3, 3, 3),
            r"QuaternionInstanceNorm3d: input must have a positive mul",
        ),
        (QuaternionBatchNorm1d(8), torch.randn(1, 8), r"QuaternionBatchNorm1d: expected more than 1 value per channel"),
        (QuaternionInstanceNorm1d(8), torch.randn(2, 8, 1), r"InstanceNorm1d: expected more than 1 spatial element"),
    ],
)
def test_input_errors(layer: torch.nn.Module, x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("layer", [QuaternionBatchNorm2d(8), QuaternionInstanceNorm2d(8, affine=True)])
def test_integer_input_is_refused(layer: torch.nn.Module, dtype: torch.dtype) -> None:
    x = torch.randint(-50, 50, (2, 8, 3, 3)).to(dtype)
    with pytest.raises(TypeError, match=rf"{type(layer).__name__}: input must be a floating-point tensor, got {dtype}"):
        layer(x)


@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 0, 3)])
@pytest.mark.parametrize(
    "make",
    [
        lambda: QuaternionBatchNorm2d(8),
        lambda: QuaternionBatchNorm2d(8, whiten=True),
        lambda: QuaternionInstanceNorm2d(8, affine=True, track_running_stats=True),
        lambda: QuaternionBatchNorm2d(8, activation="gelu"),
    ],
)
def test_empty_input_in_training_is_an_empty_output(make, shape) -> None:
    # As torch's norms: nothing to normalise, the running statistics untouched (not NaN), γ and β
    # still in the graph (zero gradients, as torch's BatchNorm gives).
    layer = make()
    with torch.no_grad():
        layer.running_mean.normal_()
    before = {name: b.clone() for name, b in layer.named_buffers() if name != "num_batches_tracked"}
    y = layer(torch.randn(*shape, requires_grad=True))
    assert y.shape == shape and y.dtype == torch.float32
    y.sum().backward()
    assert all(torch.equal(getattr(layer, name), b) for name, b in before.items())
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))


def test_constructor_and_functional_errors() -> None:
    with pytest.raises(ValueError, match=r"QuaternionBatchNorm2d: num_features must be a positive multiple of 4"):
        QuaternionBatchNorm2d(6)
    with pytest.raises(ValueError, match=r"QuaternionInstanceNorm2d: momentum must be in \[0, 1\]"):
        QuaternionInstanceNorm2d(8, momentum=1.5)
    x = torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match=r"quaternion_batch_norm: weight must have shape \(2, 4, 4\), got \(2,\)"):
        quaternion_batch_norm(x, None, None, torch.ones(2), training=True, whiten=True)
    with pytest.raises(ValueError, match=r"quaternion_batch_norm: running_var must have shape \(2,\)"):
        quaternion_batch_norm(x, torch.zeros(8), torch.ones(8), training=True)
    with pytest.raises(ValueError, match=r"quaternion_batch_norm: running_mean and running_var are required"):
        quaternion_batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"quaternion_instance_norm: input must have a positive multiple of 4"):
        quaternion_instance_norm(torch.randn(2, 5, 3))


@pytest.mark.parametrize("cls", [QuaternionBatchNorm2d, QuaternionInstanceNorm2d])
@pytest.mark.parametrize("whiten", [False, True], ids=["shared", "whiten"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composite"])
def test_bias_false_is_a_scale_without_a_shift(cls, whiten, fused) -> None:
    """``bias=False`` (torch.nn's norms' keyword): no ``bias`` parameter, and the outputs, the input and weight
    gradients and the running statistics of the same norm with its shift held at 0, in training and in eval."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 12, 4, 5, generator=g, dtype=F64)
    gy = torch.randn(3, 12, 4, 5, generator=g, dtype=F64)
    kw = {"affine": True, "track_running_stats": True, "whiten": whiten, "activation": "leaky_relu", "dtype": F64}
    scaled, shifted = cls(12, bias=False, **kw), cls(12, **kw)
    assert scaled.bias is None and "bias" not in scaled.state_dict() and "bias=False" in repr(scaled)
    with torch.no_grad():
        shifted.weight.copy_(scaled.weight.uniform_(0.5, 1.5) if not whiten else scaled.weight.normal_())
    shifted.bias.requires_grad_(False)
    scaled.fused = shifted.fused = fused
    for training in (True, False):
        scaled.train(training), shifted.train(training)
        outs = []
        for norm in (scaled, shifted):
            xi = x.clone().requires_grad_()
            y = norm(xi)
            outs.append((y, *torch.autograd.grad(y, (xi, norm.weight), gy)))
        for a, b in zip(*outs, strict=True):
            assert_close(a, b, rtol=0, atol=0)
    for name in ("running_mean", "running_cov" if whiten else "running_var"):
        assert_close(getattr(scaled, name), getattr(shifted, name), rtol=0, atol=0)

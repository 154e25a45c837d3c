"""The quaternion norms on hard but legitimate inputs, held to what torch.nn's norms do on the same data.

* Large offsets (CT Hounsfield units before normalisation: mean 1e4, std 1) in float32: the statistics must
  not cancel, on the compiled kernel (planes and channels_last rows, several chunks each) and the composite
  path: within 4x the error of torch's own float32 statistics (``var_mean``, Welford) and of ``F.batch_norm`` /
  ``F.instance_norm``'s output.
* Whitening with (nearly) linearly dependent components (i = j = k = r): the 4x4 covariance is singular, and
  ``eps`` alone is below its rounding in float32: outputs and gradients must stay finite, in training and in
  eval on the running covariance.
* Autocast: the whitening's matmuls must not run in bf16 (its statistics did).
* A batch of one / one spatial element in training: the error torch.nn gives, not NaN.
* Half precision at magnitudes whose squares overflow fp16; running statistics as torch.nn's.

The Triton kernels' large-offset case is tests/triton_kernels/test_triton_norm.py's
``test_no_cancellation_when_the_mean_dwarfs_the_spread``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aqcf_kernels.nn.norm import (
    WHITENING_JITTER,
    QuaternionBatchNorm1d,
    QuaternionBatchNorm2d,
    QuaternionInstanceNorm2d,
    _quaternion_norm,
    whitening_jitter,
)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def _offset_data(shape, offset, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, gy


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composite"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
@pytest.mark.parametrize("offset", [1e4, 3e4])
def test_large_offset_statistics_and_output_as_accurate_as_torch(fused, channels_last, per_sample, offset):
    """mean 1e4..3e4, std 1 in float32. 40x40 planes: two chunks of the compiled kernel's planes (1024) and
    seven row blocks (256) in channels_last, so the chunk merges run. Before the fix the compiled kernel's
    variance was 1e-6..5e-5 off (torch: 3e-8) and its instance-norm output up to 7x torch's error."""
    shape = (2, 8, 40, 40)
    x, gy = _offset_data(shape, offset, seed=int(offset) + 2 * per_sample + channels_last, channels_last=channels_last)
    x64 = x.double()
    cq = shape[1] // 4

    def run(inp):
        inp = inp.detach().requires_grad_()
        rm = torch.zeros(4 * cq, dtype=inp.dtype)
        rv = torch.ones(cq, dtype=inp.dtype)
        # momentum 1: the running statistics ARE the batch's (variance unbiased), so they expose the statistics
        y = _quaternion_norm("t", inp, per_sample, rm, rv, None, None, True, 1.0, 1e-5, False, fused=fused)
        (gx,) = torch.autograd.grad(y, inp, gy.to(y.dtype))
        return y, gx, rm, rv

    y, gx, rm, rv = run(x)
    y64, gx64, rm64, rv64 = run(x64)
    assert all(torch.isfinite(t).all() for t in (y, gx, rm, rv))

    # torch's float32 statistics and output on the same data (real channels, NCHW: its channels_last batch norm
    # is itself far off at these offsets, 3e-2 at 1e4)
    reduce = (2, 3) if per_sample else (0, 2, 3)
    tv, tm = torch.var_mean(x.contiguous(), reduce, correction=1)
    tv64, tm64 = torch.var_mean(x64, reduce, correction=1)
    var_floor = max(4 * _rel(tv, tv64), 2e-7)
    assert _rel(rv, rv64) <= var_floor, f"running var {_rel(rv, rv64):.2e} vs torch var_mean {_rel(tv, tv64):.2e}"
    assert _rel(rm, rm64) <= max(4 * _rel(tm, tm64), 1e-7)

    def torch_norm(inp):
        inp = inp.contiguous().detach().requires_grad_()
        y = F.instance_norm(inp) if per_sample else F.batch_norm(inp, None, None, training=True)
        return y, torch.autograd.grad(y, inp, gy.to(y.dtype))[0]

    ty, tgx = torch_norm(x)
    ty64, tgx64 = torch_norm(x64)
    assert _rel(y, y64) <= 4 * _rel(ty, ty64), f"y {_rel(y, y64):.2e} vs torch {_rel(ty, ty64):.2e}"
    assert _rel(gx, gx64) <= 4 * _rel(tgx, tgx64), f"dx {_rel(gx, gx64):.2e} vs torch {_rel(tgx, tgx64):.2e}"


def _dependent_components(kind: str, shape, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=g) * scale + offset
    j = torch.randn(shape, generator=g) * scale + offset
    if kind == "rank1":  # i = j = k = r
        return torch.cat([r, r, r, r], 1)
    if kind == "rank2":  # i = -r, k = j
        return torch.cat([r, -r, j, j], 1)
    near = r + 1e-5 * scale * torch.randn(shape, generator=g)  # dependent up to float32 rounding
    return torch.cat([r, near, 2 * r, j], 1)


@pytest.mark.parametrize("kind", ["rank1", "rank2", "near"])
@pytest.mark.parametrize("module", [QuaternionBatchNorm2d, QuaternionInstanceNorm2d])
@pytest.mark.parametrize("scale,offset", [(1e3, 5.0), (1e2, 1e4), (1.0, 0.0)])
def test_whitening_of_dependent_components_stays_finite(kind, module, scale, offset):
    """A singular 4x4 covariance: V + eps·I is positive definite in exact arithmetic only; in float32 eps is
    below V's rounding (V ~ 1e6: ulp 0.06), and the Cholesky factorisation failed: NaN everywhere (before)."""
    cq = 2
    x = _dependent_components(kind, (4, cq, 6, 5), scale, offset, seed=len(kind) + int(scale))
    norm = module(4 * cq, whiten=True, affine=True, track_running_stats=True, momentum=None)
    x = x.requires_grad_()
    y = norm(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(y, [x, norm.weight, norm.bias], gy)
    for name, t in zip(("y", "dx", "dweight", "dbias"), (y, *grads), strict=True):
        assert torch.isfinite(t).all(), f"{name} is not finite"
    # the components that are not constant are normalised (not crushed to 0, nor blown up)
    assert 0.05 < y.detach().square().mean(dim=(0, 2, 3)).max() < 10
    # eval on the running covariance (momentum=None after one batch: exactly this batch's, singular)
    norm.eval()
    x2 = _dependent_components(kind, (3, cq, 6, 5), scale, offset, seed=99).requires_grad_()
    y2 = norm(x2)
    (gx2,) = torch.autograd.grad(y2, x2, torch.ones_like(y2))
    assert torch.isfinite(y2).all() and torch.isfinite(gx2).all()


def test_whitening_jitter_leaves_well_conditioned_covariances_alone():
    """The jitter goes only to the matrices whose factorisation fails: elsewhere ``V + eps·I = L Lᵀ`` exactly."""
    from aqcf_kernels.nn.norm import _whitening_matrix

    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.mT / 4 + 0.1 * torch.eye(4, dtype=torch.float64)
    cov[2] = 1e6  # rank 1 (every entry equal): this one fails without the jitter in float32
    m = _whitening_matrix(cov.float(), 1e-5)
    assert torch.isfinite(m).all()
    # the jittered one still whitens: M V Mᵀ has eigenvalues in [0, 1] (1 along the one direction V spans)
    whitened = m[2].double() @ cov[2] @ m[2].double().T
    assert 0.99 < torch.linalg.eigvalsh(whitened).max() < 1.01
    want = torch.linalg.inv(torch.linalg.cholesky(cov + 1e-5 * torch.eye(4, dtype=torch.float64)))
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(m[keep].double(), want[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_eval_whitening_on_a_half_precision_running_covariance(dtype):
    """A half-precision module's running covariance is stored rounded to its dtype: a singular one (two samples a
    batch: rank 1) comes out indefinite by ~1e-3 of its trace, 30x the float32 jitter, and the factorisation with
    that jitter failed (bf16: max |y| 4e3 from unit inputs, found by tests/nn/test_norm_grid.py). The jitter of a
    covariance stored in half precision is one rounding of its trace (``whitening_jitter``): the whitening of the
    buffer as stored, in float64, with that jitter."""
    eps, cq = 1e-5, 32
    layer = QuaternionBatchNorm1d(4 * cq, eps=eps, whiten=True, momentum=None, affine=False, dtype=dtype)
    x = torch.randn(1, 4 * cq, 2, generator=torch.Generator().manual_seed(5)).to(dtype)
    layer.train()(x)  # momentum None: the running covariance is this batch's (unbiased), rank 1
    cov = layer.running_cov.double()
    eye = torch.eye(4, dtype=torch.float64)
    # the case at hand: the float32 factorisation of cov + eps·I fails for some channels, and with the float32
    # jitter still does
    failed = torch.linalg.cholesky_ex(cov.float() + eps * eye.float()).info > 0
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    float32_jitter = (WHITENING_JITTER * trace + eps)[:, None, None] * eye
    assert (
        failed.any()
        and (torch.linalg.cholesky_ex(cov.float() + eps * eye.float() + float32_jitter.float()).info > 0).any()
    )
    y = layer.eval()(x)
    assert whitening_jitter(dtype) == torch.finfo(dtype).eps  # the documented rule, spelled out below
    jitter = torch.where(failed, torch.finfo(dtype).eps * trace + eps, 0.0)[:, None, None] * eye
    m = torch.linalg.inv(torch.linalg.cholesky(cov + eps * eye + jitter))  # (Cq, 4, 4)
    xc = (x.double() - layer.running_mean.double().view(1, -1, 1)).unflatten(1, (4, cq))  # (1, 4, Cq, 2)
    want = torch.einsum("cij,njcs->nics", m, xc).flatten(1, 2)
    rounding = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), want, rtol=0, atol=8 * rounding * want.abs().max().item())


def test_the_onnx_exports_whitening_matrix_jitters_as_eager_mode():
    """The elementwise Cholesky an ONNX export uses (ONNX has none) factorises degenerate covariances as the
    eager path does, with the jitter where ``cov + eps·I`` fails: the exported model gave NaN there."""
    from aqcf_kernels.nn.norm import _unrolled_whitening_matrix, _whitening_matrix

    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.mT / 4 + 0.1 * torch.eye(4, dtype=torch.float64)
    cov[2] = 1e6  # rank 1
    r = torch.randn(4, 50, generator=g, dtype=torch.float64) * 1e3
    cov[4] = torch.stack([r[0], -r[0], r[1], r[1]]).cov(correction=0)  # i = -r, k = j: rank 2
    cov = cov.float()
    eager, unrolled = _whitening_matrix(cov, 1e-5), _unrolled_whitening_matrix(cov, 1e-5)
    assert torch.isfinite(unrolled).all()
    keep = [0, 1, 3, 5]  # well conditioned: the same matrix
    torch.testing.assert_close(unrolled[keep], eager[keep], rtol=1e-4, atol=1e-6)
    for i in (2, 4):  # degenerate: (whether the first factorisation fails is rounding's call) still a whitening
        whitened = unrolled[i].double() @ cov[i].double() @ unrolled[i].double().T
        assert 0.99 < torch.linalg.eigvalsh(whitened).max() < 1.01, i


@pytest.mark.parametrize("module", [QuaternionBatchNorm2d, QuaternionInstanceNorm2d])
def test_whitening_under_autocast_keeps_float32_statistics(module):
    """Under CPU bf16 autocast the covariance ``z zᵀ`` and the whitening ran as bf16 matmuls (3e-3 off, the
    running covariance too); the shared-variance mode's elementwise ops stayed in float32 (5e-8)."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(3, 8, 9, 7, generator=g, dtype=torch.float64) * 300 + 50
    gy = torch.randn(base.shape, generator=g, dtype=torch.float64)
    norm = module(8, whiten=True, affine=True, track_running_stats=True)
    ref = module(8, whiten=True, affine=True, track_running_stats=True).double()
    x = base.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.float32  # as torch.nn's norms under autocast
    (gx,) = torch.autograd.grad(y, x, gy.float())
    x64 = base.clone().requires_grad_()
    y64 = ref(x64)
    (gx64,) = torch.autograd.grad(y64, x64, gy)
    assert _rel(y, y64) < 1e-5 and _rel(gx, gx64) < 1e-5
    assert _rel(norm.running_cov, ref.running_cov) < 1e-5 and _rel(norm.running_mean, ref.running_mean) < 1e-5


@pytest.mark.parametrize("whiten", [False, True])
def test_one_value_per_statistic_in_training_is_torchs_error(whiten):
    g = torch.Generator().manual_seed(5)
    for make, shape in (
        (lambda: QuaternionBatchNorm2d(8, whiten=whiten), (1, 8, 1, 1)),
        (lambda: QuaternionBatchNorm1d(8, whiten=whiten), (1, 8)),
        (lambda: QuaternionInstanceNorm2d(8, whiten=whiten), (3, 8, 1, 1)),
    ):
        x = torch.randn(shape, generator=g)
        with pytest.raises(ValueError, match=r"expected more than 1 (value per channel|spatial element) when training"):
            make()(x)
        norm = make().eval()  # eval on running statistics: fine, and finite
        if norm.track_running_stats:
            assert torch.isfinite(norm(x)).all()
    # two values are enough (both paths): finite
    y = QuaternionBatchNorm2d(8, whiten=whiten)(torch.randn(2, 8, 1, 1, generator=g))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
@pytest.mark.parametrize("whiten", [False, True])
def test_half_precision_with_squares_beyond_fp16(dtype, per_sample, whiten):
    """|x| ~ 300 (x² overflows fp16 past 256): statistics in float32, output within 2x torch's own norm's error
    in the same dtype (on the real channels), everything finite."""
    g = torch.Generator().manual_seed(13)
    base = torch.randn(4, 8, 8, 6, generator=g, dtype=torch.float64) * 300 + 40
    gy = torch.randn(base.shape, generator=g, dtype=torch.float64)

    def run(inp):
        inp = inp.detach().requires_grad_()
        y = _quaternion_norm("t", inp, per_sample, None, None, None, None, True, 0.1, 1e-5, whiten)
        return y, torch.autograd.grad(y, inp, gy.to(y.dtype))[0]

    def torch_norm(inp):
        inp = inp.detach().requires_grad_()
        y = F.instance_norm(inp) if per_sample else F.batch_norm(inp, None, None, training=True)
        return y, torch.autograd.grad(y, inp, gy.to(y.dtype))[0]

    x = base.to(dtype)
    got, ref = run(x), run(x.double())
    theirs, theirs_ref = torch_norm(x), torch_norm(x.double())
    for name, o, r, t, tr in zip(("y", "dx"), got, ref, theirs, theirs_ref, strict=True):
        assert o.dtype == dtype and torch.isfinite(o).all()
        assert _rel(o, r) <= 2 * _rel(t, tr), f"{name}: {_rel(o, r):.2e} vs torch {_rel(t, tr):.2e}"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composite"])
def test_running_statistics_follow_torch_batch_norm(fused):
    """momentum=None is the cumulative average, as torch.nn.BatchNorm's: our running mean is torch's, our
    shared running variance the sum of torch's over the four components (both averages of unbiased batch
    statistics); eval then normalises with them, and track_running_stats=False uses the batch's in eval."""
    g = torch.Generator().manual_seed(17)
    ours = QuaternionBatchNorm2d(8, momentum=None).double()
    ours.fused = fused
    theirs = nn.BatchNorm2d(8, momentum=None).double()
    for _ in range(3):
        x = torch.randn(3, 8, 5, 4, generator=g, dtype=torch.float64) * 2 + 1e3
        ours(x), theirs(x)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var.view(4, 2).sum(0))
    ours.eval()
    x = torch.randn(2, 8, 5, 4, generator=g, dtype=torch.float64) * 2 + 1e3
    shape = (1, 8, 1, 1)
    want = (x - ours.running_mean.view(shape)) / (ours.running_var.repeat(4).view(shape) + ours.eps).sqrt()
    torch.testing.assert_close(ours(x), want)

    no_stats = QuaternionBatchNorm2d(8, track_running_stats=False).double()
    no_stats.fused = fused
    torch.testing.assert_close(no_stats.eval()(x), no_stats.train()(x))


DTYPE_PAIRS = [
    (torch.float64, torch.float32),
    (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float64),
    (torch.bfloat16, torch.float32),  # torch's mixed mode (a half input, float32 parameters): accepted
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
]


@pytest.mark.parametrize(("input_dtype", "module_dtype"), DTYPE_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: QuaternionBatchNorm2d(8), lambda: nn.BatchNorm2d(8)),
        (lambda: QuaternionInstanceNorm2d(8, affine=True), lambda: nn.InstanceNorm2d(8, affine=True)),
        (lambda: QuaternionInstanceNorm2d(8), lambda: nn.InstanceNorm2d(8)),  # no parameters: any input
        (lambda: QuaternionBatchNorm2d(8, whiten=True), lambda: nn.BatchNorm2d(8)),
    ],
    ids=["batch", "instance-affine", "instance", "batch-whiten"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_dtype_mismatch_is_refused_where_torch_refuses_it(input_dtype, module_dtype, ours, theirs, training):
    """An input whose dtype differs from the norm's parameters and running statistics is refused as torch.nn's
    norms refuse it, naming the tensor (a float64 batch through float32 parameters was normalised in float64
    without a word, the float32 running statistics updated from it); half precision over float32 parameters
    (torch's mixed mode, autocast's) is accepted, in the input's dtype."""
    x = torch.randn(2, 8, 4, 5, dtype=input_dtype)
    layer, twin = ours().to(module_dtype).train(training), theirs().to(module_dtype).train(training)
    try:
        twin(x)
        refused = False
    except RuntimeError:
        refused = True
    if refused:
        before = [b.clone() for b in layer.buffers()]
        with pytest.raises(TypeError, match=rf"has dtype {module_dtype}, the input {input_dtype}: they must match"):
            layer(x)
        assert all(torch.equal(a, b) for a, b in zip(before, layer.buffers(), strict=True))  # nothing updated
    else:
        assert layer(x).dtype == input_dtype

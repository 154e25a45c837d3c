"""ONNX lowerings of the rotation convs and the whitening norms (``aqcf-export --format onnx``).

Rotation convs are lowered to one real conv on their derived weight (computed once), whitening norms
to one 4x4 matmul per quaternion channel (the Cholesky of the running covariance done at lowering, or
unrolled into elementwise ops on the input's covariance). Each is checked twice: the lowered copy
(eager) against the layer in every rank, layout and variant, and, on one small network per family,
the ONNX file in ONNX Runtime at other batch and spatial sizes than it was traced with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim

from aqcf_kernels import nn as qnn
from aqcf_kernels.nn.conv import _QuaternionConvNd
from aqcf_kernels.nn.norm import _QuaternionNorm, _unrolled_whitening_matrix, _whitening_matrix, quaternion_batch_norm
from aqcf_kernels.pipeline import export as ex

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

#: fp32: the lowered graphs re-associate sums (folded weights, the unrolled Cholesky), ~1e-7 relative.
RTOL, ATOL = 1e-4, 1e-5


def _random_input(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ort_run(exported, path: Path, inputs: dict[str, Tensor]) -> list[Tensor]:
    exported.save(path, external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {k: v.numpy() for k, v in inputs.items()})]


def _randomise(net: nn.Module, seed: int) -> nn.Module:
    """Conv biases, and whitening norms' matrices and running statistics, away from their identity-like
    initial values (a fresh whitening norm in eval is the identity); covariances stay positive definite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _QuaternionConvNd):
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, _QuaternionNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3 + torch.eye(4) / 2)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                if m.running_mean is not None and m.whiten:
                    a = torch.randn(*m.running_cov.shape, generator=g)
                    m.running_cov.copy_(a @ a.mT / 4 + 0.2 * torch.eye(4))
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
    return net


def _correlated(*shape: int, seed: int) -> Tensor:
    """A blocked input whose four components are correlated (mixed by a fixed 4x4), so whitening is not a
    rescaling."""
    x = _random_input(*shape, seed=seed).unflatten(1, (4, -1))
    mix = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0], [-0.5, 0.3, 0.4, 0.0], [0.2, -0.7, 0.1, 0.3]])
    return (torch.einsum("ij,nj...->ni...", mix, x) + 0.5).flatten(1, 2)


# -------------------------------------------------------------------------------- rotation convs

_CONVS = {
    (1, False): qnn.QuaternionConv1d,
    (2, False): qnn.QuaternionConv2d,
    (3, False): qnn.QuaternionConv3d,
    (1, True): qnn.QuaternionConvTranspose1d,
    (2, True): qnn.QuaternionConvTranspose2d,
    (3, True): qnn.QuaternionConvTranspose3d,
}


@pytest.mark.parametrize("quaternion_format", [True, False], ids=["rijk", "ijk"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_rotation_conv_lowering_matches_the_layer(dims: int, transposed: bool, quaternion_format: bool) -> None:
    """The lowered copy (one real conv on the folded rotation weight) against the layer: grouped, strided,
    learnt scale, biased; the quaternion parameters are gone from the copy."""
    blocks = 4 if quaternion_format else 3
    geometry = dict(stride=2, padding=1, output_padding=1) if transposed else dict(stride=2, padding=1)
    conv = _CONVS[dims, transposed](
        2 * blocks, 4 * blocks, 3, groups=2, rotation=True, scale=True, quaternion_format=quaternion_format, **geometry
    )
    conv = _randomise(conv, seed=dims).eval()
    x = _random_input(2, 2 * blocks, *(5, 6, 4)[:dims], seed=dims)
    lowered = ex.lowered_for_onnx(conv)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), conv(x), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(lowered(x[0]), conv(x[0]), rtol=RTOL, atol=ATOL)  # unbatched
    assert [name for name, _ in lowered.named_parameters()] == ["bias"]
    assert conv.weight is not None and conv.scale_param is not None  # the layer itself is untouched


@pytest.mark.parametrize(
    "options",
    [
        dict(padding="same", padding_mode="reflect"),  # 'same' with an even kernel: one more on the right
        dict(padding=1, padding_mode="circular", dilation=2, bias=False),
        dict(padding="valid", quaternion_format=False),
    ],
    ids=["same-reflect", "circular-dilated", "valid-ijk"],
)
def test_rotation_conv_lowering_padding_modes(options: dict) -> None:
    blocks = 4 if options.get("quaternion_format", True) else 3
    conv = _randomise(qnn.QuaternionConv2d(2 * blocks, 2 * blocks, 2, rotation=True, **options), seed=1).eval()
    x = _random_input(2, 2 * blocks, 7, 6, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ex.lowered_for_onnx(conv)(x), conv(x), rtol=RTOL, atol=ATOL)


class _Rotations(nn.Module):
    """Rotation convs of every rank in one graph: 2D ``[r|i|j|k]`` (grouped, learnt scale, reflect padding,
    'same' with an even kernel, transposed), 1D ``[i|j|k]`` (``quaternion_format=False``) and 3D."""

    def __init__(self) -> None:
        super().__init__()
        rot = dict(rotation=True)
        self.conv = qnn.QuaternionConv2d(8, 16, 3, padding=1, groups=2, padding_mode="reflect", scale=True, **rot)
        self.same = qnn.QuaternionConv2d(16, 8, 2, padding="same", bias=False, **rot)
        self.up = qnn.QuaternionConvTranspose2d(8, 8, 2, stride=2, groups=2, scale=True, **rot)
        ijk = dict(rotation=True, quaternion_format=False, groups=2)
        self.conv1d = qnn.QuaternionConv1d(6, 12, 3, padding=1, **ijk)
        self.up1d = qnn.QuaternionConvTranspose1d(12, 6, 3, stride=2, padding=1, output_padding=1, scale=True, **ijk)
        self.conv3d = qnn.QuaternionConv3d(4, 8, 3, padding=1, **rot)
        self.up3d = qnn.QuaternionConvTranspose3d(8, 4, 2, stride=2, **rot)

    def forward(self, x2: Tensor, x1: Tensor, x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.up(self.same(self.conv(x2))), self.up1d(self.conv1d(x1)), self.up3d(self.conv3d(x3))


def test_rotation_convs_onnx_match_eager(tmp_path: Path) -> None:
    """Standard ONNX only (``onnx_program`` refuses anything else), ``Conv``/``ConvTranspose`` on the folded
    weights, and ONNX Runtime agrees with eager at two batch and spatial sizes per input."""
    net = _randomise(_Rotations(), seed=3).eval()
    batch = Dim("batch", min=1)
    shapes = {
        "x2": {0: batch, 2: Dim("h", min=2), 3: Dim("w", min=2)},
        "x1": {0: batch, 2: Dim("length", min=2)},
        "x3": {0: batch, **{i: Dim(f"s{i}", min=2) for i in (2, 3, 4)}},
    }
    args = (_random_input(2, 8, 6, 10, seed=1), _random_input(2, 6, 12, seed=2), _random_input(2, 4, 4, 6, 4, seed=3))
    exported = ex.onnx_program(net, args, shapes, ["x2", "x1", "x3"], ["y2", "y1", "y3"])
    ops = {n.op_type for n in exported.model.graph}
    assert {"Conv", "ConvTranspose"} <= ops
    for b, (h, w), length, size3 in ((1, (5, 7), 9, (3, 5, 4)), (3, (8, 4), 16, (4, 4, 6))):
        inputs = {
            "x2": _random_input(b, 8, h, w, seed=b),
            "x1": _random_input(b, 6, length, seed=b + 1),
            "x3": _random_input(b, 4, *size3, seed=b + 2),
        }
        with torch.no_grad():
            want = net(*inputs.values())
        got = _ort_run(exported, tmp_path / "rotations.onnx", inputs)
        for g, w_ in zip(got, want, strict=True):
            torch.testing.assert_close(g, w_, rtol=RTOL, atol=ATOL)
        assert want[0][:, :2].abs().max() > 0  # the [r|i|j|k] outputs' real block carries the bias


# ------------------------------------------------------------------------------- whitening norms


def test_unrolled_whitening_matrix_is_the_cholesky_one() -> None:
    """The elementwise Cholesky + inverse (what ONNX gets for input statistics) equals the layer's
    ``cholesky_ex`` + ``solve_triangular`` and whitens: ``M (V + eps I) Mᵀ = I``, lower triangular."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    cov = a @ a.mT / 6  # batched (3, 5): some near-singular (rank 4 from 6 samples), eps keeps them definite
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        got = _unrolled_whitening_matrix(cov.to(dtype), 1e-3)
        want = _whitening_matrix(cov.to(dtype), 1e-3)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    m = _unrolled_whitening_matrix(cov, 1e-3)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(m @ (cov + 1e-3 * eye) @ m.mT, eye.expand_as(cov), rtol=1e-9, atol=1e-9)
    assert (m.triu(1) == 0).all()


_NORMS = {
    ("batch", 1): qnn.QuaternionBatchNorm1d,
    ("batch", 2): qnn.QuaternionBatchNorm2d,
    ("batch", 3): qnn.QuaternionBatchNorm3d,
    ("instance", 1): qnn.QuaternionInstanceNorm1d,
    ("instance", 2): qnn.QuaternionInstanceNorm2d,
    ("instance", 3): qnn.QuaternionInstanceNorm3d,
}


@pytest.mark.parametrize("running_stats", [True, False], ids=["running", "input-stats"])
@pytest.mark.parametrize("kind", ["batch", "instance"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_whitening_norm_lowering_matches_the_layer(dims: int, kind: str, running_stats: bool) -> None:
    """The lowered copy against the layer in eval: running statistics folded into one 4x4 per channel,
    or the input's (batch: over batch and space, instance: per sample) through the unrolled Cholesky."""
    norm = _NORMS[kind, dims](8, whiten=True, affine=True, track_running_stats=running_stats, activation="gelu")
    norm = _randomise(norm, seed=dims).eval()
    x = _correlated(3, 8, *(9, 5, 4)[:dims], seed=dims)
    lowered = ex.lowered_for_onnx(norm)
    with torch.no_grad():
        want = norm(x)
        torch.testing.assert_close(lowered(x), want, rtol=RTOL, atol=ATOL)
        if kind == "instance":
            torch.testing.assert_close(lowered(x[1]), norm(x[1]), rtol=RTOL, atol=ATOL)  # unbatched
    assert want.std() > 0.1  # not a degenerate output
    assert hasattr(lowered, "lowered_matrix") == running_stats


@pytest.mark.parametrize("running_stats", [True, False], ids=["running", "input-stats"])
def test_whitening_batch_norm_1d_without_length(running_stats: bool) -> None:
    """``(N, C)`` inputs of ``QuaternionBatchNorm1d``, no affine: the statistics over the batch alone."""
    norm = _randomise(qnn.QuaternionBatchNorm1d(8, whiten=True, affine=False, track_running_stats=running_stats), 4)
    x = _correlated(16, 8, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ex.lowered_for_onnx(norm.eval())(x), norm(x), rtol=RTOL, atol=ATOL)


def test_lowered_whitening_norm_refuses_training() -> None:
    norm = qnn.QuaternionBatchNorm2d(8, whiten=True)
    lowered = ex.lowered_for_onnx(norm).train()
    with pytest.raises(RuntimeError, match="a lowered norm is for inference"):
        lowered(_random_input(2, 8, 3, 3, seed=0))


class _Whitening(nn.Module):
    """A Hamilton conv mixing the components, then whitening batch norm with running statistics (fused
    leaky ReLU) and instance norm on the input's statistics (GELU). (Batch norm on the batch's statistics
    differs from the latter only in the axes reduced, checked eagerly above: each unrolled Cholesky is
    ~80 graph nodes, seconds of ONNX export.)"""

    def __init__(self) -> None:
        super().__init__()
        self.mix = qnn.QuaternionConv2d(8, 8, 1)
        self.bn = qnn.QuaternionBatchNorm2d(8, whiten=True, activation="leaky_relu", negative_slope=0.2)
        self.inorm = qnn.QuaternionInstanceNorm2d(8, whiten=True, affine=True, activation="gelu")

    def forward(self, x: Tensor) -> Tensor:
        return self.inorm(self.bn(self.mix(x)))


def test_whitening_norms_onnx_match_eager(tmp_path: Path) -> None:
    """Standard ONNX only, no factorisation left (ONNX has none), and ONNX Runtime agrees with eager at
    two batch and spatial sizes."""
    net = _randomise(_Whitening(), seed=5).eval()
    shapes = {"x": {0: Dim("batch", min=1), 2: Dim("h", min=2), 3: Dim("w", min=2)}}
    exported = ex.onnx_program(net, (_correlated(2, 8, 6, 10, seed=1),), shapes, ["x"], ["y"])
    assert "MatMul" in {n.op_type for n in exported.model.graph}
    for b, (h, w) in ((1, (5, 7)), (3, (8, 4))):
        x = _correlated(b, 8, h, w, seed=b)
        with torch.no_grad():
            want = net(x)
        (got,) = _ort_run(exported, tmp_path / "whitening.onnx", {"x": x})
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------- refused, and what no longer is


@torch.library.custom_op("aqcf_export_test::twice", mutates_args=())
def _twice(x: Tensor) -> Tensor:
    return x * 2


@_twice.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


class _Foreign(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _twice(x)


def test_custom_op_without_lowering_is_refused() -> None:
    """A custom op that :func:`~aqcf_kernels.ops.lowerings.lowerings` does not know is named, not exported."""
    program = torch.export.export(_Foreign(), (torch.randn(2, 4),))
    with pytest.raises(ex.ExportError, match=r"no ONNX lowering for the custom op\(s\) aqcf_export_test.twice"):
        ex.lower_custom_ops(program)


class _FunctionalWhitening(nn.Module):
    """A whitening norm called as a function, on running statistics: no module to lower, so its Cholesky is
    unrolled while the exporter captures (and folded with the buffers it reads); it was refused, the
    Cholesky in the graph. ``onnx_program`` checks that only standard operators remain."""

    def __init__(self) -> None:
        super().__init__()
        a = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))
        self.register_buffer("running_mean", torch.randn(8, generator=torch.Generator().manual_seed(4)) * 0.1)
        self.register_buffer("running_cov", a @ a.mT / 6 + 0.1 * torch.eye(4))

    def forward(self, x: Tensor) -> Tensor:
        return quaternion_batch_norm(x, self.running_mean, self.running_cov, whiten=True)


def test_functional_whitening_onnx_matches_eager(tmp_path: Path) -> None:
    net = _FunctionalWhitening().eval()
    exported = ex.onnx_program(net, (_random_input(2, 8, 4, 4, seed=0),), None, ["x"], ["y"])
    x = _correlated(2, 8, 4, 4, seed=6)
    with torch.no_grad():
        want = net(x)
    (got,) = _ort_run(exported, tmp_path / "functional.onnx", {"x": x})
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)

"""Rotation ("spinor") conv and linear layers: ``y = W ⊗ x ⊗ W⁻¹`` on the pure part.

The fast path (one real conv on a derived weight, :mod:`aqcf_kernels.nn.rotation`) is held to the
literal reference (two Hamilton products per weight/input pair, :mod:`aqcf_kernels.reference`) in
float64; gradients by gradcheck; Parcollet's (Pytorch-Quaternion-Neural-Networks ``quaternion_ops``)
and speechbrain's (``q_ops`` ``quaternion_*_rotation_op``) originals are rebuilt here from their
formulas and their state dicts loaded into ours.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

from aqcf_kernels import reference as ref
from aqcf_kernels.nn import (
    QuaternionConv1d,
    QuaternionConv2d,
    QuaternionConv3d,
    QuaternionConvTranspose1d,
    QuaternionConvTranspose2d,
    QuaternionConvTranspose3d,
    QuaternionLinear,
)
from aqcf_kernels.nn.rotation import quaternion_rotation_conv, quaternion_rotation_linear

pytestmark = pytest.mark.usefixtures("single_threaded")

F64 = torch.float64
CONV = {1: QuaternionConv1d, 2: QuaternionConv2d, 3: QuaternionConv3d}
CONVT = {1: QuaternionConvTranspose1d, 2: QuaternionConvTranspose2d, 3: QuaternionConvTranspose3d}
ODD_SIZES = {1: (11,), 2: (9, 7), 3: (5, 6, 5)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh non-zero values in every parameter (the init leaves the bias at zero, hiding its wiring)."""
    gen = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


def _non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in a tensor whose last dim has stride 2."""
    wide = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1).flatten(-2)
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


# ---------------------------------------------------------------- fast path vs the literal reference

# (spatial dims, transposed, in_channels/blocks, out_channels/blocks, layer kwargs)
CASES = [
    (1, False, 2, 3, dict(kernel_size=3, stride=2, padding=1)),
    (1, False, 4, 2, dict(kernel_size=2, dilation=3, groups=2)),
    (2, False, 4, 2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)),
    (2, False, 2, 3, dict(kernel_size=4, padding="same")),
    (2, False, 1, 2, dict(kernel_size=3, padding=1, padding_mode="reflect")),
    (3, False, 2, 2, dict(kernel_size=2, stride=(1, 2, 1), padding=1, dilation=(2, 1, 1))),
    (1, True, 3, 2, dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    (2, True, 4, 2, dict(kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2), groups=2)),
    (3, True, 2, 1, dict(kernel_size=2, stride=2, padding=(0, 1, 0), output_padding=(1, 0, 0))),
]


def _case_id(case) -> str:
    dims, transposed, cin, cout, kw = case
    extras = ",".join(f"{k}={v}" for k, v in kw.items() if k != "kernel_size")
    return f"{dims}d{'T' if transposed else ''}-{cin}to{cout}-{extras}"


def _rotation_layer(case, quaternion_format: bool, scale: bool, seed: int = 0):
    dims, transposed, cin, cout, kw = case
    blocks = 4 if quaternion_format else 3
    cls = (CONVT if transposed else CONV)[dims]
    layer = cls(
        blocks * cin, blocks * cout, **kw, rotation=True, quaternion_format=quaternion_format, scale=scale, dtype=F64
    )
    return _randomise(layer, seed), blocks * cin


def _reference_of(layer, x: torch.Tensor) -> torch.Tensor:
    padding = layer.padding
    if layer.padding_mode != "zeros":
        x, padding = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
    return ref.quaternion_rotation_conv_reference(
        x,
        layer.weight,
        layer.bias,
        layer.stride,
        padding,
        layer.dilation,
        layer.groups,
        transposed=layer.transposed,
        output_padding=layer.output_padding,
        scale=layer.scale_param,
        quaternion_format=layer.quaternion_format,
    )


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch, in the reference
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize(
    "quaternion_format, scale", [(True, False), (True, True), (False, True)], ids=["qformat", "qformat-scale", "pure"]
)
def test_conv_matches_reference(case, quaternion_format, scale):
    layer, channels = _rotation_layer(case, quaternion_format, scale)
    x = _non_contiguous(_randn(2, channels, *ODD_SIZES[case[0]], seed=1))
    y = layer(x)
    assert_close(y, _reference_of(layer, x))
    if quaternion_format:  # the real output block is the real bias alone
        real = y[:, : y.shape[1] // 4]
        assert_close(real, layer.bias[: y.shape[1] // 4].view(1, -1, *[1] * case[0]).expand_as(real))


@pytest.mark.parametrize("case", [CASES[2], CASES[7]], ids=_case_id)
def test_float32_within_contract(case):
    """float32 within 1e-5 relative error of the float64 reference (the library's hamilton contract)."""
    layer, channels = _rotation_layer(case, True, True)
    x = _randn(2, channels, *ODD_SIZES[case[0]], seed=29)
    expected = _reference_of(layer, x)
    y = layer.float()(x.float()).double()
    assert ((y - expected).norm() / expected.norm()).item() <= 1e-5


def test_real_input_block_is_ignored():
    layer, channels = _rotation_layer(CASES[2], True, False)
    x = _randn(2, channels, 9, 7, seed=2)
    x_other_real = x.clone()
    x_other_real[:, : channels // 4] = _randn(2, channels // 4, 9, 7, seed=3)
    assert_close(layer(x_other_real), layer(x), rtol=0, atol=0)


def test_unbatched_and_output_size():
    layer, channels = _rotation_layer(CASES[6], True, True)
    x = _randn(channels, 6, seed=4)
    assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0))
    y = layer(x.unsqueeze(0), output_size=[12])
    assert y.shape[-1] == 12


@pytest.mark.parametrize("quaternion_format", [True, False], ids=["qformat", "pure"])
@pytest.mark.parametrize("scale", [False, True], ids=["", "scale"])
def test_linear_matches_reference(quaternion_format, scale):
    blocks = 4 if quaternion_format else 3
    layer = _randomise(
        QuaternionLinear(
            3 * blocks, 5 * blocks, rotation=True, quaternion_format=quaternion_format, scale=scale, dtype=F64
        )
    )
    x = _non_contiguous(_randn(2, 4, 3 * blocks, seed=5).transpose(0, 1)).transpose(0, 1)
    expected = ref.quaternion_rotation_linear_reference(
        x, layer.weight, layer.bias, scale=layer.scale_param, quaternion_format=quaternion_format
    )
    assert_close(layer(x), expected)


# ---------------------------------------------------------------- gradients


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize(
    "dims, transposed, groups, quaternion_format",
    [(1, False, 1, True), (2, False, 2, True), (2, True, 2, False), (3, True, 1, True)],
    ids=["1d", "2d-groups", "2dT-groups-pure", "3dT"],
)
def test_conv_gradcheck(dims, transposed, groups, quaternion_format):
    blocks = 4 if quaternion_format else 3
    a, b = 2, 1  # weight (4, a, b, *k): a = out (conv) or in (transposed) quaternions
    kernel = (2,) * dims
    weight = _leaf(_randn(4, a, b, *kernel, seed=6))
    scale = _leaf(_randn(a, b, *kernel, seed=7))
    out_q = b * groups if transposed else a
    in_q = a if transposed else b * groups
    bias = _leaf(_randn(blocks * out_q, seed=8))
    x = _leaf(_randn(2, blocks * in_q, *(3,) * dims, seed=9))
    kw = dict(transposed=transposed, quaternion_format=quaternion_format)
    if transposed:
        kw["output_padding"] = 1

    def fn(x, weight, bias, scale):
        return quaternion_rotation_conv(x, weight, bias, 2, 1, 1, groups, scale=scale, **kw)

    assert gradcheck(fn, (x, weight, bias, scale))
    if dims == 1:
        assert gradgradcheck(fn, (x, weight, bias, scale))


def test_linear_gradcheck():
    weight, scale = _leaf(_randn(4, 2, 3, seed=10)), _leaf(_randn(2, 3, seed=11))
    bias, x = _leaf(_randn(8, seed=12)), _leaf(_randn(3, 12, seed=13))
    assert gradcheck(lambda *a: quaternion_rotation_linear(a[0], a[1], a[2], scale=a[3]), (x, weight, bias, scale))


def test_module_gradients_reach_every_parameter():
    layer, channels = _rotation_layer(CASES[2], True, True)
    layer(_randn(1, channels, 9, 7, seed=14)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- properties of a rotation


def _unit_quaternions(*shape: int, seed: int) -> torch.Tensor:
    w = _randn(4, *shape, seed=seed)
    return w / w.norm(dim=0, keepdim=True)


def test_unit_rotation_preserves_the_norm_of_the_pure_part():
    """One 1x1 weight quaternion: each pixel's pure part rotates, |y| = |x| (exactly with eps=0)."""
    w = _unit_quaternions(1, 1, 1, 1, seed=15) * 3.0  # any modulus: the weight is normalised
    x = _randn(2, 4, 5, 6, seed=16)
    pure_norm = x[:, 1:].norm(dim=1)
    y = quaternion_rotation_conv(x, w, eps=0.0)
    assert_close(y[:, 1:].norm(dim=1), pure_norm)
    assert not y[:, 0].any()
    assert not torch.allclose(y[:, 1:], x[:, 1:])  # a real rotation, not the identity
    # With Parcollet's eps the norm grows by at most eps / |w|² (here 1e-4 / 9).
    y_eps = quaternion_rotation_conv(x, w)
    assert_close(y_eps[:, 1:].norm(dim=1), pure_norm, rtol=2e-5, atol=0)


def test_transposed_is_the_inverse_rotation_for_unit_weights():
    """The transposed conv is the adjoint; for a 1x1 rotation the adjoint is the inverse rotation."""
    w = _unit_quaternions(3, 1, 1, 1, seed=17)  # three groups of one quaternion channel
    x = _randn(2, 12, 4, 5, seed=18)
    y = quaternion_rotation_conv(x, w, eps=0.0, groups=3)
    back = quaternion_rotation_conv(y, w, eps=0.0, groups=3, transposed=True)
    assert_close(back[:, 3:], x[:, 3:])


def test_weight_modulus_does_not_matter_without_eps():
    w = _randn(4, 2, 2, 3, seed=19)
    x = _randn(1, 8, 7, seed=20)
    assert_close(quaternion_rotation_conv(x, w, eps=0.0), quaternion_rotation_conv(x, 0.1 * w, eps=0.0))


# ---------------------------------------------------------------- torch.compile


def test_torch_compile_forward_and_backward():
    layer, channels = _rotation_layer(CASES[2], True, True)
    compiled = torch.compile(layer, fullgraph=True)
    x = _leaf(_randn(2, channels, 9, 7, seed=21))
    y = compiled(x)
    assert_close(y, layer(x))
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_eager,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert_close(gx, gx_eager)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rotation=True, algorithm="fast8"), ValueError, "algorithm='fast8' cannot serve"),
        (dict(scale=True), ValueError, "scale=True only applies to a rotation layer"),
        (dict(quaternion_format=False), ValueError, "quaternion_format=False only applies"),
        (dict(rotation=1), TypeError, "rotation must be a bool"),
        (dict(rotation=True, quaternion_format=False), ValueError, r"multiple of 3 .*\[i\|j\|k\]"),
    ],
)
def test_bad_layer_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuaternionConv2d(8, 8, 3, **kwargs)
    with pytest.raises(error, match=match):
        QuaternionLinear(8, 8, **kwargs)


def test_bad_functional_arguments():
    w, x = _randn(4, 2, 1, 3, seed=22), _randn(1, 4, 6, seed=23)
    with pytest.raises(ValueError, match="scale must have the shape of one weight component"):
        quaternion_rotation_conv(x, w, scale=_randn(2, 3, seed=0))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        quaternion_rotation_conv(x, w, _randn(6, seed=0))
    with pytest.raises(ValueError, match="not a multiple of 3"):
        quaternion_rotation_conv(x, w, quaternion_format=False)
    with pytest.raises(ValueError, match="does not fit input"):
        quaternion_rotation_conv(_randn(1, 8, 6, seed=0), w)
    with pytest.raises(ValueError, match="eps must be"):
        quaternion_rotation_conv(x, w, eps=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        quaternion_rotation_conv(x.float(), w)
    with pytest.raises(ValueError, match="too small"):
        quaternion_rotation_conv(_randn(1, 4, 2, seed=0), w)
    with pytest.raises(ValueError, match="input has 8 features"):
        quaternion_rotation_linear(_randn(2, 8, seed=0), _randn(4, 2, 3, seed=0))


def test_repr():
    assert "rotation=True, scale=True" in repr(QuaternionConv1d(8, 8, 3, rotation=True, scale=True))
    assert "quaternion_format=False" in repr(QuaternionLinear(6, 9, rotation=True, quaternion_format=False))
    assert "rotation" not in repr(QuaternionConv1d(8, 8, 3))


# ---------------------------------------------------------------- Parcollet's and speechbrain's originals
#
# Both build, per weight quaternion, the matrix of the rotation by w / norm(w) with the entries
# below, times ``scale_param`` when it exists, and pad it with a frozen all-zero ``zero_kernel``
# Parameter into a 4x4 block matrix whose real row and column are zero. Parcollet and speechbrain's
# conv use norm = sqrt(|w|^2 + 1e-4); speechbrain's linear uses sqrt(|w|^2) + 1e-4.


def rotation_entries(r, i, j, k, scale=None, eps_inside_sqrt=True):
    """The 3x3 entries ``[row][col]`` as their quaternion_ops write them (rows: output i, j, k)."""
    square = r * r + i * i + j * j + k * k
    norm = torch.sqrt(square + 1e-4) if eps_inside_sqrt else torch.sqrt(square) + 1e-4
    r, i, j, k = r / norm, i / norm, j / norm, k / norm
    entries = [
        [1.0 - 2 * (j * j + k * k), 2 * (i * j - r * k), 2 * (i * k + r * j)],
        [2 * (i * j + r * k), 1.0 - 2 * (i * i + k * k), 2 * (j * k - r * i)],
        [2 * (i * k - r * j), 2 * (j * k + r * i), 1.0 - 2 * (i * i + j * j)],
    ]
    return [[e if scale is None else scale * e for e in row] for row in entries]


def _components(module: nn.Module, shape, scale: bool, seed: int) -> None:
    gen = _gen(seed)
    for c in "rijk":
        module.register_parameter(f"{c}_weight", nn.Parameter(torch.randn(shape, generator=gen, dtype=F64) * 0.5))
    module.zero_kernel = nn.Parameter(torch.zeros(shape, dtype=F64), requires_grad=False)
    if scale:
        module.scale_param = nn.Parameter(torch.rand(shape, generator=gen, dtype=F64) + 0.5)
    else:
        module.scale_param = None


def conv_rotation_kernel(m: nn.Module) -> torch.Tensor:
    """``quaternion_conv_rotation`` / ``quaternion_conv_rotation_op``: rows out, ``cat`` in along dim 1."""
    rows = rotation_entries(m.r_weight, m.i_weight, m.j_weight, m.k_weight, m.scale_param)
    z = m.zero_kernel
    return torch.cat([torch.cat([z, z, z, z], dim=1)] + [torch.cat([z, *row], dim=1) for row in rows], dim=0)


class ParcolletRotationConv(nn.Module):
    """``QuaternionConv(operation='convolution2d', rotation=True, quaternion_format=True, scale=...)``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, scale, seed=0):
        super().__init__()
        self.stride, self.padding = stride, padding
        _components(self, (out_channels // 4, in_channels // 4, kernel_size, kernel_size), scale, seed)
        self.bias = nn.Parameter(torch.randn(out_channels, generator=_gen(seed + 1), dtype=F64))

    def forward(self, x):
        return F.conv2d(x, conv_rotation_kernel(self), self.bias, self.stride, self.padding)


class SBRotationConv(nn.Module):
    """speechbrain ``QConv1d/2d(spinor=True, vector_scale=...)``: channels-last, 'same' reflect padding."""

    def __init__(self, dims, in_channels, out_q, kernel, vector_scale, seed=0):
        super().__init__()
        self.dims, self.kernel = dims, kernel
        _components(self, (out_q, in_channels // 4, *([kernel] * dims)), vector_scale, seed)
        self.bias = nn.Parameter(torch.randn(4 * out_q, generator=_gen(seed + 1), dtype=F64))

    def forward(self, x):
        x = x.transpose(1, -1)
        x = F.pad(x, [(self.kernel - 1) // 2] * (2 * self.dims), mode="reflect")
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, conv_rotation_kernel(self), self.bias).transpose(1, -1)


class ParcolletRotationLinear(nn.Module):
    """``QuaternionLinearAutograd(rotation=True, quaternion_format=..., scale=...)``: ``(in/4, out/4)`` components."""

    def __init__(self, in_q, out_q, quaternion_format, scale, seed=0):
        super().__init__()
        self.quaternion_format = quaternion_format
        _components(self, (in_q, out_q), scale, seed)
        # His bias has 4 * out/4 entries, which cannot be added to a 3-block output: bias=False there.
        bias = torch.randn(4 * out_q, generator=_gen(seed + 1), dtype=F64) if quaternion_format else None
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x):
        cols = rotation_entries(self.r_weight, self.i_weight, self.j_weight, self.k_weight, self.scale_param)
        z = self.zero_kernel
        if self.quaternion_format:  # column c = output c; rows = inputs r, i, j, k
            kernel = torch.cat([torch.cat([z, z, z, z], dim=0)] + [torch.cat([z, *c], dim=0) for c in cols], dim=1)
        else:
            kernel = torch.cat([torch.cat(c, dim=0) for c in cols], dim=1)
        return x @ kernel if self.bias is None else x @ kernel + self.bias


class SBRotationLinear(nn.Module):
    """speechbrain ``QLinear(spinor=True, vector_scale=...)``: rows of the matrix are INPUT blocks, bias ``b``."""

    def __init__(self, in_q, out_q, vector_scale, seed=0):
        super().__init__()
        _components(self, (in_q, out_q), vector_scale, seed)
        self.b = nn.Parameter(torch.randn(4 * out_q, generator=_gen(seed + 1), dtype=F64))

    def forward(self, x):
        rows = rotation_entries(
            self.r_weight, self.i_weight, self.j_weight, self.k_weight, self.scale_param, eps_inside_sqrt=False
        )
        z = self.zero_kernel
        kernel = torch.cat([torch.cat([z, z, z, z], dim=1)] + [torch.cat([z, *row], dim=1) for row in rows], dim=0)
        return x @ kernel + self.b


@pytest.mark.parametrize("scale", [False, True], ids=["", "scale"])
def test_parcollet_rotation_conv_state_dict(scale):
    theirs = ParcolletRotationConv(8, 12, 3, stride=2, padding=1, scale=scale)
    ours = QuaternionConv2d(8, 12, 3, stride=2, padding=1, rotation=True, scale=scale, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    x = _randn(2, 8, 9, 7, seed=24)
    assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("vector_scale", [False, True], ids=["", "vector_scale"])
def test_speechbrain_spinor_conv_state_dict(dims, vector_scale):
    theirs = SBRotationConv(dims, 8, 3, kernel=3, vector_scale=vector_scale)
    conv = CONV[dims]
    ours = conv(8, 12, 3, padding="same", padding_mode="reflect", rotation=True, scale=vector_scale, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    x = _randn(2, *ODD_SIZES[dims], 8, seed=25)  # channels last
    assert_close(ours(x.transpose(1, -1)).transpose(1, -1), theirs(x))  # speechbrain swaps dims 1 and -1


@pytest.mark.parametrize("quaternion_format", [True, False], ids=["qformat", "pure"])
@pytest.mark.parametrize("scale", [False, True], ids=["", "scale"])
def test_parcollet_rotation_linear_state_dict(quaternion_format, scale):
    blocks = 4 if quaternion_format else 3
    theirs = ParcolletRotationLinear(3, 2, quaternion_format, scale)
    ours = QuaternionLinear(
        3 * blocks,
        2 * blocks,
        bias=quaternion_format,
        rotation=True,
        quaternion_format=quaternion_format,
        scale=scale,
        dtype=F64,
    )
    ours.load_state_dict(theirs.state_dict())
    x = _randn(5, 3 * blocks, seed=26)
    assert_close(ours(x), theirs(x))


def test_speechbrain_spinor_linear_is_the_conjugate_rotation():
    """Documented difference: speechbrain's QLinear spinor rotates by W* and normalises by |w| + 1e-4."""
    theirs = SBRotationLinear(3, 2, vector_scale=True)
    ours = QuaternionLinear(12, 8, rotation=True, scale=True, dtype=F64)
    ours.load_state_dict(theirs.state_dict())  # ``b`` is their bias
    x = _randn(5, 12, seed=27)
    assert not torch.allclose(ours(x), theirs(x), atol=1e-2)
    with torch.no_grad():
        ours.weight[1:].neg_()
    assert_close(ours(x), theirs(x), rtol=1e-3, atol=1e-3)  # the eps placement alone


def test_rotation_state_dict_mismatches_are_errors():
    sd = ParcolletRotationConv(8, 8, 3, stride=1, padding=1, scale=True).state_dict()
    with pytest.raises(RuntimeError, match="scale_param"):  # a scaled checkpoint into a layer without scale
        QuaternionConv2d(8, 8, 3, rotation=True, dtype=F64).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="zero_kernel"):  # a rotation checkpoint into a plain layer
        QuaternionConv2d(8, 8, 3, dtype=F64).load_state_dict(
            ParcolletRotationConv(8, 8, 3, stride=1, padding=1, scale=False).state_dict()
        )
    sd["zero_kernel"] = torch.ones_like(sd["zero_kernel"])
    with pytest.raises(RuntimeError, match="zero_kernel"):
        QuaternionConv2d(8, 8, 3, rotation=True, scale=True, dtype=F64).load_state_dict(sd)


def test_layer_roundtrip_state_dict_and_from_components():
    layer, _ = _rotation_layer(CASES[1], False, True)
    twin = QuaternionConv1d(12, 6, 2, dilation=3, groups=2, rotation=True, quaternion_format=False, scale=True)
    twin = twin.to(F64)
    twin.load_state_dict(layer.state_dict())
    x = _randn(1, 12, 11, seed=28)
    assert_close(twin(x), layer(x))
    built = QuaternionConv1d.from_components(
        *layer.weight.unbind(0), layer.bias, dilation=3, groups=2, rotation=True, quaternion_format=False
    )
    assert (built.in_channels, built.out_channels) == (12, 6)

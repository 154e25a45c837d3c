"""The quaternion nn layers against :mod:`aqcf_kernels.reference` (float64, forward and gradients)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from aqcf_kernels import nn as qnn
from aqcf_kernels import reference as ref
from aqcf_kernels.nn import (
    QuaternionConv1d,
    QuaternionConv2d,
    QuaternionConv3d,
    QuaternionConvTranspose1d,
    QuaternionConvTranspose2d,
    QuaternionConvTranspose3d,
    QuaternionLinear,
    quaternion_init_,
)

CONV = {1: QuaternionConv1d, 2: QuaternionConv2d, 3: QuaternionConv3d}
CONVT = {1: QuaternionConvTranspose1d, 2: QuaternionConvTranspose2d, 3: QuaternionConvTranspose3d}
TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
ODD_SIZES = {1: (11,), 2: (9, 7), 3: (5, 6, 5)}
F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise_bias(layer: nn.Module) -> None:
    # The init puts the bias at zero, which would hide a mis-wired bias.
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()


def _check_forward_and_grads(layer: nn.Module, x: torch.Tensor, reference, **call_kwargs) -> None:
    """``layer(x)`` and its gradients (input, weight, bias) equal ``reference(x, weight, bias)``'s."""
    x1 = x.clone().requires_grad_()
    y = layer(x1, **call_kwargs)
    w = layer.weight.detach().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y_ref = reference(x2, w, b)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    params_ref = [p for p in (w, b) if p is not None]
    grads = torch.autograd.grad(y, [x1, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x2, *params_ref], g)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_close(got, want)


# (dims, in, out, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 8, 12, 3, 2, 1, 1, 1),
    (1, 8, 8, 4, 1, "same", 2, 2),
    (2, 8, 16, (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (2, 12, 8, 2, 1, "same", 1, 1),
    (2, 8, 4, 3, 1, "valid", 1, 1),
    (3, 8, 8, (3, 1, 2), 1, (1, 0, 1), 1, 2),
]


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_matches_reference(case, algorithm):
    dims, cin, cout, k, stride, padding, dilation, groups = case
    layer = CONV[dims](cin, cout, k, stride, padding, dilation, groups, dtype=F64, algorithm=algorithm)
    _randomise_bias(layer)
    x = torch.randn(2, cin, *ODD_SIZES[dims], dtype=F64)
    _check_forward_and_grads(
        layer, x, lambda x, w, b: ref.quaternion_conv_naive(x, w, b, stride, padding, dilation, groups)
    )
    # Unbatched (C, *spatial) input, as torch's conv modules accept it.
    assert_close(layer(x[1]), layer(x[1:])[0])


# (dims, padding_mode, padding, kernel): torch's own conv on the expanded weight is the reference
# for how padding modes and 'same' (odd total padding -> extra on the right) are applied.
PADDING_MODE_CASES = [
    (1, "reflect", "same", 4),
    (2, "replicate", (1, 2), 3),
    (2, "circular", "same", (2, 3)),
    (3, "reflect", 1, 3),
]


@pytest.mark.parametrize("case", PADDING_MODE_CASES, ids=str)
def test_padding_modes_match_torch(case):
    dims, mode, padding, k = case
    layer = CONV[dims](8, 12, k, padding=padding, dilation=1, padding_mode=mode, dtype=F64)
    _randomise_bias(layer)
    torch_layer = TORCH_CONV[dims](8, 12, k, padding=padding, padding_mode=mode, dtype=F64)
    with torch.no_grad():
        torch_layer.weight.copy_(ref.expand_weight(layer.weight))
        torch_layer.bias.copy_(layer.bias)
    x = torch.randn(2, 8, *ODD_SIZES[dims], dtype=F64, requires_grad=True)
    y, y_torch = layer(x), torch_layer(x)
    assert_close(y, y_torch)
    g = torch.randn_like(y)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_torch, x, g)[0])


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_padding_mode_with_groups_matches_reference(mode):
    layer = QuaternionConv2d(8, 16, 3, padding=(2, 1), groups=2, padding_mode=mode, dtype=F64)
    _randomise_bias(layer)
    x = torch.randn(2, 8, 7, 6, dtype=F64)
    pad = [1, 1, 2, 2]  # F.pad order: last dim first

    def reference(x, w, b):
        return ref.quaternion_conv_naive(F.pad(x, pad, mode=mode), w, b, groups=2)

    _check_forward_and_grads(layer, x, reference)


# (dims, in, out, kernel, stride, padding, output_padding, groups, dilation)
CONVT_CASES = [
    (1, 8, 12, 3, 2, 1, 1, 1, 1),
    (2, 8, 16, (3, 2), (2, 3), (1, 0), (1, 2), 2, 1),
    (2, 16, 8, 3, 1, 2, 0, 2, 2),
    (3, 8, 8, 2, 2, 0, 1, 1, 1),
]


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", CONVT_CASES, ids=str)
def test_conv_transpose_matches_reference(case, algorithm):
    dims, cin, cout, k, stride, padding, output_padding, groups, dilation = case
    layer = CONVT[dims](
        cin, cout, k, stride, padding, output_padding, groups, True, dilation, dtype=F64, algorithm=algorithm
    )
    _randomise_bias(layer)
    x = torch.randn(2, cin, *ODD_SIZES[dims], dtype=F64)

    def reference(x, w, b):
        return ref.quaternion_conv_naive(
            x, w, b, stride, padding, dilation, groups, transposed=True, output_padding=output_padding
        )

    _check_forward_and_grads(layer, x, reference)
    assert_close(layer(x[1]), layer(x[1:])[0])


@pytest.mark.parametrize("output_size", [[11, 15], [10, 13], [2, 12, 12, 14]])
def test_conv_transpose_output_size(output_size):
    layer = QuaternionConvTranspose2d(8, 12, 3, stride=3, padding=1, dtype=F64)
    _randomise_bias(layer)
    # torch's ConvTranspose2d on the expanded weight resolves output_size the same way.
    torch_layer = nn.ConvTranspose2d(8, 12, 3, stride=3, padding=1, dtype=F64)
    with torch.no_grad():
        torch_layer.weight.copy_(ref.expand_weight(layer.weight))
        torch_layer.bias.copy_(layer.bias)
    x = torch.randn(2, 8, 4, 5, dtype=F64)
    y = layer(x, output_size=output_size)
    assert list(y.shape[2:]) == output_size[-2:]
    assert_close(y, torch_layer(x, output_size=output_size))
    assert_close(layer(x[0], output_size=output_size[-2:]), y[0])


def test_conv_transpose_output_size_out_of_range():
    layer = QuaternionConvTranspose2d(8, 12, 3, stride=3, padding=1)
    with pytest.raises(ValueError, match="output size"):
        layer(torch.randn(1, 8, 4, 5), output_size=[13, 15])
    with pytest.raises(ValueError, match="output_size must have"):
        layer(torch.randn(1, 8, 4, 5), output_size=[11])


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_conv1d_reference(lead, algorithm, bias):
    layer = QuaternionLinear(12, 8, bias=bias, dtype=F64, algorithm=algorithm)
    _randomise_bias(layer)
    x = torch.randn(*lead, 12, dtype=F64)

    def reference(x, w, b):
        y = ref.quaternion_conv_naive(x.reshape(-1, 12, 1), w.unsqueeze(-1), b)
        return y.reshape(*lead, 8)

    _check_forward_and_grads(layer, x, reference)


# ---------------------------------------------------------------- init


def _expected_sigma(criterion: str, fan_in: int, fan_out: int) -> float:
    # Parcollet's quaternion_init, fans in quaternion units.
    if criterion == "glorot":
        return 1 / math.sqrt(2 * (fan_in + fan_out))
    return 1 / math.sqrt(2 * fan_in)


# (factory, fan_in, fan_out): conv fan_in = in/4/groups * prod(k), fan_out = out/4 * prod(k);
# transposed weights (4, in/4, out/4/groups, *k) follow torch's and Parcollet's shape convention.
INIT_CASES = [
    (lambda c: QuaternionConv2d(256, 512, 3, groups=2, init_criterion=c), 32 * 9, 128 * 9),
    (lambda c: QuaternionConvTranspose1d(512, 256, 5, init_criterion=c), 64 * 5, 128 * 5),
    (lambda c: QuaternionLinear(1024, 512, init_criterion=c), 256, 128),
]


@pytest.mark.parametrize("criterion", ["glorot", "he"])
@pytest.mark.parametrize("case", range(len(INIT_CASES)))
def test_init_statistics(case, criterion):
    factory, fan_in, fan_out = INIT_CASES[case]
    layer = factory(criterion)
    w = layer.weight.detach().double().flatten(1)  # (4, quaternions), > 6e4 quaternions
    sigma2 = _expected_sigma(criterion, fan_in, fan_out) ** 2
    modulus2 = w.pow(2).sum(0)
    assert modulus2.mean().item() == pytest.approx(4 * sigma2, rel=0.03)  # Var(W) = 4 sigma^2
    # Chi(4): E|w| = sigma * sqrt(2) Gamma(5/2) / Gamma(2) = sigma * 3 sqrt(pi/2) / 2.
    assert modulus2.sqrt().mean().item() == pytest.approx(math.sqrt(sigma2) * 1.5 * math.sqrt(math.pi / 2), rel=0.03)
    # Uniform phase: E cos^2 = 1/2 on the real part, the rest shared by a uniformly oriented axis.
    per_component = w.pow(2).mean(1) / sigma2
    assert_close(per_component, torch.tensor([2, 2 / 3, 2 / 3, 2 / 3], dtype=F64), rtol=0.05, atol=0)
    assert (w / modulus2.sqrt()).mean(1).abs().max().item() < 0.02
    assert layer.bias is not None and not layer.bias.any()


def test_init_generator_reproducible():
    layer = QuaternionConv1d(8, 16, 3)

    def draw(seed):
        layer.reset_parameters(generator=torch.Generator().manual_seed(seed))
        return layer.weight.detach().clone()

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    w = torch.empty(4, 3, 2, 2, dtype=F64)
    a = quaternion_init_(w.clone(), "he", torch.Generator().manual_seed(7))
    assert torch.equal(a, quaternion_init_(w.clone(), "he", torch.Generator().manual_seed(7)))
    # Without a generator, torch.manual_seed governs.
    with torch.random.fork_rng():
        torch.manual_seed(3)
        a = QuaternionConvTranspose2d(8, 8, 3)
        torch.manual_seed(3)
        b = QuaternionConvTranspose2d(8, 8, 3)
    assert torch.equal(a.weight, b.weight)


# ---------------------------------------------------------------- construction and state


@pytest.mark.parametrize(
    "make, x_shape",
    [
        (lambda: QuaternionConv2d(8, 16, (3, 2), stride=2, padding=1, groups=2, dtype=F64), (2, 8, 7, 6)),
        (lambda: QuaternionConvTranspose1d(8, 12, 3, stride=2, output_padding=1, groups=1, dtype=F64), (2, 8, 5)),
        (lambda: QuaternionLinear(8, 12, dtype=F64), (3, 8)),
    ],
)
def test_from_components_round_trip(make, x_shape):
    layer = make()
    _randomise_bias(layer)
    kwargs = {
        name: getattr(layer, name)
        for name in ("stride", "padding", "output_padding", "groups", "dilation")
        if hasattr(layer, name)
    }
    if isinstance(layer, QuaternionConv2d):
        kwargs.pop("output_padding")
    rebuilt = type(layer).from_components(*layer.weight.unbind(0), bias=layer.bias, **kwargs)
    assert repr(rebuilt) == repr(layer)
    assert torch.equal(rebuilt.weight, layer.weight) and torch.equal(rebuilt.bias, layer.bias)
    x = torch.randn(*x_shape, dtype=F64)
    assert_close(rebuilt(x), layer(x))
    no_bias = type(layer).from_components(*layer.weight.unbind(0), **kwargs)
    assert no_bias.bias is None


class _ParcolletLayer(nn.Module):
    """State-dict stand-in of Parcollet's layers: four component parameters and a bias.

    Shapes as in Pytorch-Quaternion-Neural-Networks: QuaternionConv ``(out/4, in/4, *k)``,
    QuaternionTransposeConv ``(in/4, out/4, *k)``, QuaternionLinear(Autograd) ``(in/4, out/4)``.
    """

    def __init__(self, shape, out_channels):
        super().__init__()
        for c in "rijk":
            setattr(self, f"{c}_weight", nn.Parameter(torch.randn(*shape, dtype=F64)))
        self.bias = nn.Parameter(torch.randn(out_channels, dtype=F64))

    def components(self):
        return torch.stack([self.r_weight, self.i_weight, self.j_weight, self.k_weight]).detach()


def test_load_parcollet_conv_state_dict():
    his = nn.Sequential(_ParcolletLayer((3, 2, 3, 2), 12))  # a prefix ("0.") as in a real model
    ours = nn.Sequential(QuaternionConv2d(8, 12, (3, 2), stride=2, padding=1, dtype=F64))
    ours.load_state_dict(his.state_dict())
    x = torch.randn(2, 8, 7, 6, dtype=F64)
    expected = ref.quaternion_conv_expanded(x, his[0].components(), his[0].bias, stride=2, padding=1)
    assert_close(ours(x), expected)
    assert set(ours.state_dict()) == {"0.weight", "0.bias"}


def test_load_parcollet_conv_transpose_state_dict():
    his = _ParcolletLayer((2, 3, 4), 12)  # (in/4, out/4, k)
    ours = QuaternionConvTranspose1d(8, 12, 4, stride=2, padding=1, output_padding=1, dtype=F64)
    ours.load_state_dict(his.state_dict())
    x = torch.randn(2, 8, 9, dtype=F64)
    expected = ref.quaternion_conv_expanded(
        x, his.components(), his.bias, stride=2, padding=1, transposed=True, output_padding=1
    )
    assert_close(ours(x), expected)


def _parcollet_linear(x, r, i, j, k, bias):
    # Parcollet's quaternion_ops.quaternion_linear, verbatim construction: x @ M + b.
    cat_r = torch.cat([r, -i, -j, -k], dim=0)
    cat_i = torch.cat([i, r, -k, j], dim=0)
    cat_j = torch.cat([j, k, r, -i], dim=0)
    cat_k = torch.cat([k, -j, i, r], dim=0)
    return x @ torch.cat([cat_r, cat_i, cat_j, cat_k], dim=1) + bias


def test_load_parcollet_linear_state_dict():
    his = _ParcolletLayer((3, 2), 8)  # (in/4, out/4)
    ours = QuaternionLinear(12, 8, dtype=F64)
    ours.load_state_dict(his.state_dict())
    x = torch.randn(5, 12, dtype=F64)
    y = ours(x)
    assert_close(y, _parcollet_linear(x, *his.components(), his.bias.detach()))
    # ...which is the conv reference with his components transposed to (out/4, in/4).
    w = his.components().transpose(1, 2).unsqueeze(-1)
    assert_close(y, ref.quaternion_conv_expanded(x.unsqueeze(-1), w, his.bias.detach()).squeeze(-1))


def test_load_parcollet_state_dict_strictness():
    sd = _ParcolletLayer((3, 2, 3), 12).state_dict()
    del sd["k_weight"]
    with pytest.raises(RuntimeError, match="weight"):
        QuaternionConv1d(8, 12, 3, dtype=F64).load_state_dict(sd)
    wrong = _ParcolletLayer((2, 3, 3), 12).state_dict()  # transposed layout into a conv
    with pytest.raises(RuntimeError, match="size mismatch"):
        QuaternionConv1d(8, 12, 3, dtype=F64).load_state_dict(wrong)
    # components of different shapes: torch's size-mismatch error, naming them (was torch.stack's own error)
    uneven = _ParcolletLayer((3, 2, 3), 12).state_dict()
    uneven["i_weight"] = torch.randn(2, 2, 3, dtype=F64)
    layer = QuaternionConv1d(8, 12, 3, dtype=F64)
    before = layer.weight.detach().clone()
    message = r"size mismatch for r_weight, i_weight, j_weight, k_weight: .* r \(3, 2, 3\), i \(2, 2, 3\)"
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(uneven)
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: QuaternionConv2d(6, 8, 3), "in_channels"),
        (lambda: QuaternionConv2d(8, 10, 3), "out_channels"),
        (lambda: QuaternionConv1d(12, 8, 3, groups=2), "in_channels"),
        (lambda: QuaternionConvTranspose3d(8, 12, 3, groups=2), "out_channels"),
        (lambda: QuaternionConv1d(8, 8, 3, groups=0), "groups"),
        (lambda: QuaternionLinear(6, 8), "in_features"),
        (lambda: QuaternionLinear(8, 0), "out_features"),
        (lambda: QuaternionConvTranspose2d(8, 8, 3, padding_mode="reflect"), "padding_mode"),
        (lambda: QuaternionConv2d(8, 8, 3, padding_mode="mirror"), "padding_mode"),
        (lambda: QuaternionConv2d(8, 8, 3, stride=2, padding="same"), "same"),
        (lambda: QuaternionConv2d(8, 8, 3, padding="full"), "padding"),
        (lambda: QuaternionConv2d(8, 8, (3, 3, 3)), "kernel_size"),
        (lambda: QuaternionConv2d(8, 8, 3, algorithm="fast16"), "algorithm"),
        (lambda: QuaternionLinear(8, 8, init_criterion="xavier"), "init_criterion"),
    ],
)
def test_bad_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(kernel_size=(3.5, 3)), "kernel_size"),
        (dict(kernel_size=3, stride=(1.9, 1)), "stride"),
        (dict(kernel_size=3, padding=("1", 1)), "padding"),
        (dict(kernel_size=(True, 3)), "kernel_size"),
    ],
)
def test_non_integer_sizes_are_refused_not_truncated(kwargs, argument):
    with pytest.raises(TypeError, match=f"{argument} must be an int or a sequence of 2 ints"):
        QuaternionConv2d(8, 8, **kwargs)


def test_integer_likes_are_sizes():
    conv = QuaternionConv2d(8, 8, (np.int64(3), torch.tensor(1)), stride=(np.int32(2), 1))
    assert conv.kernel_size == (3, 1) and conv.stride == (2, 1)
    assert all(type(v) is int for v in (*conv.kernel_size, *conv.stride))


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: QuaternionConv2d(8, 8, 3, padding=1), torch.channels_last),
        (lambda: QuaternionConvTranspose2d(8, 8, 3, stride=2), torch.channels_last),
        (lambda: QuaternionConv2d(8, 8, 3, rotation=True, scale=True), torch.channels_last),
        (lambda: QuaternionConv1d(8, 8, 3), torch.channels_last),
        (lambda: QuaternionConv3d(8, 8, 3), torch.channels_last_3d),
    ],
)
def test_module_to_memory_format(make, fmt):
    # nn.Conv2d users write model.to(memory_format=torch.channels_last): a 2d conv's 5-d weight takes the
    # format through its 4-d view instead of failing; values, gradients and the output are unchanged.
    torch.manual_seed(0)
    layer = make()
    spatial = layer._spatial_dims
    x = torch.randn(2, 8, *[5] * spatial)
    expected = layer(x)
    layer.weight.grad = torch.randn_like(layer.weight)
    weight, grad = layer.weight.detach().clone(), layer.weight.grad.clone()
    model = nn.Sequential(layer, qnn.QuaternionBatchNorm2d(8) if spatial == 2 else nn.Identity())
    assert model.to(memory_format=fmt) is model
    assert isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.weight.grad, grad)
    if spatial == 2:
        assert layer.weight.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert layer.to(torch.float64).weight.dtype == torch.float64


def test_linear_dtype_mismatch_names_the_linear_map():
    with pytest.raises(
        TypeError, match=r"quaternion_linear: weight is torch.float32 on cpu but input is torch.float64"
    ):
        QuaternionLinear(8, 8)(torch.randn(3, 8, dtype=torch.float64))


def test_extra_repr():
    assert repr(QuaternionConv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)) == (
        "QuaternionConv2d(8, 16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=2, bias=False)"
    )
    assert repr(QuaternionConv1d(8, 8, 4, padding="same", padding_mode="reflect", algorithm="fast8")) == (
        "QuaternionConv1d(8, 8, kernel_size=(4,), stride=(1,), padding='same', padding_mode='reflect', "
        "algorithm='fast8')"
    )
    assert repr(QuaternionConvTranspose3d(8, 4, 2, stride=2, output_padding=1, init_criterion="he")) == (
        "QuaternionConvTranspose3d(8, 4, kernel_size=(2, 2, 2), stride=(2, 2, 2), output_padding=(1, 1, 1), "
        "init_criterion='he')"
    )
    assert repr(QuaternionLinear(8, 12)) == "QuaternionLinear(in_features=8, out_features=12, bias=True)"


def test_deepcopy_and_state_dict_round_trip():
    layer = QuaternionConvTranspose2d(8, 12, 3, stride=2, padding=1, output_padding=1, dtype=F64)
    _randomise_bias(layer)
    x = torch.randn(2, 8, 5, 4, dtype=F64)
    assert_close(copy.deepcopy(layer)(x), layer(x))
    fresh = QuaternionConvTranspose2d(8, 12, 3, stride=2, padding=1, output_padding=1, dtype=F64)
    fresh.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert_close(fresh(x), layer(x))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = QuaternionConv2d(8, 16, 3, padding=1, padding_mode="reflect")
        self.up = QuaternionConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.fc = QuaternionLinear(8, 4)

    def forward(self, x):
        y = self.up(torch.tanh(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


def test_torch_compile_matches_eager():
    model = _Tiny()
    for layer in (model.conv, model.up, model.fc):
        _randomise_bias(layer)
    x = torch.randn(2, 8, 5, 6)
    g = torch.randn(2, 4)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()), g)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(compiled, list(model.parameters()), g), eager_grads, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-5)


# Compiled once for every input size under dynamic=True (fullgraph: no break either). Sizes chosen so that
# dynamo's own specialisations do not apply (no size 0 or 1, no spatial size equal to the channel count).
DYNAMIC_LAYERS = {
    "conv": (lambda: QuaternionConv2d(8, 12, 3, padding=1), "nchw"),
    "conv_transpose": (lambda: QuaternionConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1), "nchw"),
    "max_pool_padded": (lambda: qnn.QuaternionMaxPool2d(3, stride=2, padding=1), "nchw"),
    "avg_pool": (lambda: qnn.QuaternionAvgPool2d(2, ceil_mode=True), "nchw"),
    "batch_norm_relu": (lambda: qnn.QuaternionBatchNorm2d(8, activation="relu"), "nchw"),
    "instance_norm": (lambda: qnn.QuaternionInstanceNorm2d(8, affine=True), "nchw"),
    "linear": (lambda: QuaternionLinear(8, 12), "tokens"),
    # (with kv_pool, one graph per pooling factor: the factor is a loop over the sizes)
    "aqcf_block": (lambda: qnn.AQCFBlock(8, heads=2), "two_streams"),
}


@pytest.mark.parametrize("name", DYNAMIC_LAYERS)
@pytest.mark.usefixtures("fresh_dynamo")
def test_torch_compile_dynamic_shapes_compiles_once(name):
    from torch._dynamo.testing import CompileCounterWithBackend

    factory, kind = DYNAMIC_LAYERS[name]
    torch.manual_seed(0)
    layer = factory()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for n, h, w in ((2, 10, 13), (3, 17, 11), (5, 9, 22)):
        x = torch.randn(n, 8, h, w) if kind != "tokens" else torch.randn(n, h, 8)
        inputs = (x, torch.randn(n, 8, w + 3, h)) if kind == "two_streams" else (x,)
        if kind == "two_streams":
            with torch.no_grad():  # (alpha = 0 at init: the block would be the identity)
                layer.alpha_a.fill_(0.6)
                layer.alpha_b.fill_(-0.3)
        got, want = compiled(*inputs), layer(*inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1:] == frames[:1] * 2  # compiled on the first size, never again


def test_linear_double_backward_and_empty_input():
    # quaternion_linear runs the rows as the length of one 1x1 conv1d; the op's double backward must survive it.
    x = torch.randn(3, 8, dtype=F64, requires_grad=True)
    w = torch.randn(4, 1, 2, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True)
    from aqcf_kernels.functional import quaternion_linear

    assert torch.autograd.gradcheck(quaternion_linear, (x, w, b))
    assert torch.autograd.gradgradcheck(quaternion_linear, (x, w, b))
    layer = QuaternionLinear(8, 4, dtype=F64)
    y = layer(torch.randn(0, 2, 8, dtype=F64))
    assert y.shape == (0, 2, 4)
    y.sum().backward()
    assert not layer.weight.grad.any()


@pytest.mark.parametrize("transposed", [False, True])
def test_conv_input_errors_say_how_the_input_was_read(transposed: bool) -> None:
    cls = qnn.QuaternionConvTranspose2d if transposed else qnn.QuaternionConv2d
    layer = cls(8, 8, 3)
    with pytest.raises(ValueError, match=r"expected 3D \(unbatched\) or 4D \(batched\) input, got 5D input"):
        layer(torch.randn(1, 1, 8, 6, 6))
    with pytest.raises(ValueError, match=r"\(12, 6, 6\) was read as unbatched \(C, H, W\) with 12 channels, .*=8"):
        layer(torch.randn(12, 6, 6))
    with pytest.raises(ValueError, match=r"\(2, 12, 6, 6\) has 12 channels \(dim 1\), .*in_channels=8"):
        layer(torch.randn(2, 12, 6, 6))
    assert layer(torch.randn(8, 6, 6)).shape[0] == 8  # unbatched in, unbatched out


def test_channel_counts_take_int_likes_as_torch_nn_does():
    """numpy's ints (a config read with numpy, ``arange``) count as torch.nn counts them; 4.0 and True do not."""
    import numpy as np

    layer = QuaternionConv2d(np.int64(4), np.int32(8), 3)
    assert (layer.in_channels, layer.out_channels) == (4, 8) and type(layer.in_channels) is int
    assert QuaternionLinear(np.int64(8), 4).in_features == 8
    for bad in (4.0, True, "4"):
        with pytest.raises(TypeError, match=r"QuaternionConv2d: in_channels must be an int \(real channels\), got"):
            QuaternionConv2d(bad, 8, 3)

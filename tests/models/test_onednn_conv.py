"""The model's real convs (stem, heads): ``torch.nn`` convs that run float32 CPU inputs on oneDNN where
PyTorch's rule would take its im2col kernels (batch 1, few channels). Against the parent conv:
values and every gradient, odd sizes, strides, dilation, groups, channels_last; which kernel ran;
the cases that go the parent's way."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from aqcf_kernels.models.layers import ONEDNN_CONVS

PARENTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def pair(dims: int, *args, seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(oneDNN conv, parent conv) with the same weights."""
    torch.manual_seed(seed)
    ours = ONEDNN_CONVS[dims - 1](*args, **kwargs)
    ref = PARENTS[dims - 1](*args, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return {e.key for e in p.key_averages()}


GEOMETRIES = [
    # (dims, in, out, kernel, kwargs, input spatial size)
    (3, 1, 16, 3, {"padding": 1, "bias": False}, (9, 10, 11)),  # the 3D stem at batch 1
    (3, 16, 3, 1, {}, (7, 6, 5)),  # a head
    (3, 4, 6, 3, {"stride": 2, "padding": 2, "dilation": 2, "groups": 2}, (11, 9, 10)),
    (2, 1, 8, 3, {"padding": 1}, (13, 17)),
    (2, 6, 4, 3, {"stride": (2, 1), "padding": (0, 1), "groups": 2}, (12, 9)),
    (1, 3, 5, 3, {"padding": 1}, (23,)),
]


@pytest.mark.parametrize(
    "dims,cin,cout,k,kwargs,size,channels_last",
    [(*g, cl) for g in GEOMETRIES for cl in (False, True) if g[0] > 1 or not cl],  # channels_last: 2d/3d
)
def test_matches_the_parent_conv(dims, cin, cout, k, kwargs, size, channels_last) -> None:
    ours, ref = pair(dims, cin, cout, k, **kwargs)
    x = torch.randn(1, cin, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    grad = torch.randn_like(ref(x))
    results = []
    for conv in (ours, ref):
        conv.zero_grad()
        xi = x.detach().clone().requires_grad_()
        y = conv(xi)
        y.backward(grad)
        results.append([y.detach(), xi.grad, *[p.grad for p in conv.parameters()]])
    for name, got, want in zip(["y", "dx", "dw", "db"], *results, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_batch_one_3d_stem_runs_on_onednn_not_im2col() -> None:
    ours, ref = pair(3, 1, 16, 3, padding=1, bias=False)
    x = torch.randn(1, 1, 12, 12, 12)
    assert "aten::slow_conv3d_forward" in ops_run(lambda: ref(x))  # what PyTorch's rule picks here
    ran = ops_run(lambda: ours(x))
    assert "aten::mkldnn_convolution" in ran and not any(k.startswith("aten::slow_conv") for k in ran)


@pytest.mark.parametrize(
    "case",
    [
        "float64",
        "unbatched",
        "padding_same",
        "reflect",
    ],
)
def test_other_cases_go_the_parent_way(case) -> None:
    kwargs = {"padding": "same"} if case == "padding_same" else {"padding": 1}
    if case == "reflect":
        kwargs["padding_mode"] = "reflect"
    dtype = torch.float64 if case == "float64" else torch.float32
    ours, ref = pair(3, 2, 4, 3, dtype=dtype, **kwargs)
    x = torch.randn(2, 7, 8, 9, dtype=dtype) if case == "unbatched" else torch.randn(1, 2, 7, 8, 9, dtype=dtype)
    assert "aten::mkldnn_convolution" not in ops_run(lambda: ours(x))
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_is_the_parent_for_state_dicts_and_repr() -> None:
    ours, ref = pair(3, 1, 16, 3, padding=1)
    assert isinstance(ours, nn.Conv3d) and list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours).startswith("OneDNNConv3d(1, 16, kernel_size=(3, 3, 3)")


# ---- the activation as oneDNN's post-op, and the stem unit that folds its norm in eval mode

ACTS = {
    "relu": lambda z, s: nn.functional.relu(z),
    "leaky_relu": lambda z, s: nn.functional.leaky_relu(z, s),
    "gelu": lambda z, s: nn.functional.gelu(z),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-post-op", "fp64-after"])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dims", [2, 3])
def test_activation_keyword_matches_conv_then_activation(dims, activation, dtype) -> None:
    """float32 (batched, CPU): oneDNN's post-op, no separate activation op; float64: the parent conv,
    then the activation. Both equal the parent conv followed by torch's activation; a given weight and
    bias replace the module's for the call."""
    ours, ref = pair(dims, 4, 6, 3, padding=1, stride=2, dtype=dtype)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = torch.randn(2, 4, *[7] * dims, dtype=dtype).contiguous(memory_format=fmt)
    w, b = torch.randn_like(ref.weight), torch.randn_like(ref.bias)
    with torch.no_grad():
        got = ours(x, weight=w, bias=b, activation=activation, negative_slope=0.2)
        ran = ops_run(lambda: ours(x, weight=w, bias=b, activation=activation, negative_slope=0.2))
        want = ACTS[activation](ref._conv_forward(x, w, b), 0.2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    separate = {k for k in ran if k.startswith("aten::") and activation in k}
    assert (separate == set()) == (dtype == torch.float32), ran


def _stem(dims: int, dtype=torch.float32, seed: int = 0):
    from aqcf_kernels import nn as qnn
    from aqcf_kernels.models.layers import RealConvNormAct

    torch.manual_seed(seed)
    conv = ONEDNN_CONVS[dims - 1](1, 16, 3, padding=1, bias=False, dtype=dtype)
    norm = (qnn.QuaternionBatchNorm2d if dims == 2 else qnn.QuaternionBatchNorm3d)(
        16, activation="leaky_relu", negative_slope=0.01, dtype=dtype
    )
    with torch.no_grad():  # trained-looking statistics and affine
        norm.running_mean.uniform_(-0.3, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return RealConvNormAct(conv, norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("dims", [2, 3])
def test_stem_unit_folds_its_norm_in_eval(dims, dtype) -> None:
    """Eval mode: one conv with the folded weight and the activation as post-op (float32: no norm or
    activation op runs), equal to the two modules in turn; training mode runs them in turn (same
    values and gradients as nn.Sequential), and the state dict is nn.Sequential's."""
    unit = _stem(dims, dtype)
    seq = nn.Sequential(unit[0], unit[1])
    x = torch.randn(2, 1, *[9] * dims, dtype=dtype)
    unit.eval()
    with torch.no_grad():
        got, want = unit(x), seq(x)
        ran = ops_run(lambda: unit(x))
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    if dtype == torch.float32:
        assert not any("qnorm" in k or "leaky_relu" in k or "batch_norm" in k for k in ran), ran
    unit.train()
    xg = x.clone().requires_grad_()
    y = unit(xg)
    y.backward(torch.ones_like(y))
    assert xg.grad is not None and unit[1].weight.grad is not None
    assert list(unit.state_dict()) == list(nn.Sequential(unit[0], unit[1]).state_dict())


@pytest.mark.parametrize("dims", [2, 3])
def test_eval_mode_gradients_flow_through_the_folded_stem(dims) -> None:
    """Eval mode with autograd on (saliency maps, Grad-CAM, fine-tuning with frozen statistics): the folded
    unit's gradients w.r.t. the input, the conv weight and the norm's affine equal nn.Sequential's in eval
    mode. oneDNN's post-op conv has no autograd formula: called with autograd on, torch warned and its
    backward returned no gradient at all (x.grad stayed None), so it serves only calls that need none."""
    unit = _stem(dims, torch.float32, seed=3)
    seq = nn.Sequential(unit[0], unit[1])
    unit.eval()
    x = torch.randn(2, 1, *[9] * dims)
    gy = torch.randn(2, 16, *[9] * dims)
    params = [unit[0].weight, unit[1].weight, unit[1].bias]
    grads = {}
    for name, module in (("unit", unit), ("seq", seq)):
        xg = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's "autograd kernel was not registered" warning fails it
            y = module(xg)
            grads[name] = (y, *torch.autograd.grad(y, [xg, *params], gy))
    for got, want in zip(grads["unit"], grads["seq"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and the activation keyword alone: the post-op only where nothing needs a gradient
    conv = unit[0]
    xg = x.clone().requires_grad_()
    y = conv(xg, activation="gelu")
    (gx,) = torch.autograd.grad(y, [xg], torch.ones_like(y))
    ref = nn.functional.gelu(conv._conv_forward(x.clone().requires_grad_(), conv.weight, None))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert gx.abs().sum() > 0


def test_stem_unit_type_errors() -> None:
    from aqcf_kernels.models.layers import RealConvNormAct

    unit = _stem(2)
    with pytest.raises(TypeError, match="conv must be one of ONEDNN_CONVS"):
        RealConvNormAct(nn.Conv2d(1, 16, 3), unit[1])
    with pytest.raises(TypeError, match="norm must be a quaternion norm"):
        RealConvNormAct(unit[0], nn.BatchNorm2d(16))

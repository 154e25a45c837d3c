"""The ``cpp_im2col`` backend: the cpp engine with its real convs on PyTorch's own kernel choice.

Where PyTorch keeps a one-sample float32 conv on few channels on its im2col kernels, the cpp engine
routes it to oneDNN (``csrc/cpu/real_conv.cpp``); which is faster at the small end depends on the CPU,
so ``auto`` times both. Checked here: with ``im2col`` the real convs run exactly PyTorch's own kernels
(bit-identical to ``F.conv*`` and its weight gradient, activations after the conv, not as oneDNN's
post-op); the route query agrees with the route taken; the backend serves exactly where the routes
differ and says why not elsewhere; through the quaternion op, forward and both gradients meet the
accuracy contract against ``reference.py`` on odd sizes, strides, transposed convs, activations and
non-contiguous inputs, and never touch oneDNN; a call it served is remembered by the extension and
served natively, bit-identically. (That ``auto`` times it where the routes differ: test_tuning.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aqcf_kernels import backends, reference
from aqcf_kernels import functional as QF
from aqcf_kernels.backends._extension import _C
from aqcf_kernels.params import ConvParams

pytestmark = [
    pytest.mark.skipif(
        _C is None or not torch.backends.mkldnn.is_available(), reason="needs the extension and a oneDNN build of torch"
    ),
    pytest.mark.usefixtures("single_threaded"),
]

CONV = (F.conv1d, F.conv2d, F.conv3d)
CONV_T = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _exactly(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# (dims, stride, padding, dilation, output_padding): the extension reroutes each one to oneDNN
FORWARD = [(3, 1, 1, 1, 0), (3, 2, 1, 1, 0), (2, 1, 2, 2, 0), (1, 2, 0, 1, 0)]
TRANSPOSED = [(3, 1, 1, 1, 0), (2, 1, 3, 1, 0), (3, 2, 1, 1, 1), (1, 2, 1, 1, 1)]


def _real_args(dims, stride, padding, dilation, output_padding, transposed):
    return ([stride] * dims, [padding] * dims, [dilation] * dims, transposed, [output_padding] * dims, 1)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize(("geometry", "transposed"), [(g, False) for g in FORWARD] + [(g, True) for g in TRANSPOSED])
def test_im2col_runs_pytorchs_own_conv_where_the_extension_takes_onednn(geometry, transposed, activation) -> None:
    dims, stride, padding, dilation, output_padding = geometry
    x = _rand(1, 4, *[7 + d for d in range(dims)], seed=1)
    w = _rand(*((4, 6) if transposed else (6, 4)), *[3] * dims, seed=2)
    b = _rand(6, seed=3)
    args = _real_args(dims, stride, padding, dilation, output_padding, transposed)
    _, rerouted = _C._real_conv(x, w, b, *args)
    assert rerouted != "aten"  # the case this backend exists for
    assert _C._real_conv_route(x, list(w.shape), *args) == rerouted
    y, taken = _C._real_conv(x, w, b, *args, activation=activation, im2col=True)
    assert taken == "aten"
    if transposed:
        want = CONV_T[dims - 1](x, w, b, stride, padding, output_padding, 1, dilation)
    else:
        want = CONV[dims - 1](x, w, b, stride, padding, dilation)
    if activation is not None:
        want = getattr(F, activation)(want)
    _exactly(y, want)


@pytest.mark.parametrize(
    ("dims", "size", "stride", "padding", "dilation"), [(3, 8, 1, 1, 1), (2, 11, 2, 2, 2), (1, 13, 3, 1, 1)]
)
def test_im2col_weight_gradient_is_pytorchs_own(dims, size, stride, padding, dilation) -> None:
    x = _rand(1, 4, *[size + d for d in range(dims)], seed=4)[..., 1:]  # a non-contiguous view
    w = _rand(6, 4, *[3] * dims, seed=5)
    gy = _rand(*CONV[dims - 1](x, w, None, stride, padding, dilation).shape, seed=6)
    geometry = ([stride] * dims, [padding] * dims, [dilation] * dims, 1)
    _, rerouted = _C._real_conv_weight_grad(x, gy, list(w.shape), *geometry)
    assert rerouted == "two_slabs"
    gw, taken = _C._real_conv_weight_grad(x, gy, list(w.shape), *geometry, im2col=True)
    assert taken == "aten"
    wr = w.clone().requires_grad_()
    CONV[dims - 1](x, wr, None, stride, padding, dilation).backward(gy)
    _exactly(gw, wr.grad)


@pytest.mark.parametrize(
    ("batch", "channels", "size", "dtype", "groups", "route"),
    [
        (1, 4, (9, 9, 9), torch.float32, 1, "onednn"),
        (1, 64, (17, 18, 5), torch.float32, 1, "onednn"),  # 64 * 17 * 18 leading elements: PyTorch's im2col
        (2, 4, (9, 9, 9), torch.float32, 1, "aten"),  # PyTorch takes oneDNN itself for two samples
        (1, 64, (18, 18, 2), torch.float32, 1, "aten"),  # and past 20480 leading elements
        (1, 4, (9, 9, 9), torch.float32, 2, "aten"),  # and for groups
        (1, 4, (9, 9, 9), torch.float64, 1, "aten"),  # not float32: nothing reroutes
    ],
)
def test_the_route_query_names_the_route_the_conv_takes(batch, channels, size, dtype, groups, route) -> None:
    x = _rand(batch, channels, *size, seed=7).to(dtype)
    w = _rand(channels, channels // groups, 3, 3, 3, seed=8).to(dtype)
    args = _real_args(3, 1, 1, 1, 0, False)[:-1] + (groups,)
    assert _C._real_conv_route(x, list(w.shape), *args) == route
    assert _C._real_conv(x, w, None, *args)[1] == route


def _geometry(dims: int, stride: int = 1, transposed: bool = False, groups: int = 1, padding: int = 1) -> ConvParams:
    return ConvParams(dims, (stride,) * dims, (padding,) * dims, (1,) * dims, transposed, (0,) * dims, groups)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "dtype", "params", "algorithm", "why"),
    [
        ((2, 8, 9, 9), (4, 2, 2, 3, 3), torch.float32, _geometry(2), "hamilton", "nothing differs"),
        ((1, 8, 9, 9), (4, 2, 2, 3, 3), torch.float64, _geometry(2), "hamilton", "float32 real convs only"),
        ((1, 8, 9, 9), (4, 2, 2, 3, 3), torch.float32, _geometry(2), "fast8", "hamilton algorithm only"),
        ((1, 8, 9, 9), (4, 2, 2, 1, 1), torch.float32, _geometry(2, padding=0), "hamilton", "pointwise"),
        ((1, 8, 9, 9), (4, 2, 1, 3, 3), torch.float32, _geometry(2, groups=2), "hamilton", "nothing differs"),
    ],
)
def test_the_backend_declines_where_nothing_differs_and_says_why(x_shape, w_shape, dtype, params, algorithm, why):
    im2col = backends.registered()["cpp_im2col"]
    x, w = torch.empty(x_shape, dtype=dtype), torch.empty(w_shape, dtype=dtype)
    assert why in im2col.cannot_serve(x, w, params, algorithm)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "params"),
    [
        ((1, 8, 9, 9), (4, 2, 2, 3, 3), _geometry(2)),
        ((1, 8, 9, 8, 7), (4, 3, 2, 3, 3, 3), _geometry(3, stride=2)),
        ((1, 8, 11), (4, 2, 2, 3), _geometry(1)),
        ((1, 8, 5, 6, 7), (4, 2, 3, 3, 3, 3), _geometry(3, stride=2, transposed=True)),
    ],
)
def test_the_backend_serves_where_the_extension_reroutes(x_shape, w_shape, params) -> None:
    im2col = backends.registered()["cpp_im2col"]
    assert im2col.cannot_serve(torch.empty(x_shape), torch.empty(w_shape), params, "hamilton") is None


# (dims, stride, padding, dilation, transposed, output_padding, activation, negative slope)
QUATERNION = [
    (2, 1, 1, 1, False, 0, None, 0.01),
    (3, 2, 1, 1, False, 0, "relu", 0.01),
    (1, 2, 2, 2, False, 0, "gelu", 0.01),
    (2, 1, 1, 1, True, 0, "leaky_relu", -0.2),  # a negative slope: the pre-activation is kept
    (3, 2, 1, 1, True, 1, "leaky_relu", 0.1),
]


@pytest.mark.parametrize(
    ("dims", "stride", "padding", "dilation", "transposed", "output_padding", "activation", "slope"), QUATERNION
)
def test_the_quaternion_conv_meets_the_contract_on_pytorchs_kernels(
    qrand, rel_errors, monkeypatch, dims, stride, padding, dilation, transposed, output_padding, activation, slope
) -> None:
    monkeypatch.setenv("AQCF_BACKEND", "cpp_im2col")
    x = qrand(1, 12, *[9 - d for d in range(dims)], dtype=torch.float32, seed=1)
    x = torch.cat([x, x], -1)[..., 1 : 10 - dims]  # a non-contiguous view, odd sizes
    w = qrand(4, 2, 3, *[3] * dims, dim=0, dtype=torch.float32, seed=2)
    b = qrand(8, dim=0, dtype=torch.float32, seed=3)
    if transposed:
        w = qrand(4, 3, 2, *[3] * dims, dim=0, dtype=torch.float32, seed=2)
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "transposed": transposed}
    kw["output_padding"] = output_padding
    act = {"activation": activation, "negative_slope": slope} if activation else {}
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = QF.quaternion_conv(xs, ws, bs, algorithm="hamilton", **kw, **act)
        gy = qrand(*y.shape, dtype=torch.float32, seed=4)
        y.backward(gy)
    ran = {e.name for e in prof.events()}
    assert not {name for name in ran if "mkldnn" in name}, sorted(ran)
    assert {name for name in ran if name.startswith("aten::_slow_conv") or name.startswith("aten::slow_conv")}, sorted(
        ran
    )
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference.quaternion_conv_naive(xd, wd, bd, **kw)
    if activation == "leaky_relu":
        ref = F.leaky_relu(ref, slope)
    elif activation is not None:
        ref = getattr(F, activation)(ref)
    ref.backward(gy.double())
    for got, want, dim in ((y, ref, 1), (xs.grad, xd.grad, 1), (ws.grad, wd.grad, 0), (bs.grad, bd.grad, 0)):
        assert max(rel_errors(got, want, dim).values()) < 1e-5


def _step(x, w, b):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = QF.quaternion_conv2d(x, w, b, padding=1, activation="relu")
    return (y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y)))


def test_a_call_it_served_is_remembered_and_served_natively(asked, qrand, monkeypatch) -> None:
    monkeypatch.setenv("AQCF_BACKEND", "cpp_im2col")
    x, w, b = qrand(1, 8, 7, 6, dtype=torch.float32, seed=5), qrand(4, 3, 2, 3, 3, seed=6), qrand(12, seed=7)
    w, b = w.float(), b.float()
    first = _step(x, w, b)
    assert (asked.conv, asked.weight_grad) == (2, 1)
    assert _C._remembered_conv_choices() == 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        second = _step(x, w, b)
    assert (asked.conv, asked.weight_grad) == (2, 1), "a remembered signature went back to Python"
    assert not {e.name for e in prof.events() if "mkldnn" in e.name}, "the native path took oneDNN"
    for a, b_ in zip(second, first, strict=True):
        _exactly(a, b_)

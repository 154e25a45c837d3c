"""The real convs under both quaternion algorithms (``csrc/cpu/real_conv.cpp``): where PyTorch would run a
one-sample float32 conv on its own im2col kernels, the extension takes oneDNN another way. Each way must
compute exactly what the conv means: checked here against PyTorch's conv in float64, forward and
weight gradient, on odd sizes, every stride/padding/dilation the route accepts, and non-contiguous and
channels_last inputs; that the route is taken where it should be (and only there); and, through the
quaternion op, that a batch-1 3D conv of both algorithms still meets the accuracy contract against
``reference.py``."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _threads import intra_op_threads

from aqcf_kernels import backends, reference
from aqcf_kernels import functional as QF
from aqcf_kernels.backends._extension import _C
from aqcf_kernels.params import ConvParams

from .test_qconv_accuracy import FP32_TOLERANCE

pytestmark = pytest.mark.skipif(
    _C is None or not torch.backends.mkldnn.is_available(), reason="needs the extension and a oneDNN build of torch"
)

CONV = (F.conv1d, F.conv2d, F.conv3d)
CONV_T = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _inputs(dims, c_in, c_out, size, transposed, seed=0):
    x = _rand(1, c_in, *[size + d for d in range(dims)], seed=seed)  # unequal, odd and even sizes
    w = _rand(*((c_in, c_out) if transposed else (c_out, c_in)), *[3] * dims, seed=seed + 1)
    b = _rand(c_out, seed=seed + 2)
    return x, w, b


# (dims, stride, padding, dilation, output_padding, expected route of the transposed conv)
TRANSPOSED = [
    (3, 1, 1, 1, 0, "flipped"),
    (3, 1, 0, 1, 0, "flipped"),
    (2, 1, 2, 1, 0, "flipped"),  # padding = the kernel's extent: still a forward conv (padding 0)
    (3, 1, 1, 2, 0, "flipped"),
    (2, 1, 3, 1, 0, "two_groups"),  # padding past the extent: not a forward conv
    (3, 2, 1, 1, 1, "two_groups"),
    (3, 2, 1, 1, 0, "two_groups"),
    (1, 2, 1, 1, 1, "two_groups"),
    (2, 3, 0, 2, 2, "two_groups"),
    (2, 1, 1, 2, 1, "aten"),  # output_padding >= stride: oneDNN refuses it, PyTorch's own path stays
]


@pytest.mark.parametrize(("dims", "stride", "padding", "dilation", "output_padding", "route"), TRANSPOSED)
def test_a_one_sample_transposed_conv_takes_onednn_and_matches_pytorch(
    dims, stride, padding, dilation, output_padding, route
) -> None:
    x, w, b = _inputs(dims, 4, 6, 7, transposed=True)
    args = ([stride] * dims, [padding] * dims, [dilation] * dims, True, [output_padding] * dims, 1)
    y, taken = _C._real_conv(x, w, b, *args)
    assert taken == route
    expected = CONV_T[dims - 1](x.double(), w.double(), b.double(), stride, padding, output_padding, 1, dilation)
    assert y.shape == expected.shape and _rel(y, expected) < 1e-6


def test_an_odd_output_channel_count_keeps_pytorchs_strided_transposed_conv() -> None:
    x, w, b = _inputs(3, 4, 5, 6, transposed=True)
    y, taken = _C._real_conv(x, w, b, [2] * 3, [1] * 3, [1] * 3, True, [1] * 3, 1)
    assert taken == "aten"
    assert _rel(y, F.conv_transpose3d(x.double(), w.double(), b.double(), 2, 1, 1)) < 1e-6


@pytest.mark.parametrize(
    ("dims", "stride", "padding", "dilation"), [(3, 1, 1, 1), (3, 2, 1, 1), (2, 1, 2, 2), (1, 2, 0, 1)]
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_a_one_sample_forward_conv_takes_onednn_and_matches_pytorch(dims, stride, padding, dilation, layout) -> None:
    x, w, b = _inputs(dims, 4, 6, 7, transposed=False)
    if layout == "channels_last" and dims > 1:
        x = x.to(memory_format=(torch.channels_last, torch.channels_last_3d)[dims - 2])
    if layout == "sliced":  # a component view of a blocked tensor: not contiguous
        x = torch.cat([x, _rand(*x.shape, seed=9)], 1)[:, : x.shape[1]]
    y, taken = _C._real_conv(x, w, b, [stride] * dims, [padding] * dims, [dilation] * dims, False, [0] * dims, 1)
    assert taken == "onednn"
    expected = CONV[dims - 1](x.double(), w.double(), b.double(), stride, padding, dilation)
    assert _rel(y, expected) < 1e-6


# (dims, size, stride, padding, dilation): odd and even output rows, rows the conv never reads
@pytest.mark.parametrize(
    ("dims", "size", "stride", "padding", "dilation"),
    [
        (3, 7, 1, 1, 1),
        (3, 8, 1, 1, 1),
        (3, 9, 2, 1, 1),
        (3, 8, 2, 0, 1),
        (2, 11, 1, 2, 2),
        (1, 13, 3, 1, 1),
        (2, 6, 1, 0, 1),
    ],
)
@pytest.mark.parametrize("layout", ["sliced", "channels_last"])
def test_a_one_sample_weight_gradient_as_two_samples_matches_pytorch(
    dims, size, stride, padding, dilation, layout
) -> None:
    x, w, _ = _inputs(dims, 4, 6, size, transposed=False)
    if layout == "sliced":
        x = x[..., : x.shape[-1] - 1] if dims > 1 else x  # a non-contiguous view
    elif dims > 1:
        x = x.to(memory_format=(torch.channels_last, torch.channels_last_3d)[dims - 2])
    gy = _rand(*CONV[dims - 1](x, w, None, stride, padding, dilation).shape, seed=5)
    gw, taken = _C._real_conv_weight_grad(x, gy, list(w.shape), [stride] * dims, [padding] * dims, [dilation] * dims, 1)
    assert taken == "two_slabs"
    wd = w.double().requires_grad_()
    CONV[dims - 1](x.double(), wd, None, stride, padding, dilation).backward(gy.double())
    assert _rel(gw, wd.grad) < 1e-6


@pytest.mark.parametrize(
    ("what", "batch", "channels", "size", "groups", "dtype"),
    [
        ("two samples", 2, 4, 7, 1, torch.float32),
        ("many channels", 1, 64, 32, 1, torch.float32),
        ("groups", 1, 4, 7, 2, torch.float32),
        ("float64", 1, 4, 7, 1, torch.float64),
    ],
)
def test_pytorchs_own_choice_stands_where_it_takes_onednn_or_the_dtype_is_not_float32(
    what, batch, channels, size, groups, dtype
) -> None:
    x = _rand(batch, channels, size, size, size, seed=0).to(dtype)
    w = _rand(channels, channels // groups, 3, 3, 3, seed=1).to(dtype)
    _, taken = _C._real_conv(x, w, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, groups)
    assert taken == "aten", what
    gy = _rand(*x.shape, seed=2).to(dtype)
    _, taken = _C._real_conv_weight_grad(x, gy, list(w.shape), [1] * 3, [1] * 3, [1] * 3, groups)
    assert taken == "aten", what


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_batch1_3d_quaternion_conv_meets_the_contract_through_the_routes(
    qrand, rel_errors, monkeypatch, algorithm, transposed
) -> None:
    """The model's case: one sample, 3D, few quaternion channels, stride 2 (the down- and up-samplings):
    on the cpp backend no real conv runs on PyTorch's im2col kernels any more, and the forward and both
    gradients meet the accuracy contract against the float64 reference."""
    monkeypatch.setenv("AQCF_BACKEND", "cpp")
    x = qrand(1, 16, 9, 8, 7, dtype=torch.float32, seed=1)
    w = qrand(4, 4, 4, 3, 3, 3, dim=0, dtype=torch.float32, seed=2)
    b = qrand(16, dim=0, dtype=torch.float32, seed=3)
    kw = {"stride": 2, "padding": 1, "transposed": transposed, "output_padding": 1 if transposed else 0}
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = QF.quaternion_conv(xs, ws, bs, algorithm=algorithm, **kw)
        gy = qrand(*y.shape, dtype=torch.float32, seed=4)
        y.backward(gy)
    ran = {e.name for e in prof.events()}
    assert not {name for name in ran if name.startswith("aten::slow_conv")}, sorted(ran)
    assert "aten::mkldnn_convolution" in ran
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference.quaternion_conv_naive(xd, wd, bd, **kw)
    ref.backward(gy.double())
    tol = 1e-5 if algorithm == "hamilton" else 5e-4
    # whole tensor and per component (DESIGN.md's contract); weights and bias are blocked along dim 0
    for got, want, dim in ((y, ref, 1), (xs.grad, xd.grad, 1), (ws.grad, wd.grad, 0), (bs.grad, bd.grad, 0)):
        assert max(rel_errors(got, want, dim).values()) < tol


@pytest.mark.parametrize("batch", [1, 2], ids=["onednn-route", "aten-route"])
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_channels_last_conv_gets_its_weight_made_in_channels_last(
    qrand, rel_errors, monkeypatch, dims, algorithm, batch
) -> None:
    """PyTorch's CPU conv converts a weight to its input's channels_last on every call. The expanded weight
    (hamilton) and fast8's 8 weight operands are written in that format, so no real conv copies a
    weight-shaped tensor; the forward still meets the contract, and both gradients (the input gradient's
    transposed conv keeps a contiguous weight) too."""
    monkeypatch.setenv("AQCF_BACKEND", "cpp")
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = qrand(batch, 32, *(7, 6, 5)[:dims], dtype=torch.float32, seed=5).contiguous(memory_format=fmt)
    w = qrand(4, 8, 8, *[3] * dims, dim=0, dtype=torch.float32, seed=6)
    kernel = (3,) * dims
    weight_shapes = {(32, 32, *kernel), (8, 8, *kernel)}  # expanded; one component (fast8's operands)
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof,
    ):
        y = QF.quaternion_conv(x, w, None, padding=1, algorithm=algorithm)
    copies = [
        e.input_shapes for e in prof.events() if e.name == "aten::copy_" and tuple(e.input_shapes[0]) in weight_shapes
    ]
    assert not copies, copies
    assert {"aten::mkldnn_convolution", "aten::convolution"} & {e.name for e in prof.events()}
    xs, ws = (t.detach().clone().requires_grad_() for t in (x, w))
    ys = QF.quaternion_conv(xs, ws, None, padding=1, algorithm=algorithm)
    gy = qrand(*ys.shape, dtype=torch.float32, seed=7)
    ys.backward(gy)
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    ref = reference.quaternion_conv_naive(xd, wd, None, padding=1)
    ref.backward(gy.double())
    tol = 1e-5 if algorithm == "hamilton" else 5e-4
    for got, want, dim in ((y, ref, 1), (ys, ref, 1), (xs.grad, xd.grad, 1), (ws.grad, wd.grad, 0)):
        assert max(rel_errors(got, want, dim).values()) < tol


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_channels_last_backward_on_pytorchs_route_clones_no_weight(qrand, monkeypatch, dims, algorithm) -> None:
    """Two samples: every real conv takes PyTorch's own route. Its transposed conv (the input gradient) gets
    the weight in channels_last too, and its weight-gradient kernel a weight-shaped argument already in
    that format (it only reads the shape, but made a broadcast scalar contiguous in full): no weight-shaped
    tensor is cloned in a training step."""
    monkeypatch.setenv("AQCF_BACKEND", "cpp")
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = qrand(2, 32, *(7, 6, 5)[:dims], dtype=torch.float32, seed=8).contiguous(memory_format=fmt).requires_grad_()
    w = qrand(4, 8, 8, *[3] * dims, dim=0, dtype=torch.float32, seed=9).requires_grad_()
    kernel = (3,) * dims
    weight_shapes = {(32, 32, *kernel), (8, 8, *kernel)}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        y = QF.quaternion_conv(x, w, None, padding=1, algorithm=algorithm)
        y.backward(qrand(*y.shape, dtype=torch.float32, seed=10))
    clones = [
        e.input_shapes for e in prof.events() if e.name == "aten::clone" and tuple(e.input_shapes[0]) in weight_shapes
    ]
    assert not clones, clones
    assert "aten::convolution_backward" in {e.name for e in prof.events()}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_several_samples_of_a_1x1_conv_keep_every_sample_in_the_weight_gradient(dims, batch, threads) -> None:
    """On one thread PyTorch's choice does not stand for a few samples of a 1x1 conv (pytorch_choice_stands), yet
    the two-slab weight gradient is one sample's: it must not be taken, or the gradient is sample 0's alone. fast8's
    products always run on one thread each, so its 1x1 weight gradients went this way (35-100% off)."""
    with intra_op_threads(threads):
        x = _rand(batch, 8, *[5 + d for d in range(dims)], seed=3)
        w = _rand(6, 8, *[1] * dims, seed=4)
        gy = _rand(batch, 6, *x.shape[2:], seed=5)
        ones = [1] * dims
        gw, taken = _C._real_conv_weight_grad(x, gy, list(w.shape), ones, [0] * dims, ones, 1)
    assert taken == "aten"
    wd = w.double().requires_grad_()
    CONV[dims - 1](x.double(), wd).backward(gy.double())
    assert _rel(gw, wd.grad) < 1e-6


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_1x1_quaternion_conv_of_several_samples_meets_the_contract(
    dims, algorithm, groups, transposed, threads, qrand
) -> None:
    """Forward, input and weight gradient of a float32 1x1 quaternion conv (and transposed conv) on 3 samples, one
    group and two, through the cpp backend, against reference.py in float64 on the same rounded inputs (the
    float32 contract). On one thread (and in every fast8 product) PyTorch's choice does not stand for these, and
    the extension's one-sample, one-group routes once served them: weight gradients 35-100% off, and a grouped
    conv's input gradient with half its channels."""
    x = qrand(3, 16, *[5 + d for d in range(dims)], seed=20, dtype=torch.float32, requires_grad=True)
    # (4, A, B, *k): A the output's quaternion channels (the input's when transposed), B the other side's per group
    w_shape = (4, 4, 8 // groups) if transposed else (4, 8, 4 // groups)
    w = qrand(*w_shape, *[1] * dims, dim=0, seed=21, dtype=torch.float32, requires_grad=True)
    with intra_op_threads(threads):
        with backends.use("cpp"):
            y = QF.quaternion_conv(x, w, groups=groups, transposed=transposed, algorithm=algorithm)
            g = qrand(*y.shape, seed=22, dtype=torch.float32)
            got = (y, *torch.autograd.grad(y, (x, w), g))
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    yd = reference.quaternion_conv_naive(xd, wd, None, groups=groups, transposed=transposed)
    want = (yd, *torch.autograd.grad(yd, (xd, wd), g.double()))
    tolerance = FP32_TOLERANCE[algorithm]
    for name, o, r in zip(("forward", "input grad", "weight grad"), got, want, strict=True):
        assert _rel(o, r) < tolerance, f"{name}: {_rel(o, r):.1e}"


# (input depth, kernel depth, depth padding): deeper kernels than inputs, where PyTorch's bf16 weight gradient is
# wrong on an AMD EPYC with avx512_bf16 (torch 2.13), and a depth equal to the kernel's, where it is right
DEEP_KERNELS = [(2, 3, 1), (1, 2, 1), (4, 5, 2), (3, 3, 1)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(("depth", "kernel_depth", "padding"), DEEP_KERNELS)
def test_a_bf16_3d_weight_gradient_under_a_deeper_kernel_is_right(depth, kernel_depth, padding, channels_last) -> None:
    """The real weight gradient of a bf16 conv3d, both twins (the extension's and the torch backend's), against
    PyTorch in float64 within bf16's rounding: where the kernel is deeper than the input, PyTorch's own (oneDNN's
    kernel) gave 1 to 1e35 relative error or NaN (a 3d U-Net's depth-2 bottleneck under a 3x3x3 kernel), so both take
    the float32 gradient there, and PyTorch's elsewhere."""
    from aqcf_kernels.backends.torch.conv import real_conv_weight_grad

    x = _rand(2, 16, depth, 6, 5, seed=30).bfloat16()
    w = _rand(16, 16, kernel_depth, 3, 3, seed=31)
    gy = _rand(2, 16, depth + 2 * padding - kernel_depth + 1, 6, 5, seed=32).bfloat16()
    if channels_last:
        x, gy = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, gy))
    geometry = ([1] * 3, [padding, 1, 1], [1] * 3)
    gw, taken = _C._real_conv_weight_grad(x, gy, list(w.shape), *geometry, 1)
    gw_torch = real_conv_weight_grad(x, gy, list(w.shape), ConvParams(3, *geometry, False, (0, 0, 0), 1))
    assert taken == ("float32" if kernel_depth > depth else "aten")
    wd = w.double().requires_grad_()
    F.conv3d(x.double(), wd, padding=geometry[1]).backward(gy.double())
    for name, got in (("extension", gw), ("torch backend", gw_torch)):
        assert got.dtype == torch.bfloat16
        assert _rel(got, wd.grad) < 8e-3, (name, _rel(got, wd.grad))  # bf16's eps: 7.8e-3, one rounding: 3e-3


# (input spatial size, kernel, stride, padding, dilation): kernels larger than the input along some dim, the depth or
# another, in 1d, 2d and 3d (bf16 weight gradients PyTorch got wrong here, from a grid of random geometries:
# tests/conv/test_native_served_grid.py), a dilated extent larger than the input, and kernels that fit
LARGER_KERNELS = [
    ((1,), (3,), (2,), (2,), (1,)),
    ((5, 1), (3, 3), (1, 2), (0, 1), (1, 1)),
    ((3, 1, 1), (3, 3, 1), (1, 2, 2), (1, 1, 0), (1, 1, 1)),
    ((2, 5, 3), (2, 2, 3), (1, 2, 1), (1, 0, 1), (1, 1, 1)),
    ((4, 6), (2, 3), (1, 1), (2, 1), (4, 1)),
    ((3, 3), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((6,), (3,), (2,), (1,), (2,)),
]


@pytest.mark.parametrize(("size", "kernel", "stride", "padding", "dilation"), LARGER_KERNELS)
def test_a_bf16_weight_gradient_under_a_kernel_larger_than_its_input_is_right(size, kernel, stride, padding, dilation):
    """As above, along any spatial dim and in 1d and 2d too: where the kernel's dilated extent exceeds the input's size
    along some dim, both twins take the float32 weight gradient, and PyTorch's elsewhere."""
    from aqcf_kernels.backends.torch.conv import real_conv_weight_grad

    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(size)]
    x = _rand(1, 64, *size, seed=33).bfloat16()
    w = _rand(16, 64, *kernel, seed=34)
    geometry = (list(stride), list(padding), list(dilation))
    gy = _rand(*conv(x.double(), w.double(), None, *geometry).shape, seed=35).bfloat16()
    gw, taken = _C._real_conv_weight_grad(x, gy, list(w.shape), *geometry, 1)
    gw_torch = real_conv_weight_grad(x, gy, list(w.shape), ConvParams(len(size), *geometry, False, (0,) * len(size), 1))
    larger = any(d * (k - 1) + 1 > n for n, k, d in zip(size, kernel, dilation, strict=True))
    assert taken == ("float32" if larger else "aten")
    wd = w.double().requires_grad_()
    conv(x.double(), wd, None, *geometry).backward(gy.double())
    for name, got in (("extension", gw), ("torch backend", gw_torch)):
        assert got.dtype == torch.bfloat16
        assert _rel(got, wd.grad) < 8e-3, (name, _rel(got, wd.grad))  # bf16's eps: 7.8e-3, one rounding: 3e-3


@pytest.mark.parametrize("backend", ["torch", "cpp", "cpp_cl"])
def test_a_bf16_quaternion_conv3d_at_a_depth_2_bottleneck_meets_the_contract(backend, qrand) -> None:
    """A bf16 QuaternionConv3d-sized call (8 quaternion channels, 3x3x3, padding 1) on a depth-2 map, through each
    CPU backend: forward, input and weight gradient against reference.py in float64 on the same rounded inputs,
    within a bf16 rounding (the expanded conv's weight gradient, PyTorch's own, is garbage here)."""
    x = qrand(2, 32, 2, 6, 5, seed=40, dtype=torch.bfloat16, requires_grad=True)
    w = qrand(4, 8, 8, 3, 3, 3, dim=0, seed=41, dtype=torch.bfloat16, requires_grad=True)
    with backends.use(backend):
        y = QF.quaternion_conv(x, w, None, padding=1, algorithm="hamilton")
        g = qrand(*y.shape, seed=42, dtype=torch.bfloat16)
        got = (y, *torch.autograd.grad(y, (x, w), g))
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    yd = reference.quaternion_conv_naive(xd, wd, None, padding=1)
    want = (yd, *torch.autograd.grad(yd, (xd, wd), g.double()))
    for name, o, r in zip(("forward", "input grad", "weight grad"), got, want, strict=True):
        assert _rel(o, r) < 8e-3, (backend, name, _rel(o, r))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fast8_on_one_quaternion_channel_of_a_channels_last_map_with_a_strided_width_of_one(backend, dims, qrand):
    """fast8 slices a channels_last input into its four components: with one quaternion channel each is a one-channel
    tensor whose channel stride is 1, and PyTorch's float32 conv of such a tensor (oneDNN's kernel; torch 2.13, AMD
    EPYC) is ~100% off where the output's last dim is 1 and strided over (a 3d conv of (3, 1, 3, 3, 4) with a
    (1, 1, 3) kernel, stride (1, 1, 2)). Both real-conv twins give it contiguous strides (the same memory); forward
    and both gradients against reference.py in float64, within the float32 contract."""
    spatial, kernel, stride = ((3, 3, 4), (1, 1, 3), (1, 1, 2)) if dims == 3 else ((6, 5), (1, 3), (1, 3))
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = qrand(3, 4, *spatial, seed=50, dtype=torch.float32).contiguous(memory_format=fmt).requires_grad_()
    w = qrand(4, 2, 1, *kernel, dim=0, seed=51, dtype=torch.float32, requires_grad=True)
    with backends.use(backend):
        y = QF.quaternion_conv(x, w, None, stride=stride, algorithm="fast8")
        assert y.shape[-1] == 1
        g = qrand(*y.shape, seed=52, dtype=torch.float32)
        got = (y, *torch.autograd.grad(y, (x, w), g))
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    yd = reference.quaternion_conv_naive(xd, wd, None, stride=stride)
    want = (yd, *torch.autograd.grad(yd, (xd, wd), g.double()))
    for name, o, r in zip(("forward", "input grad", "weight grad"), got, want, strict=True):
        assert _rel(o, r) < FP32_TOLERANCE["fast8"], (backend, name, _rel(o, r))


# Run in a subprocess: a segfault would take the test run with it. Forward and both gradients on the cpp backend,
# each printed as its relative error to reference.py in float64.
_SINGLE_TAP_DILATED = """
import sys
import torch
from aqcf_kernels import backends, reference
from aqcf_kernels import functional as QF

dims, algorithm = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(60)
spatial, kernel = ((3, 1), (2, 1)) if dims == 2 else ((3, 2, 1), (2, 1, 1))
stride, padding, dilation = (1,) * (dims - 1) + (2,), (0,) * (dims - 1) + (1,), (1,) * (dims - 1) + (2,)
fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
x = torch.randn(1, 8, *spatial, generator=g).contiguous(memory_format=fmt).requires_grad_()
w = torch.randn(4, 4, 2, *kernel, generator=g, requires_grad=True)
b = torch.randn(16, generator=g, requires_grad=True)
with backends.use("cpp"):
    y = QF.quaternion_conv(x, w, b, stride=stride, padding=padding, dilation=dilation, algorithm=algorithm)
    gy = torch.randn(y.shape, generator=g)
    got = (y, *torch.autograd.grad(y, (x, w, b), gy))
leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
yd = reference.quaternion_conv_naive(*leaves, stride=stride, padding=padding, dilation=dilation)
want = (yd, *torch.autograd.grad(yd, leaves, gy.double()))
print(" ".join(f"{((o.double() - r).norm() / r.norm()).item():.3e}" for o, r in zip(got, want)))
"""


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_dilated_single_tap_kernel_over_padding_only(dims, algorithm):
    """oneDNN's conv (torch 2.13, AMD EPYC), which the cpp backend calls directly, segfaulted on a float32
    channels_last input with a bias and a kernel one tap wide and dilated in a dim where every output position reads
    only padding (a width-1 map, padding 1, stride 2, dilation 2: tests/nn/test_unit_grid.py found it). A dilation
    means nothing to a one-tap kernel: both real-conv routes set it to 1 (undilated_single_taps). Forward and every
    gradient against reference.py in float64, within the float32 contract."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SINGLE_TAP_DILATED, str(dims), algorithm],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-800:]}"
    errors = [float(e) for e in done.stdout.split()]
    assert len(errors) == 4 and max(errors) < FP32_TOLERANCE[algorithm], errors

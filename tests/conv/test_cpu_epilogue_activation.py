"""The activation in the ``cpp`` backend's conv epilogue: oneDNN's post-op on the expanded conv (float32
2d/3d forward convs) and fast8's output pass (every dtype), against the float64 reference conv followed
by torch's activation; and that an inference unit runs no activation pass of its own.

Where the post-op does not apply (float64, 1d, transposed, grouped channel reorders) the activation
runs in place after the conv: the same results, checked here too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aqcf_kernels import functional as qF
from aqcf_kernels import nn as qnn
from aqcf_kernels import reference
from aqcf_kernels.backends import _extension

pytestmark = [
    pytest.mark.usefixtures("single_threaded"),
    pytest.mark.skipif(_extension._C is None, reason=f"extension not built: {_extension.IMPORT_ERROR}"),
]
_C = _extension._C

ACTIVATIONS = {
    "relu": lambda z, slope: F.relu(z),
    "leaky_relu": lambda z, slope: F.leaky_relu(z, slope),
    "gelu": lambda z, slope: F.gelu(z),
}
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}

# (input shape, weight shape, stride, padding, dilation, transposed, output_padding, groups): odd sizes,
# a stride, dilation, groups (a channel reorder around the real conv), transposed and 1d (no post-op)
CASES = {
    "2d": ((2, 12, 9, 11), (4, 5, 3, 3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), 1),
    "2d-strided-dilated": ((1, 8, 10, 7), (4, 3, 2, 3, 2), (2, 1), (2, 0), (2, 1), False, (0, 0), 1),
    "2d-groups": ((2, 16, 6, 5), (4, 4, 2, 3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), 2),
    "3d": ((1, 8, 5, 6, 7), (4, 3, 2, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), False, (0, 0, 0), 1),
    "1d": ((3, 8, 13), (4, 3, 2, 3), (1,), (1,), (1,), False, (0,), 1),
    "2d-transposed": ((2, 8, 5, 4), (4, 2, 3, 3, 3), (2, 2), (1, 0), (1, 1), True, (1, 0), 1),
}


def _case(name: str, dtype: torch.dtype, channels_last: bool, seed: int):
    shape, w_shape, stride, padding, dilation, transposed, output_padding, groups = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = 0.4 * torch.randn(*w_shape, generator=g, dtype=torch.float64)
    out_q = w_shape[2] * groups if transposed else w_shape[1]
    b = torch.randn(4 * out_q, generator=g, dtype=torch.float64)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref_z = reference.quaternion_conv_naive(x, w, b, transposed=transposed, output_padding=output_padding, **geometry)
    xt = x.to(dtype)
    if channels_last and xt.dim() in FORMATS:
        xt = xt.contiguous(memory_format=FORMATS[xt.dim()])
    args = (list(stride), list(padding), list(dilation), transposed, list(output_padding), groups)
    return xt, w.to(dtype), b.to(dtype), args, ref_z


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize(("activation", "slope"), [("relu", 0.0), ("leaky_relu", 0.2), ("gelu", 0.0)])
@pytest.mark.parametrize("name", list(CASES))
def test_extension_conv_applies_the_activation(name, activation, slope, algorithm, dtype, channels_last):
    x, w, b, args, ref_z = _case(name, dtype, channels_last, seed=len(name))
    y = _C.conv(x, w, b, *args, algorithm == "fast8", activation, slope)
    want = ACTIVATIONS[activation](ref_z, slope)
    tol = 1e-12 if dtype == torch.float64 else (1e-5 if algorithm == "hamilton" else 5e-4)
    assert y.dtype == dtype and y.shape == want.shape
    assert _rel(y, want) <= tol, f"{_rel(y, want):.2e}"
    # without an activation: the conv itself (the activation is not applied twice, nor left out)
    assert _rel(_C.conv(x, w, b, *args, algorithm == "fast8"), ref_z) <= tol


# (torch.backends.mkldnn.flags() sets every flag it has, TF32 included, and torch warns that oneDNN's TF32 is
# for Intel GPUs)
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN:UserWarning")
def test_post_op_serves_float32_forward_2d_3d_only():
    fuses = _C._real_conv_fuses_activation
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch")
    assert fuses(torch.zeros(1, 4, 3, 3), False) and fuses(torch.zeros(1, 4, 3, 3, 3), False)
    assert not fuses(torch.zeros(1, 4, 3, 3, dtype=torch.float64), False)
    assert not fuses(torch.zeros(1, 4, 3), False)  # 1d
    assert not fuses(torch.zeros(1, 4, 3, 3), True)  # transposed
    with torch.backends.mkldnn.flags(enabled=False):
        assert not fuses(torch.zeros(1, 4, 3, 3), False)


@pytest.mark.parametrize(("activation", "slope"), [("relu", 0.0), ("leaky_relu", 0.1), ("gelu", 0.0)])
def test_real_conv_post_op_matches_conv_then_activation(activation, slope):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 9, 8, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(5, 6, 3, 3, generator=g), torch.randn(5, generator=g)
    y, route = _C._real_conv(x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, activation, slope)
    want = ACTIVATIONS[activation](F.conv2d(x.double(), w.double(), b.double(), padding=1), slope)
    assert route == "aten" and _rel(y, want) <= 1e-5


def _no_activation_ops(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(a in n for a in ("leaky_relu", "aten::relu", "aten::gelu")))


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_inference_unit_runs_no_activation_pass(spatial_dims, algorithm):
    """A folded unit in eval mode hands the activation to the conv: the cpp backend applies it in the
    epilogue, so no activation op runs, and the output equals conv → norm → activation unfused."""
    conv_cls = qnn.QuaternionConv2d if spatial_dims == 2 else qnn.QuaternionConv3d
    norm_cls = qnn.QuaternionBatchNorm2d if spatial_dims == 2 else qnn.QuaternionBatchNorm3d
    torch.manual_seed(0)
    conv = conv_cls(16, 16, 3, padding=1, algorithm=algorithm)
    norm = norm_cls(16, activation="leaky_relu", negative_slope=0.1)
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    unit = qnn.QuaternionConvNormAct(conv, norm).eval()
    x = torch.randn(2, 16, *([6] * spatial_dims)).contiguous(memory_format=FORMATS[spatial_dims + 2])
    with torch.no_grad():
        unit(x)  # a first call may measure or ask Python; the second is what inference runs
        assert _no_activation_ops(lambda: unit(x)) == []
        got = unit(x)
        want = norm(conv(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_functional_conv_with_activation_is_fused_on_cpu():
    """The public function with ``activation=`` on float32 CPU tensors: no separate activation op."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 8, 7, 6, generator=g).contiguous(memory_format=torch.channels_last)
    w = 0.3 * torch.randn(4, 3, 2, 3, 3, generator=g)
    with torch.no_grad():
        qF.quaternion_conv2d(x, w, None, padding=1, activation="relu")
        assert _no_activation_ops(lambda: qF.quaternion_conv2d(x, w, None, padding=1, activation="relu")) == []
        y = qF.quaternion_conv2d(x, w, None, padding=1, activation="relu")
    want = F.relu(reference.quaternion_conv_expanded(x.double(), w.double(), None, padding=1))
    assert _rel(y, want) <= 5e-4

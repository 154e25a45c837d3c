"""The Triton pass of a fused activation's backward (backends/triton/activation_grad.py): ``dL/dz`` and
the bias gradient in one read, against aten's activation backward and sum in float64.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the kernel runs on CPU tensors in the
interpreter (16 x 16 tiles, two tiles a chunk); on a GPU it runs natively. The shapes are odd: every
case crosses partial channel and spatial tiles and several chunks per sample, so every partial sum
and its mask run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aqcf_kernels.backends.triton import common
from aqcf_kernels.ops import conv as conv_ops

from .test_igemm import _rel

pytestmark = pytest.mark.skipif(common.unavailable() is not None, reason=f"triton: {common.unavailable()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GATES = [("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("gelu", 0.01)]
# (shape, memory format): 1d, 2d NCHW, 2d channels_last, 3d channels_last; C = 20 or 12, S = 37, 35, 35, 45
LAYOUTS = [
    ((2, 20, 37), torch.contiguous_format),
    ((3, 20, 7, 5), torch.contiguous_format),
    ((3, 20, 7, 5), torch.channels_last),
    ((2, 12, 3, 5, 3), torch.channels_last_3d),
]


def _inputs(shape, memory_format, activation, slope, seed=0):
    """``(grad, y, pre)`` in float64 on CPU: z with both signs, y = act(z), grad contiguous (so it is in
    another layout than y where y is channels_last: the launcher copies it once)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64).contiguous(memory_format=memory_format)
    y = F.gelu(z) if activation == "gelu" else F.leaky_relu(z, slope if activation == "leaky_relu" else 0.0)
    keep = conv_ops.stores_preactivation(activation, slope)
    grad = torch.randn(shape, generator=g, dtype=torch.float64) + 0.25  # a mean: the channel sums are not ~0
    return grad, y, (z if keep else z.new_empty(0))


def _reference(grad, y, pre, activation, slope):
    gz = conv_ops.activation_grad(grad, y, pre, activation, slope)
    return gz, gz.sum(dim=[0, *range(2, gz.dim())])


@pytest.fixture
def triton_calls(monkeypatch):
    """Force the triton backend (the interpreter serves CPU tensors only then) and count the kernel's launches."""
    from aqcf_kernels.backends.triton import activation_grad as triton_activation

    monkeypatch.setenv("AQCF_BACKEND", "triton")
    calls = []
    real = triton_activation.activation_grad_bias

    def spy(*args):
        calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(triton_activation, "activation_grad_bias", spy)
    return calls


def _op(grad, y, pre, activation, slope):
    """The op as the backward calls it: through the dispatcher on CUDA; on CPU the compiled extension's
    kernel would take the dispatcher's call, so the op's Python implementation is called directly."""
    if grad.device.type == "cuda":
        return torch.ops.aqcf.activation_grad_bias(grad, y, pre, activation, slope)
    return conv_ops.activation_grad_bias(grad, y, pre, activation, slope)


@pytest.mark.parametrize("activation,slope", GATES)
@pytest.mark.parametrize("shape,memory_format", LAYOUTS, ids=["1d", "2d", "2d-channels_last", "3d-channels_last"])
def test_float32_matches_the_two_aten_passes(triton_calls, shape, memory_format, activation, slope):
    grad, y, pre = _inputs(shape, memory_format, activation, slope, seed=len(shape))
    want = _reference(grad, y, pre, activation, slope)
    gz, gb = _op(*(t.to(DEVICE, torch.float32) for t in (grad, y, pre)), activation, slope)
    assert triton_calls == [torch.float32]
    assert gz.dtype == gb.dtype == torch.float32 and gb.shape == (shape[1],)
    assert gz.stride() == (pre if pre.numel() else y).stride()  # the gate's layout, as the fake says
    assert _rel(gz, want[0]) <= 1e-6, f"dL/dz: {_rel(gz, want[0]):.2e}"
    assert _rel(gb, want[1]) <= 1e-6, f"bias gradient: {_rel(gb, want[1]):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation,slope", [("relu", 0.01), ("gelu", 0.01)])
def test_half_precision_within_twice_aten_error(triton_calls, dtype, activation, slope):
    """FlashAttention's rule: error against float64 at most twice aten's own in the same dtype."""
    shape, memory_format = LAYOUTS[2]
    grad, y, pre = _inputs(shape, memory_format, activation, slope, seed=7)
    want = _reference(grad, y, pre, activation, slope)
    half = [t.to(dtype) for t in (grad, y, pre)]
    aten = _reference(*half, activation, slope)
    got = _op(*(t.to(DEVICE) for t in half), activation, slope)
    assert triton_calls == [dtype]
    for name, o, a, w in zip(("dL/dz", "bias gradient"), got, aten, want, strict=True):
        assert o.dtype == dtype
        bound = max(2 * _rel(a, w), 1e-3 if dtype == torch.float16 else 8e-3)
        assert _rel(o, w) <= bound, f"{name}: {_rel(o, w):.2e} > {bound:.2e} (aten {_rel(a, w):.2e})"


def test_an_expanded_gradient_is_copied_into_the_gate_layout(triton_calls):
    """``y.sum().backward()`` hands the backward a stride-0 gradient: the launcher copies it once."""
    shape, memory_format = LAYOUTS[2]
    _, y, pre = _inputs(shape, memory_format, "relu", 0.01, seed=8)
    grad = torch.full((1,), 1.5, dtype=torch.float64).expand(shape)
    want = _reference(grad, y, pre, "relu", 0.01)
    gz, gb = _op(grad.to(DEVICE, torch.float32), y.to(DEVICE, torch.float32), pre.to(DEVICE), "relu", 0.01)
    assert triton_calls == [torch.float32]
    assert gz.is_contiguous(memory_format=torch.channels_last)
    assert _rel(gz, want[0]) <= 1e-6 and _rel(gb, want[1]) <= 1e-6


def test_what_the_kernel_does_not_take_runs_aten(triton_calls):
    """float64, a 2-d tensor, a gate in neither layout: the two aten passes serve, with the same results."""
    from aqcf_kernels.backends.triton import activation_grad as triton_activation

    grad, y, pre = _inputs((3, 8, 6), torch.contiguous_format, "gelu", 0.01, seed=9)
    assert "float64" in triton_activation.cannot_serve(grad, pre)
    assert "3 dims" in triton_activation.cannot_serve(grad[:, :, 0].float(), pre[:, :, 0].float())
    odd = pre.float().view(3, 8, 2, 3).transpose(2, 3)
    assert "neither contiguous nor channels_last" in triton_activation.cannot_serve(odd.contiguous(), odd)
    gz, gb = _op(*(t.to(DEVICE) for t in (grad, y, pre)), "gelu", 0.01)
    assert triton_calls == []
    want = _reference(grad, y, pre, "gelu", 0.01)
    torch.testing.assert_close(gz.cpu(), want[0])
    torch.testing.assert_close(gb.cpu(), want[1])


@pytest.mark.skipif(not common.INTERPRET, reason="CPU tensors reach the kernel only under the interpreter")
@pytest.mark.parametrize("activation,slope", [("relu", 0.01), ("leaky_relu", -0.3), ("gelu", 0.01)])
def test_a_conv_backward_reaches_the_kernel_through_the_dispatcher(
    triton_calls, python_kernels_on_cpu, activation, slope
):
    """What a GPU runs, on CPU: the conv's autograd (the extension's, or Python's) calls the op, the
    dispatcher hands it to the Python implementation, which runs the kernel (interpreted)."""
    errors = _conv_bias_activation_errors("cpu", activation, slope)
    assert triton_calls == [torch.float32]
    assert errors == pytest.approx([0, 0, 0], abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the backward on CUDA tensors needs a CUDA device")
@pytest.mark.parametrize("activation,slope", [("relu", 0.01), ("gelu", 0.01)])
def test_a_conv_backward_on_cuda_runs_this_pass(triton_calls, activation, slope):
    """End to end on a GPU: a conv + bias + activation's backward (the extension's autograd, or Python's)
    calls the op once, the op runs the kernel, and the gradients meet the fp32 contract."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE fp32 dots: the 1e-5 contract
    try:
        errors = _conv_bias_activation_errors(DEVICE, activation, slope)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert errors == pytest.approx([0, 0, 0], abs=1e-5)
    assert triton_calls == [torch.float32]


def _conv_bias_activation_errors(device, activation, slope) -> list[float]:
    """Relative errors of a conv + bias + activation's (input, weight, bias) gradients on ``device``
    (fp32, channels_last) against the float64 reference."""
    from aqcf_kernels import functional as qF
    from aqcf_kernels import reference

    g = torch.Generator().manual_seed(10)
    x, w, b = (torch.randn(*s, generator=g) for s in ((2, 16, 9, 7), (4, 5, 4, 3, 3), (20,)))
    gy = torch.randn(2, 20, 9, 7, generator=g)
    leaves = [t.to(device).requires_grad_() for t in (x.contiguous(memory_format=torch.channels_last), w, b)]
    y = qF.quaternion_conv2d(*leaves, padding=1, activation=activation, negative_slope=slope)
    grads = torch.autograd.grad(y, leaves, gy.to(device))
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    z = reference.quaternion_conv_expanded(*leaves64, padding=1)
    ref = F.gelu(z) if activation == "gelu" else F.leaky_relu(z, slope if activation == "leaky_relu" else 0.0)
    want = torch.autograd.grad(ref, leaves64, gy.double())
    return [_rel(got, expected) for got, expected in zip(grads, want, strict=True)]

"""The conv with a fused activation (``activation=`` of the functional ops, op ``aqcf.qconv``).

Against the reference conv followed by torch's own activation, forward and every gradient: float64
gradcheck + gradgradcheck where the backend takes float64, fp32 against the float64 reference
where it does not (Triton, which fuses the activation into its epilogue).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from aqcf_kernels import functional as qF
from aqcf_kernels import reference

pytestmark = pytest.mark.usefixtures("single_threaded")

# (activation, negative_slope): a negative slope makes the op keep the pre-activation.
ACTIVATIONS = [("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("gelu", 0.01)]


def torch_activation(z: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, slope)
    return F.gelu(z)


def reference_conv_act(x, w, b, activation, slope, transposed, **kw):
    z = reference.quaternion_conv_expanded(x, w, b, transposed=transposed, **kw)
    return torch_activation(z, activation, slope)


CASES = {
    "conv2d": (qF.quaternion_conv2d, False, (1, 8, 4, 3), (4, 2, 2, 3, 2), dict(stride=(2, 1), padding=1)),
    "conv_transpose1d": (
        qF.quaternion_conv_transpose1d,
        True,
        (1, 8, 4),
        (4, 2, 3, 3),
        dict(stride=2, padding=1, output_padding=1),
    ),
    "pointwise3d": (qF.quaternion_conv3d, False, (1, 4, 2, 3, 2), (4, 2, 1, 1, 1, 1), {}),
}


def _functional_kwargs(kw: dict, transposed: bool) -> dict:
    return kw if transposed else {k: v for k, v in kw.items() if k != "output_padding"}


@pytest.mark.parametrize("activation,slope", ACTIVATIONS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
def test_float64_gradcheck(backend, case, activation, slope, algorithm, qrand, served):
    fn, transposed, xs, ws, kw = CASES[case]
    x = qrand(*xs, seed=1, requires_grad=True)
    w = qrand(*ws, dim=0, seed=2, requires_grad=True)
    out_ch = 4 * (ws[2] if transposed else ws[1])
    b = qrand(out_ch, dim=0, seed=3, requires_grad=True)
    served(backend, x, w, algorithm, transposed=transposed, **kw)

    def f(x, w, b):
        return fn(x, w, b, **kw, algorithm=algorithm, activation=activation, negative_slope=slope)

    torch.testing.assert_close(f(x, w, b), reference_conv_act(x, w, b, activation, slope, transposed, **kw))
    assert gradcheck(f, (x, w, b))
    if algorithm == "hamilton":  # fast8's double backward is the conv's, gradgradchecked in test_qconv_gradcheck
        assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("activation,slope", ACTIVATIONS)
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
def test_float32_every_backend_against_float64_reference(backend, activation, slope, algorithm, qrand, served):
    """fp32 forward and all three gradients within the contract (1e-5 hamilton, 5e-4 fast8)."""
    x = qrand(2, 8, 7, 6, seed=4, dtype=torch.float32, requires_grad=True)
    w = qrand(4, 5, 2, 3, 3, dim=0, seed=5, dtype=torch.float32, requires_grad=True)
    b = qrand(20, dim=0, seed=6, dtype=torch.float32, requires_grad=True)
    served(backend, x, w, algorithm, padding=1)
    y = qF.quaternion_conv2d(x, w, b, padding=1, algorithm=algorithm, activation=activation, negative_slope=slope)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = reference_conv_act(*leaves64, activation, slope, False, padding=1)
    g = qrand(*y.shape, seed=7, dtype=torch.float32)
    grads = torch.autograd.grad(y, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, leaves64, g.double())
    tol = 1e-5 if algorithm == "hamilton" else 5e-4
    for name, got, want in zip(("out", "input", "weight", "bias"), (y, *grads), (ref, *ref_grads), strict=True):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def test_opcheck_qconv_act(qrand):
    x = qrand(2, 8, 5, seed=1, requires_grad=True)
    w = qrand(4, 3, 2, 3, dim=0, seed=2, requires_grad=True)
    b = qrand(12, dim=0, seed=3, requires_grad=True)
    for activation, slope in ACTIVATIONS:
        args = (x, w, b, [1], [1], [1], False, [0], 1, "hamilton", activation, slope)
        torch.library.opcheck(torch.ops.aqcf.qconv.default, args)


def test_preactivation_kept_only_where_the_backward_needs_it(qrand):
    x = qrand(1, 4, 5, seed=1)
    w = qrand(4, 1, 1, 3, dim=0, seed=2)
    sizes = {
        (act, slope): torch.ops.aqcf.qconv(x, w, None, [1], [1], [1], False, [0], 1, "hamilton", act, slope)[1].numel()
        for act, slope in ACTIVATIONS
    }
    assert sizes == {("relu", 0.01): 0, ("leaky_relu", 0.2): 0, ("leaky_relu", -0.3): 20, ("gelu", 0.01): 20}


def test_bad_activation_is_a_clear_error(qrand):
    x, w = qrand(1, 4, 5, seed=1), qrand(4, 1, 1, 3, dim=0, seed=2)
    with pytest.raises(ValueError, match=r"activation must be None or one of \('relu', 'leaky_relu', 'gelu'\)"):
        qF.quaternion_conv1d(x, w, activation="tanh")
    with pytest.raises(TypeError, match="negative_slope must be a number"):
        qF.quaternion_conv1d(x, w, activation="leaky_relu", negative_slope="0.1")


@pytest.mark.parametrize("activation,slope", [("relu", 0.01), ("gelu", 0.01)])
def test_output_follows_the_input_memory_format(backend, activation, slope, qrand, served):
    """channels_last in, channels_last out (y and the kept pre-activation), as qconv and the fake say."""
    x = qrand(2, 8, 5, 6, seed=8, dtype=torch.float32).to(memory_format=torch.channels_last)
    w = qrand(4, 3, 2, 3, 3, dim=0, seed=9, dtype=torch.float32)
    served(backend, x, w, "hamilton", padding=1)
    y, pre = torch.ops.aqcf.qconv(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, "hamilton", activation, slope)
    assert y.is_contiguous(memory_format=torch.channels_last)
    if pre.numel():
        assert pre.is_contiguous(memory_format=torch.channels_last)
    ref = reference.quaternion_conv_expanded(x.double(), w.double(), padding=1)
    torch.testing.assert_close(y.double(), torch_activation(ref, activation, slope), rtol=1e-5, atol=1e-5)

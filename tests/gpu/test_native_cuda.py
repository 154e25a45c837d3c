"""The extension's CUDA kernels of the conv ops: a signature the ``cuda`` backend served is remembered and
served in C++ afterwards (cuDNN through the ATen path), never asking Python again; what the others serve
(torch, Triton) asks Python every call. (The same kernels on CPU, with the ATen path standing in for the
cuda backend: tests/conv/test_native_ops.py.)"""

from __future__ import annotations

import pytest
import torch

from aqcf_kernels import backends, reference
from aqcf_kernels import functional as QF
from aqcf_kernels.backends._extension import _C

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _step(conv, x, w, b, **kwargs):
    leaves = tuple(t.detach().requires_grad_() for t in (x, w, b))
    y = conv(*leaves, **kwargs)
    return (y, *torch.autograd.grad(y, leaves, torch.ones_like(y)))


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_the_cuda_backend_is_served_natively_once_remembered(asked, transposed, algorithm, activation):
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(2, 16, 9, 8, device="cuda", dtype=torch.float64, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 4, 3, 3, device="cuda", dtype=torch.float64, generator=g)
    b = torch.randn(16, device="cuda", dtype=torch.float64, generator=g)
    conv = QF.quaternion_conv_transpose2d if transposed else QF.quaternion_conv2d
    kwargs = {"padding": 1, "stride": 2, "algorithm": algorithm, "activation": activation}
    if transposed:
        kwargs["output_padding"] = 1
    with backends.use("cuda"):
        first = _step(conv, x, w, b, **kwargs)
        assert (asked.conv, asked.weight_grad) == (2, 1)  # forward, input gradient, weight and bias gradients
        assert _C._remembered_conv_choices() == 3
        second = _step(conv, x, w, b, **kwargs)
        assert (asked.conv, asked.weight_grad) == (2, 1), "a remembered signature went back to Python"
    for a, b_ in zip(second, first, strict=True):
        assert a.stride() == b_.stride()
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    naive = {k: v for k, v in kwargs.items() if k not in ("algorithm", "activation")}
    z = reference.quaternion_conv_naive(x, w, b, transposed=transposed, **naive)
    expected = {None: z, "relu": torch.relu(z), "gelu": torch.nn.functional.gelu(z)}[activation]
    torch.testing.assert_close(second[0], expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_backends_ask_python_every_call(asked, backend):
    if backends.registered()[backend].unavailable() is not None:
        pytest.fail(f"{backend} unavailable on a GPU machine")
    x = torch.randn(2, 16, 9, 8, device="cuda")
    w, b = torch.randn(4, 4, 4, 3, 3, device="cuda"), torch.randn(16, device="cuda")
    with backends.use(backend):
        _step(QF.quaternion_conv2d, x, w, b, padding=1, algorithm="hamilton")
        _step(QF.quaternion_conv2d, x, w, b, padding=1, algorithm="hamilton")
    assert (asked.conv, asked.weight_grad) == (4, 2) and _C._remembered_conv_choices() == 0

"""The ops' registration: ``torch.library.opcheck`` (schema, fake impl, autograd, AOT dispatch) and
``torch.compile(fullgraph=True)`` of the public functions, forward and backward, against eager."""

from __future__ import annotations

import pytest
import torch

import aqcf_kernels  # noqa: F401  (registers torch.ops.aqcf)
from aqcf_kernels import functional as qF
from aqcf_kernels.params import ConvParams, conv_output_shape

# Tiny convs only: one intra-op thread runs them faster (see tests/conv/conftest.py).
pytestmark = pytest.mark.usefixtures("single_threaded")


def _conv_args(name: str, qrand):
    """Positional arguments of ``aqcf::qconv`` for a few argument sets (requires_grad: autograd is checked)."""
    if name == "2d conv":
        x = qrand(2, 8, 5, 4, seed=20, requires_grad=True)
        w = qrand(4, 2, 2, 3, 3, dim=0, seed=21, requires_grad=True)
        b = qrand(8, dim=0, seed=22, requires_grad=True)
        return (x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, "hamilton")
    if name == "3d transposed, groups=2":
        x = qrand(1, 8, 3, 2, 3, seed=23, requires_grad=True)
        w = qrand(4, 2, 1, 2, 2, 1, dim=0, seed=24, requires_grad=True)  # (4, Cq_in, Cq_out/G, *k)
        b = qrand(8, dim=0, seed=25, requires_grad=True)
        return (x, w, b, [2, 1, 2], [0, 1, 0], [1, 1, 1], True, [1, 0, 0], 2, "fast8")
    assert name == "1d conv, no bias"
    x = qrand(2, 12, 7, seed=26, requires_grad=True)
    w = qrand(4, 2, 3, 3, dim=0, seed=27, requires_grad=True)
    return (x, w, None, [2], [1], [2], False, [0], 1, "fast8")


def _skip_unless_served(backend, op_args, served):
    x, w, _, stride, padding, dilation, transposed, output_padding, groups, algorithm = op_args
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if transposed:
        kwargs.update(transposed=True, output_padding=output_padding)
    served(backend, x, w, algorithm, **kwargs)


ARG_SETS = ["2d conv", "3d transposed, groups=2", "1d conv, no bias"]


@pytest.mark.parametrize("args", ARG_SETS)
def test_opcheck_qconv(backend, args, qrand, served):
    op_args = _conv_args(args, qrand)
    _skip_unless_served(backend, op_args, served)
    torch.library.opcheck(torch.ops.aqcf.qconv.default, op_args)


@pytest.mark.parametrize("args", ARG_SETS)
def test_opcheck_qconv_weight_grad(backend, args, qrand, served):
    op_args = _conv_args(args, qrand)
    _skip_unless_served(backend, op_args, served)
    x, w, _, *conv_params = op_args
    p = ConvParams.from_op_args(w.dim() - 3, *conv_params[:-1])
    grad_output = qrand(*conv_output_shape(x.shape, w.shape, p), seed=28, requires_grad=True)
    torch.library.opcheck(torch.ops.aqcf.qconv_weight_grad.default, (x, grad_output, list(w.shape), *conv_params))


def test_torch_compile_fullgraph_matches_eager(monkeypatch, qrand):
    # Default backend selection (what users get); both algorithms, a conv and a transposed conv.
    monkeypatch.delenv("AQCF_BACKEND", raising=False)

    def f(x, w1, b1, w2):
        h = torch.tanh(qF.quaternion_conv2d(x, w1, b1, padding=1, algorithm="hamilton"))
        return qF.quaternion_conv_transpose2d(h, w2, stride=2, output_padding=1, groups=2, algorithm="fast8")

    def leaves():
        return (
            qrand(2, 8, 5, 3, seed=30, dtype=torch.float32, requires_grad=True),
            qrand(4, 4, 2, 3, 3, dim=0, seed=31, dtype=torch.float32, requires_grad=True),
            qrand(16, dim=0, seed=32, dtype=torch.float32, requires_grad=True),
            qrand(4, 4, 1, 3, 2, dim=0, seed=33, dtype=torch.float32, requires_grad=True),
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_in, compiled_in = leaves(), leaves()
    y_eager, y_compiled = f(*eager_in), compiled(*compiled_in)
    torch.testing.assert_close(y_compiled, y_eager)
    g = qrand(*y_eager.shape, seed=34, dtype=torch.float32)
    y_eager.backward(g)
    y_compiled.backward(g)
    for name, a, b in zip(("input", "weight1", "bias1", "weight2"), compiled_in, eager_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"{name} gradient: {m}")

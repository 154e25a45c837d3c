"""Inductor: ``torch.compile`` and AOTInductor, torch's ahead-of-time deployment path (TorchScript's
successor). ``torch.export`` of a model built from the layers, compiled into a package with
``aoti_compile_and_package`` and loaded back, gives eager mode's outputs. The package keeps the custom ops
(``aqcf::qconv``, ``qnorm``, ``cross_attention``, ``gated_residual``) and calls them through the
dispatcher, so the process that loads it imports ``aqcf_kernels`` (which registers them).

Every test runs as in a CI job (the ``CI`` environment variable set, as GitHub Actions sets it), with
Inductor's graph cache off: Inductor then asserts that no op it calls as a fallback kernel has an entry in
torch's global decomposition table. The package once put its ONNX lowerings there, and ``torch.compile``
failed in every CI job of a user's ("make_fallback(aqcf.qconv.default): a decomposition exists").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.testing import assert_close

from aqcf_kernels import nn as qnn

pytestmark = pytest.mark.usefixtures("single_threaded", "fresh_dynamo", "as_in_a_ci_job")


@pytest.fixture
def as_in_a_ci_job(monkeypatch):
    monkeypatch.setenv("CI", "1")
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cached graph skips Inductor's lowering
        yield


class _TwoStreams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = qnn.QuaternionConv2d(4, 8, 3, padding=1)
        self.norm = qnn.QuaternionBatchNorm2d(8, activation="relu")
        self.block = qnn.AQCFBlock(8, heads=2)
        self.up = qnn.QuaternionConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, a, b):
        a, b = self.block(self.norm(self.conv(a)), self.norm(self.conv(b)))
        return self.up(a), self.up(b)


def _trained_two_streams() -> _TwoStreams:
    torch.manual_seed(0)
    model = _TwoStreams()
    with torch.no_grad():
        model.block.alpha_a.fill_(0.5)  # a fresh block is the identity (alpha = 0)
        model.block.alpha_b.fill_(-0.3)
        model(torch.randn(4, 4, 6, 6), torch.randn(4, 4, 6, 6))  # running statistics
    return model.eval()


def test_torch_compile_runs_every_op_as_eager_mode():
    model = _trained_two_streams()
    a, b = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        for got, want in zip(torch.compile(model)(a, b), model(a, b), strict=True):
            assert_close(got, want, rtol=1e-5, atol=1e-5)
    lstm = qnn.QuaternionLSTM(8, 8, num_layers=2).eval()  # aqcf::rnn_sequence, where a fused kernel serves
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        assert_close(torch.compile(lstm)(x)[0], lstm(x)[0], rtol=1e-5, atol=1e-5)


def test_an_aot_inductor_package_runs_as_eager_mode(tmp_path):
    model = _trained_two_streams()
    batch = Dim("batch", min=1)
    args = (torch.randn(2, 4, 6, 6), torch.randn(2, 4, 5, 7))
    program = torch.export.export(model, args, dynamic_shapes=({0: batch}, {0: batch}))
    ops = {str(n.target) for n in program.graph.nodes if str(n.target).startswith("aqcf.")}
    assert {"aqcf.qconv.default", "aqcf.cross_attention.default", "aqcf.gated_residual.default"} <= ops

    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "two_streams.pt2"))
    package = torch._inductor.aoti_load_package(path)
    for n in (1, 3):
        a, b = torch.randn(n, 4, 6, 6), torch.randn(n, 4, 5, 7)
        with torch.no_grad():
            want = model(a, b)
        got = package(a, b)
        assert (want[0] - model.up(model.norm(model.conv(a)))).abs().max() > 1e-3  # the fusion is exercised
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, rtol=1e-5, atol=1e-5)

"""``torch.onnx.export`` of models built from the layers, with no call to this package: what a user of
torch.nn's layers does. While the exporter captures a model, the layers call each custom op's lowering
(:mod:`aqcf_kernels.ops.lowerings`), so the ONNX graph holds standard operators only and ONNX Runtime's
outputs equal eager mode's. Before, every layer with a conv, a norm, an attention or a
recurrence failed in the exporter ("No ONNX function found for aqcf.qconv"), and a whitening norm on
aten's Cholesky, which ONNX lacks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.testing import assert_close
from torch.utils._pytree import tree_leaves

from aqcf_kernels import nn as qnn
from aqcf_kernels.models import AQCFNet
from aqcf_kernels.nn.norm import quaternion_instance_norm
from aqcf_kernels.ops import rnn_cell

from .test_fx import LAYERS, _Holder, _Holder2

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("single_threaded")

# fp32 rounding of a re-associated computation (the expanded conv, the unrolled 4x4 Cholesky)
RTOL, ATOL = 1e-4, 1e-5

# Beyond LAYERS (one per public class): the norms' other statistics paths.
EXTRA = {
    "instance_norm2d_whitened_affine": (
        lambda: qnn.QuaternionInstanceNorm2d(8, whiten=True, affine=True),
        [(2, 8, 5, 4)],
    ),
    "batch_norm1d_whitened_without_running_stats": (
        lambda: qnn.QuaternionBatchNorm1d(8, whiten=True, track_running_stats=False),
        [(6, 8, 3)],
    ),
    "grouped_fast8_conv_gelu": (
        lambda: qnn.QuaternionConvNormAct(
            qnn.QuaternionConv2d(8, 8, 3, padding=1, groups=2, algorithm="fast8"),
            qnn.QuaternionInstanceNorm2d(8, affine=True, activation="gelu"),
        ),
        [(2, 8, 6, 5)],
    ),
}
CASES = {**LAYERS, **EXTRA}


class _FunctionalWhitening(nn.Module):
    """A whitening norm called as a function, on its input's statistics (no module to lower)."""

    def forward(self, x):
        return quaternion_instance_norm(x, whiten=True, activation="relu")


def test_a_whitening_norm_called_as_a_function_exports():
    x = torch.randn(2, 8, 5, 3) * 1.5 + 0.3
    model = _FunctionalWhitening()
    (got,) = _run(_session(_export(model, (x,))), [x])
    assert_close(got, _outputs(model, [x])[0], rtol=RTOL, atol=ATOL)


def _trained_layer(name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    """The layer in eval mode with parameters away from their initial values and running statistics
    from three training batches (a fresh layer's are the identity's; the A-QCF block's alphas are 0)."""
    torch.manual_seed(0)
    factory, shapes = CASES[name]
    layer = factory()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
        layer.train()
        for _ in range(3):
            layer(*[torch.randn(s) * 2 + 0.5 for s in shapes])
    holder = (_Holder2 if len(shapes) == 2 else _Holder)(layer).eval()
    return holder, [torch.randn(s) for s in shapes]


@contextlib.contextmanager
def _quiet():
    """The exporter prints its steps and logs a warning per torchvision op it cannot find."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _export(model: nn.Module, args: tuple, **kwargs):
    with _quiet():
        program = torch.onnx.export(model, args, dynamo=True, **kwargs)
    graph = program.model.graph
    custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.all_nodes() if n.domain not in ("", "ai.onnx")})
    assert custom == [] and len(program.model.functions) == 0, custom
    return program


def _session(program):
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, inputs) -> list[torch.Tensor]:
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})]


def _outputs(model: nn.Module, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", CASES)
def test_a_model_of_the_layer_exports_and_onnx_runtime_agrees(name):
    model, inputs = _trained_layer(name)
    program = _export(model, tuple(inputs))
    want = _outputs(model, inputs)
    got = _run(_session(program), inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert_close(g, w, rtol=RTOL, atol=ATOL, check_dtype=False)
        assert w.float().abs().max() > 0  # the layer computed something


@pytest.mark.parametrize("name", ["batch_norm2d_relu", "batch_norm3d_whitened", "conv_norm_act_two_inputs", "ligru"])
def test_a_model_in_training_mode_exports_with_batch_statistics(name):
    """As torch.nn's batch norm does: the graph normalises by the batch's statistics (the running averages'
    update, a multi-tensor lerp in eager mode, is two ``lerp_`` in an export: ONNX has no multi-tensor op)."""
    model, inputs = _trained_layer(name)
    model.train()
    program = _export(copy.deepcopy(model), tuple(inputs))
    got = _run(_session(program), inputs)
    want = _outputs(model, inputs)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=RTOL, atol=ATOL)
    model.eval()  # the batch statistics are not the running ones: eval mode gives another output
    assert (want[0] - _outputs(model, inputs)[0]).abs().max() > 1e-3


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = qnn.QuaternionConv2d(4, 8, 3, padding=1, padding_mode="reflect")
        self.norm = qnn.QuaternionBatchNorm2d(8, activation="relu")
        self.down = qnn.QuaternionMaxPool2d(2)
        self.up = qnn.QuaternionConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.up(self.down(self.norm(self.conv(x))))


def test_dynamic_batch_and_spatial_sizes():
    torch.manual_seed(1)
    model = _Stack()
    with torch.no_grad():
        model(torch.randn(4, 4, 8, 8))  # running statistics
    model.eval()
    height, width = Dim("h", min=1) * 2, Dim("w", min=1) * 2
    program = _export(model, (torch.randn(2, 4, 6, 8),), dynamic_shapes=({0: Dim("n"), 2: height, 3: width},))
    session = _session(program)
    for shape in ((1, 4, 10, 6), (3, 4, 4, 12)):
        x = torch.randn(shape)
        (got,) = _run(session, [x])
        assert_close(got, _outputs(model, [x])[0], rtol=RTOL, atol=ATOL)


def test_a_program_the_user_exported_exports_once_lowered():
    """A ``torch.export`` program keeps the custom ops (captured outside an ONNX export):
    ``lower_custom_ops`` gives the exporter standard ops."""
    from aqcf_kernels.pipeline.export import lower_custom_ops

    torch.manual_seed(5)
    model = _Stack()
    with torch.no_grad():
        model(torch.randn(4, 4, 8, 8))  # running statistics
    model.eval()
    x = torch.randn(2, 4, 6, 8)
    program = torch.export.export(model, (x,))
    assert "aqcf.qconv.default" in {str(n.target) for n in program.graph.nodes}
    (got,) = _run(_session(_export(lower_custom_ops(program), ())), [x])
    assert_close(got, _outputs(model, [x])[0], rtol=RTOL, atol=ATOL)


class _Joint(nn.Module):
    def __init__(self, net: AQCFNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, ct, mri):
        out = self.net(ct=ct, mri=mri)
        return out["ct"], out["mri"]


def test_the_joint_network_exports_with_its_fusion():
    """A-QCF-Net on both streams (the fusion blocks' attention is in the graph) through plain torch.onnx.export."""
    torch.manual_seed(2)
    net = AQCFNet(2, features=(8, 16), bottleneck=16, heads=2).eval()
    with torch.no_grad():
        for block in net.fusion.values():  # a fresh block is the identity (alpha = 0)
            block.alpha_a.fill_(0.6)
            block.alpha_b.fill_(-0.4)
    model = _Joint(net).eval()
    inputs = [torch.randn(1, 1, 32, 32), torch.randn(1, 1, 32, 32)]
    got = _run(_session(_export(model, tuple(inputs))), inputs)
    want = _outputs(model, inputs)
    assert (want[0] - _outputs(net, [inputs[0]])[0]).abs().max() > 1e-3  # the fusion changed the CT logits
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=RTOL, atol=ATOL)


def test_the_lowerings_stay_out_of_torchs_default_decompositions():
    """Registered for ONNX only: torch.export's default decompositions (and so torch.compile's, which are
    also explicit lists of aten ops) keep the custom ops, whose kernels are the point of the package."""
    model = _Stack().eval()
    program = torch.export.export(model, (torch.randn(2, 4, 8, 8),))

    def custom_ops(p):
        return {str(n.target) for n in p.graph.nodes if str(n.target).startswith("aqcf.")}

    before = custom_ops(program)
    assert "aqcf.qconv.default" in before  # (the norm is an op too where the extension is built)
    assert custom_ops(program.run_decompositions()) == before


# Where the fused recurrent op does not serve (no compiled extension), a recurrent layer runs its own per-step
# loop and never calls the op, so torch.export and torch.compile fix the sequence length there, as in any
# Python loop. (An ONNX export calls the op's lowering, a scan, either way.)
needs_the_fused_recurrence = pytest.mark.skipif(
    not rnn_cell.available(torch.empty(1, 1, 4)),
    reason="the recurrent layers call aqcf::rnn_sequence only where a fused kernel serves",
)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = qnn.QuaternionLSTM(8, 8, num_layers=2)

    def forward(self, x):
        return self.lstm(x)[0]


@needs_the_fused_recurrence
def test_symbolic_sizes_keep_the_ops_fake_implementations():
    """A torch.export with a dynamic sequence length keeps the op, on its fake implementation (through a
    decomposition-table entry, the recurrent lowering's loop once fixed it: "T specialized to be a
    constant")."""
    torch.manual_seed(3)
    model = _Recurrent().eval()
    program = torch.export.export(model, (torch.randn(5, 2, 8),), dynamic_shapes=({0: Dim("T", min=2)},))
    assert "aqcf.rnn_sequence.default" in {str(n.target) for n in program.graph.nodes}
    for steps in (3, 9):
        x = torch.randn(steps, 2, 8)
        assert_close(program.module()(x), _outputs(model, [x])[0])


@needs_the_fused_recurrence
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiling_with_dynamic_shapes_compiles_a_recurrent_layer_once():
    from torch._dynamo.testing import CompileCounter

    model, counter = _Recurrent().eval(), CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True)
    for steps in (4, 7, 11):
        x = torch.randn(steps, 2, 8)
        assert_close(compiled(x), _outputs(model, [x])[0])
    assert counter.frame_count == 1


def test_a_dynamic_sequence_length_exports_as_a_scan():
    """Recurrent layers of every mode, one after another in one process, exported with a dynamic length: one
    ONNX ``Scan`` each, and ONNX Runtime agrees with eager mode at shorter and longer sequences than the
    example's. (Unrolled, the graph would compute the example's number of steps whatever it is given; through
    torch's ``scan`` wrapper, the second export in a process failed.)"""
    torch.manual_seed(4)
    layers = {
        "lstm_batch_first": (qnn.QuaternionLSTM(8, 8, num_layers=2, batch_first=True), 1),
        "ligru": (qnn.QuaternionLiGRU(8, 8), 0),
        "rnn_bidirectional": (qnn.QuaternionRNN(8, 8, bidirectional=True), 0),
    }
    for name, (layer, time_dim) in layers.items():
        model = _Holder(layer).eval()
        example = torch.randn(2, 5, 8) if time_dim else torch.randn(5, 2, 8)
        program = _export(model, (example,), dynamic_shapes=({time_dim: Dim("T", min=2)},))
        assert "Scan" in {n.op_type for n in program.model.graph}, name
        session = _session(program)
        for steps in (3, 9):
            x = torch.randn(2, steps, 8) if time_dim else torch.randn(steps, 2, 8)
            for got, want in zip(_run(session, [x]), _outputs(model, [x]), strict=True):  # output, final states
                assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_no_op_has_an_entry_in_torchs_global_decomposition_table():
    """Inductor refuses, in a CI job, to run an op with an entry there as a fallback kernel; FakeTensorMode
    prefers an entry to the op's fake implementation under symbolic sizes (tests/nn/test_aot_inductor.py)."""
    tables = torch._decomp.global_decomposition_table.values()
    assert not [str(op) for table in tables for op in table if str(op).startswith("aqcf.")]


def test_eager_whitening_keeps_lapack_outside_an_export():
    """The unrolled Cholesky serves ONNX export only; eager mode and its gradients use LAPACK's."""
    from aqcf_kernels.nn import norm

    a = torch.randn(3, 4, 6, dtype=torch.float64)
    cov = a @ a.mT / 6
    calls = []
    original = norm._unrolled_whitening_matrix
    norm._unrolled_whitening_matrix = lambda *args: calls.append(1) or original(*args)
    try:
        eager = norm._whitening_matrix(cov, 1e-3)
    finally:
        norm._unrolled_whitening_matrix = original
    assert calls == []
    assert_close(original(cov, 1e-3), eager)

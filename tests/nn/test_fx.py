"""torch.fx symbolic tracing (``aqcf_kernels._fx``): every layer is one ``call_module`` node of a traced
model, as torch.nn's layers are, and the package's functions (``functional``, ``layout``) are
``call_function`` nodes. The traced ``GraphModule`` gives eager mode's outputs and gradients, and keeps
what a leaf keeps at run time: train/eval mode, hooks, unbatched inputs. The reference values are the
same modules run eagerly, which the other test files hold to ``reference.py``. Before, tracing any of
these failed inside the layer ("weight must be a Tensor, got Proxy").
"""

from __future__ import annotations

import copy
import io
import operator
import warnings

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.testing import assert_close
from torch.utils._pytree import tree_leaves

from aqcf_kernels import functional as QF
from aqcf_kernels import nn as qnn
from aqcf_kernels.functional import quaternion_conv2d  # imported by name: still one node
from aqcf_kernels.layout import as_components, from_components, qcat, qsplit
from aqcf_kernels.models import AQCFNet

pytestmark = pytest.mark.usefixtures("single_threaded")

DOUBLE = dict(dtype=torch.float64)
# (float64 with torch's default tolerance: `auto` may time another algorithm on a later call)

# name: (module factory, input shapes). Every public layer class appears (checked below).
LAYERS = {
    "conv1d": (lambda: qnn.QuaternionConv1d(8, 12, 3, stride=2, padding=1), [(2, 8, 9)]),
    "conv2d_reflect": (lambda: qnn.QuaternionConv2d(8, 16, 3, padding=1, padding_mode="reflect"), [(2, 8, 7, 6)]),
    "conv3d_grouped": (lambda: qnn.QuaternionConv3d(8, 8, 3, padding=1, groups=2), [(1, 8, 4, 3, 5)]),
    "conv_transpose1d": (lambda: qnn.QuaternionConvTranspose1d(8, 4, 3, stride=2, output_padding=1), [(2, 8, 5)]),
    "conv_transpose2d": (lambda: qnn.QuaternionConvTranspose2d(8, 4, 2, stride=2), [(2, 8, 3, 4)]),
    "conv_transpose3d": (lambda: qnn.QuaternionConvTranspose3d(4, 8, 2, stride=2), [(1, 4, 2, 3, 2)]),
    "rotation_conv2d": (lambda: qnn.QuaternionConv2d(8, 8, 3, rotation=True), [(2, 8, 5, 5)]),
    "linear": (lambda: qnn.QuaternionLinear(8, 12), [(3, 5, 8)]),
    "batch_norm1d": (lambda: qnn.QuaternionBatchNorm1d(8), [(6, 8)]),
    "batch_norm2d_relu": (lambda: qnn.QuaternionBatchNorm2d(8, activation="relu"), [(3, 8, 4, 5)]),
    "batch_norm3d_whitened": (lambda: qnn.QuaternionBatchNorm3d(8, whiten=True), [(2, 8, 3, 2, 3)]),
    "instance_norm1d": (lambda: qnn.QuaternionInstanceNorm1d(8, affine=True), [(2, 8, 7)]),
    "instance_norm2d_gelu": (lambda: qnn.QuaternionInstanceNorm2d(8, affine=True, activation="gelu"), [(2, 8, 4, 5)]),
    "instance_norm3d": (lambda: qnn.QuaternionInstanceNorm3d(8), [(2, 8, 3, 2, 3)]),
    "max_pool1d_indices": (lambda: qnn.QuaternionMaxPool1d(2, return_indices=True), [(2, 8, 9)]),
    "max_pool2d": (lambda: qnn.QuaternionMaxPool2d(2), [(2, 8, 6, 5)]),
    "max_pool3d": (lambda: qnn.QuaternionMaxPool3d(2), [(1, 8, 4, 4, 3)]),
    "avg_pool1d": (lambda: qnn.QuaternionAvgPool1d(3, stride=2), [(2, 8, 9)]),
    "avg_pool2d": (lambda: qnn.QuaternionAvgPool2d(2), [(2, 8, 6, 5)]),
    "avg_pool3d": (lambda: qnn.QuaternionAvgPool3d(2), [(1, 8, 4, 4, 3)]),
    "dropout": (lambda: qnn.QuaternionDropout(0.3), [(2, 8, 5, 5)]),
    "rnn_bidirectional": (lambda: qnn.QuaternionRNN(8, 8, bidirectional=True), [(4, 2, 8)]),
    "lstm": (lambda: qnn.QuaternionLSTM(8, 8, num_layers=2, batch_first=True), [(2, 4, 8)]),
    "ligru": (lambda: qnn.QuaternionLiGRU(8, 8), [(4, 2, 8)]),
    "aqcf_block": (lambda: qnn.AQCFBlock(16, heads=2, kv_pool=4), [(2, 16, 5, 4), (2, 16, 3, 4)]),
    "conv_norm_act_two_inputs": (
        lambda: qnn.QuaternionConvNormAct(
            qnn.QuaternionConv2d(16, 8, 3, padding=1), qnn.QuaternionBatchNorm2d(8, activation="leaky_relu")
        ),
        [(2, 8, 5, 5), (2, 8, 5, 5)],
    ),
}


class _Holder(nn.Module):
    """A model around one layer (a layer alone is never traced: it is a leaf, as torch.nn's are)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class _Holder2(_Holder):
    def forward(self, x, y):  # (FX traces a root's named arguments, not *args)
        return self.layer(x, y)


def _layer(name: str):
    torch.manual_seed(0)
    factory, shapes = LAYERS[name]
    module = factory().double()
    with torch.no_grad():  # nothing zero: the alphas of the A-QCF block start at 0
        for p in module.parameters():
            p.add_(torch.randn(p.shape, **DOUBLE) * 0.1)
    return module, [torch.randn(s, **DOUBLE) for s in shapes]


def _floats(out) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _run(model: nn.Module, inputs: list[torch.Tensor], seed: int = 1):
    """Outputs, then the gradients of a fixed random projection of them for the inputs and parameters."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    torch.manual_seed(seed)  # the same dropout mask in both runs
    out = model(*inputs)
    gen = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=gen, **DOUBLE)).sum() for t in _floats(out))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*inputs, *params], allow_unused=True)
    return out, grads


def test_the_table_covers_every_public_layer():
    public = {getattr(qnn, n) for n in qnn.__all__ if isinstance(getattr(qnn, n), type)}
    public = {c for c in public if issubclass(c, nn.Module)}
    covered = {type(factory()) for factory, _ in LAYERS.values()}
    assert public - covered == set()


@pytest.mark.parametrize("name", LAYERS)
def test_a_layer_is_one_call_module_node_and_runs_as_in_eager_mode(name):
    layer, inputs = _layer(name)
    model = (_Holder if len(inputs) == 1 else _Holder2)(layer)
    traced = torch.fx.symbolic_trace(model)
    calls = [(n.op, n.target) for n in traced.graph.nodes if n.op not in ("placeholder", "output")]
    assert calls == [("call_module", "layer")]
    assert traced.layer is layer
    for mode in ("train", "eval"):
        getattr(model, mode)()
        eager_out, eager_grads = _run(model, inputs)
        traced_out, traced_grads = _run(traced, inputs)
        assert_close(_floats(traced_out), _floats(eager_out))
        for g_traced, g_eager in zip(traced_grads, eager_grads, strict=True):
            assert (g_traced is None) == (g_eager is None)
            if g_eager is not None:
                assert_close(g_traced, g_eager)


def test_mode_hooks_and_unbatched_inputs_are_decided_when_the_graph_runs():
    torch.manual_seed(0)
    model = nn.Sequential(
        qnn.QuaternionConv2d(8, 8, 3, padding=1), qnn.QuaternionBatchNorm2d(8, activation="relu")
    ).double()
    traced = torch.fx.symbolic_trace(model)  # traced in training mode
    x = torch.randn(3, 8, 5, 4, **DOUBLE)
    before = model[1].running_mean.clone()
    traced(x)
    assert not torch.equal(model[1].running_mean, before)  # the traced graph updated the shared buffers
    conv_alone = torch.fx.symbolic_trace(nn.Sequential(model[0]))
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with pytest.warns(UserWarning, match="hooks of QuaternionConv2d ran while tracing"):
        torch.fx.symbolic_trace(nn.Sequential(model[0]))  # (a torch.nn leaf's hooks would not run here)
    assert len(seen) == 1 and isinstance(seen.pop(), torch.fx.Proxy)
    traced.eval()
    model.eval()
    assert_close(traced(x), model(x))  # eval mode, though traced in training
    assert_close(conv_alone(x[0]), model[0](x[0]))  # unbatched (C, H, W), as in eager mode
    assert seen == [(3, 8, 5, 4), (3, 8, 5, 4), (8, 5, 4), (8, 5, 4)]


class _UsesFunctions(nn.Module):
    """A user's model calling the package's functions, by module and by imported name."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 4, 2, 3, 3, **DOUBLE) * 0.3)
        self.wt = nn.Parameter(torch.randn(4, 2, 1, 2, 2, **DOUBLE) * 0.3)
        self.wl = nn.Parameter(torch.randn(4, 1, 2, **DOUBLE) * 0.3)
        self.alpha = nn.Parameter(torch.tensor([0.6], **DOUBLE))

    def forward(self, a, b):
        x = qcat([a, b])
        y = quaternion_conv2d(x, self.w, None, 1, 1, activation="gelu")
        lo, hi = qsplit(y, 2)
        up = QF.quaternion_conv_transpose2d(lo, self.wt, stride=2)
        tokens = from_components(as_components(hi).flatten(3))  # (B, 8, H*W)
        q = tokens.transpose(1, 2).unsqueeze(1)  # (B, 1, N, 8)
        out_a, out_b = QF.cross_attention(q, q, q, q * 0.5, q, q)
        lin = QF.quaternion_linear(out_a, self.wl)
        g = QF.gated_residual(out_b, out_a, lin.mean(-1, keepdim=True), self.alpha)
        return up.sum((2, 3)), g


def test_functions_are_call_function_nodes_and_run_as_in_eager_mode():
    model = _UsesFunctions()
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    ours = [t for t in targets if getattr(t, "__module__", "").startswith("aqcf_kernels")]
    assert ours == [
        qcat,
        quaternion_conv2d,
        qsplit,
        QF.quaternion_conv_transpose2d,
        as_components,
        from_components,
        QF.cross_attention,
        QF.quaternion_linear,
        QF.gated_residual,
    ]
    torch.manual_seed(1)
    inputs = [torch.randn(2, 4, 5, 6, **DOUBLE), torch.randn(2, 4, 5, 6, **DOUBLE)]
    eager_out, eager_grads = _run(model, inputs)
    traced_out, traced_grads = _run(traced, inputs)
    assert_close(_floats(traced_out), _floats(eager_out))
    assert_close(list(traced_grads), list(eager_grads))


def test_a_traced_graph_copies_and_pickles():
    traced = torch.fx.symbolic_trace(_UsesFunctions())
    inputs = [torch.randn(1, 4, 3, 4, **DOUBLE), torch.randn(1, 4, 3, 4, **DOUBLE)]
    expected = traced(*inputs)
    buffer = io.BytesIO()
    torch.save(traced, buffer)  # a GraphModule pickles as code that imports its call_function targets
    buffer.seek(0)
    for other in (copy.deepcopy(traced), torch.load(buffer, weights_only=False)):
        assert_close(other(*inputs), expected)


def test_shape_propagation_reads_the_layers_outputs():
    model = nn.Sequential(qnn.QuaternionConv2d(8, 16, 3, stride=2), nn.ReLU(), qnn.QuaternionMaxPool2d(2))
    traced = torch.fx.symbolic_trace(model)
    ShapeProp(traced).propagate(torch.randn(2, 8, 11, 9))
    shapes = {n.target: n.meta["tensor_meta"].shape for n in traced.graph.nodes if n.op == "call_module"}
    assert shapes == {"0": (2, 16, 5, 4), "1": (2, 16, 5, 4), "2": (2, 16, 2, 2)}


class _PathNamingTracer(torch.fx.Tracer):
    """The pattern of torchvision's NodePathTracer (create_feature_extractor): the module path being called
    is kept by call_module, and every node made meanwhile is named by it."""

    def __init__(self) -> None:
        super().__init__()
        self.path, self.node_paths = "", {}

    def call_module(self, m, forward, args, kwargs):
        outer, self.path = self.path, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.path = outer

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        self.node_paths[proxy.node] = self.path
        return proxy


def test_a_tracer_naming_nodes_by_module_path_names_the_layers():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 1), nn.Sequential(qnn.QuaternionConv2d(8, 8, 3), qnn.QuaternionBatchNorm2d(8)), nn.ReLU()
    )
    tracer = _PathNamingTracer()
    graph = tracer.trace(model)
    paths = {tracer.node_paths[n]: n.op for n in graph.nodes if n.op == "call_module"}
    assert paths == {"0": "call_module", "1.0": "call_module", "1.1": "call_module", "2": "call_module"}


@pytest.mark.parametrize("name", ["conv2d_reflect", "batch_norm1d", "lstm", "aqcf_block"])
def test_tracing_a_layer_alone_says_to_trace_a_model_around_it(name):
    layer, _ = _layer(name)
    with pytest.raises(TypeError, match="is a leaf of traced graphs.*trace a module that contains it"):
        torch.fx.symbolic_trace(layer)


def test_aqcfnet_is_one_node_of_a_traced_model():
    torch.manual_seed(0)
    net = AQCFNet(2, features=(8, 16), bottleneck=32, kv_pool=8).double().eval()

    class Segmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, ct, mri):
            out = self.net(ct, mri)
            return out["ct"].softmax(1), out["mri"]

    model = Segmenter()
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["net"]
    ct, mri = torch.randn(2, 1, 12, 9, **DOUBLE), torch.randn(2, 1, 8, 8, **DOUBLE)
    assert_close(traced(ct, mri), model(ct, mri))


def test_fx_graph_mode_quantization_keeps_the_quaternion_layers_in_float():
    """torch.ao's FX graph-mode quantization (prepare_fx / convert_fx) on a model mixing torch's convs and
    ours: torch's are quantized, ours stay float leaves between a dequantize and a quantize, and the result
    is the float model's within int8's rounding."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.q = qnn.QuaternionConv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(torch.relu(self.q(torch.relu(self.stem(x)))))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (torch.ao.quantization is deprecated for torchao)
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        prepared(x)  # calibration
        quantized = convert_fx(prepared)
    assert type(quantized.q) is qnn.QuaternionConv2d
    assert type(quantized.stem).__module__.startswith("torch.ao.nn.quantized")
    want = model(x)
    assert_close(quantized(x), want, rtol=0, atol=0.05 * float(want.abs().max()))


def test_torchscript_traces_the_custom_ops_and_refuses_scripting():
    """``torch.jit.trace`` records the layer's ``aqcf`` op, and the saved trace gives eager mode's output when
    loaded back (the op is found through the registration ``import aqcf_kernels`` makes); ``torch.jit.script``
    refuses the modules, as the README says."""
    layer = qnn.QuaternionConv2d(8, 12, 3, padding=1, algorithm="hamilton").eval()
    x = torch.randn(2, 8, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's warnings about Python values it bakes in)
        traced = torch.jit.trace(layer, x)
    assert "aqcf::qconv" in str(traced.graph)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    y = torch.randn(3, 8, 5, 7)  # another batch: the trace is not the one input it was made with
    assert_close(loaded(y), layer(y), rtol=1e-5, atol=1e-5)  # (auto may time another backend for a new size)
    with pytest.raises(torch.jit.frontend.NotSupportedError):
        torch.jit.script(layer)

"""torch.func through the layers and the model (``aqcf_kernels.ops.func``): ``functional_call`` + ``grad`` gives
autograd's gradients, ``vmap`` of an eval layer is a loop over its slices, and per-sample gradients of a small
network are each sample's own. Those reference values come from plain autograd on the same layers, which
the other test files hold to ``reference.py``. Before, every one of these failed through the ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.testing import assert_close

from aqcf_kernels import nn as qnn
from aqcf_kernels.models import AQCFNet

pytestmark = pytest.mark.usefixtures("single_threaded", "no_vmap_fallback")

DOUBLE = dict(dtype=torch.float64)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# name: (module factory, input shape). Norms with an activation take the fused op's path outside torch.func.
LAYERS = {
    "conv2d": (lambda: qnn.QuaternionConv2d(8, 16, 3, stride=2, padding=1, groups=2), (2, 8, 7, 6)),
    "conv_transpose3d": (lambda: qnn.QuaternionConvTranspose3d(8, 4, 2, stride=2), (2, 8, 3, 2, 3)),
    "rotation_conv1d": (lambda: qnn.QuaternionConv1d(8, 8, 3, rotation=True), (2, 8, 9)),
    "linear": (lambda: qnn.QuaternionLinear(8, 12), (3, 5, 8)),
    "batch_norm_relu": (
        lambda: qnn.QuaternionBatchNorm2d(8, track_running_stats=False, activation="relu"),
        (3, 8, 4, 5),
    ),
    "instance_norm_gelu": (lambda: qnn.QuaternionInstanceNorm2d(8, affine=True, activation="gelu"), (2, 8, 4, 5)),
    "whitened_batch_norm": (lambda: qnn.QuaternionBatchNorm1d(8, whiten=True, track_running_stats=False), (6, 8)),
    "lstm": (lambda: qnn.QuaternionLSTM(8, 8, num_layers=2), (5, 2, 8)),
    "rnn_bidirectional": (lambda: qnn.QuaternionRNN(8, 8, bidirectional=True), (4, 2, 8)),
    "ligru": (lambda: qnn.QuaternionLiGRU(8, 8), (4, 2, 8)),
    "aqcf_block": (lambda: _TwoStreams(qnn.AQCFBlock(16, heads=2, kv_pool=4)), (2, 16, 5, 4)),
    "conv_norm_act": (
        lambda: qnn.QuaternionConvNormAct(
            qnn.QuaternionConv2d(8, 8, 3, padding=1), qnn.QuaternionBatchNorm2d(8, activation="leaky_relu")
        ),
        (2, 8, 5, 5),
    ),
}


class _TwoStreams(nn.Module):
    """The A-QCF block on a tensor: stream b is a fixed function of stream a, so both reach the loss."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        with torch.no_grad():
            block.alpha_a.fill_(0.7)
            block.alpha_b.fill_(-0.4)

    def forward(self, x):
        a, b = self.block(x, x.flip(-1)[..., :3] * 2)
        return torch.cat([a.flatten(1), b.flatten(1)], 1)


def _layer(name: str):
    torch.manual_seed(0)
    factory, shape = LAYERS[name]
    module = factory().double()
    return module, torch.randn(shape, **DOUBLE)


@pytest.mark.parametrize("name", LAYERS)
def test_grad_of_functional_call_is_autograds(name):
    """Training mode; running statistics, where a layer keeps them, are inputs of the transformed function
    (functorch refuses an in-place update of a captured tensor, for torch.nn's batch norm too)."""
    module, x = _layer(name)
    u = torch.randn_like(_first(module(x)))
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(params, buffers, x):
        return (_first(functional_call(module, {**params, **buffers}, (x,))) * u).sum()

    def buffers():
        return {k: v.clone() for k, v in module.named_buffers()}

    got_params, got_x = grad(loss, argnums=(0, 2))(params, buffers(), x)
    x_leaf = x.clone().requires_grad_()
    want = torch.autograd.grad(loss(dict(module.named_parameters()), buffers(), x_leaf), [*module.parameters(), x_leaf])
    assert_close(list(got_params.values()) + [got_x], list(want))


@pytest.mark.parametrize("name", ["conv2d", "linear", "instance_norm_gelu", "lstm", "aqcf_block", "conv_norm_act"])
def test_vmap_and_jvp_of_eval_layers(name):
    """Eval layers (running statistics, the folded conv-norm unit): vmap over a stack of inputs equals a loop;
    jvp equals the directional difference (second-order accurate)."""
    module, x = _layer(name)
    if any(isinstance(m, nn.modules.batchnorm._NormBase) or "Norm" in type(m).__name__ for m in module.modules()):
        module(torch.randn_like(x))  # running statistics that are not the defaults
    module.eval()
    xs = torch.stack([torch.randn_like(x) for _ in range(3)])
    with torch.no_grad():
        want = torch.stack([_first(module(xi)) for xi in xs])
    assert_close(vmap(lambda xi: _first(module(xi)))(xs), want)

    dx, eps = torch.randn_like(x), 1e-6
    _, tangent = jvp(lambda x: _first(module(x)), (x,), (dx,))
    with torch.no_grad():
        difference = (_first(module(x + eps * dx)) - _first(module(x - eps * dx))) / (2 * eps)
    assert_close(tangent, difference, rtol=1e-6, atol=1e-7)


class _SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = qnn.QuaternionConv2d(4, 8, 3, padding=1)
        self.norm = qnn.QuaternionInstanceNorm2d(8, affine=True, activation="relu")
        self.down = qnn.QuaternionConv2d(8, 8, 2, stride=2, algorithm="fast8")
        self.head = qnn.QuaternionLinear(8, 4)

    def forward(self, x):
        y = self.down(self.norm(self.conv(x)))
        return self.head(y.mean((2, 3)))


def test_per_sample_gradients_of_a_network():
    """``vmap(grad(loss))`` over the samples (DP-SGD's per-sample clipping; Opacus' functorch path): each
    sample's gradient as autograd gives it for that sample alone."""
    torch.manual_seed(0)
    net = _SmallNet().double()
    x, target = torch.randn(5, 4, 6, 7, **DOUBLE), torch.randn(5, 4, **DOUBLE)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(params, x, t):
        return (functional_call(net, params, (x[None],))[0] - t).square().sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(x.shape[0]):
        net.zero_grad()
        loss(dict(net.named_parameters()), x[i], target[i]).backward()
        for k, p in net.named_parameters():
            assert_close(got[k][i], p.grad, msg=lambda m, k=k, i=i: f"sample {i}, {k}: {m}")


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_per_sample_gradients_are_the_eager_ones():
    """``torch.compile(vmap(grad(loss)), fullgraph=True)``: one graph (the convs are their expanded-weight
    lowering there, which dynamo traces; the Function serving eager transforms made dynamo recurse until
    the recursion limit) and eager mode's per-sample gradients, float64."""
    torch.manual_seed(0)
    net = _SmallNet().double()
    x, target = torch.randn(4, 4, 6, 7, **DOUBLE), torch.randn(4, 4, **DOUBLE)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(params, x, t):
        return (functional_call(net, params, (x[None],))[0] - t).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    want = per_sample(params, x, target)
    got = torch.compile(per_sample, backend="aot_eager", fullgraph=True)(params, x, target)
    assert_close(got, want)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("train", [True, False])
def test_compiled_model_gradients_through_torch_func(train):
    """A-QCF-Net under ``torch.compile(grad(loss), fullgraph=True)``: autograd's parameter gradients."""
    torch.manual_seed(1)
    model = AQCFNet(2, features=(8, 16), bottleneck=16, heads=2, kv_pool=16).double().train(train)
    for block in model.modules():
        if isinstance(block, qnn.AQCFBlock):
            with torch.no_grad():
                block.alpha_a.fill_(0.5)
                block.alpha_b.fill_(-0.5)
    ct, mri = torch.randn(2, 1, 16, 12, **DOUBLE), torch.randn(2, 1, 16, 12, **DOUBLE)

    def buffers():  # inputs of the transformed function: training updates the running statistics
        return {k: v.clone() for k, v in model.named_buffers()}

    def loss(params, buffers):
        out = functional_call(model, {**params, **buffers}, (), {"ct": ct, "mri": mri})
        return out["ct"].square().mean() + out["mri"].sin().mean()

    compiled = torch.compile(grad(loss), backend="eager", fullgraph=True)
    got = compiled({k: v.detach() for k, v in model.named_parameters()}, buffers())
    want = torch.autograd.grad(
        loss(dict(model.named_parameters()), buffers()), list(model.parameters()), allow_unused=True
    )
    for (k, _), w in zip(model.named_parameters(), want, strict=True):
        assert_close(got[k], torch.zeros_like(got[k]) if w is None else w, msg=lambda m, k=k: f"{k}: {m}")


def test_model_gradients_through_torch_func():
    """A-QCF-Net (twin encoders, fused norms, A-QCF attention and gate): ``grad`` over ``functional_call``
    gives autograd's parameter gradients, in training and in eval."""
    torch.manual_seed(0)
    model = AQCFNet(2, features=(8, 16), bottleneck=32, heads=2, kv_pool=16, act="gelu").double()
    for block in model.modules():
        if isinstance(block, qnn.AQCFBlock):
            with torch.no_grad():
                block.alpha_a.fill_(0.5)
                block.alpha_b.fill_(0.5)
    ct, mri = torch.randn(2, 1, 19, 23, **DOUBLE), torch.randn(2, 1, 19, 23, **DOUBLE)
    names = [k for k, _ in model.named_parameters()]
    for train in (True, False):
        model.train(train)

        def buffers():
            return {k: v.clone() for k, v in model.named_buffers()}

        def loss(params, buffers):
            out = functional_call(model, {**params, **buffers}, (), {"ct": ct, "mri": mri})
            return out["ct"].square().mean() + out["mri"].sin().mean()

        got = grad(loss)({k: v.detach() for k, v in model.named_parameters()}, buffers())
        want = torch.autograd.grad(
            loss(dict(model.named_parameters()), buffers()), list(model.parameters()), allow_unused=True
        )
        for k, w in zip(names, want, strict=True):
            assert_close(got[k], torch.zeros_like(got[k]) if w is None else w, msg=lambda m, k=k: f"{k}: {m}")


def test_batch_norm_with_running_statistics_refuses_grad_as_torch_does():
    """Updating running statistics in place is refused under grad for torch.nn's batch norm too: the layer
    in eval, or built with ``track_running_stats=False``, serves (test_grad_of_functional_call_is_autograds)."""
    x = torch.randn(3, 8, 4, 4, **DOUBLE)
    for module in (nn.BatchNorm2d(8).double(), qnn.QuaternionBatchNorm2d(8).double()):
        params = dict(module.named_parameters())
        with pytest.raises(RuntimeError, match="in-place operation"):
            grad(lambda p, m=module: functional_call(m, p, (x,)).sum())(params)


@pytest.mark.parametrize("name", ["batch_norm_relu", "instance_norm_gelu", "lstm", "aqcf_block", "conv_norm_act"])
def test_forward_mode_ad_with_dual_tensors(name):
    """``torch.autograd.forward_ad`` in training mode: the tangent equals torch.func.jvp's, which equals the
    directional difference (test_vmap_and_jvp_of_eval_layers; here in training, batch statistics)."""
    module, x = _layer(name)
    dx = torch.randn_like(x)
    with fwad.dual_level():
        got = fwad.unpack_dual(_first(module(fwad.make_dual(x, dx)))).tangent
    eps = 1e-6
    with torch.no_grad():
        difference = (_first(module(x + eps * dx)) - _first(module(x - eps * dx))) / (2 * eps)
    assert_close(got, difference, rtol=1e-6, atol=1e-7)


def test_model_vmap_in_eval_is_a_loop():
    """vmap over stacks of batches through A-QCF-Net in eval (folded units, oneDNN stem left for torch's conv,
    channels_last off for vmapped tensors): each slice as the model gives it alone."""
    torch.manual_seed(0)
    model = AQCFNet(2, features=(8, 16), bottleneck=32, heads=2, kv_pool=16).double()
    model(ct=torch.randn(2, 1, 19, 23, **DOUBLE), mri=torch.randn(2, 1, 19, 23, **DOUBLE))  # running statistics
    model.eval()
    ct, mri = torch.randn(3, 2, 1, 19, 23, **DOUBLE), torch.randn(3, 2, 1, 17, 20, **DOUBLE)
    got = vmap(lambda c, m: model(ct=c, mri=m)["mri"])(ct, mri)
    with torch.no_grad():
        want = torch.stack([model(ct=c, mri=m)["mri"] for c, m in zip(ct, mri, strict=True)])
    assert_close(got, want)


def _bf16_close(got, want, what):
    """Within bf16's rounding at the tensor's scale (the two computations round at different places)."""
    scale = want.abs().max().clamp_min(1e-6)
    assert_close(got, want, rtol=0, atol=float(2e-2 * scale), msg=lambda m: f"{what}: {m}")


def test_autocast_inside_transformed_functions():
    """CPU bf16 autocast inside ``vmap(grad(...))``, ``grad`` and ``jvp``: the convs run in bf16 as they do under
    autocast outside torch.func, and parameter gradients arrive in float32. functorch runs the Function that
    serves a transform outside the dispatcher's autocast keys, so before, a bf16 feature map met a float32
    weight inside it (per-sample gradients failed at the second conv, ``grad`` in oneDNN)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        qnn.QuaternionConv2d(8, 8, 3, padding=1),
        qnn.QuaternionInstanceNorm2d(8, affine=True, activation="relu"),
        qnn.QuaternionConvTranspose2d(8, 8, 2, stride=2),
        nn.Flatten(),
        qnn.QuaternionLinear(8 * 10 * 10, 4),
    )
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(3, 8, 5, 5)

    def loss(params, x):  # one sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = functional_call(net, params, (x[None],))
        assert y.dtype == torch.bfloat16
        return y.float().square().mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    one = grad(loss)(params, x[1])
    for i in range(x.shape[0]):
        net.zero_grad()
        loss(dict(net.named_parameters()), x[i]).backward()
        for k, p in net.named_parameters():
            assert per_sample[k].dtype == torch.float32
            _bf16_close(per_sample[k][i], p.grad, f"sample {i}, {k}")
            if i == 1:
                _bf16_close(one[k], p.grad, f"grad, {k}")

    def forward(x, enabled=True):  # the convs (the norm's ReLU has kinks a tangent's rounding may cross)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            return net[2](net[0](x))

    dx = torch.randn_like(x)
    out, tangent = jvp(forward, (x,), (dx,))
    assert out.dtype == tangent.dtype == torch.bfloat16
    _bf16_close(out.float(), forward(x).float(), "jvp's output")
    _, tangent_fp32 = jvp(lambda x: forward(x, enabled=False), (x,), (dx,))
    _bf16_close(tangent.float(), tangent_fp32, "jvp's tangent")

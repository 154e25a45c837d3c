"""speechbrain state dicts load into our layers, and the outputs match the originals given the same weights.

speechbrain is not a dependency: each original is rebuilt here from its formulas, with its parameter
names and layouts (speechbrain/nnet/quaternion_networks: ``q_linear.py``, ``q_CNN.py``,
``q_normalization.py``, ``q_RNN.py``, ``q_ops.py``):

* ``QLinear``: ``r_weight`` .. ``k_weight`` of shape ``(in/4, out/4)``, ``bias`` ``(out,)`` (absent
  without bias), ``y = x @ cat_kernels + b`` with the ``(in, out)`` block matrix below;
* ``QConv1d/2d``: components ``(out/4, in/4, *k)``, channels-last input ``(B, T, C)`` /
  ``(B, T, F, C)``, 'same' padding by ``F.pad`` (reflect by default); ``QConv2d(bias=False)`` keeps
  an all-zero ``bias`` buffer;
* ``QBatchNorm``: ``gamma`` ``(C/4,)``, ``beta`` ``(C,)``, running mean ``(C,)`` and quaternion variance
  ``(C/4,)``; ``eps`` 1e-4;
* ``QRNN`` / ``QLSTM`` / ``QLiGRU``: layers ``rnn.{l}`` with projections ``w`` (input, all steps at
  once) and ``u`` (recurrent) and, for the LiGRU, ``norm``; buffers ``h_init`` (and ``drop_masks``);
  batch-first; the two directions share the layer's weights (the batch is doubled with the flipped
  sequence); the gates are ``chunk(4 * G)`` of the projection, concatenated back four at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from aqcf_kernels.nn import (
    QuaternionBatchNorm1d,
    QuaternionConv1d,
    QuaternionConv2d,
    QuaternionLiGRU,
    QuaternionLinear,
    QuaternionLSTM,
    QuaternionRNN,
)

pytestmark = pytest.mark.usefixtures("single_threaded")

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
    return module


# ---------------------------------------------------------------- the originals, from their formulas


def sb_linear_kernel(r, i, j, k):
    """speechbrain's ``(in, out)`` matrix from ``(in/4, out/4)`` components: ``x @ K`` is ``W ⊗ x``."""
    return torch.cat(
        [
            torch.cat([r, -i, -j, -k], dim=0),
            torch.cat([i, r, -k, j], dim=0),
            torch.cat([j, k, r, -i], dim=0),
            torch.cat([k, -j, i, r], dim=0),
        ],
        dim=1,
    )


def sb_conv_kernel(r, i, j, k):
    """speechbrain's ``(out, in, *k)`` conv kernel from ``(out/4, in/4, *k)`` components."""
    return torch.cat(
        [
            torch.cat([r, -i, -j, -k], dim=1),
            torch.cat([i, r, -k, j], dim=1),
            torch.cat([j, k, r, -i], dim=1),
            torch.cat([k, -j, i, r], dim=1),
        ],
        dim=0,
    )


class SBQLinear(nn.Module):
    def __init__(self, input_size: int, n_neurons: int, bias: bool = True) -> None:
        super().__init__()
        for c in "rijk":
            self.register_parameter(f"{c}_weight", nn.Parameter(torch.empty(input_size // 4, n_neurons, dtype=F64)))
        self.bias = nn.Parameter(torch.zeros(4 * n_neurons, dtype=F64)) if bias else None

    def forward(self, x):
        out = x @ sb_linear_kernel(self.r_weight, self.i_weight, self.j_weight, self.k_weight)
        return out if self.bias is None else out + self.bias


class SBQConv(nn.Module):
    """``QConv1d`` / ``QConv2d`` with 'same' padding (odd kernels, stride 1), channels-last input."""

    def __init__(self, dims: int, in_channels: int, out_q: int, kernel: int, dilation=1, bias=True) -> None:
        super().__init__()
        self.dims, self.kernel, self.dilation = dims, kernel, dilation
        for c in "rijk":
            shape = (out_q, in_channels // 4, *([kernel] * dims))
            self.register_parameter(f"{c}_weight", nn.Parameter(torch.empty(shape, dtype=F64)))
        if bias:
            self.bias = nn.Parameter(torch.zeros(4 * out_q, dtype=F64))
        else:  # QConv2d(bias=False): a zero buffer, saved in the state dict
            self.register_buffer("bias", torch.zeros(4 * out_q, dtype=F64))

    def forward(self, x):
        x = x.transpose(1, -1)
        pad = (self.kernel - 1) * self.dilation // 2
        x = F.pad(x, [pad] * (2 * self.dims), mode="reflect")
        weight = sb_conv_kernel(self.r_weight, self.i_weight, self.j_weight, self.k_weight)
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, weight, self.bias, dilation=self.dilation).transpose(1, -1)


class SBQBatchNorm(nn.Module):
    def __init__(self, input_size: int, eps: float = 1e-4, momentum: float = 0.1) -> None:
        super().__init__()
        cq = input_size // 4
        self.eps, self.momentum = eps, momentum
        self.gamma = nn.Parameter(torch.ones(cq, dtype=F64))
        self.beta = nn.Parameter(torch.zeros(4 * cq, dtype=F64))
        self.register_buffer("running_mean", torch.zeros(4 * cq, dtype=F64))
        self.register_buffer("running_var", torch.ones(cq, dtype=F64))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):  # x: (N, C)
        if self.training:
            mu = x.mean(0)
            delta = x - mu
            r, i, j, k = delta.chunk(4, dim=-1)
            var = (r**2 + i**2 + j**2 + k**2).mean(0)
            out = delta * torch.rsqrt(var + self.eps).repeat(4)
        else:
            out = (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps).repeat(4)
        return self.gamma.repeat(4) * out + self.beta


class SBRecurrentLayer(nn.Module):
    GATES = {"rnn": 1, "lstm": 4, "ligru": 2}

    def __init__(self, mode: str, input_size: int, hidden_size: int, bidirectional: bool, nonlinearity: str):
        super().__init__()
        hq, gates = hidden_size // 4, self.GATES[mode]
        self.mode, self.bidirectional, self.nonlinearity = mode, bidirectional, nonlinearity
        bias = mode != "ligru"
        self.w = SBQLinear(input_size, gates * hq, bias=bias)
        self.u = SBQLinear(hidden_size, gates * hq, bias=bias)
        if mode == "ligru":
            self.norm = SBQBatchNorm(gates * hidden_size)
            self.register_buffer("drop_masks", torch.ones(16000, hidden_size, dtype=F64))
        self.register_buffer("h_init", torch.zeros(1, hidden_size, dtype=F64))

    def act(self, v):
        return {"tanh": torch.tanh, "relu": torch.relu, "leaky_relu": F.leaky_relu}[self.nonlinearity](v)

    def forward(self, x, hx=None):
        if self.bidirectional:
            x = torch.cat([x, x.flip(1)], dim=0)
        w = self.w(x)
        if self.mode == "ligru":
            w = self.norm(w.reshape(w.shape[0] * w.shape[1], w.shape[2])).reshape(w.shape)
        h = self.h_init if hx is None else hx
        c = self.h_init
        hiddens = []
        for t in range(w.shape[1]):
            gates = w[:, t] + self.u(h)
            if self.mode == "rnn":
                h = self.act(gates)
            elif self.mode == "lstm":
                q = gates.chunk(16, 1)
                i, f, o = (torch.sigmoid(torch.cat(q[4 * g : 4 * g + 4], dim=-1)) for g in range(3))
                c = i * torch.tanh(torch.cat(q[12:16], dim=-1)) + f * c
                h = o * torch.tanh(c)
            else:
                q = gates.chunk(8, 1)
                a, z = torch.cat(q[:4], dim=-1), torch.sigmoid(torch.cat(q[4:], dim=-1))
                h = z * h + (1 - z) * self.act(a)
            hiddens.append(h)
        h = torch.stack(hiddens, dim=1)
        if self.bidirectional:
            h_f, h_b = h.chunk(2, dim=0)
            h = torch.cat([h_f, h_b.flip(1)], dim=2)
        return h


class SBRecurrent(nn.Module):
    """speechbrain's ``QRNN`` / ``QLSTM`` / ``QLiGRU``: ``hidden_size`` in REAL features here."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bidirectional=False, nonlinearity="tanh"):
        super().__init__()
        d = 2 if bidirectional else 1
        self.rnn = nn.ModuleList(
            SBRecurrentLayer(mode, input_size if i == 0 else d * hidden_size, hidden_size, bidirectional, nonlinearity)
            for i in range(num_layers)
        )

    def forward(self, x, hx=None):
        last = []
        for i, layer in enumerate(self.rnn):
            x = layer(x, None if hx is None else hx[i])
            last.append(x[:, -1])
        return x, torch.stack(last)


# ---------------------------------------------------------------- linear, conv, batch norm


@pytest.mark.parametrize("bias", [True, False])
def test_qlinear(bias):
    sb = _randomise(SBQLinear(16, 3, bias=bias))
    ours = QuaternionLinear(16, 12, bias=bias, dtype=F64)
    ours.load_state_dict(sb.state_dict())
    x = torch.randn(5, 7, 16, generator=_gen(1), dtype=F64)
    assert_close(ours(x), sb(x))


def test_qconv1d():
    sb = _randomise(SBQConv(1, 8, 3, kernel=3, dilation=2))
    ours = QuaternionConv1d(8, 12, 3, dilation=2, padding="same", padding_mode="reflect", dtype=F64)
    ours.load_state_dict(sb.state_dict())
    x = torch.randn(2, 11, 8, generator=_gen(2), dtype=F64)  # (batch, time, channels)
    assert_close(ours(x.transpose(1, 2)).transpose(1, 2), sb(x))


@pytest.mark.parametrize("bias", [True, False])
def test_qconv2d(bias):
    sb = _randomise(SBQConv(2, 8, 2, kernel=3, bias=bias))
    ours = QuaternionConv2d(8, 8, 3, bias=bias, padding="same", padding_mode="reflect", dtype=F64)
    ours.load_state_dict(sb.state_dict())  # bias=False: speechbrain's zero bias buffer is dropped
    x = torch.randn(2, 9, 7, 8, generator=_gen(3), dtype=F64)  # (batch, time, freq, channels)
    assert_close(ours(x.transpose(1, -1)).transpose(1, -1), sb(x))


def test_qconv2d_nonzero_bias_buffer_is_not_dropped():
    sb = _randomise(SBQConv(2, 8, 2, kernel=3, bias=False))
    sd = sb.state_dict()
    sd["bias"] = torch.ones_like(sd["bias"])
    with pytest.raises(RuntimeError, match="bias"):
        QuaternionConv2d(8, 8, 3, bias=False, dtype=F64).load_state_dict(sd)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_qbatchnorm(train):
    sb = _randomise(SBQBatchNorm(16)).train(train)
    ours = QuaternionBatchNorm1d(16, eps=1e-4, dtype=F64)
    ours.load_state_dict(sb.state_dict())
    ours.train(train)
    x = torch.randn(10, 16, generator=_gen(4), dtype=F64) * 2 + 1
    assert_close(ours(x), sb(x))


# ---------------------------------------------------------------- recurrent layers

OURS = {
    "rnn": lambda i, h, **kw: QuaternionRNN(i, h, nonlinearity="tanh", **kw),
    "lstm": lambda i, h, **kw: QuaternionLSTM(i, h, **kw),
    "ligru": lambda i, h, **kw: QuaternionLiGRU(i, h, nonlinearity="leaky_relu", **kw),
}
SB_NONLINEARITY = {"rnn": "tanh", "lstm": "tanh", "ligru": "leaky_relu"}


def _pair(mode: str, num_layers: int, bidirectional: bool):
    sb = _randomise(SBRecurrent(mode, 12, 8, num_layers, bidirectional, SB_NONLINEARITY[mode]), seed=5)
    ours = OURS[mode](12, 8, num_layers=num_layers, bidirectional=bidirectional, batch_first=True, dtype=F64)
    ours.load_state_dict(sb.state_dict())
    return sb, ours


@pytest.mark.parametrize("mode", ["rnn", "lstm", "ligru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_outputs_match(mode, bidirectional):
    sb, ours = _pair(mode, num_layers=2, bidirectional=bidirectional)
    sb.eval()
    ours.eval()
    x = torch.randn(3, 5, 12, generator=_gen(6), dtype=F64)  # (batch, time, features)
    out_sb, _ = sb(x)
    out, _ = ours(x)
    assert_close(out, out_sb)
    if bidirectional:  # both directions got speechbrain's one set of weights
        assert torch.equal(ours.weight_hh_l1, ours.weight_hh_l1_reverse)


@pytest.mark.parametrize("mode", ["rnn", "ligru"])
def test_recurrent_with_initial_state_and_final_state(mode):
    """Unidirectional, speechbrain's ``hx`` ``(num_layers, B, H)`` is ours; its final state is ours too."""
    sb, ours = _pair(mode, num_layers=2, bidirectional=False)
    hx = torch.randn(2, 3, 8, generator=_gen(7), dtype=F64)
    x = torch.randn(3, 4, 12, generator=_gen(8), dtype=F64)
    out_sb, h_sb = sb(x, hx)  # training mode: the LiGRU's batch norm on batch statistics, as ours
    out, h = ours(x, hx)
    assert_close(out, out_sb)
    assert_close(h, h_sb)


def test_lstm_final_state_differs_from_speechbrains_only_where_documented():
    """speechbrain returns the output at the last index; for the reverse direction ours is its last step."""
    sb, ours = _pair("lstm", num_layers=1, bidirectional=True)
    x = torch.randn(2, 4, 12, generator=_gen(9), dtype=F64)
    out, (h, _) = ours(x)
    assert_close(h[0], sb(x)[0][:, -1, :8])  # forward: the same
    assert_close(h[1], out[:, 0, 8:])  # reverse: its final state is at time 0


def test_speechbrain_mismatches_are_errors():
    sb, _ = _pair("lstm", num_layers=2, bidirectional=True)
    with pytest.raises(RuntimeError, match="size mismatch"):  # layer 1's input is 2H in the checkpoint
        QuaternionLSTM(12, 8, num_layers=2, dtype=F64).load_state_dict(sb.state_dict())
    sd = SBRecurrent("ligru", 12, 8).state_dict()
    with pytest.raises(RuntimeError, match="norm_l0"):  # a batch-norm checkpoint into a layer without one
        QuaternionLiGRU(12, 8, normalization=None, dtype=F64).load_state_dict(sd)
    sd = SBRecurrent("rnn", 12, 8).state_dict()
    sd["rnn.0.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="rnn.0.extra"):
        QuaternionRNN(12, 8, dtype=F64).load_state_dict(sd)


def test_nested_prefix():
    """A speechbrain layer inside a bigger model loads into ours at the same place."""
    sb = nn.Sequential(_randomise(SBRecurrent("lstm", 12, 8), seed=3))
    ours = nn.Sequential(QuaternionLSTM(12, 8, batch_first=True, dtype=F64))
    ours.load_state_dict(sb.state_dict())
    x = torch.randn(2, 3, 12, generator=_gen(10), dtype=F64)
    assert_close(ours(x)[0], sb(x)[0])

"""The quaternion recurrent layers against :mod:`aqcf_kernels.reference` (float64, forward and gradients).

The reference is a plain per-time-step loop on the expanded-weight quaternion linear map (speechbrain's
construction); every layer is also gradchecked, packed sequences are checked against running each
sequence alone, and one small case runs under ``torch.compile``.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.testing import assert_close

from aqcf_kernels import reference as ref
from aqcf_kernels.nn import QuaternionLiGRU, QuaternionLSTM, QuaternionRNN
from aqcf_kernels.ops import rnn_cell as rnn_cell_ops

pytestmark = pytest.mark.usefixtures("single_threaded")

F64 = torch.float64
CLASSES = {"rnn": QuaternionRNN, "lstm": QuaternionLSTM, "ligru": QuaternionLiGRU}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_layer(mode: str, input_size=8, hidden_size=8, seed=0, **kwargs):
    """A float64 layer whose every parameter (biases and norms included) is random, never at its init."""
    layer = CLASSES[mode](input_size, hidden_size, dtype=F64, **kwargs)
    gen = _gen(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
        for name, buf in layer.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen, dtype=F64) * 0.3)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen, dtype=F64) + 0.5)
    return layer


def reference_forward(layer, x, hx, **cell_kwargs):
    """:func:`reference.quaternion_recurrent` with ``layer``'s own parameters (time-major ``x``)."""
    mode = {QuaternionRNN: "rnn", QuaternionLSTM: "lstm", QuaternionLiGRU: "ligru"}[type(layer)]
    layers = []
    for lay in range(layer.num_layers):
        directions = []
        for d in range(layer.num_directions):
            sfx = f"_l{lay}" + ("_reverse" if d else "")
            params = {"weight_ih": getattr(layer, f"weight_ih{sfx}"), "weight_hh": getattr(layer, f"weight_hh{sfx}")}
            params["bias_ih"] = getattr(layer, f"bias_ih{sfx}", None)
            if mode != "ligru":
                params["bias_hh"] = getattr(layer, f"bias_hh{sfx}", None)
            elif layer.normalization == "batchnorm":
                norm = getattr(layer, f"norm{sfx}")
                stats = {} if layer.training else {"running_mean": norm.running_mean, "running_var": norm.running_var}
                params["norm"] = lambda rows, norm=norm, stats=stats: ref.quaternion_batch_norm_rows(
                    rows, norm.weight, norm.bias, norm.eps, **stats
                )
            directions.append(params)
        layers.append(directions)
    if mode == "rnn":
        cell_kwargs.setdefault("nonlinearity", layer.nonlinearity)
    if mode == "ligru":
        cell_kwargs.setdefault("nonlinearity", layer.nonlinearity)
        cell_kwargs.setdefault("negative_slope", layer.negative_slope)
    h0, c0 = hx if mode == "lstm" else (hx, None)
    return ref.quaternion_recurrent(mode, x, layers, h0, c0, **cell_kwargs)


def random_states(layer, batch: int, seed: int = 1):
    gen = _gen(seed)
    shape = (layer.num_layers * layer.num_directions, batch, layer.hidden_size)
    h0 = torch.randn(shape, generator=gen, dtype=F64)
    if isinstance(layer, QuaternionLSTM):
        return h0, torch.randn(shape, generator=gen, dtype=F64)
    return h0


def _states(hx) -> list[torch.Tensor]:
    return list(hx) if isinstance(hx, tuple) else [hx]


CASES = [
    ("rnn", {}),
    ("rnn", {"nonlinearity": "relu", "bidirectional": True}),
    ("lstm", {}),
    ("lstm", {"num_layers": 2, "bidirectional": True}),
    ("ligru", {}),
    ("ligru", {"num_layers": 2, "bidirectional": True, "nonlinearity": "leaky_relu"}),
    ("ligru", {"normalization": None, "nonlinearity": "tanh"}),
    ("lstm", {"bias": False, "num_layers": 2}),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode, kwargs", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_matches_reference_forward_and_gradients(mode, kwargs, train):
    layer = make_layer(mode, input_size=12, hidden_size=8, **kwargs).train(train)
    x = torch.randn(4, 3, 12, generator=_gen(5), dtype=F64)
    hx = random_states(layer, batch=3)
    x1 = x.clone().requires_grad_()
    hx1 = tuple(s.clone().requires_grad_() for s in _states(hx))
    out, h_n = layer(x1, hx1 if mode == "lstm" else hx1[0])
    x2 = x.clone().requires_grad_()
    hx2 = tuple(s.clone().requires_grad_() for s in _states(hx))
    out_ref, h_ref, c_ref = reference_forward(layer, x2, hx2 if mode == "lstm" else hx2[0])
    assert out.shape == (4, 3, layer.num_directions * 8)
    assert_close(out, out_ref)
    assert_close(_states(h_n), [h_ref] + ([c_ref] if mode == "lstm" else []))

    # Gradients of a random function of output and final states w.r.t. input, states and parameters.
    gen = _gen(9)
    outs, outs_ref = [out, *_states(h_n)], [out_ref, h_ref] + ([c_ref] if mode == "lstm" else [])
    weights = [torch.randn(o.shape, generator=gen, dtype=F64) for o in outs]
    params = list(layer.parameters())
    grads = torch.autograd.grad(outs, [x1, *hx1, *params], weights)
    grads_ref = torch.autograd.grad(outs_ref, [x2, *hx2, *params], weights)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_close(got, want)


@pytest.mark.parametrize("mode", ["rnn", "lstm", "ligru"])
def test_gradcheck(mode):
    """float64 gradcheck through input, initial state and every parameter (hidden 8, T 3, batch 2).

    One direction: the reverse direction's gradients are held to the reference's above."""
    layer = make_layer(mode)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(3, 2, 8, generator=_gen(3), dtype=F64, requires_grad=True)
    states = [s.requires_grad_() for s in _states(random_states(layer, batch=2))]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def fn(x, *rest):
        st, ps = rest[: len(states)], rest[len(states) :]
        hx = tuple(st) if mode == "lstm" else st[0]
        out, h_n = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x, hx))
        return (out, *_states(h_n))

    assert torch.autograd.gradcheck(fn, (x, *states, *params))


def test_fast8_recurrent_step_matches_reference():
    """``algorithm='fast8'`` runs the recurrent product on the op every step (not the expanded weight)."""
    layer = make_layer("lstm", algorithm="fast8", bidirectional=True)
    x = torch.randn(3, 2, 8, generator=_gen(4), dtype=F64)
    out, (h, c) = layer(x)
    out_ref, h_ref, c_ref = reference_forward(layer, x, (torch.zeros_like(h), torch.zeros_like(c)))
    assert_close(out, out_ref)
    assert_close((h, c), (h_ref, c_ref))


@pytest.mark.parametrize("algorithm, bound", [("hamilton", 1e-5), ("fast8", 5e-4)])
@pytest.mark.parametrize("mode", ["lstm", "ligru"])
def test_float32_accuracy(mode, algorithm, bound):
    """float32 against float64 (held to the reference above), same weights: the numerical contract."""
    layer64 = make_layer(mode, input_size=32, hidden_size=32, num_layers=2, bidirectional=True)
    layer32 = make_layer(mode, input_size=32, hidden_size=32, num_layers=2, bidirectional=True, algorithm=algorithm)
    layer32.load_state_dict(layer64.state_dict())
    layer32.float().eval()
    layer64.eval()
    x = torch.randn(6, 4, 32, generator=_gen(13), dtype=F64)
    out32, _ = layer32(x.float())
    with torch.no_grad():
        out64, _ = layer64(x)
    assert ((out32.double() - out64).norm() / out64.norm()).item() <= bound


# ---------------------------------------------------------------- shapes and conventions


@pytest.mark.parametrize("mode", ["rnn", "lstm", "ligru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_shapes_multilayer_bidirectional(mode, bidirectional):
    layer = CLASSES[mode](12, 16, num_layers=3, bidirectional=bidirectional)
    d = 2 if bidirectional else 1
    assert layer.weight_ih_l0.shape == (4, layer._gates * 4, 3)
    assert layer.weight_ih_l1.shape == (4, layer._gates * 4, d * 4)
    assert layer.weight_hh_l2.shape == (4, layer._gates * 4, 4)
    assert hasattr(layer, "weight_hh_l2_reverse") == bidirectional
    out, h_n = layer(torch.randn(5, 2, 12))
    assert out.shape == (5, 2, d * 16)
    for s in _states(h_n):
        assert s.shape == (3 * d, 2, 16)
    assert len(layer.all_weights) == 3 * d


@pytest.mark.parametrize("mode", ["rnn", "lstm", "ligru"])
def test_final_state_is_the_last_step_of_each_direction(mode):
    layer = make_layer(mode, num_layers=2, bidirectional=True).eval()
    out, h_n = layer(torch.randn(4, 3, 8, generator=_gen(2), dtype=F64))
    h = _states(h_n)[0]
    assert_close(h[2], out[-1, :, :8])  # last layer, forward: its last step
    assert_close(h[3], out[0, :, 8:])  # last layer, reverse: its last step is time 0


@pytest.mark.parametrize("mode", ["rnn", "lstm", "ligru"])
def test_initial_state(mode):
    layer = make_layer(mode, num_layers=2).eval()
    x = torch.randn(3, 2, 8, generator=_gen(6), dtype=F64)
    zeros = random_states(layer, batch=2)
    zeros = tuple(torch.zeros_like(s) for s in zeros) if mode == "lstm" else torch.zeros_like(zeros)
    out_default, h_default = layer(x)
    out_zero, h_zero = layer(x, zeros)
    assert_close(out_default, out_zero)
    assert_close(_states(h_default), _states(h_zero))
    out_given, _ = layer(x, random_states(layer, batch=2))
    assert not torch.allclose(out_given, out_default)
    # Feeding the final state back continues the sequence: two halves equal the whole.
    out_a, h_a = layer(x[:2])
    out_b, h_b = layer(x[2:], h_a)
    assert_close(torch.cat([out_a, out_b]), out_default)
    assert_close(_states(h_b), _states(h_default))


@pytest.mark.parametrize("mode", ["rnn", "lstm", "ligru"])
def test_batch_first_and_unbatched(mode):
    layer = make_layer(mode, bidirectional=True).eval()
    x = torch.randn(4, 3, 8, generator=_gen(7), dtype=F64)  # (T, B, F)
    out, h_n = layer(x)
    layer.batch_first = True
    out_bf, h_bf = layer(x.transpose(0, 1))
    assert_close(out_bf, out.transpose(0, 1))
    assert_close(_states(h_bf), _states(h_n))
    # Unbatched (T, F), with an unbatched state, whatever batch_first says (as torch.nn).
    hx = random_states(layer, batch=1)
    hx_unbatched = tuple(s[:, 0] for s in hx) if mode == "lstm" else hx[:, 0]
    out_u, h_u = layer(x[:, 0], hx_unbatched)
    layer.batch_first = False
    out_1, h_1 = layer(x[:, :1], hx)
    assert_close(out_u, out_1[:, 0])
    assert_close(_states(h_u), [s[:, 0] for s in _states(h_1)])


@pytest.mark.parametrize("mode", ["rnn", "lstm", "ligru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_equals_each_sequence_alone(mode, bidirectional):
    layer = make_layer(mode, num_layers=2, bidirectional=bidirectional).eval()
    lengths = [3, 5, 1, 4]  # unsorted: enforce_sorted=False exercises the index permutations
    x = torch.randn(5, 4, 8, generator=_gen(8), dtype=F64, requires_grad=True)
    hx = random_states(layer, batch=4)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out_packed, h_n = layer(packed, hx)
    out, out_lengths = pad_packed_sequence(out_packed)
    assert out_lengths.tolist() == lengths
    for b, n in enumerate(lengths):
        hx_b = tuple(s[:, b : b + 1] for s in hx) if mode == "lstm" else hx[:, b : b + 1]
        out_b, h_b = layer(x[:n, b : b + 1], hx_b)
        assert_close(out[:n, b : b + 1], out_b)
        assert not out[n:, b].any()
        assert_close([s[:, b : b + 1] for s in _states(h_n)], _states(h_b))
    out.sum().backward()  # gradients flow through the packed path
    assert x.grad is not None and x.grad[:1].abs().sum() > 0


def test_packed_batch_norm_sees_only_the_real_steps():
    """In training, the LiGRU's batch norm takes statistics over the packed rows only (no padding)."""
    layer = make_layer("ligru").train()
    x = torch.randn(4, 2, 8, generator=_gen(10), dtype=F64)
    x[2:, 1] = 1e3  # padding: would dominate the statistics if it were seen
    before = layer.norm_l0.running_mean.clone()
    layer(pack_padded_sequence(x, torch.tensor([4, 2])))
    rows = torch.cat([x[:, 0], x[:2, 1]])  # the 6 real steps
    mean = (rows @ ref.expand_weight(layer.weight_ih_l0).t()).mean(0)
    assert_close(layer.norm_l0.running_mean, 0.9 * before + 0.1 * mean.detach())


def test_dropout_between_layers():
    layer = make_layer("lstm", num_layers=2, dropout=0.5)
    x = torch.randn(3, 2, 8, generator=_gen(11), dtype=F64)
    torch.manual_seed(0)
    a, _ = layer(x)
    b, _ = layer(x)
    assert not torch.allclose(a, b)  # a fresh mask per call in training
    layer.eval()
    assert_close(layer(x)[0], layer(x)[0])
    with pytest.warns(UserWarning, match="dropout"):
        QuaternionLSTM(8, 8, dropout=0.2)


def test_compile_matches_eager():
    """One small LSTM step under ``torch.compile``: forward and backward equal eager."""
    layer = make_layer("lstm").float()
    x = torch.randn(3, 2, 8, generator=_gen(12))
    compiled = torch.compile(layer, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, (h_c, c_c) = compiled(x1)
    out_e, (h_e, c_e) = layer(x2)
    assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    assert_close((h_c, c_c), (h_e, c_e), rtol=1e-5, atol=1e-5)
    (g_c,) = torch.autograd.grad(out_c.square().sum() + c_c.sum(), x1)
    (g_e,) = torch.autograd.grad(out_e.square().sum() + c_e.sum(), x2)
    assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)


def test_repr():
    assert repr(QuaternionRNN(8, 16, nonlinearity="relu", bidirectional=True)) == (
        "QuaternionRNN(8, 16, nonlinearity='relu', bidirectional=True)"
    )
    assert repr(QuaternionLSTM(8, 16, 2, batch_first=True, dropout=0.1, init="unitary")) == (
        "QuaternionLSTM(8, 16, num_layers=2, batch_first=True, dropout=0.1, init='unitary')"
    )
    assert repr(QuaternionLiGRU(8, 16, normalization=None, bias=False)) == (
        "QuaternionLiGRU(8, 16, normalization=None, bias=False)"
    )


def test_parameters_and_init():
    layer = QuaternionLiGRU(8, 16, normalization=None)
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias_ih_l0", "weight_hh_l0", "weight_ih_l0"]
    assert not layer.bias_ih_l0.any()  # zero bias, as the other layers
    with_norm = QuaternionLiGRU(8, 16)
    assert "bias_ih_l0" not in dict(with_norm.named_parameters())  # the norm's shift is the bias
    lstm = QuaternionLSTM(8, 16, bidirectional=True)
    assert [n for n, _ in lstm.named_parameters()] == [
        f"{w}_l0{s}" for s in ("", "_reverse") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    a = QuaternionLSTM(8, 16)
    b = QuaternionLSTM(8, 16)
    a.reset_parameters(generator=_gen(0))
    b.reset_parameters(generator=_gen(0))
    assert torch.equal(a.weight_hh_l0, b.weight_hh_l0)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: QuaternionLSTM(6, 8), "input_size"),
        (lambda: QuaternionRNN(8, 10), "hidden_size"),
        (lambda: QuaternionLiGRU(8, 0), "hidden_size"),
        (lambda: QuaternionLSTM(8, 8, num_layers=0), "num_layers"),
        (lambda: QuaternionLSTM(8, 8, dropout=1.5), "dropout"),
        (lambda: QuaternionRNN(8, 8, nonlinearity="sigmoid"), "nonlinearity"),
        (lambda: QuaternionLiGRU(8, 8, nonlinearity="gelu"), "nonlinearity"),
        (lambda: QuaternionLiGRU(8, 8, normalization="layernorm"), "normalization"),
        (lambda: QuaternionLSTM(8, 8, init="orthogonal"), "init"),
        (lambda: QuaternionLSTM(8, 8, init_criterion="xavier"), "init_criterion"),
        (lambda: QuaternionLSTM(8, 8, algorithm="fast16"), "algorithm"),
        (lambda: QuaternionLSTM(8, 8, bidirectional=1), "bidirectional"),
    ],
)
def test_bad_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


@pytest.mark.parametrize(
    "mode, call, error, argument",
    [
        ("lstm", lambda m: m(torch.randn(3, 2, 12)), ValueError, "input_size=8"),
        ("rnn", lambda m: m(torch.randn(3, 2, 2, 8)), ValueError, "3-D"),
        ("rnn", lambda m: m(torch.randn(0, 2, 8)), ValueError, "no time steps"),
        ("rnn", lambda m: m(torch.randn(3, 2, 8), torch.randn(1, 3, 8)), ValueError, "hx must have shape"),
        ("ligru", lambda m: m(torch.randn(3, 2, 8), torch.randn(2, 2, 8)), ValueError, "hx must have shape"),
        ("lstm", lambda m: m(torch.randn(3, 2, 8), torch.randn(1, 2, 8)), TypeError, "hx must be a tuple"),
        (
            "lstm",
            lambda m: m(torch.randn(3, 2, 8), (torch.randn(1, 2, 8), torch.randn(1, 2, 4))),
            ValueError,
            "c_0 must have shape",
        ),
        (
            "lstm",
            lambda m: m(torch.randn(3, 2, 8), (torch.randn(2, 2, 8), torch.randn(1, 2, 8))),
            ValueError,
            "h_0 must have shape",
        ),
        ("rnn", lambda m: m(torch.randn(3, 2, 8), torch.randn(1, 2, 8, dtype=F64)), ValueError, "hx is torch.float64"),
        ("rnn", lambda m: m(torch.ones(3, 2, 8, dtype=torch.long)), TypeError, "floating point"),
    ],
)
def test_bad_inputs_name_the_argument(mode, call, error, argument):
    layer = CLASSES[mode](8, 8)
    with pytest.raises(error, match=argument):
        call(layer)


@pytest.mark.parametrize("cls", [QuaternionRNN, QuaternionLSTM, QuaternionLiGRU])
def test_zero_size_batch_in_training_gives_empty_outputs(cls):
    # nn.GRU takes a batch of 0; the LiGRU's batch norm over (batch, time) must too
    layer = cls(8, 8, num_layers=2).train()
    out, _ = layer(torch.randn(3, 0, 8))
    assert out.shape == (3, 0, 8)


@pytest.mark.parametrize("cls", [QuaternionRNN, QuaternionLSTM, QuaternionLiGRU])
def test_input_dtype_other_than_the_parameters_names_the_layer(cls):
    with pytest.raises(TypeError, match=rf"{cls.__name__}: input is torch.float64 on cpu but the layer's parameters"):
        cls(8, 8)(torch.randn(3, 2, 8, dtype=torch.float64))


@pytest.mark.parametrize("packed", [False, True], ids=["tensor", "packed"])
@pytest.mark.parametrize("mode", ["rnn", "lstm", "ligru"])
def test_under_cpu_autocast_the_outputs_are_bfloat16_as_torch_nn_lstm_s(mode, packed, monkeypatch):
    """As torch.nn.RNN/GRU/LSTM under CPU bf16 autocast: output and final states in bfloat16, the parameters'
    gradients in float32, the values the float32 layer's within bf16 rounding. The recurrence runs as one
    fused op in float32, the dtype the compiled CPU kernel serves (a packed sequence: the composite loop, in
    float32): left to autocast op by op it took the composite loop in mixed dtypes."""
    layer = make_layer(mode, input_size=16, hidden_size=16, num_layers=2, bidirectional=True).float()
    x = torch.randn(7, 3, 16, generator=_gen(21))
    lengths = torch.tensor([7, 5, 2])

    def run(inputs):
        out, state = layer(pack_padded_sequence(inputs, lengths) if packed else inputs)
        out = pad_packed_sequence(out)[0] if packed else out
        return out, (state if isinstance(state, tuple) else (state,))

    out32, states32 = run(x)
    received = []  # the dtype of proj at each call of the fused op
    fused = torch.ops.aqcf.rnn_sequence
    monkeypatch.setattr(torch.ops.aqcf, "rnn_sequence", lambda proj, *a: received.append(proj.dtype) or fused(proj, *a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, states = run(x)
    reference = torch.nn.LSTM(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert reference(x)[0].dtype == torch.bfloat16  # what a drop-in layer matches
    assert out.dtype == torch.bfloat16 and all(s.dtype == torch.bfloat16 for s in states)
    for got, want in zip((out, *states), (out32, *states32), strict=True):
        assert ((got.float() - want).norm() / want.norm()).item() <= 2e-2
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    stand_in = x.new_empty(1).expand(7, 3, 16 * rnn_cell_ops.GATES[mode])
    expected = [] if packed or not rnn_cell_ops.available(stand_in) else [torch.float32] * 4  # 2 layers x 2 directions
    assert received == expected

"""The fused recurrent op ``aqcf::rnn_sequence`` (csrc/cpu/rnn_cell.cpp) against its composite definition.

The composite cells (:mod:`aqcf_kernels.ops.rnn_cell`) in a Python loop are the reference of the op;
the layers running on the op are held to :mod:`aqcf_kernels.reference`'s per-step layers. Without the
extension (``AQCF_NO_EXTENSION=1``, run in a subprocess) the op is the composite loop and the tests that
need the kernel skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from aqcf_kernels import reference as ref
from aqcf_kernels.ops import rnn_cell as R

from .test_recurrent import _states, make_layer, random_states, reference_forward

pytestmark = pytest.mark.usefixtures("single_threaded")

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64
NATIVE = R.available(torch.empty(0))
needs_kernel = pytest.mark.skipif(not NATIVE, reason="the compiled extension is not loaded")

# (mode, nonlinearity): every cell the op implements
CELLS = [
    ("rnn", "tanh"),
    ("rnn", "relu"),
    ("lstm", "tanh"),
    ("ligru", "relu"),
    ("ligru", "leaky_relu"),
    ("ligru", "tanh"),
]


def _inputs(mode, steps, batch, hidden, dtype=F64, seed=0, scale=1.0, contiguous=True):
    """Fresh random (proj, h0, c0, weight); with ``contiguous=False`` each is a strided view."""
    gen = torch.Generator().manual_seed(seed)
    gates = R.GATES[mode] * hidden

    def rand(*shape):
        t = torch.randn(*shape, generator=gen, dtype=F64) * scale
        if not contiguous:  # the same values, laid out transposed: a non-contiguous view
            t = t.transpose(0, -1).contiguous().transpose(0, -1)
        return t.to(dtype)

    proj = rand(steps, batch, gates)
    h0 = rand(batch, hidden)
    c0 = rand(batch, hidden) if mode == "lstm" else None
    weight = rand(4, gates // 4, hidden // 4) * (2.0 / hidden) ** 0.5
    return proj, h0, c0, weight


def _run(fn, proj, h0, c0, weight, args, grad_seed=1):
    """Forward (output, cells) and the gradients of a random function of them w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (proj, h0, c0, weight)]
    out, cells, _ = fn(*leaves, *args)
    gen = torch.Generator().manual_seed(grad_seed)
    # the same numbers in every dtype: drawn in float64, then cast
    loss = (out * torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype)).sum()
    if cells.numel():
        loss = loss + (cells * torch.randn(cells.shape, generator=gen, dtype=F64).to(out.dtype)).sum()
    wrt = [t for t in leaves if t is not None]
    return [out, cells], list(torch.autograd.grad(loss, wrt))


def _composite(proj, h0, c0, weight, *args):
    return R._composite(proj, h0, c0, weight, *args, keep_saved=True)


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode, nonlinearity", CELLS)
@pytest.mark.parametrize("steps, batch, hidden, contiguous", [(5, 3, 12, True), (1, 1, 4, True), (4, 5, 20, False)])
def test_kernel_matches_composite_float64(mode, nonlinearity, reverse, steps, batch, hidden, contiguous):
    proj, h0, c0, weight = _inputs(mode, steps, batch, hidden, seed=steps + hidden, contiguous=contiguous)
    args = (mode, nonlinearity, 0.2, reverse)
    outs, grads = _run(torch.ops.aqcf.rnn_sequence, proj, h0, c0, weight, args)
    outs_ref, grads_ref = _run(_composite, proj, h0, c0, weight, args)
    for got, want in zip(outs + grads, outs_ref + grads_ref, strict=True):
        assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("mode, nonlinearity", CELLS)
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["unit", "saturating"])
def test_kernel_float32_accuracy(mode, nonlinearity, scale):
    """float32 (the kernel's own exp, tanh, sigmoid) against the float64 composite: within 1e-5 relative
    on unit-scale inputs; with saturated gates (pre-activations ~30) no worse than 2x the composite's own
    float32 error (σ' = σ(1 − σ) loses digits in float32 either way) and finite."""
    proj, h0, c0, weight = _inputs(mode, 6, 4, 16, seed=3, scale=scale)
    args = (mode, nonlinearity, 0.01, False)
    f32 = [t.float() if t is not None else None for t in (proj, h0, c0, weight)]
    outs, grads = _run(torch.ops.aqcf.rnn_sequence, *f32, args)
    outs_f32, grads_f32 = _run(_composite, *f32, args)
    outs_ref, grads_ref = _run(_composite, proj, h0, c0, weight, args)
    for got, composite, want in zip(outs + grads, outs_f32 + grads_f32, outs_ref + grads_ref, strict=True):
        if want.numel():
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            error = (got.double() - want).norm()
            if scale == 1.0:
                assert error <= 1e-5 * want.norm()
            else:
                assert error <= 2 * (composite.double() - want).norm() + 1e-6 * want.norm()


@pytest.mark.parametrize("mode, nonlinearity", CELLS)
def test_gradcheck(mode, nonlinearity):
    """float64 gradcheck of the op (kernel when loaded, else composite) through every input."""
    proj, h0, c0, weight = _inputs(mode, 3, 2, 8, seed=7)
    inputs = [t.requires_grad_() for t in (proj, h0, c0, weight) if t is not None]

    def fn(*ts):
        p, h, *rest = ts
        c, w = (rest[0], rest[1]) if mode == "lstm" else (None, rest[0])
        out, cells, _ = torch.ops.aqcf.rnn_sequence(p, h, c, w, mode, nonlinearity, 0.2, True)
        return (out, cells) if mode == "lstm" else out

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("mode", ["lstm", "ligru"])
def test_double_backward_goes_through_the_composite(mode):
    proj, h0, c0, weight = _inputs(mode, 2, 2, 4, seed=11)
    inputs = [t.requires_grad_() for t in (proj, h0, c0, weight) if t is not None]

    def fn(*ts):
        p, h, *rest = ts
        c, w = (rest[0], rest[1]) if mode == "lstm" else (None, rest[0])
        return torch.ops.aqcf.rnn_sequence(p, h, c, w, mode, "tanh", 0.01, False)[0]

    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("mode, nonlinearity", CELLS[1:4])
def test_opcheck(mode, nonlinearity):
    proj, h0, c0, weight = _inputs(mode, 3, 2, 8, seed=5)
    for t in (proj, h0, c0, weight):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.aqcf.rnn_sequence.default, (proj, h0, c0, weight, mode, nonlinearity, 0.01, False))


@needs_kernel
def test_backward_opcheck():
    proj, h0, c0, weight = _inputs("lstm", 3, 2, 8, seed=5)
    out, cells, saved = torch.ops.aqcf.rnn_sequence(proj, h0, c0, weight, "lstm", "tanh", 0.0, False)
    args = (torch.randn_like(out), torch.randn_like(cells), out, cells, saved, h0, c0, weight)
    torch.library.opcheck(
        torch.ops.aqcf.rnn_sequence_backward.default, (*args, "lstm", "tanh", 0.0, False, [True, True, True, True])
    )


def test_bad_arguments_name_the_problem():
    proj, h0, c0, weight = _inputs("lstm", 2, 2, 8)
    with pytest.raises(ValueError, match="mode"):
        torch.ops.aqcf.rnn_sequence(proj, h0, c0, weight, "gru", "tanh", 0.0, False)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.aqcf.rnn_sequence(proj, h0, c0, weight[:, :, :1], "lstm", "tanh", 0.0, False)
    with pytest.raises(ValueError, match="c0"):
        torch.ops.aqcf.rnn_sequence(proj, h0, None, weight, "lstm", "tanh", 0.0, False)


# ----------------------------------------------------------------------------------- the layers


@needs_kernel
@pytest.mark.parametrize(
    "mode, kwargs",
    [
        ("rnn", {"nonlinearity": "relu", "bidirectional": True}),
        ("lstm", {"num_layers": 2, "bidirectional": True}),
        ("ligru", {"num_layers": 2, "bidirectional": True, "nonlinearity": "leaky_relu"}),
        ("ligru", {"normalization": None, "nonlinearity": "tanh"}),
    ],
)
def test_layers_on_the_kernel_match_reference(mode, kwargs, monkeypatch):
    """The layers (every direction on the op: asserted) against reference.py's per-step layers,
    forward and every gradient, hidden 12 (3 quaternions), batch 3, 5 steps."""
    calls = []
    op = torch.ops.aqcf.rnn_sequence

    def counting(*args):
        calls.append(args[4])
        return op(*args)

    monkeypatch.setattr(torch.ops.aqcf, "rnn_sequence", counting)
    layer = make_layer(mode, input_size=8, hidden_size=12, **kwargs).train()
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    hx = random_states(layer, batch=3)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    hx1 = tuple(s.clone().requires_grad_() for s in _states(hx))
    hx2 = tuple(s.clone().requires_grad_() for s in _states(hx))
    out, h_n = layer(x1, hx1 if mode == "lstm" else hx1[0])
    assert calls == [mode] * layer.num_layers * layer.num_directions
    out_ref, h_ref, c_ref = reference_forward(layer, x2, hx2 if mode == "lstm" else hx2[0])
    assert_close(out, out_ref)
    outs, outs_ref = [out, *_states(h_n)], [out_ref, h_ref] + ([c_ref] if mode == "lstm" else [])
    assert_close(outs[1:], outs_ref[1:])
    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(o.shape, generator=gen, dtype=F64) for o in outs]
    params = list(layer.parameters())
    grads = torch.autograd.grad(outs, [x1, *hx1, *params], weights)
    grads_ref = torch.autograd.grad(outs_ref, [x2, *hx2, *params], weights)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_close(got, want)


def test_composite_cells_are_the_reference_cells():
    """The op's composite loop against reference.py's LSTM layer on the same projection."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 8, generator=gen, dtype=F64)
    w_ih = torch.randn(4, 8, 2, generator=gen, dtype=F64) * 0.5
    w_hh = torch.randn(4, 8, 2, generator=gen, dtype=F64) * 0.5
    h0, c0 = torch.randn(2, 2, 8, generator=gen, dtype=F64)
    out_ref, h_ref, c_ref = ref.quaternion_lstm_layer(x, h0, c0, w_ih, w_hh, reverse=True)
    proj = ref.quaternion_linear_expanded(x, w_ih)
    out, cells, _ = _composite(proj, h0, c0, w_hh, "lstm", "tanh", 0.0, True)
    assert_close(out, out_ref)
    assert_close(cells[0], c_ref)


@pytest.mark.slow
@needs_kernel
def test_compile_ligru_on_the_kernel():
    """A LiGRU layer (its directions on the op) under ``torch.compile(fullgraph=True)``: forward and backward.

    (Without batch norm: the composite norm path does not trace with fullgraph=True today.)"""
    layer = make_layer("ligru", bidirectional=True, normalization=None, nonlinearity="leaky_relu").float()
    x = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(12))
    compiled = torch.compile(layer, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, h_c = compiled(x1)
    out_e, h_e = layer(x2)
    assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    assert_close(h_c, h_e, rtol=1e-5, atol=1e-5)
    (g_c,) = torch.autograd.grad(out_c.square().sum(), x1)
    (g_e,) = torch.autograd.grad(out_e.square().sum(), x2)
    assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("AQCF_NO_EXTENSION") == "1", reason="already the no-extension run")
def test_without_the_extension(without_extension):
    """``AQCF_NO_EXTENSION=1``: the op is the composite loop (opcheck, gradcheck, the layers' tests)."""
    check = (
        "import torch; from aqcf_kernels.ops import rnn_cell as R; "
        "assert not R.available(torch.empty(0)), 'the kernel still serves the op'"
    )
    without_extension(__file__, check=check)

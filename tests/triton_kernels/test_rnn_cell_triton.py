"""The Triton fused recurrence (``aqcf::rnn_sequence`` on backends/triton/rnn_cell.py) against the composite loop.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and these tests force the ``triton`` backend
(``AQCF_BACKEND=triton``), under which ``aqcf::rnn_sequence`` and its backward run the Triton kernels on
CPU tensors; on a GPU they run natively on CUDA tensors. The reference is the op's composite loop
(:func:`aqcf_kernels.ops.rnn_cell._composite`) in float64 on CPU, differentiated by autograd. Shapes are
tiny and odd (hidden 12 = 3 quaternions, batch 3) so the interpreter's 2 x 8 tiles are cut at both
edges; inputs and upstream gradients are fresh random numbers (never zeros). A spy checks that the
kernels actually served.
"""

from __future__ import annotations

import pytest
import torch

from aqcf_kernels.backends.triton import common
from aqcf_kernels.ops import rnn_cell as R

pytestmark = pytest.mark.skipif(common.unavailable() is not None, reason=f"triton: {common.unavailable()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
# (mode, nonlinearity): every cell the op implements
CELLS = [
    ("rnn", "tanh"),
    ("rnn", "relu"),
    ("lstm", "tanh"),
    ("ligru", "relu"),
    ("ligru", "leaky_relu"),
    ("ligru", "tanh"),
]
NAMES = ("output", "cells", "saved", "grad_proj", "grad_h0", "grad_c0", "grad_weight")


@pytest.fixture
def triton_calls(monkeypatch):
    """Force the triton backend and count the Triton forward/backward calls of ``aqcf::rnn_sequence``."""
    from aqcf_kernels.backends.triton import rnn_cell as triton_rnn

    monkeypatch.setenv("AQCF_BACKEND", "triton")
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(triton_rnn, name)

        def spy(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(triton_rnn, name, spy)
    return calls


def _inputs(mode, steps=3, batch=3, hidden=12, seed=0, scale=1.0):
    """Fresh random float64 ``(proj, h0, c0, weight, grad_output, grad_cells)`` on CPU."""
    gen = torch.Generator().manual_seed(seed)
    gates = R.GATES[mode] * hidden

    def rand(*shape, s=scale):
        return torch.randn(*shape, generator=gen, dtype=F64) * s

    proj = rand(steps, batch, gates)
    h0 = rand(batch, hidden)
    c0 = rand(batch, hidden) if mode == "lstm" else None
    weight = rand(4, gates // 4, hidden // 4, s=scale * (2.0 / hidden) ** 0.5)
    grad_output = rand(steps, batch, hidden, s=1.0)
    grad_cells = rand(steps, batch, hidden, s=1.0) if mode == "lstm" else None
    return proj, h0, c0, weight, grad_output, grad_cells


def _run(fn, inputs, args, dtype, device, proj_view=None):
    """``[output, cells, saved, grad_proj, grad_h0, grad_c0, grad_weight]`` of ``fn`` (the op or the composite).

    ``proj_view`` (optional) turns the projection into a non-contiguous view with the same values."""
    proj, h0, c0, weight, go, gc = inputs
    leaves = [
        t.to(device=device, dtype=dtype).requires_grad_() if t is not None else None for t in (proj, h0, c0, weight)
    ]
    p = proj_view(leaves[0]) if proj_view else leaves[0]
    out, cells, saved = fn(p, *leaves[1:], *args)
    outputs, upstream = [out], [go.to(out)]
    if gc is not None:
        outputs.append(cells)
        upstream.append(gc.to(cells))
    wrt = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(outputs, wrt, upstream))
    return [out, cells, saved] + [next(grads) if t is not None else None for t in leaves]


def _composite(proj, h0, c0, weight, *args):
    return R._composite(proj, h0, c0, weight, *args, keep_saved=True)


def _rel(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).norm() / ref.norm()).item()


def _present(results):
    """``(name, tensor)`` of the results the mode has (cells only for the LSTM, saved not for the RNN, ...)."""
    return [(n, t) for n, t in zip(NAMES, results, strict=True) if t is not None and t.numel()]


def _check(got, ref, tol):
    got_present, ref_present = _present(got), _present(ref)
    assert [n for n, _ in got_present] == [n for n, _ in ref_present]
    for (name, g), (_, r) in zip(got_present, ref_present, strict=True):
        assert _rel(g, r) <= tol, f"{name}: relative error {_rel(g, r):.2e} > {tol}"


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode, nonlinearity", CELLS)
def test_float32_matches_composite(triton_calls, mode, nonlinearity, reverse):
    """Forward (output, cells, saved) and the four gradients against the float64 composite: ≤ 1e-5 relative."""
    inputs = _inputs(mode, seed=CELLS.index((mode, nonlinearity)) + 10 * reverse)
    args = (mode, nonlinearity, 0.2, reverse)
    got = _run(torch.ops.aqcf.rnn_sequence, inputs, args, torch.float32, DEVICE)
    assert triton_calls == {"forward": 1, "backward": 1}
    ref = _run(_composite, inputs, args, F64, "cpu")
    assert all(t.dtype == torch.float32 for _, t in _present(got))
    _check(got, ref, 1e-5)


@pytest.mark.parametrize("mode, nonlinearity", [("rnn", "relu"), ("lstm", "tanh"), ("ligru", "leaky_relu")])
def test_float64_matches_composite(triton_calls, mode, nonlinearity):
    """float64 computes in float64 (the slope 0.25 is exact in the float32 scalar the kernel receives)."""
    inputs = _inputs(mode, steps=3, batch=2, hidden=8, seed=20)
    args = (mode, nonlinearity, 0.25, True)
    got = _run(torch.ops.aqcf.rnn_sequence, inputs, args, F64, DEVICE)
    assert triton_calls == {"forward": 1, "backward": 1}
    _check(got, _run(_composite, inputs, args, F64, "cpu"), 1e-12)


@pytest.mark.parametrize("mode, nonlinearity", [("lstm", "tanh"), ("ligru", "leaky_relu")])
def test_gradcheck_float64(triton_calls, mode, nonlinearity):
    proj, h0, c0, weight, _, _ = _inputs(mode, steps=3, batch=2, hidden=8, seed=30)
    inputs = [t.to(DEVICE).requires_grad_() for t in (proj, h0, c0, weight) if t is not None]

    def fn(*ts):
        p, h, *rest = ts
        c, w = (rest[0], rest[1]) if mode == "lstm" else (None, rest[0])
        out, cells, _ = torch.ops.aqcf.rnn_sequence(p, h, c, w, mode, nonlinearity, 0.25, False)
        return (out, cells) if mode == "lstm" else out

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert triton_calls["forward"] > 0 and triton_calls["backward"] > 0


@pytest.mark.parametrize(
    "mode, nonlinearity, dtype",
    [("lstm", "tanh", torch.float16), ("ligru", "relu", torch.float16), ("rnn", "tanh", torch.bfloat16)],
)
def test_half_precision_within_twice_the_composite_error(triton_calls, mode, nonlinearity, dtype):
    """fp16/bf16 in and out, float32 inside the cell: at most 2x the composite loop's error in the same dtype.

    Under the interpreter bf16 gets 4x: the interpreter converts float32 to bfloat16 by truncating the
    mantissa (measured: 1.9x the error of torch's round-to-nearest cast; fp16 rounds correctly), while the
    GPU's ``cvt.rn.bf16.f32`` rounds to nearest. Measured here over 6 seeds, the Triton/composite error
    ratios in bf16: RNN 1.0-3.1 (every output 1.4-1.5), LSTM 0.7-1.8."""
    inputs = _inputs(mode, seed=40)
    args = (mode, nonlinearity, 0.01, False)
    got = _run(torch.ops.aqcf.rnn_sequence, inputs, args, dtype, DEVICE)
    assert triton_calls == {"forward": 1, "backward": 1}
    composite = _run(_composite, inputs, args, dtype, "cpu")
    ref = _run(_composite, inputs, args, F64, "cpu")
    factor = 4 if dtype == torch.bfloat16 and common.INTERPRET else 2
    for (name, g), (_, c), (_, r) in zip(_present(got), _present(composite), _present(ref), strict=True):
        assert g.dtype == dtype, name
        bound = max(factor * _rel(c, r), 2e-3)
        assert _rel(g, r) <= bound, f"{name}: {_rel(g, r):.2e} vs composite {_rel(c, r):.2e}"


@pytest.mark.parametrize(
    "view",
    [
        lambda p: p.transpose(0, 1).contiguous().transpose(0, 1),  # batch-major: strides (G·H, T·G·H, 1)
        lambda p: torch.cat([p, -p], -1)[..., : p.shape[-1]],  # a slice of a wider row
        lambda p: torch.stack([p, -p], -1)[..., 0],  # every other element: stride 2 along the gates
    ],
    ids=["batch_major", "sliced", "strided"],
)
def test_non_contiguous_projection(triton_calls, view):
    """A strided projection is read through its strides (no copy): the same numbers as a contiguous one."""
    inputs = _inputs("lstm", seed=50)
    args = ("lstm", "tanh", 0.0, False)
    assert not view(inputs[0]).is_contiguous()
    got = _run(torch.ops.aqcf.rnn_sequence, inputs, args, torch.float32, DEVICE, proj_view=view)
    want = _run(torch.ops.aqcf.rnn_sequence, inputs, args, torch.float32, DEVICE)
    assert triton_calls == {"forward": 2, "backward": 2}
    for (name, g), (_, w) in zip(_present(got), _present(want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["lstm", "ligru"])
def test_backward_honours_needs_and_missing_upstream_gradients(triton_calls, mode):
    """The backward op on its own: ``needs`` leaves fresh empty tensors; no grad_output (only cells for the
    LSTM; for the LiGRU an all-zero grad_output is the reference) is a gradient of zero there."""
    proj, h0, c0, weight, go, gc = (t.to(DEVICE) if t is not None else None for t in _inputs(mode, seed=60))
    args = (mode, "relu", 0.0, True)
    out, cells, saved = torch.ops.aqcf.rnn_sequence(proj, h0, c0, weight, *args)
    full = torch.ops.aqcf.rnn_sequence_backward(go, gc, out, cells, saved, h0, c0, weight, *args, [True] * 4)
    only_weight = torch.ops.aqcf.rnn_sequence_backward(
        go, gc, out, cells, saved, h0, c0, weight, *args, [False, False, False, True]
    )
    assert [t.numel() for t in only_weight[:3]] == [0, 0, 0]
    torch.testing.assert_close(only_weight[3], full[3], rtol=0, atol=0)
    upstream = gc if mode == "lstm" else None
    partial = torch.ops.aqcf.rnn_sequence_backward(None, upstream, out, cells, saved, h0, c0, weight, *args, [True] * 4)
    leaves = [t.detach().cpu().requires_grad_() if t is not None else None for t in (proj, h0, c0, weight)]
    ref_out, ref_cells, _ = _composite(*leaves, *args)
    wrt = [t for t in leaves if t is not None]
    if mode == "lstm":
        found = iter(torch.autograd.grad([ref_cells], wrt, [gc.cpu()]))
    else:
        found = iter(torch.autograd.grad([ref_out], wrt, [torch.zeros_like(ref_out)]))
    ref = [next(found) if t is not None else None for t in leaves]
    for name, g, r in zip(NAMES[3:], partial, ref, strict=True):
        if r is None:
            assert g.numel() == 0, name
        elif mode == "lstm":
            assert _rel(g, r) <= 1e-12, name
        else:
            assert not g.any(), name
    assert triton_calls["backward"] == 3


def test_empty_sequence(triton_calls):
    proj, h0, c0, weight, _, _ = (t.to(DEVICE) if t is not None else None for t in _inputs("lstm", steps=0))
    out, cells, saved = torch.ops.aqcf.rnn_sequence(proj, h0, c0, weight, "lstm", "tanh", 0.0, False)
    assert out.shape == cells.shape == (0, 3, 12) and saved.shape == (0, 3, 48)
    grads = torch.ops.aqcf.rnn_sequence_backward(
        out, cells, out, cells, saved, h0, c0, weight, "lstm", "tanh", 0.0, False, [True] * 4
    )
    assert grads[0].shape == (0, 3, 48) and not grads[1].any() and not grads[2].any() and not grads[3].any()
    assert grads[3].shape == weight.shape
    assert triton_calls == {"forward": 1, "backward": 1}


def test_opcheck(triton_calls):
    """The fake (meta) implementations agree with the Triton path, forward and backward op."""
    proj, h0, c0, weight, go, gc = (t.to(DEVICE).float() if t is not None else None for t in _inputs("lstm", 3, 2, 8))
    args = ("lstm", "tanh", 0.0, False)
    leaves = [t.clone().requires_grad_() for t in (proj, h0, c0, weight)]
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.aqcf.rnn_sequence.default, (*leaves, *args), test_utils=utils)
    out, cells, saved = torch.ops.aqcf.rnn_sequence(proj, h0, c0, weight, *args)
    torch.library.opcheck(
        torch.ops.aqcf.rnn_sequence_backward.default,
        (go, gc, out, cells, saved, h0, c0, weight, *args, [True, False, True, True]),
        test_utils=("test_schema", "test_faketensor"),
    )
    assert triton_calls["forward"] > 0 and triton_calls["backward"] > 0


def test_cpu_tensors_go_to_the_compiled_kernel_unless_triton_is_forced(monkeypatch):
    proj, h0, c0, weight, _, _ = (t.float() if t is not None else None for t in _inputs("lstm"))
    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    assert not R._triton_serves(proj, h0, c0, weight)
    monkeypatch.setenv("AQCF_BACKEND", "triton")
    assert R._triton_serves(proj, h0, c0, weight) == common.INTERPRET
    assert not R._triton_serves(proj, h0.double(), c0, weight)  # mixed dtypes: not the kernels
    assert not R._triton_serves(proj.int(), h0.int(), c0.int(), weight.int())


@pytest.mark.parametrize("mode", ["rnn", "lstm"])
def test_a_step_beyond_32_bit_offsets_is_left_to_the_composite_loop(monkeypatch, mode):
    """The kernels index a step (batch x gates values) in int32: a sequence whose step reaches 2**31 values is
    not theirs (it raised a ValueError in the kernels' launcher), forward or backward; one value fewer is."""
    from aqcf_kernels.backends.triton import rnn_cell as triton_rnn

    monkeypatch.setenv("AQCF_BACKEND", "triton")
    gates = triton_rnn.GATES[mode]
    for batch, hidden, served in ((2**31 // (4 * gates), 4, False), (2**31 // (4 * gates) - 1, 4, True)):
        meta = {"device": "meta", "dtype": torch.float32}
        proj = torch.empty(2, batch, gates * hidden, **meta)
        output = torch.empty(2, batch, hidden, **meta)
        saved = torch.empty(2, batch, gates * hidden, **meta) if mode != "rnn" else None
        h0 = torch.empty(batch, hidden, **meta)
        c0 = h0 if mode == "lstm" else None
        weight = torch.empty(hidden // 4, hidden, **meta)
        assert triton_rnn.serves(proj, h0, c0, weight) == served, (batch, "forward")
        assert triton_rnn.serves(output, saved, h0, c0, weight) == served, (batch, "backward")
    with pytest.raises(ValueError, match="32-bit offsets"):  # a direct call of the kernels still says why
        triton_rnn._check(mode, "tanh", 4, 2**31 // (4 * gates), 4 * gates)


def test_layer_runs_its_directions_on_the_kernels(triton_calls, monkeypatch):
    """A bidirectional QuaternionLiGRU (leaky ReLU, no norm) with the triton backend forced: both directions on
    the Triton recurrence, output, final state and every gradient as the same layer without forcing."""
    from aqcf_kernels.nn import QuaternionLiGRU

    layer = QuaternionLiGRU(8, 8, bidirectional=True, normalization=None, nonlinearity="leaky_relu").to(DEVICE)
    gen = torch.Generator().manual_seed(70)
    x, grad = torch.randn(2, 3, 3, 8, generator=gen)
    grad = torch.cat([grad, -grad], -1)

    def run():
        xx = x.to(DEVICE).requires_grad_()
        out, h_n = layer(xx)
        return [out, h_n, *torch.autograd.grad(out, [xx, *layer.parameters()], grad.to(DEVICE))]

    got = run()
    assert triton_calls == {"forward": 2, "backward": 2}
    monkeypatch.delenv("AQCF_BACKEND")
    want = run()
    assert triton_calls == {"forward": 2 * (DEVICE == "cuda") + 2, "backward": 2 * (DEVICE == "cuda") + 2}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_under_autocast_a_layer_runs_the_kernels_in_the_autocast_dtype(triton_calls, monkeypatch):
    """Under bf16 autocast a QuaternionLSTM's recurrence is one fused op in bfloat16 where the Triton kernels
    serve that dtype (the CUDA rule; forced here on CPU): output and states bfloat16, as torch.nn.LSTM's, values
    the float32 layer's within bf16 rounding, gradients reaching every parameter in float32."""
    from aqcf_kernels.backends.triton import rnn_cell as triton_rnn
    from aqcf_kernels.nn import QuaternionLSTM

    layer = QuaternionLSTM(8, 12).to(DEVICE)
    x = torch.randn(3, 3, 8, generator=torch.Generator().manual_seed(71)).to(DEVICE)
    with torch.no_grad():
        want, (h_want, c_want) = layer(x)
    received = []
    spied = triton_rnn.forward  # the fixture's counting spy
    monkeypatch.setattr(triton_rnn, "forward", lambda proj, *a: received.append(proj.dtype) or spied(proj, *a))
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out, (h, c) = layer(x)
    assert received == [torch.bfloat16]
    for got, ref in ((out, want), (h, h_want), (c, c_want)):
        assert got.dtype == torch.bfloat16
        assert ((got.float() - ref).norm() / ref.norm()).item() <= 2e-2
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert triton_calls["backward"] == 1

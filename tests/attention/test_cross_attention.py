"""``aqcf.cross_attention`` / ``aqcf.gated_residual`` on the ``torch`` backend, against ``aqcf_kernels.reference``.

Forward, log-sum-exp and all six gradients in float64 (N_a ≠ N_b, pooled k/v counts, several head
counts and head sizes); gradcheck of the public functions; float32 within the contract's 1e-5 of the
float64 reference; fp16/bf16 within 2x the error of the materialised reference run in the same dtype
(FlashAttention's rule); opcheck; torch.compile; non-contiguous inputs; an output left out of the loss;
the generic chunked path (what non-CPU devices without triton run) with several chunks; argument errors
and backend selection.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _threads import intra_op_threads
from torch.autograd import gradcheck, gradgradcheck

import aqcf_kernels
from aqcf_kernels import backends, reference
from aqcf_kernels import functional as QF
from aqcf_kernels.backends import BackendError, registered
from aqcf_kernels.backends.torch import attention as TA
from aqcf_kernels.ops import attention as attention_ops

from ._util import (
    ATTN_NAMES,
    attention_inputs,
    output_grads,
    rand,
    reference_attention,
    reference_lse,
    rel,
    run_attention,
)


@pytest.fixture(autouse=True)
def force_torch(monkeypatch):
    """The torch backend (a test may override AQCF_BACKEND or push ``backends.use``)."""
    monkeypatch.setenv("AQCF_BACKEND", "torch")


def _op(*inputs):
    """The raw op with the public default scale; returns all four outputs."""
    return torch.ops.aqcf.cross_attention(*inputs, inputs[0].shape[-1] ** -0.5)


# (B, H, N_qa, N_ka, N_qb, N_kb, E): keys/values of stream a have N_ka tokens, of b N_kb.
CASES = [
    (2, 1, 7, 7, 13, 13, 4),  # N_a ≠ N_b, unpooled
    (1, 3, 9, 4, 5, 6, 12),  # pooled k/v: counts differ from the same stream's queries
    (3, 2, 17, 5, 1, 3, 20),  # a single query in b, E not a multiple of 8
]
IDS = ["Na!=Nb-E4", "pooled-E12", "one-query-E20"]


@pytest.mark.parametrize(
    ("case", "chunks"),
    [((1, 1, 12, 5, 9, 7, 8), (4, 3)), ((1, 1, 7, 5, 5, 3, 4), (1, 1))],
    ids=["divisible", "prime-counts"],
)
def test_one_head_backward_runs_query_chunks_and_matches_reference_float64(case, chunks):
    """With fewer (batch, head) pairs than threads, the CPU backward cuts the queries into chunks run as
    extra heads and adds their dK, dV: same gradients (a query count with no divisor runs whole)."""
    with intra_op_threads(2):
        assert (TA.query_chunks(1, case[2]), TA.query_chunks(1, case[4])) == chunks
        assert TA.query_chunks(2, 12) == 1
        inputs = attention_inputs(*case, seed=5)
        grads = output_grads(inputs, seed=6)
        ref = run_attention(reference_attention, inputs, torch.float64, grads)
        got = run_attention(_op, inputs, torch.float64, grads)
    for name, o, r in zip(ATTN_NAMES, got, ref, strict=True):
        assert rel(o, r) <= 1e-12, f"{name}: relative error {rel(o, r):.2e}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_op_forward_lse_and_grads_float64(case):
    inputs = attention_inputs(*case, seed=sum(case))
    grads = output_grads(inputs, seed=3)
    ref = run_attention(reference_attention, inputs, torch.float64, grads)
    got = run_attention(_op, inputs, torch.float64, grads)
    for name, o, r in zip(ATTN_NAMES, got, ref, strict=True):
        assert o.dtype == torch.float64
        assert rel(o, r) <= 1e-12, f"{name}: relative error {rel(o, r):.2e}"
    _, _, lse_a, lse_b = _op(*inputs)
    for name, o, r in zip(("lse_a", "lse_b"), (lse_a, lse_b), reference_lse(inputs), strict=True):
        assert o.shape == r.shape and o.dtype == torch.float64
        assert rel(o, r) <= 1e-12, f"{name}: relative error {rel(o, r):.2e}"


def test_gradcheck_cross_attention_float64(single_threaded):
    ins = [t.requires_grad_() for t in attention_inputs(1, 2, 3, 2, 4, 3, 4, seed=5)]
    assert gradcheck(lambda *a: QF.cross_attention(*a), ins)
    assert gradcheck(lambda *a: QF.cross_attention(*a, scale=0.37), ins)


@pytest.mark.parametrize("gate_shape", [(2, 8, 5), (2, 8, 1), (8, 1)], ids=["token", "channel", "no-batch"])
def test_gradcheck_gated_residual_float64(gate_shape, single_threaded):
    f, o = rand(2, 8, 5, seed=1).requires_grad_(), rand(2, 8, 5, seed=2).requires_grad_()
    g = rand(*gate_shape, seed=3).requires_grad_()
    alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert gradcheck(QF.gated_residual, (f, o, g, alpha))


def _check_second_order(fn, inputs) -> None:
    """gradgradcheck of ``fn``, and its gradients under create_graph=True (the composite path) equal to the
    plain backward's: gradgradcheck differentiates the create_graph gradient numerically, so a wrong but
    smooth one would pass it alone."""
    assert gradgradcheck(fn, inputs)
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads_out = [rand(*o.shape, seed=40 + i) for i, o in enumerate(outs)]
    plain = torch.autograd.grad(outs, inputs, grads_out, retain_graph=True)
    differentiable = torch.autograd.grad(outs, inputs, grads_out, create_graph=True)
    for i, (d, p) in enumerate(zip(differentiable, plain, strict=True)):
        assert rel(d, p) <= 1e-12, f"input {i}: {rel(d, p):.2e}"


@pytest.mark.parametrize("aliased", [False, True], ids=["distinct", "k-is-v"])
def test_gradgradcheck_cross_attention_float64(aliased, single_threaded):
    """Double backward: the backward under create_graph=True differentiates the composite attention. With
    one tensor passed as both keys and values of a stream, each argument keeps its own gradient."""
    q_a, k_a, v_a, q_b, k_b, v_b = (t.requires_grad_() for t in attention_inputs(1, 2, 3, 2, 4, 3, 4, seed=6))
    if aliased:
        _check_second_order(lambda q_a, kv_a, q_b, kv_b: QF.cross_attention(q_a, kv_a, kv_a, q_b, kv_b, kv_b),
                            (q_a, k_a, q_b, k_b))  # fmt: skip
    else:
        _check_second_order(lambda *a: QF.cross_attention(*a, scale=0.37), (q_a, k_a, v_a, q_b, k_b, v_b))


@pytest.mark.parametrize("gate_shape", [(2, 8, 5), (2, 8, 1)], ids=["token", "channel"])
def test_gradgradcheck_gated_residual_float64(gate_shape, single_threaded):
    f, o = rand(2, 8, 5, seed=1).requires_grad_(), rand(2, 8, 5, seed=2).requires_grad_()
    g = rand(*gate_shape, seed=3).requires_grad_()
    alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    _check_second_order(QF.gated_residual, (f, o, g, alpha))
    _check_second_order(lambda f, alpha: QF.gated_residual(f, f, f, alpha), (f, alpha))  # one tensor, three roles


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_second_derivative_in_low_precision_within_contract(dtype, bound):
    """A Hessian-vector product through the attention in float32 / fp16 / bf16: float32 within the contract's
    1e-5 of float64; the composite computes half-precision scores in float32, so fp16 and bf16 stay within
    a few of their ulps (2.5 bf16 ulps; measured 2.5-4.1e-3 bf16, 2.8-5.0e-4 fp16) of the float64
    computation on the same rounded inputs."""
    exact_inputs = attention_inputs(2, 2, 9, 5, 7, 4, 8, seed=8)
    v_dir = [rand(*t.shape, seed=30 + i) for i, t in enumerate(exact_inputs)]

    def hvp(inputs, direction):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        out_a, out_b = QF.cross_attention(*inputs)
        grads = torch.autograd.grad(out_a.square().sum() + out_b.square().sum(), inputs, create_graph=True)
        dot = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
        return [h.double() for h in torch.autograd.grad(dot, inputs)]

    exact = hvp(exact_inputs, v_dir)
    got = hvp([t.to(dtype) for t in exact_inputs], [d.to(dtype) for d in v_dir])
    rounded = hvp([t.to(dtype).double() for t in exact_inputs], [d.to(dtype).double() for d in v_dir])
    for i, (g, r, e) in enumerate(zip(got, rounded, exact, strict=True)):
        against = e if dtype == torch.float32 else r
        assert rel(g, against) <= bound, f"input {i}: {rel(g, against):.2e}"


@pytest.mark.parametrize("gate_shape", [(3, 12, 37), (3, 12, 1)], ids=["token", "channel"])
def test_gated_residual_matches_reference_float64(gate_shape):
    args = [rand(3, 12, 37, seed=1), rand(3, 12, 37, seed=2), rand(*gate_shape, seed=3), rand(1, seed=4)[0]]
    gy = rand(3, 12, 37, seed=5)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in args]
        y = fn(*leaves)
        (y * gy).sum().backward()
        return [y.detach()] + [t.grad for t in leaves]

    got, ref = run(QF.gated_residual), run(reference.gated_residual)
    for name, o, r in zip(("y", "df", "do", "dg", "dalpha"), got, ref, strict=True):
        assert o.shape == r.shape, name
        assert rel(o, r) <= 1e-13, f"{name}: {rel(o, r):.2e}"


@pytest.mark.parametrize(
    "case", [(2, 4, 150, 150, 97, 97, 16), (1, 3, 130, 29, 70, 41, 12)], ids=["unpooled-E16", "pooled-E12"]
)
def test_float32_within_contract(case):
    inputs = attention_inputs(*case, seed=11)
    grads = output_grads(inputs, seed=12)
    ref = run_attention(reference_attention, inputs, torch.float64, grads)
    got = run_attention(_op, inputs, torch.float32, grads)
    # Contract: ≤ 1e-5 relative to the float64 reference (measured here: ~3e-7).
    for name, o, r in zip(ATTN_NAMES, got, ref, strict=True):
        assert o.dtype == torch.float32
        assert rel(o, r) <= 1e-5, f"{name}: relative error {rel(o, r):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [(2, 2, 37, 37, 70, 70, 12), (1, 3, 45, 9, 20, 6, 20)], ids=["Na!=Nb", "pooled"])
def test_half_within_twice_materialised_reference(case, dtype):
    inputs = attention_inputs(*case, seed=21)
    grads = output_grads(inputs, seed=22)
    ref = run_attention(reference_attention, inputs, torch.float64, grads)
    baseline = run_attention(reference_attention, inputs, dtype, grads)
    got = run_attention(_op, inputs, dtype, grads)
    for name, o, e, r in zip(ATTN_NAMES, got, baseline, ref, strict=True):
        assert o.dtype == dtype
        assert rel(o, r) <= 2 * rel(e, r), f"{name}: {rel(o, r):.2e} vs materialised {dtype}: {rel(e, r):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("in_float32", [False, True], ids=["in-dtype", "in-float32"])
@pytest.mark.parametrize(
    "shape", [(2, 2, 37, 70, 12), (1, 3, 45, 6, 20), (1, 1, 300, 129, 8)], ids=["E12", "pooled-E20", "E8"]
)
def test_both_cpu_half_routes_within_twice_materialised_reference(shape, in_float32, dtype):
    """Either route 'auto' may measure faster for a half-precision CPU forward (the kernel in the dtype, or in float32
    with the output rounded once) meets the contract: the output and the log-sum-exp within 2x the materialised
    attention's error in the dtype."""
    b, h, n_q, n_k, e = shape
    q, k, v = (rand(b, h, n, e, seed=40 + i) for i, n in enumerate((n_q, n_k, n_k)))
    scale = e**-0.5
    ref = reference.attention(q, k, v, scale)
    rounded = [t.to(dtype) for t in (q, k, v)]
    baseline = reference.attention(*rounded, scale)
    got = TA._cpu_flash_forward(*rounded, scale, in_float32=in_float32)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, o, e_, r in zip(("out", "lse"), got, baseline, ref, strict=True):
        assert rel(o, r) <= 2 * rel(e_, r), f"{name}: {rel(o, r):.2e} vs materialised {dtype}: {rel(e_, r):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(dtype, single_threaded):
    ins = [t.to(dtype).requires_grad_() for t in attention_inputs(2, 3, 5, 3, 7, 4, 8, seed=31)]
    torch.library.opcheck(torch.ops.aqcf.cross_attention, (*ins, 0.3))
    with torch.no_grad():
        out_a, out_b, lse_a, lse_b = torch.ops.aqcf.cross_attention(*ins, 0.3)
    ga, gb = (t.to(dtype) for t in output_grads(ins, seed=32))
    plain = [t.detach() for t in ins]
    torch.library.opcheck(torch.ops.aqcf.cross_attention_backward, (ga, gb, *plain, out_a, out_b, lse_a, lse_b, 0.3))
    f, o = rand(2, 8, 5, seed=33, dtype=dtype), rand(2, 8, 5, seed=34, dtype=dtype)
    for g in (rand(2, 8, 5, seed=35, dtype=dtype), rand(2, 8, 1, seed=36, dtype=dtype)):
        alpha = torch.tensor(-0.6, dtype=dtype)
        leaves = [t.clone().requires_grad_() for t in (f, o, g, alpha)]
        torch.library.opcheck(torch.ops.aqcf.gated_residual, leaves)
        torch.library.opcheck(
            torch.ops.aqcf.gated_residual_backward, (rand(2, 8, 5, seed=37, dtype=dtype), o, g, alpha)
        )


def test_torch_compile_fullgraph_matches_eager():
    inputs = [t.float() for t in attention_inputs(2, 2, 5, 3, 7, 4, 8, seed=41)]
    gate = rand(2, 2, 5, 1, seed=42, dtype=torch.float32)

    def fn(q_a, k_a, v_a, q_b, k_b, v_b, alpha):
        out_a, out_b = QF.cross_attention(q_a, k_a, v_a, q_b, k_b, v_b)
        y = QF.gated_residual(q_a, out_a, gate, alpha)
        return y.sin().sum() + (out_b * out_b).sum()

    def run(f):
        leaves = [t.detach().clone().requires_grad_() for t in inputs] + [torch.tensor(0.7, requires_grad=True)]
        loss = f(*leaves)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    torch._dynamo.reset()
    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True))
    for name, c, e in zip(["loss", "q_a", "k_a", "v_a", "q_b", "k_b", "v_b", "alpha"], compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)


def _check_views(views, sources, seed):
    """Run the op on views of fresh leaves and the reference on contiguous copies; compare outputs and
    the leaves' gradients."""
    gy = None

    def run(fn, contiguous):
        nonlocal gy
        leaves = [s.clone().requires_grad_() for s in sources]
        args = [v(t) for v, t in zip(views, leaves, strict=True)]
        if contiguous:
            args = [a.contiguous() for a in args]
        out_a, out_b = fn(*args)
        if gy is None:
            gy = rand(*out_a.shape, seed=seed), rand(*out_b.shape, seed=seed + 1)
        ((out_a * gy[0]).sum() + (out_b * gy[1]).sum()).backward()
        return [out_a.detach(), out_b.detach()] + [t.grad for t in leaves]

    ref, got = run(reference_attention, True), run(QF.cross_attention, False)
    names = ["out_a", "out_b", "src q_a", "src k_a", "src v_a", "src q_b", "src k_b", "src v_b"]
    for name, o, r in zip(names, got, ref, strict=True):
        assert rel(o, r) <= 1e-12, f"{name}: {rel(o, r):.2e}"


def test_non_contiguous_inputs():
    """q_a as the transpose of a (B, N, H, E) tensor; k_b/v_b as batch-1 streams broadcast with stride 0
    (what the block does with a shared stream); q_b a token slice."""
    b, h, e = 2, 3, 8
    sources = [
        rand(b, 9, h, e, seed=51),
        rand(b, h, 4, e, seed=52),
        rand(b, h, 4, e, seed=53),
        rand(b, h, 13, e, seed=54),
        rand(1, h, 5, e, seed=55),
        rand(1, h, 5, e, seed=56),
    ]
    views = [
        lambda t: t.transpose(1, 2),
        lambda t: t,
        lambda t: t,
        lambda t: t[:, :, 1::2],
        lambda t: t.expand(b, -1, -1, -1),
        lambda t: t.expand(b, -1, -1, -1),
    ]
    _check_views(views, sources, seed=57)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_inputs_with_strided_last_dim(which):
    """Views whose head dim is not unit-stride (a slice ``t[..., ::2]`` of a wider tensor)."""
    b, h, e = 2, 2, 8
    shapes = [(b, h, 7, e), (b, h, 4, e), (b, h, 4, e), (b, h, 5, e), (b, h, 6, e), (b, h, 6, e)]
    strided = {"q": (0, 3), "k": (1, 4), "v": (2, 5)}[which]
    sources, views = [], []
    for i, s in enumerate(shapes):
        if i in strided:
            sources.append(rand(*s[:-1], 2 * e, seed=60 + i))
            views.append(lambda t: t[..., 1::2])
        else:
            sources.append(rand(*s, seed=60 + i))
            views.append(lambda t: t)
    _check_views(views, sources, seed=67)


@pytest.mark.parametrize("used", ["a", "b"])
def test_output_left_out_of_loss(used):
    inputs = attention_inputs(2, 2, 7, 5, 11, 3, 12, seed=61)
    grads = output_grads(inputs, seed=62)
    ref = run_attention(reference_attention, inputs, torch.float64, grads, use=(used,))
    got = run_attention(QF.cross_attention, inputs, torch.float64, grads, use=(used,))
    for name, o, r in zip(ATTN_NAMES[2:], got[2:], ref[2:], strict=True):
        if r is None:  # this input only feeds the unused output: its gradient is zero
            assert o is None or torch.count_nonzero(o) == 0, f"{name} should be zero"
        else:
            assert rel(o, r) <= 1e-12, f"{name}: {rel(o, r):.2e}"
    # the leaves of the unused direction really were unused (so the branch above was taken)
    assert sum(r is None for r in ref[2:]) == 3


# ---------------------------------------------------------------------------------------------
# The generic chunked path (non-CPU devices without triton), run on CPU with small chunks.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=["fp64", "fp32", "fp16"])
def test_chunked_attention_several_chunks(dtype, monkeypatch):
    monkeypatch.setattr(TA, "CHUNK_ROWS", 4)  # 11 query rows: chunks of 4, 4 and a partial 3
    q, k, v = rand(2, 3, 11, 12, seed=71), rand(2, 3, 6, 12, seed=72), rand(2, 3, 6, 12, seed=73)
    gy = rand(2, 3, 11, 12, seed=74)
    scale = 0.29

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*leaves, scale)
    (ref_out * gy).sum().backward()
    ref = [ref_out.detach(), ref_lse.detach()] + [t.grad for t in leaves]

    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    out, lse = TA.chunked_attention_forward(qc, kc, vc, scale)
    assert out.dtype == dtype and lse.dtype == TA.lse_dtype(dtype)
    dq, dk, dv = TA.chunked_attention_backward(gy.to(dtype), qc, kc, vc, out, lse, scale)
    got = [out, lse, dq, dk, dv]
    if dtype == torch.float64:
        tols = [1e-12] * 5
    elif dtype == torch.float32:
        tols = [1e-5] * 5  # the contract
    else:  # 2x the materialised reference in fp16
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        b_out, b_lse = reference.attention(*leaves, scale)
        (b_out * gy.to(dtype)).sum().backward()
        tols = [2 * rel(e, r) for e, r in zip([b_out, b_lse] + [t.grad for t in leaves], ref, strict=True)]
    for name, o, r, tol in zip(["out", "lse", "dq", "dk", "dv"], got, ref, tols, strict=True):
        assert o.shape == r.shape
        assert rel(o, r) <= tol, f"{name}: {rel(o, r):.2e} > {tol:.2e}"


def test_torch_backend_generic_path_through_the_op(monkeypatch, single_threaded):
    """The op on the chunked path end to end (no fused kernel serves, as on devices PyTorch has none
    for): forward, grads, gradcheck; every call reaches it (nothing is served natively instead)."""
    monkeypatch.setattr(TA, "CHUNK_ROWS", 3)
    monkeypatch.setattr(TA.TorchAttentionBackend, "kernel", lambda self, q, k, v: None)
    calls = []
    chunked_forward, chunked_backward = TA.chunked_attention_forward, TA.chunked_attention_backward

    def fwd(*a):
        calls.append("fwd")
        return chunked_forward(*a)

    def bwd(*a):
        calls.append("bwd")
        return chunked_backward(*a)

    monkeypatch.setattr(TA, "chunked_attention_forward", fwd)
    monkeypatch.setattr(TA, "chunked_attention_backward", bwd)
    inputs = attention_inputs(2, 2, 8, 5, 7, 4, 12, seed=81)
    grads = output_grads(inputs, seed=82)
    ref = run_attention(reference_attention, inputs, torch.float64, grads)
    got = run_attention(_op, inputs, torch.float64, grads)
    for name, o, r in zip(ATTN_NAMES, got, ref, strict=True):
        assert rel(o, r) <= 1e-12, f"{name}: {rel(o, r):.2e}"
    assert calls.count("fwd") == 2 and calls.count("bwd") == 2
    small = [t.requires_grad_() for t in attention_inputs(1, 1, 4, 3, 5, 2, 4, seed=83)]
    assert gradcheck(lambda *a: QF.cross_attention(*a), small)


# ---------------------------------------------------------------------------------------------
# Argument errors of the public functions
# ---------------------------------------------------------------------------------------------


def _good():
    return attention_inputs(2, 2, 5, 3, 4, 6, 8, seed=91)


@pytest.mark.parametrize(
    "index, make, match",
    [
        (0, lambda t: t[0], r"q_a must be \(batch, heads, tokens, head_dim\)"),
        (4, lambda t: t.unsqueeze(0), r"k_b must be \(batch, heads, tokens, head_dim\)"),
        (2, lambda t: t[..., :4], r"v_a has shape \(2, 2, 3, 4\).*head_dim"),
        (3, lambda t: t[:, :1], r"q_b has shape \(2, 1, 4, 8\).*heads"),
        (5, lambda t: t[:1], r"v_b has shape \(1, 2, 6, 8\).*batch"),
        (5, lambda t: t[:, :, :5], r"k_b has 6 tokens but v_b has 5"),
        (1, lambda t: t[:, :, :2], r"k_a has 2 tokens but v_a has 3"),
        (3, lambda t: t[:, :, :0], r"q_b has no tokens"),
        (1, lambda t: t[:, :, :0], r"k_a has no tokens"),
        (0, lambda t: t[:, :, :0], r"q_a has no tokens"),
        (2, lambda t: t.float(), r"v_a is torch.float32 on cpu but q_a is torch.float64"),
        (4, lambda t: t.to("meta"), r"k_b is torch.float64 on meta but q_a is torch.float64 on cpu"),
    ],
    ids=[
        "rank-3",
        "rank-5",
        "head-dim",
        "heads",
        "batch",
        "kv-tokens-b",
        "kv-tokens-a",
        "empty-q",
        "empty-k",
        "empty-q_a",
        "dtype",
        "device",
    ],
)
def test_cross_attention_errors(index, make, match):
    args = _good()
    args[index] = make(args[index])
    with pytest.raises(ValueError, match=match):
        QF.cross_attention(*args)


def test_cross_attention_rejects_integer_tensors():
    args = [t.long() for t in _good()]
    with pytest.raises(TypeError, match="q_a must be floating point"):
        QF.cross_attention(*args)
    args = _good()
    args[1] = args[1].long()
    with pytest.raises(TypeError, match="k_a must be floating point, got torch.int64"):
        QF.cross_attention(*args)


def test_cross_attention_rejects_non_tensors():
    args = _good()
    args[2] = args[2].numpy()
    with pytest.raises(TypeError, match="v_a must be a Tensor, got ndarray"):
        QF.cross_attention(*args)


@pytest.mark.parametrize(
    "f_shape, o_shape, g_shape, alpha_shape, match",
    [
        ((2, 8, 5), (2, 8, 4), (2, 8, 5), (), r"f \(2, 8, 5\) and o \(2, 8, 4\) must have the same shape"),
        ((2, 8, 5), (2, 8, 5), (2, 8, 3), (), r"gate_logits \(2, 8, 3\) must broadcast to f \(2, 8, 5\)"),
        ((2, 8, 5), (2, 8, 5), (1, 2, 8, 5), (), r"gate_logits \(1, 2, 8, 5\) must broadcast"),
        ((2, 8, 5), (2, 8, 5), (2, 8, 1), (2,), r"alpha must hold one value, got shape \(2,\)"),
    ],
    ids=["o-shape", "gate-shape", "gate-rank", "alpha"],
)
def test_gated_residual_shape_errors(f_shape, o_shape, g_shape, alpha_shape, match):
    f, o, g = rand(*f_shape, seed=1), rand(*o_shape, seed=2), rand(*g_shape, seed=3)
    alpha = rand(*alpha_shape, seed=4) if alpha_shape else torch.tensor(0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        QF.gated_residual(f, o, g, alpha)


@pytest.mark.parametrize("which", [1, 2, 3], ids=["o", "gate_logits", "alpha"])
def test_gated_residual_dtype_error(which):
    args = [rand(2, 8, 5, seed=1), rand(2, 8, 5, seed=2), rand(2, 8, 1, seed=3), torch.tensor(0.5, dtype=torch.float64)]
    args[which] = args[which].float()
    name = ["f", "o", "gate_logits", "alpha"][which]
    with pytest.raises(ValueError, match=rf"{name} is torch.float32 on cpu but f is torch.float64"):
        QF.gated_residual(*args)


# ---------------------------------------------------------------------------------------------
# Backend selection for the attention family
# ---------------------------------------------------------------------------------------------


def test_backends_table_lists_attention_rows():
    table = aqcf_kernels.backends()
    rows = {(s.family, s.name): s for s in table}
    assert ("attention", "torch") in rows and ("attention", "triton") in rows
    assert rows[("attention", "torch")].available
    assert set(registered("attention")) == {"torch", "triton"}
    text = repr(table)
    assert any(line.split()[:2] == ["torch", "attention"] for line in text.splitlines())
    assert any(line.split()[:2] == ["triton", "attention"] for line in text.splitlines())


@pytest.mark.parametrize("how", ["use", "env"])
def test_forcing_conv_only_backend_leaves_attention_on_auto(how, monkeypatch):
    """``cpp`` has no attention kernel: forcing it selects attention as if nothing were forced (torch)."""
    assert "cpp" not in registered("attention") and "cpp" in registered("conv")
    inputs = attention_inputs(1, 2, 5, 4, 6, 3, 8, seed=95)
    gate = rand(1, 2, 5, 1, seed=96)
    if how == "env":
        monkeypatch.setenv("AQCF_BACKEND", "cpp")
    with backends.use("cpp") if how == "use" else contextlib.nullcontext():
        assert attention_ops._select_attention(inputs[0]).name == "torch"
        assert attention_ops._select_gate(inputs[0], gate).name == "torch"
        grads = output_grads(inputs, seed=97)
        got = run_attention(QF.cross_attention, inputs, torch.float64, grads)
        y = QF.gated_residual(inputs[0], inputs[0].flip(-1), gate, torch.tensor(0.5, dtype=torch.float64))
    ref = run_attention(reference_attention, inputs, torch.float64, grads)
    for name, o, r in zip(ATTN_NAMES, got, ref, strict=True):
        assert rel(o, r) <= 1e-12, name
    torch.testing.assert_close(
        y, reference.gated_residual(inputs[0], inputs[0].flip(-1), gate, torch.tensor(0.5, dtype=torch.float64))
    )


def test_unknown_backend_is_an_error(monkeypatch):
    with pytest.raises(BackendError, match="'nope' is not a backend"):
        with backends.use("nope"):
            pass
    inputs = attention_inputs(1, 1, 3, 3, 3, 3, 4, seed=98)
    monkeypatch.setenv("AQCF_BACKEND", "nope")
    with pytest.raises(BackendError, match="AQCF_BACKEND='nope' is not a backend"):
        QF.cross_attention(*inputs)


def test_cpu_attention_auto_is_torch_even_with_triton_interpreter(monkeypatch):
    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    assert attention_ops._select_attention(torch.zeros(1, 1, 1, 4)).name == "torch"
    monkeypatch.setenv("AQCF_BACKEND", "auto")
    assert attention_ops._select_attention(torch.zeros(1, 1, 1, 4)).name == "torch"


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    triton_backend = registered("attention")["triton"]
    from aqcf_kernels.backends.triton import common as triton_common

    if triton_common.IMPORT_ERROR:
        pytest.skip(f"triton not importable: {triton_common.IMPORT_ERROR}")
    if torch.cuda.is_available():
        pytest.skip("with CUDA the triton backend is available; the CPU-without-interpreter refusal is not")
    # As if TRITON_INTERPRET were unset: the backend must refuse CPU tensors, never fall back silently.
    monkeypatch.setattr(triton_common, "INTERPRET", False)
    assert triton_backend.unavailable() is not None
    inputs = attention_inputs(1, 1, 3, 3, 3, 3, 4, seed=99)
    f = inputs[0].float()
    with backends.use("triton"):
        with pytest.raises(BackendError, match="AQCF_BACKEND='triton' cannot serve this call: no CUDA device"):
            QF.cross_attention(*[t.float() for t in inputs])
        with pytest.raises(BackendError, match="AQCF_BACKEND='triton' cannot serve this call"):
            QF.gated_residual(f, f, f, torch.tensor(0.5))


def test_the_gate_broadcast_check_is_torchs_rule():
    # functional._broadcasts_to replaced torch.broadcast_shapes (13 µs a call) in gated_residual's checks.
    from itertools import product

    from aqcf_kernels.functional import _broadcasts_to

    target = (2, 8, 5)
    sizes = [(), (1,), (5,), (3,), (8, 1), (8, 5), (1, 1, 1), (2, 1, 5), (2, 8, 5), (1, 2, 8, 5), (3, 8, 5)]
    for shape, tgt in product(sizes, [target, (1, 8, 5)]):
        try:
            expected = torch.broadcast_shapes(shape, tgt) == torch.Size(tgt)
        except RuntimeError:
            expected = False
        assert _broadcasts_to(shape, tgt) == expected, (shape, tgt)

"""Hypothesis grids over ``aqcf.cross_attention`` and ``AQCFBlock``, against the float64 reference.

The fixed cases of test_cross_attention.py, test_triton_attention.py and test_aqcf_block.py, drawn instead:
batch and heads 1-3, the four token counts N_qa, N_ka, N_qb, N_kb independently 1-150 (single-token sides, query
and key counts that differ, counts at the kernels' tile edges: PyTorch's CPU flash kernel takes queries 32 at a time
at these sizes, the Triton kernels 64x64 tiles under the interpreter), head sizes multiples of 8 and not, fp64,
fp32, bf16 and fp16, each input in its own layout (transposed, tokens-last, a head-dim slice, a token slice,
split_heads' views and copies as the block makes them, a batch-1 stream broadcast over the batch, one token
broadcast over the tokens: equal rows, tied scores), each upstream gradient in its own (transposed, one row
broadcast, ``mirrored``: the second half of the rows nearly cancels the first, so sums over the queries are small),
and one output or both in the loss. Every output, log-sum-exp and all six input gradients are checked.

Routes of the ``torch`` backend on CPU, drawn: PyTorch's flash kernel called from Python (the extension's choice
switched off), and the extension's C++ (the signature's first call runs Python's forward and remembers the choice;
the backward and a second call run in C++), each on 1 or 2 intra-op threads (the backward cuts the queries of
fewer (batch, head) pairs than threads into chunks, run as extra heads), an fp16/bf16 forward in the dtype or in
float32 (``auto`` measures which; drawn here, as if measured: its choice is pinned); and the generic query-chunked
path (what devices without a fused kernel run) with chunks of 1, 3, 32 and 256 rows. The ``triton`` backend (the
interpreter on CPU) on a grid of its own, fp32 and fp16 (bf16 arithmetic is wrong in the interpreter).

Criteria, per tensor, ‖got − ref‖ / ‖ref‖ against the float64 reference on the same rounded inputs and upstream
gradients:

* float64: 1e-12; float32: the contract's 1e-5;
* fp16 / bf16: at most 2x the error of the materialised reference run in that dtype (FlashAttention's rule), with a
  floor, for where the materialised run is near-exact by chance, of two roundings of the result (2^-10 fp16, 2^-7
  bf16): a flash kernel rounds the probabilities to the dtype before ``P·V`` (and ``dS`` before its products) and
  then its result, and on outputs of a few elements one rounding is not enough: single 4-element rows of PyTorch's
  forward came out 1.1-4.5 roundings off where the materialised run, which rounds as often, was 0.4 (3 in 3,000
  draws even above 2x and two roundings: such rows are rare in the grid). Kernels that add partial sums rounded to
  the dtype are 9-28 roundings off (below);
* where terms cancel, ‖ref‖ is replaced by the size of the terms (:func:`cancellation_scales`): dq and dk of rows
  whose softmax is one-hot or whose keys or values are all equal (exactly zero for a single key), a log-sum-exp
  near zero, a broadcast input's gradient (a sum over the broadcast dim);
* a leaf that does not reach the loss has no gradient or an all-zero one; outputs have the inputs' dtype (the
  log-sum-exps float32, float64 for float64), are finite and contiguous.

Two faults found by the grid have fixed cases below: in fp16/bf16, dK and dV were added from partial sums already
rounded to the dtype, by our query chunks and, over its blocks of queries, by PyTorch's CPU kernel itself (the
backend now runs PyTorch's float32 kernel for half-precision inputs).

The block grid: heads 1-3 of 1-3 quaternion channels, kv_pool (none or 1-40 tokens), gate, bias, the projections'
algorithm, 1d/2d/3d streams of their own spatial sizes 1-7 in their own layouts (strided, channels_last), batch 1-2,
a shared batch-1 stream b, float64 and float32, against test_aqcf_block.py's re-implementation from reference
pieces: float64 1e-12 (parameter gradients 1e-11), float32 the contract of the projections' algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from _grid import SCALE, grid
from _threads import intra_op_threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqcf_kernels import backends, reference, tuning
from aqcf_kernels import functional as QF
from aqcf_kernels.backends import registered
from aqcf_kernels.backends.registry import forget_choices
from aqcf_kernels.backends.torch import attention as TA
from aqcf_kernels.layout import split_heads
from aqcf_kernels.ops import attention as attention_ops

from . import test_aqcf_block
from ._util import rand, reference_attention, reference_lse
from .test_aqcf_block import make_block, reference_block

FP64_TOLERANCE = 1e-12
FP32_TOLERANCE = 1e-5  # the contract (test_cross_attention.py's test_float32_within_contract)
FP32_CONV_TOLERANCE = {"hamilton": FP32_TOLERANCE, "fast8": 5e-4, "auto": 5e-4}
# Two roundings of the result, relative (torch.finfo(dtype).eps; see the module docstring)
HALF_FLOOR = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
HEAD_SIZES = (4, 8, 12, 16, 20, 32, 40, 64, 72, 96)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Where the kernels' tiles end: PyTorch's CPU flash kernel takes 32 query rows at a time below 192 queries,
# the Triton kernels 64x64 tiles in the interpreter.
TILE_EDGES = (1, 2, 31, 32, 33, 63, 64, 65, 96, 97, 127, 128, 129, 150)
LAYOUTS = (
    "contiguous",
    "transposed",
    "tokens-last",
    "strided-e",
    "token-slice",
    "split-heads",
    "shared-batch",
    "repeated-token",
)
GRAD_LAYOUTS = ("contiguous", "transposed", "broadcast", "mirrored")
NAMES = ("out_a", "out_b", "lse_a", "lse_b", "dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b")


@dataclass(frozen=True)
class AttentionCase:
    batch: int
    heads: int
    tokens: tuple[int, int, int, int]  # N_qa, N_ka, N_qb, N_kb
    e: int
    dtype: torch.dtype
    layouts: tuple[str, ...]  # of q_a, k_a, v_a, q_b, k_b, v_b
    grad_layouts: tuple[str, str]  # of the upstream gradients of out_a, out_b
    use: str  # the outputs in the loss: "ab", "a" or "b"
    route: str  # "python", "native" (torch backend on CPU), "generic" (chunked path), "triton"
    threads: int
    chunk_rows: int  # the generic path's CHUNK_ROWS
    entry: str  # "op" (torch.ops.aqcf.cross_attention) or "functional" (aqcf_kernels.functional)
    half_route: str  # fp16/bf16 on the flash kernel: its forward in the dtype or in float32 (TA.IN_DTYPE)
    seed: int

    def shapes(self) -> list[tuple[int, int, int, int]]:
        n_qa, n_ka, n_qb, n_kb = self.tokens
        return [(self.batch, self.heads, n, self.e) for n in (n_qa, n_ka, n_ka, n_qb, n_kb, n_kb)]


def token_counts(max_tokens: int):
    return st.one_of(st.integers(1, max_tokens), st.sampled_from([n for n in TILE_EDGES if n <= max_tokens]))


@st.composite
def attention_cases(draw, routes, dtypes=DTYPES, max_tokens=150, max_batch_heads=9) -> AttentionCase:
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if batch * heads > max_batch_heads:
        batch = max(1, max_batch_heads // heads)
    route = draw(st.sampled_from(routes))
    return AttentionCase(
        batch=batch,
        heads=heads,
        tokens=tuple(draw(token_counts(max_tokens)) for _ in range(4)),
        e=draw(st.sampled_from(HEAD_SIZES)),
        dtype=draw(st.sampled_from(dtypes)),
        layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(6)),
        grad_layouts=tuple(draw(st.sampled_from(GRAD_LAYOUTS)) for _ in range(2)),
        use=draw(st.sampled_from(["ab", "a", "b"])),
        route=route,
        # (the generic path does not depend on the thread count; 3 threads oversubscribe a 2-core machine, where
        # every parallel op can stall on a thread that is not scheduled)
        threads=draw(st.sampled_from([1, 2])) if route in ("python", "native") else 1,
        chunk_rows=draw(st.sampled_from([1, 3, 32, TA.CHUNK_ROWS])),
        entry=draw(st.sampled_from(["op", "functional"])),
        half_route=draw(st.sampled_from([TA.IN_DTYPE.algorithm, TA.IN_FLOAT32.algorithm])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# ---------------------------------------------------------------------------------------------
# Inputs in their layouts
# ---------------------------------------------------------------------------------------------


def source_and_view(shape, layout: str):
    """The shape of the tensor to draw and the view of it that has ``shape`` (B, H, N, E) in ``layout``."""
    b, h, n, e = shape
    if layout == "contiguous":
        return shape, lambda t: t
    if layout == "transposed":  # (B, N, H, E) memory, heads and tokens swapped
        return (b, n, h, e), lambda t: t.transpose(1, 2)
    if layout == "tokens-last":  # (B, H, E, N) memory: head dim of stride N
        return (b, h, e, n), lambda t: t.transpose(2, 3)
    if layout == "strided-e":  # every other element of a wider head dim
        return (b, h, n, 2 * e), lambda t: t[..., 1::2]
    if layout == "token-slice":  # every other token, from an offset
        return (b, h, 2 * n + 1, e), lambda t: t[:, :, 1::2]
    if layout == "split-heads":  # the block's (B, 4·Cq, N) -> (B, H, N, 4·d): a view for H = 1 or d = 1
        return (b, h * e, n), lambda t: split_heads(t, h)
    if layout == "shared-batch":  # a batch-1 stream broadcast over the batch (stride 0)
        return (1, h, n, e), lambda t: t.expand(b, -1, -1, -1)
    assert layout == "repeated-token"  # one token broadcast over the tokens (stride 0): equal rows, tied scores
    return (b, h, 1, e), lambda t: t.expand(-1, -1, n, -1)


def attention_leaves(c: AttentionCase):
    """Source tensors (in float64: draw them in a dtype with ``.to``) and the views that make the op's inputs."""
    sources, views = [], []
    for i, (shape, layout) in enumerate(zip(c.shapes(), c.layouts, strict=True)):
        source_shape, view = source_and_view(shape, layout)
        sources.append(rand(*source_shape, seed=c.seed * 7 % 2**31 + i))
        views.append(view)
    return sources, views


def upstream_grads(c: AttentionCase):
    """float64 upstream gradients of out_a and out_b (the values the dtype rounds), each in its layout."""
    grads = []
    for i, (shape, layout) in enumerate(zip((c.shapes()[0], c.shapes()[3]), c.grad_layouts, strict=True)):
        b, h, n, e = shape
        seed = c.seed * 7 % 2**31 + 10 + i
        if layout == "contiguous":
            grads.append(rand(*shape, seed=seed))
        elif layout == "transposed":
            grads.append(rand(b, n, h, e, seed=seed).transpose(1, 2))
        elif layout == "broadcast":  # one row broadcast over the tokens (stride 0)
            grads.append(rand(b, h, 1, e, seed=seed).expand(shape))
        else:  # "mirrored": the second half of the rows nearly cancels the first, so sums over queries are small
            g = rand(*shape, seed=seed)
            half = n // 2
            g[:, :, n - half :] = -(1 - 2.0**-5) * g[:, :, :half]
            grads.append(g)
    return grads


def run_attention_case(fn, sources, views, grads, dtype, use, contiguous=False):
    """``[out_a, out_b, lse_a, lse_b, d q_a, ..., d v_b]`` of ``fn`` (which returns the four) on the views of
    fresh ``dtype`` leaves; the gradients are the leaves' (the sources'), of ``Σ <out_s, grad_s>`` over the
    streams in ``use``, ``None`` for a leaf that does not reach it."""
    leaves = [s.detach().to(dtype).requires_grad_() for s in sources]
    args = [view(t) for view, t in zip(views, leaves, strict=True)]
    if contiguous:
        args = [a.contiguous() for a in args]
    outs = fn(*args)
    used = [i for i, s in enumerate("ab") if s in use]
    d = torch.autograd.grad([outs[i] for i in used], leaves, [grads[i].to(dtype) for i in used], allow_unused=True)
    return [o.detach() for o in outs] + list(d)


def reference_with_lse(*inputs):
    return (*reference_attention(*inputs), *reference_lse(inputs))


def to_source(view, source_shape, t: torch.Tensor) -> torch.Tensor:
    """``t`` (the shape of ``view``'s output) taken back through the view, as autograd takes a gradient back: summed
    over what the view broadcasts. With ``t ≥ 0`` that bounds the sum of terms of those sizes, whatever their
    signs."""
    source = torch.zeros(source_shape, dtype=torch.float64, requires_grad=True)
    return torch.autograd.grad(view(source), source, t)[0]


def cancellation_scales(c: AttentionCase, sources, views, grads) -> dict[str, float]:
    """For each result, the size of the terms that cancel in it (0 where none do), in float64 on the rounded
    inputs: a result is measured relative to ``max(‖ref‖, this)``. With ``P = softmax(q kᵀ·scale)``, ``O = P v``
    and ``δ_i = dO_i·O_i``:

    * dq and dk, the δ term: ``dq = scale·(P ⊙ (dO vᵀ − δ)) k`` and ``dk = scale·(P ⊙ (dO vᵀ − δ))ᵀ q``. Where a
      row's softmax is (nearly) one-hot, or every key or value is the same, ``dO_i·v_j ≈ δ_i`` and the two parts
      cancel: dq and dk are far smaller than they, exactly zero for a single key. A flash backward takes δ from the
      output rounded to the dtype (PyTorch's CPU and CUDA kernels, FlashAttention, the Triton kernels), so its
      error there is the dtype's rounding of the δ term, ``scale·|dO_i||O_i|·|(P k)_i|`` and
      ``scale·|Pᵀ (|dO_i||O_i|·q_i)|``, however small dq and dk are (the materialised reference rounds both parts
      alike, and they cancel). Taken back to a broadcast input's source by :func:`to_source`: summed, as its
      errors may be (one query repeated, one upstream gradient row for all).
    * lse: ``Σ_j P_ij |q_i||k_j|·scale``, the size of the scores, whose rounding moves the log-sum-exp by as
      much (a log-sum-exp near zero has no relative accuracy).
    * a gradient of an input broadcast over the batch or the tokens: the view's gradient, which autograd
      sums over the broadcast dim (in the dtype; every key the same makes dk's sum exactly zero).
    * float32 and float64, whose bounds are fixed: the terms of the products that make the gradients,
      ``scale·|dS| |k|``, ``scale·|dS|ᵀ |q|`` and ``Pᵀ |dO|`` (``dS = P ⊙ (dO vᵀ − δ)``). A flash backward
      recomputes P as ``exp(s − lse)``, a few roundings of the score off in each row (the materialised softmax
      divides each row by its own sum), so where the terms cancel the result is off by as much relative to them:
      ``mirrored`` gradients of 2 queries reading 60 equal keys gave a float32 dV 1.5e-5 off. In half precision the
      bound is the materialised run's error, which cancels alike, so there is no such scale there: kernels that add
      partial sums rounded to the dtype fail it.
    """
    views64 = [view(s.to(c.dtype).double()).contiguous() for view, s in zip(views, sources, strict=True)]
    g_a, g_b = (g.to(c.dtype).double() for g in grads)
    per_view = run_attention_case(reference_with_lse, views64, [lambda t: t] * 6, (g_a, g_b), torch.float64, c.use)
    sizes = {name: 0.0 if d is None else d.norm().item() for name, d in zip(NAMES[4:], per_view[4:], strict=True)}
    q_a, k_a, v_a, q_b, k_b, v_b = views64
    scale = c.e**-0.5
    # (…, the indices of q, k and v among the inputs)
    directions = ((q_a, k_b, v_b, g_a, "a", 0, 4, 5), (q_b, k_a, v_a, g_b, "b", 3, 1, 2))
    for q, k, v, g, stream, iq, ik, iv in directions:
        eye = torch.eye(k.shape[2], dtype=torch.float64).expand(*k.shape[:2], -1, -1)
        p = reference.attention(q, k, eye, scale)[0]  # the probabilities: attention with identity values
        o = p @ v
        w = g.norm(dim=-1, keepdim=True) * o.norm(dim=-1, keepdim=True)
        terms = [(iq, scale * w * (p @ k).abs()), (ik, (scale * p.transpose(-1, -2) @ (w * q)).abs())]
        if c.dtype in (torch.float32, torch.float64):  # the products' terms (see the docstring)
            ds = (p * (g @ v.transpose(-1, -2) - (g * o).sum(-1, keepdim=True))).abs()
            terms += [(iq, scale * ds @ k.abs()), (ik, scale * ds.transpose(-1, -2) @ q.abs())]
            terms += [(iv, p.transpose(-1, -2) @ g.abs())]
        for i, term in terms:
            name = NAMES[4 + i]
            sizes[name] = max(sizes[name], to_source(views[i], sources[i].shape, term).norm().item())
        score_sizes = scale * q.norm(dim=-1, keepdim=True) * k.norm(dim=-1).unsqueeze(-2)  # |q_i| |k_j| scale
        sizes[f"lse_{stream}"] = (p * score_sizes).sum(-1).norm().item()
    return sizes


def error(got: torch.Tensor, ref: torch.Tensor, cancelled: float = 0.0) -> float:
    """‖got − ref‖ / max(‖ref‖, ``cancelled``) in float64 (see :func:`cancellation_scales`): the relative error
    where nothing cancels."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    norm = max(ref.norm().item(), cancelled)
    assert norm > 0, "a reference of zero where nothing cancels"
    return (got - ref).norm().item() / norm


def check_against_reference(c: AttentionCase, got, sources, views, grads, what: str = "") -> None:
    """``got`` (from :func:`run_attention_case`) held to the module's criteria (see its docstring)."""
    # the reference sees the rounded inputs and upstream gradients (where the gradients of many queries cancel, a
    # rounding of each is a large change of their sum)
    rounded = [s.to(c.dtype).double() for s in sources]
    rounded_grads = [g.to(c.dtype).double() for g in grads]
    ref = run_attention_case(reference_with_lse, rounded, views, rounded_grads, torch.float64, c.use, contiguous=True)
    cancelled = cancellation_scales(c, sources, views, grads)
    baseline = None
    if c.dtype in HALF_FLOOR:
        baseline = run_attention_case(reference_with_lse, sources, views, grads, c.dtype, c.use, contiguous=True)
    for i, name in enumerate(NAMES):
        o, r = got[i], ref[i]
        if r is None:  # a leaf only the unused output reads
            assert o is None or torch.count_nonzero(o) == 0, f"{what}{name} should have no gradient: {c}"
            continue
        assert o is not None, f"{what}{name}: no gradient ({c})"
        want_dtype = (torch.float64 if c.dtype == torch.float64 else torch.float32) if name[:3] == "lse" else c.dtype
        assert o.dtype == want_dtype, f"{what}{name}: {o.dtype}, expected {want_dtype}"
        assert torch.isfinite(o).all(), f"{what}{name}: not finite ({c})"
        if i < 4:
            assert o.is_contiguous(), f"{what}{name}: the op returns contiguous tensors"
        err = error(o, r, cancelled.get(name, 0.0))
        if c.dtype == torch.float64:
            bound, why = FP64_TOLERANCE, "float64"
        elif c.dtype == torch.float32:
            bound, why = FP32_TOLERANCE, "the float32 contract"
        else:
            base = error(baseline[i], r, cancelled.get(name, 0.0))
            bound, why = max(2 * base, HALF_FLOOR[c.dtype]), f"2x materialised {c.dtype} ({base:.2e}) or the floor"
        assert err <= bound, f"{what}{name}: relative error {err:.2e} > {bound:.2e} ({why}); {c}"


def attention_fn(c: AttentionCase):
    """The call under test, returning ``(out_a, out_b, lse_a, lse_b)``."""
    if c.entry == "op":
        return lambda *a: torch.ops.aqcf.cross_attention(*a, c.e**-0.5)

    def functional(*a):
        out_a, out_b = QF.cross_attention(*a)
        with torch.no_grad():  # the log-sum-exps, which the public function does not return
            lse_a, lse_b = torch.ops.aqcf.cross_attention(*a, c.e**-0.5)[2:]
        return out_a, out_b, lse_a, lse_b

    return functional


# Examples per test sized for CI, whose time is budgeted: at 1000 (torch backend, block) and 100 (Triton) examples these
# tests took 188 CPU-seconds of the 2-core suite (AMD EPYC, 2026-12-07), after hunts at 8-10x that found nothing
# more; since 2026-12-07 300 and 30, and the block (a whole A-QCF block an example: 84 s of a loaded CI) 150
# (tests/_grid.py). A longer hunt multiplies them: AQCF_GRID_SCALE=20 pytest <this file>.
# The fixtures (AQCF_BACKEND, poisoned allocations) hold for every example of the test.
GRID = grid(300, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large)


# ---------------------------------------------------------------------------------------------
# The torch backend
# ---------------------------------------------------------------------------------------------


def check_torch_backend(c: AttentionCase, sources, views, grads) -> None:
    """Run ``c`` on the torch backend's route ``c.route`` (see the module docstring) and hold every output and
    gradient to the criteria. On the ``native`` route the signature's first call (Python forward, C++ backward) and
    its second (all C++) are both checked, and the second must not have asked Python; on ``python`` and ``generic``
    every call reaches the function the route names."""
    fn = attention_fn(c)
    calls = {"flash": 0, "chunked": 0}
    flash_forward, chunked_forward = TA._cpu_flash_forward, TA.chunked_attention_forward

    def counting(key, real):
        def call(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        return call

    # The fp16/bf16 forward's route, pinned as if measured: measuring it would run both routes, a varying number
    # of calls (test_native_attention.py checks the measuring).
    route = next(r for r in (TA.IN_DTYPE, TA.IN_FLOAT32) if r.algorithm == c.half_route)
    recall = tuning.recall

    def pinned_recall(fast_key):
        return route if fast_key[0] == "cpu_flash_half" else recall(fast_key)

    forget_choices()  # nothing remembered from an earlier example with the same signature
    with pytest.MonkeyPatch.context() as mp, intra_op_threads(c.threads):
        mp.setenv("AQCF_BACKEND", "torch")
        mp.setattr(tuning, "recall", pinned_recall)
        mp.setattr(TA, "_cpu_flash_forward", counting("flash", flash_forward))
        mp.setattr(TA, "chunked_attention_forward", counting("chunked", chunked_forward))
        if c.route == "python":  # the extension never remembers a choice: every call asks Python
            mp.setattr(attention_ops, "_remember_attention", lambda *args: None)
        elif c.route == "generic":
            mp.setattr(TA, "CHUNK_ROWS", c.chunk_rows)
            mp.setattr(TA.TorchAttentionBackend, "kernel", lambda self, q, k, v: None)
        op_calls = 2 if c.entry == "functional" else 1  # (the functional entry calls the op again for lse)
        for run in range(2 if c.route == "native" else 1):
            before = dict(calls)
            got = run_attention_case(fn, sources, views, grads, c.dtype, c.use)
            ran = {k: calls[k] - before[k] for k in calls}
            if c.route == "generic":
                expected = {"flash": 0, "chunked": 2 * op_calls}
            elif c.route == "python" or not attention_ops.NATIVE:
                expected = {"flash": 2 * op_calls, "chunked": 0}
            else:  # the signature's first op call asks Python, which remembers the choice; C++ serves the rest
                expected = {"flash": 2 if run == 0 else 0, "chunked": 0}
            assert ran == expected, (c.route, run, ran)
            check_against_reference(c, got, sources, views, grads, what=f"call {run}: ")
    forget_choices()


@GRID
@given(c=attention_cases(routes=("python", "native", "generic")))
def test_torch_backend_matches_reference(c):
    sources, views = attention_leaves(c)
    check_torch_backend(c, sources, views, upstream_grads(c))


# Found by the grid: in half precision, dK and dV added up from partial sums rounded to the dtype. Inputs that make
# the partial sums cancel: one query token repeated (every row of P the same) and upstream gradients whose second
# half is -(1 - 2^-5) times the first (``mirrored``), so dK and dV are ~30x smaller than the partial sum of either
# half of the queries. The materialised reference (one GEMM, accumulated in float32) stays within ~1 rounding of the
# result, as does the backward run in float32 and rounded once.
CANCELLING = dict(
    batch=1,
    heads=1,
    layouts=("repeated-token", "contiguous", "contiguous", "repeated-token", "contiguous", "contiguous"),
    grad_layouts=("mirrored", "mirrored"),
    use="ab",
    chunk_rows=TA.CHUNK_ROWS,
    entry="op",
    half_route=TA.IN_DTYPE.algorithm,  # (the forward these faults were found with)
    seed=3,
)


@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
@pytest.mark.parametrize("route", ["python", "native"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_backward_adds_query_chunks_unrounded(dtype, route, threads):
    """With two threads and one (batch, head) pair, the backward runs the 2 queries as 2 chunks (query_chunks) and
    adds the chunks' dK and dV: added after rounding each to the dtype (as PyTorch's half-precision kernel returns
    them), the sum was 16-28 roundings off where the chunks cancel; in float32, then rounded once, it is within the
    bound, as one thread (no chunks) is."""
    c = AttentionCase(tokens=(2, 3, 2, 3), e=8, dtype=dtype, route=route, threads=threads, **CANCELLING)
    with intra_op_threads(threads):
        assert TA.query_chunks(1, 2) == threads
    sources, views = attention_leaves(c)
    check_torch_backend(c, sources, views, upstream_grads(c))


@pytest.mark.parametrize("queries", [32, 64, 200])
@pytest.mark.parametrize("route", ["python", "native"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_backward_accumulates_query_blocks_unrounded(dtype, route, queries):
    """One thread (no query chunks of ours): PyTorch's half-precision CPU flash backward runs the queries in blocks
    of 32 and accumulates dK and dV in its output tensor, in the dtype, so each block's partial sum is added to the
    previous ones' rounded sum: 9-14 roundings off at 64 queries where they cancel (F.scaled_dot_product_attention's
    bits, torch 2.13). The backend runs PyTorch's float32 kernel for half-precision inputs instead."""
    c = AttentionCase(tokens=(queries, 5, queries, 5), e=4, dtype=dtype, route=route, threads=1, **CANCELLING)
    sources, views = attention_leaves(c)
    check_torch_backend(c, sources, views, upstream_grads(c))


# ---------------------------------------------------------------------------------------------
# The triton backend (the interpreter on CPU: smaller sizes)
# ---------------------------------------------------------------------------------------------

TRITON = registered("attention")["triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(
    TRITON.unavailable() is not None, reason=f"triton attention backend unavailable: {TRITON.unavailable()}"
)
@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter grid (tests/attention/test_cuda_attention.py on CUDA)")
@pytest.mark.usefixtures("poisoned_allocations")  # an unwritten element read fails (tests/conftest.py)
@settings(GRID, max_examples=30 * SCALE)
@given(c=attention_cases(routes=("triton",), dtypes=(torch.float32, torch.float16), max_tokens=130, max_batch_heads=4))
def test_triton_backend_matches_reference(c):
    """The Triton kernels (both directions in one launch, dk/dv and dq backward) on the grid: fp32 within the
    contract, fp16 within 2x the materialised fp16 reference."""
    sources, views = attention_leaves(c)
    grads = upstream_grads(c)
    with backends.use("triton"):
        got = run_attention_case(attention_fn(c), sources, views, grads, c.dtype, c.use)
    check_against_reference(c, got, sources, views, grads)


# ---------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockCase:
    heads: int
    d: int  # quaternion channels per head
    gate: str
    kv_pool: int | None
    bias: bool
    batch: int
    shared_b: bool  # f_b of batch 1, broadcast
    spatial_a: tuple[int, ...]
    spatial_b: tuple[int, ...]
    layout_a: str
    layout_b: str
    dtype: torch.dtype
    algorithm: str  # of the block's quaternion projections
    threads: int
    seed: int

    @property
    def channels(self) -> int:
        return 4 * self.heads * self.d


@st.composite
def block_cases(draw) -> BlockCase:
    def spatial():
        return tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))

    s_a, s_b = spatial(), spatial()
    layouts_a = ["contiguous", "strided"] + (["channels_last"] if len(s_a) > 1 else [])
    layouts_b = ["contiguous", "strided"] + (["channels_last"] if len(s_b) > 1 else [])
    return BlockCase(
        heads=draw(st.integers(1, 3)),
        d=draw(st.integers(1, 3)),
        gate=draw(st.sampled_from(["token", "channel", "none"])),
        kv_pool=draw(st.one_of(st.none(), st.integers(1, 40))),
        bias=draw(st.booleans()),
        batch=draw(st.integers(1, 2)),
        shared_b=draw(st.booleans()),
        spatial_a=s_a,
        spatial_b=s_b,
        layout_a=draw(st.sampled_from(layouts_a)),
        layout_b=draw(st.sampled_from(layouts_b)),
        dtype=draw(st.sampled_from([torch.float64, torch.float64, torch.float32])),
        algorithm=draw(st.sampled_from(["auto", "hamilton", "fast8"])),
        threads=draw(st.sampled_from([1, 2])),
        seed=draw(st.integers(0, 2**20)),
    )


def expected_pooled(spatial: tuple[int, ...], kv_pool: int | None) -> tuple[int, ...] | None:
    """The block's documented K/V pooling: none if the tokens fit, else the smallest integer factor r (each dim
    ceil(s / r)) that leaves at most ``kv_pool`` tokens."""
    if kv_pool is None or math.prod(spatial) <= kv_pool:
        return None
    r = 1
    while math.prod(-(-s // r) for s in spatial) > kv_pool:
        r += 1
    return tuple(-(-s // r) for s in spatial)


def block_input(shape, layout: str, seed: int) -> torch.Tensor:
    """A float64 tensor of ``shape`` in ``layout`` (values differ per layout)."""
    if layout == "strided":  # every other element of a wider last dim
        return rand(*shape[:-1], 2 * shape[-1], seed=seed)[..., ::2]
    t = rand(*shape, seed=seed)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def block_cancellation_scales(block64, f_a, f_b, gy_a, gy_b, pooled_a, pooled_b) -> dict[str, float]:
    """For each parameter of the qkv projections, the size of the terms that cancel in its gradient (see
    :func:`cancellation_scales`), in float64: the attention's dq and dk, where a softmax row is (nearly) one-hot (a
    side pooled to one key, a single token), are exactly zero in the materialised reference and a rounding of the δ
    term and of the products' terms in a flash backward. The projection's weight gradient sums that rounding ``ν``
    times its input ``x`` over the tokens, at most ``Σ |ν| |x|ᵀ`` for the expanded real weight (twice its norm for
    the quaternion weight's components, each a sum of four of its blocks), and its bias ``Σ |ν|``."""
    captured, projected = [], []
    real_attention, real_project = reference.attention, test_aqcf_block.project

    def attention(q, k, v, scale):
        out = real_attention(q, k, v, scale)
        entry = {"q": q, "k": k, "v": v, "scale": scale}
        out[0].register_hook(lambda g: entry.__setitem__("g", g))
        captured.append(entry)
        return out

    def project(conv, x, part=None, parts=1):
        projected.append((conv, x, part))
        return real_project(conv, x, part, parts)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "attention", attention)
        patch.setattr(test_aqcf_block, "project", project)
        a, b = f_a.double(), f_b.double()
        y_a, y_b = reference_block(block64, a, b, pooled_a, pooled_b)
        ((y_a * gy_a.double()).sum() + (y_b * gy_b.double()).sum()).backward()
    # the projection's input per (conv, part): q reads the stream's tokens, k the (pooled) tokens
    inputs = {(id(conv), part): x.detach() for conv, x, part in projected if part is not None}
    sizes = dict.fromkeys((f"{n}.{p}" for n in ("qkv_a", "qkv_b") for p in ("weight", "bias")), 0.0)
    # a's queries read b's keys, b's queries read a's
    for entry, q_conv, k_conv in zip(captured, ("qkv_a", "qkv_b"), ("qkv_b", "qkv_a"), strict=True):
        q, k, v, g = (entry[n].detach() for n in "qkvg")
        scale = entry["scale"]
        p = torch.softmax(q @ k.mT * scale, -1)
        o = p @ v
        w = g.norm(dim=-1, keepdim=True) * o.norm(dim=-1, keepdim=True)
        ds = (p * (g @ v.mT - (g * o).sum(-1, keepdim=True))).abs()
        term_q = scale * w * (p @ k).abs() + scale * ds @ k.abs()  # (B, H, tokens, E), as the heads split
        term_k = (scale * p.mT @ (w * q)).abs() + scale * ds.mT @ q.abs()
        for conv_name, part, term in ((q_conv, 0, term_q), (k_conv, 1, term_k)):
            x = inputs[(id(getattr(block64, conv_name)), part)].abs()  # (B, C, tokens)
            nu = test_aqcf_block.hand_merge_heads(term)  # (B, C_part, tokens)
            sizes[f"{conv_name}.weight"] += 2 * torch.einsum("bon,bin->oi", nu, x).norm().item()
            sizes[f"{conv_name}.bias"] += nu.sum((0, 2)).norm().item()
    return sizes


@settings(GRID, max_examples=150 * SCALE)
@given(c=block_cases())
def test_block_matches_reference(c, monkeypatch):
    """AQCFBlock's outputs, input and parameter gradients against test_aqcf_block.py's re-implementation from
    reference pieces (float64 parameters and inputs; a float32 block against the float64 copy of itself)."""
    monkeypatch.setenv("AQCF_BACKEND", "torch")
    block64 = make_block(c.channels, c.heads, c.gate, c.kv_pool, seed=c.seed, bias=c.bias)
    block = make_block(c.channels, c.heads, c.gate, c.kv_pool, seed=c.seed, bias=c.bias, dtype=c.dtype)
    with torch.no_grad():  # the float64 reference sees the block's rounded parameters
        for p, p64 in zip(block.parameters(), block64.parameters(), strict=True):
            p64.copy_(p.double())
    for conv in block.children():
        conv.algorithm = c.algorithm
    shape_a = (c.batch, c.channels, *c.spatial_a)
    shape_b = (1 if c.shared_b else c.batch, c.channels, *c.spatial_b)
    f_a = block_input(shape_a, c.layout_a, seed=c.seed + 1).to(c.dtype)
    f_b = block_input(shape_b, c.layout_b, seed=c.seed + 2).to(c.dtype)
    out_b_shape = (c.batch, *shape_b[1:])
    gy_a, gy_b = rand(*shape_a, seed=c.seed + 3).to(c.dtype), rand(*out_b_shape, seed=c.seed + 4).to(c.dtype)
    pooled_a, pooled_b = expected_pooled(c.spatial_a, c.kv_pool), expected_pooled(c.spatial_b, c.kv_pool)

    def run(module, forward, dtype):
        module.zero_grad()
        a, b = (t.detach().to(dtype).requires_grad_() for t in (f_a, f_b))
        y_a, y_b = forward(a, b)
        ((y_a * gy_a.to(dtype)).sum() + (y_b * gy_b.to(dtype)).sum()).backward()
        params = {n: p.grad.clone() for n, p in module.named_parameters()}
        return [y_a.detach(), y_b.detach(), a.grad, b.grad], params

    with intra_op_threads(c.threads):
        got, got_params = run(block, block, c.dtype)
    ref, ref_params = run(block64, lambda a, b: reference_block(block64, a, b, pooled_a, pooled_b), torch.float64)
    assert got[0].shape == shape_a and got[1].shape == out_b_shape
    # float32: the contract of the projections' algorithm (fast8's is 5e-4, test_qconv_accuracy.py; auto may pick it)
    tolerance = FP64_TOLERANCE if c.dtype == torch.float64 else FP32_CONV_TOLERANCE[c.algorithm]
    for name, o, r in zip(("f_a'", "f_b'", "d f_a", "d f_b"), got, ref, strict=True):
        assert o.dtype == c.dtype
        assert error(o, r) <= tolerance, f"{name}: relative error {error(o, r):.2e} > {tolerance:.0e}; {c}"
    assert got_params.keys() == ref_params.keys()
    # d alpha = Σ gy ⊙ (G ⊙ O) is ONE sum of every output element's term, which may nearly cancel: it is measured
    # relative to the size of its terms, at most ‖gy‖ ‖G ⊙ O‖ = ‖gy‖ ‖y − f‖ / |alpha| (the other parameters'
    # gradients are tensors, measured as the outputs)
    f_b64 = f_b.double().expand(out_b_shape)
    terms = {
        "alpha_a": (gy_a.double().norm() * (ref[0] - f_a.double()).norm()).item() / abs(block64.alpha_a.item()),
        "alpha_b": (gy_b.double().norm() * (ref[1] - f_b64).norm()).item() / abs(block64.alpha_b.item()),
    }
    terms.update(block_cancellation_scales(block64, f_a, f_b, gy_a, gy_b, pooled_a, pooled_b))
    for name, r in ref_params.items():
        # parameter gradients sum over every token and sample: 10x the outputs' bound in float64 (as
        # test_aqcf_block.py), the contract in float32
        bound = 10 * tolerance if c.dtype == torch.float64 else tolerance
        err = error(got_params[name], r, terms.get(name, 0.0))
        assert err <= bound, f"grad {name}: relative error {err:.2e} > {bound:.0e}; {c}"

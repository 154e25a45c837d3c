"""The attention ops defined by the compiled extension (csrc/cpu/attention_op.cpp) and, without it, by Python.

With the extension, a call signature is resolved in Python once; when the ``torch`` backend served it with
PyTorch's own kernels (its attention kernels, its gate's elementwise ops), later calls with that signature
are served in C++ — with results identical to the Python path's, bit for bit. Anything that decides a
choice drops the remembered ones; a backend whose methods a test replaced is never remembered. Without
the extension (``AQCF_NO_EXTENSION=1``) the same schemas come from Python, through the same tests.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import torch
from _threads import intra_op_threads

from aqcf_kernels import backends, reference, tuning
from aqcf_kernels import functional as QF
from aqcf_kernels.backends._extension import _C
from aqcf_kernels.backends.registry import forget_choices
from aqcf_kernels.backends.torch import attention as TA
from aqcf_kernels.ops import attention as attention_ops

from ._util import attention_inputs, output_grads, rand, rel

ROOT = Path(__file__).resolve().parents[2]
native = pytest.mark.skipif(not attention_ops.NATIVE, reason="aqcf_kernels._C is not built")
OPS = ("cross_attention", "cross_attention_backward", "gated_residual", "gated_residual_backward")
#: the differentiable gradients the native autograd formulas ask for under create_graph=True
COMPOSITES = ("composite_attention_backward", "composite_gate_backward")


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("AQCF_BACKEND", "torch")


@pytest.fixture
def asked(counting_fallbacks):
    """The extension's attention kernels ask counting wrappers of the Python functions; nothing remembered."""
    with counting_fallbacks(_C._set_attention_fallbacks, attention_ops, OPS + COMPOSITES) as asked:
        yield asked


def test_the_schemas_are_those_python_infers() -> None:
    """A program exported on either install (extension or not) calls the same ops."""
    for name in OPS:
        registered = str(getattr(torch.ops.aqcf, name).default._schema)
        inferred = torch.library.infer_schema(getattr(attention_ops, name), mutates_args=())
        assert registered == f"aqcf::{name}{inferred}"


@native
def test_the_extension_has_cpu_and_cuda_kernels_for_the_attention_ops() -> None:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in OPS:
        assert has(f"aqcf::{name}", "CPU") and has(f"aqcf::{name}", "CUDA"), name
        assert has(f"aqcf::{name}", "Autograd"), name


def _attention_step(inputs, grads, scale=0.3, python_backward=False):
    """The op's outputs and log-sum-exps, then the backward op's six gradients (through autograd);
    ``python_backward``: the choice the forward remembered is dropped first, so Python runs the backward."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out_a, out_b, lse_a, lse_b = torch.ops.aqcf.cross_attention(*leaves, scale)
    if python_backward:
        forget_choices()
    dq = torch.autograd.grad([out_a, out_b], leaves, grads)
    return [out_a.detach(), out_b.detach(), lse_a, lse_b, *dq]


def _same(got, expected, names=None):
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        name = names[i] if names else i
        assert g.dtype == e.dtype and g.shape == e.shape and g.stride() == e.stride(), name
        assert torch.equal(g, e), f"{name}: max difference {(g.double() - e.double()).abs().max().item():.3e}"


def _views(inputs):
    """q_a with its head dim strided (one quaternion channel per head makes such views), k_b a transposed
    layout, v_b a batch-1 stream broadcast with stride 0."""
    q_a, k_a, v_a, q_b, k_b, v_b = inputs
    q_a = torch.cat([q_a, q_a], -1)[..., ::2]
    k_b = k_b.transpose(1, 2).contiguous().transpose(1, 2)
    v_b = v_b[:1].expand_as(v_b)
    return [q_a, k_a, v_a, q_b, k_b, v_b]


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "views"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_a_signature_is_resolved_in_python_once_then_served_natively(asked, dtype, layout, threads) -> None:
    """Identical outputs, log-sum-exps and gradients from Python and from C++; with one (batch, head) on two
    threads the backward cuts the queries into chunks (query_chunks) in both."""
    inputs = [t.to(dtype) for t in attention_inputs(1, 1, 12, 5, 9, 7, 8, seed=3)]
    if layout == "views":
        inputs = _views(inputs)
    grads = [g.to(dtype) for g in output_grads(inputs, seed=4)]
    # (fp16/bf16 on CPU: 'auto' first measures the forward's route, in the dtype or in float32, and nothing is
    # remembered until that choice is final: test_the_half_precision_route_is_measured_then_served_natively.
    # Here the rule's route, float32.)
    rule = tuning.using("heuristic") if dtype in TA.HALF_DTYPES else contextlib.nullcontext()
    with intra_op_threads(threads), rule:
        first = _attention_step(inputs, grads, python_backward=True)
        assert asked["cross_attention"] == 1 and asked["cross_attention_backward"] == 1
        assert _C._remembered_attention_choices() == 1  # remembered by the backward too
        again = _attention_step(inputs, grads)
        again_twice = _attention_step(inputs, grads)
    assert asked["cross_attention"] == 1 and asked["cross_attention_backward"] == 1
    _same(again_twice, again)
    _same(again, first, ["out_a", "out_b", "lse_a", "lse_b", "dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b"])


@native
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("dtype", "kernel"), [(torch.bfloat16, "flash"), (torch.float16, "flash"), (torch.float32, "efficient")]
)
@pytest.mark.parametrize("layout", ["contiguous", "views"])
def test_cuda_signatures_are_served_natively_with_pytorchs_kernels(asked, dtype, kernel, layout) -> None:
    """On a GPU: the flash and memory-efficient kernels called from C++ give what the Python path gives
    (a query count off the efficient kernel's multiple of 32: its log-sum-exp padding). The forwards
    are deterministic: identical; the backwards add partial sums with atomics, in any order: close."""
    inputs = [t.to(dtype).cuda() for t in attention_inputs(2, 3, 50, 37, 33, 20, 16, seed=21)]
    if layout == "views":
        inputs = _views(inputs)
    assert TA.cuda_kernel(*(TA._dense_rows(t) for t in inputs[:3])) == kernel
    grads = [g.to(dtype).cuda() for g in output_grads(inputs, seed=22)]
    first = _attention_step(inputs, grads, python_backward=True)
    again = _attention_step(inputs, grads)
    assert asked["cross_attention"] == 1 and asked["cross_attention_backward"] == 1
    _same(again[:4], first[:4], ["out_a", "out_b", "lse_a", "lse_b"])
    for name, g, e in zip(["dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b"], again[4:], first[4:], strict=True):
        torch.testing.assert_close(g, e, msg=name)


@native
def test_the_backward_alone_is_served_by_what_python_remembers(asked) -> None:
    """A backward op called before any forward of its signature asks Python, which remembers it."""
    inputs = attention_inputs(2, 3, 6, 4, 5, 7, 8, seed=5)
    with torch.no_grad():
        outs = torch.ops.aqcf.cross_attention(*inputs, 0.4)
    forget_choices()
    args = (*output_grads(inputs, seed=6), *inputs, *outs, 0.4)
    first = torch.ops.aqcf.cross_attention_backward(*args)
    again = torch.ops.aqcf.cross_attention_backward(*args)
    assert asked["cross_attention_backward"] == 1
    _same(again, first)


@native
@pytest.mark.parametrize("gate_shape", [(2, 8, 5), (2, 8, 1), (8, 1)], ids=["token", "channel", "no-batch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_the_gate_is_resolved_in_python_once_then_served_natively(asked, gate_shape, dtype) -> None:
    f, o = rand(2, 8, 5, seed=1, dtype=dtype), rand(2, 8, 5, seed=2, dtype=dtype)
    g, alpha = rand(*gate_shape, seed=3, dtype=dtype), torch.tensor(-0.7, dtype=dtype)
    gy = rand(2, 8, 5, seed=4, dtype=dtype)

    def step(python_backward=False):
        leaves = [t.detach().requires_grad_() for t in (f, o, g, alpha)]
        y = torch.ops.aqcf.gated_residual(*leaves)
        if python_backward:
            forget_choices()
        return [y.detach(), *torch.autograd.grad(y, leaves, gy)]

    first = step(python_backward=True)
    assert (asked["gated_residual"], asked["gated_residual_backward"]) == (1, 1)
    # the backward's signature (grad and gate_logits) is the forward's (f and gate_logits): either remembers both
    forget_choices()
    step()
    assert (asked["gated_residual"], asked["gated_residual_backward"]) == (2, 1)
    again = step()
    assert (asked["gated_residual"], asked["gated_residual_backward"]) == (2, 1)
    _same(again, first, ["y", "df", "do", "dg", "dalpha"])


@native
def test_what_decides_a_choice_drops_the_remembered_ones(asked, monkeypatch) -> None:
    inputs = attention_inputs(1, 2, 4, 3, 5, 6, 8, seed=7)

    def call():
        torch.ops.aqcf.cross_attention(*inputs, 0.5)
        return asked["cross_attention"]

    assert (call(), call()) == (1, 1)
    monkeypatch.setenv("AQCF_BACKEND", "")  # part of the signature: another one
    assert (call(), call()) == (2, 2)
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(not flash)  # PyTorch's switches of its kernels: part of it too
    try:
        assert (call(), call()) == (3, 3)
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
    assert call() == 3  # the first signature again
    with backends.use("torch"):  # a forced backend: signatures of its own
        assert (call(), call()) == (4, 4)
    assert call() == 4  # the choices made before the block serve after it
    with backends.use("torch"):
        assert call() == 4  # and those made under it, the next time it is forced
    monkeypatch.setitem(backends.ATTENTION.priority, "cpu", ["torch"])  # the priorities
    assert _C._remembered_attention_choices() == 0
    call()
    monkeypatch.setitem(backends.ATTENTION.backends, "torch", TA.TorchAttentionBackend())  # the registry
    assert _C._remembered_attention_choices() == 0


def _register_replacing(monkeypatch, method: str, replacement) -> None:
    """Register (as ``torch``) a subclass of the torch backend whose ``method`` is ``replacement``."""
    replaced = type("Replaced", (TA.TorchAttentionBackend,), {method: replacement})
    monkeypatch.setitem(backends.ATTENTION.backends, "torch", replaced())


@native
@pytest.mark.parametrize("method", ["cross_attention", "attention_forward", "kernel"])
def test_a_backend_whose_methods_were_replaced_is_asked_every_time(asked, monkeypatch, method) -> None:
    """The extension computes what the torch backend's own methods do: once a test (or a subclass) replaces
    one, its calls are never remembered, so the replacement keeps being asked."""
    original = getattr(TA.TorchAttentionBackend, method)
    calls = []

    def replaced(self, *args, **kwargs):
        calls.append(method)
        return original(self, *args, **kwargs)

    _register_replacing(monkeypatch, method, replaced)
    inputs = attention_inputs(1, 2, 4, 3, 5, 6, 8, seed=8)
    for _ in range(3):
        torch.ops.aqcf.cross_attention(*inputs, 0.5)
    assert asked["cross_attention"] == 3 and len(calls) >= 3
    assert _C._remembered_attention_choices() == 0


@native
def test_a_replaced_gate_is_asked_every_time(asked, monkeypatch) -> None:
    _register_replacing(monkeypatch, "gated_residual", lambda self, f, o, g, a: f + a * o)
    f = rand(2, 8, 5, seed=9)
    for _ in range(2):
        y = torch.ops.aqcf.gated_residual(f, f, f, torch.tensor(0.5, dtype=f.dtype))
    assert asked["gated_residual"] == 2 and torch.equal(y, 1.5 * f)


@native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("faster", ["cpu_flash", "cpu_flash_float32"])
def test_the_half_precision_route_is_measured_then_served_natively(
    asked, dtype, faster, tmp_path, monkeypatch, single_threaded
) -> None:
    """fp16/bf16 on CPU: 'auto' times the forward in the dtype and in float32 (here the other route is slowed
    down 0.1 s, on one thread: see test_tuning.py's deterministic-mode test for what two threads take on a busy
    machine), remembers the faster per direction, and the extension then serves the signature with that
    route: its outputs are the route's, bit for bit, and Python is not asked again."""
    monkeypatch.setenv("AQCF_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "mode", "measure")
    tuning.clear()
    real = TA._cpu_flash_forward

    def slowed(q, k, v, scale, in_float32=False):
        if in_float32 != (faster == "cpu_flash_float32"):
            time.sleep(0.1)
        return real(q, k, v, scale, in_float32)

    monkeypatch.setattr(TA, "_cpu_flash_forward", slowed)
    inputs = [t.to(dtype) for t in attention_inputs(1, 2, 12, 5, 9, 7, 8, seed=5)]
    q_a, k_a, v_a, q_b, k_b, v_b = inputs
    grads = [g.to(dtype) for g in output_grads(inputs, seed=6)]
    try:
        calls = _until_the_half_route_is_chosen(lambda: _attention_step(inputs, grads), inputs)
        assert asked["cross_attention"] == calls
        assert TA.cpu_kernel_chosen(q_a, k_b, v_b) == TA.cpu_kernel_chosen(q_b, k_a, v_a) == faster
        assert _C._remembered_attention_choices() == 1
        backwards = asked["cross_attention_backward"]
        again = _attention_step(inputs, grads)
        # remembered once chosen: the next forward and backward ran in C++ alone
        assert asked["cross_attention"] == calls and asked["cross_attention_backward"] == backwards
        float32 = faster == "cpu_flash_float32"
        expected = [*real(q_a, k_b, v_b, 0.3, float32), *real(q_b, k_a, v_a, 0.3, float32)]
        _same(again[:4], [expected[i] for i in (0, 2, 1, 3)], ["out_a", "out_b", "lse_a", "lse_b"])
        _same(_attention_step(inputs, grads), again)
    finally:
        tuning.clear()


def _until_the_half_route_is_chosen(call, inputs) -> int:
    """``call()`` until 'auto' has chosen both directions' half-precision route (a first measurement whose runs
    are close, as a busy machine can make them, is refined over later calls); how many calls that took."""
    q_a, k_a, v_a, q_b, k_b, v_b = inputs
    calls = 0
    while calls == 0 or None in (TA.cpu_kernel_chosen(q_a, k_b, v_b), TA.cpu_kernel_chosen(q_b, k_a, v_a)):
        call()
        calls += 1
        assert calls <= 1 + tuning.max_provisional_calls(2), "still provisional"
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rule", ["heuristic", "deterministic"])
def test_the_rule_runs_half_precision_cpu_attention_in_float32(
    dtype, rule, tmp_path, monkeypatch, single_threaded
) -> None:
    """'heuristic' mode and deterministic algorithms run the rule's route, float32, even for a signature whose
    measured choice (here the dtype's kernel: the float32 route is slowed down) is remembered in Python and in
    the extension; back in 'measure' mode without them, the measured route again."""
    monkeypatch.setenv("AQCF_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "mode", "measure")
    tuning.clear()
    real = TA._cpu_flash_forward

    def slowed(q, k, v, scale, in_float32=False):
        if in_float32:
            time.sleep(0.1)
        return real(q, k, v, scale, in_float32)

    monkeypatch.setattr(TA, "_cpu_flash_forward", slowed)
    inputs = [t.to(dtype) for t in attention_inputs(2, 1, 12, 5, 9, 7, 8, seed=8)]
    q_a, k_a, v_a, q_b, k_b, v_b = inputs

    def out_a():
        return torch.ops.aqcf.cross_attention(*inputs, 0.3)[0]

    try:
        _until_the_half_route_is_chosen(out_a, inputs)
        assert torch.equal(out_a(), real(q_a, k_b, v_b, 0.3)[0])  # measured: the dtype's kernel
        if rule == "heuristic":
            context = tuning.using("heuristic")
        else:
            context = contextlib.ExitStack()
            was = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            context.callback(torch.use_deterministic_algorithms, was)
        with context:
            assert TA.cpu_kernel_chosen(q_a, k_b, v_b) == "cpu_flash_float32"
            float32 = real(q_a, k_b, v_b, 0.3, True)[0]
            assert not torch.equal(float32, real(q_a, k_b, v_b, 0.3)[0])
            assert all(torch.equal(out_a(), float32) for _ in range(3))
        assert torch.equal(out_a(), real(q_a, k_b, v_b, 0.3)[0])
    finally:
        tuning.clear()


@native
def test_the_native_kernels_match_the_torch_backend_bit_for_bit() -> None:
    """``_C.attention_forward``/``_backward('cpu_flash' or 'cpu_flash_float32', ...)`` against the Python functions
    they mirror, including the query chunks of the backward (one head on two threads)."""
    q, k, v = rand(1, 1, 12, 8, seed=10), rand(1, 1, 5, 8, seed=11), rand(1, 1, 5, 8, seed=12)
    gy = rand(1, 1, 12, 8, seed=13)
    with intra_op_threads(2):
        assert TA.query_chunks(1, 12) > 1
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            args = [t.to(dtype) for t in (q, k, v)]
            for kernel in ("cpu_flash", "cpu_flash_float32"):
                out, lse = _C.attention_forward(kernel, *args, 0.3)
                _same([out, lse], TA._cpu_flash_forward(*args, 0.3, in_float32=kernel == "cpu_flash_float32"))
                got = _C.attention_backward(kernel, gy.to(dtype), *args, out, lse, 0.3)
                _same(got, TA._cpu_flash_backward(gy.to(dtype), *args, out, lse, 0.3))
    with pytest.raises(RuntimeError, match="attention kernel must be 'cpu_flash', 'cpu_flash_float32', 'flash' or"):
        _C.attention_forward("math", q, k, v, 0.3)


@native
@pytest.mark.parametrize(("kernel", "dtype"), [("flash", torch.bfloat16), ("efficient", torch.float32)])
@pytest.mark.parametrize("n_q", [50, 64], ids=["Nq-not-a-multiple-of-32", "Nq-64"])
def test_the_native_cuda_calls_on_meta_tensors(kernel, dtype, n_q) -> None:
    """The extension's calls of PyTorch's CUDA attention kernels (argument order, the outputs taken, the
    efficient kernel's padded log-sum-exp) through PyTorch's meta functions of those ops: the contract
    the Python path's own meta test holds (tests/attention/test_cuda_attention.py)."""
    b, h, n_k, e = 2, 3, 37, 16
    q = torch.empty(b, h, n_q, e, dtype=dtype, device="meta")
    k, v = (torch.empty(b, h, n_k, e, dtype=dtype, device="meta") for _ in range(2))
    out, lse = _C.attention_forward(kernel, q, k, v, 0.25)
    expected = TA._cuda_fused_forward(kernel, q, k, v, 0.25)
    assert (out.shape, out.dtype, out.stride()) == (expected[0].shape, dtype, expected[0].stride())
    assert (lse.shape, lse.dtype) == ((b, h, n_q), torch.float32) == (expected[1].shape, expected[1].dtype)
    grads = _C.attention_backward(kernel, torch.empty_like(out), q, k, v, out, lse, 0.25)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(g.dtype == dtype and g.is_contiguous() for g in grads)


@native
def test_a_differentiable_backward_goes_through_the_composites(asked) -> None:
    """The backward ops have no derivative (as FlashAttention's): the native autograd formulas take the
    composite attention and gate under create_graph=True, and only then; the second derivatives through
    them are the reference's."""
    inputs = [t.requires_grad_() for t in attention_inputs(1, 1, 3, 2, 4, 3, 8, seed=14)]
    f = rand(2, 4, 3, seed=15).requires_grad_()
    alpha = torch.tensor(0.5, dtype=f.dtype, requires_grad=True)

    def second_derivatives(attention, gate):
        out_a, out_b = attention(*inputs)
        y = gate(f, f, f, alpha)
        loss = out_a.square().sum() + out_b.sum() + y.square().sum()
        first = torch.autograd.grad(loss, [*inputs, f], create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), [*inputs, f, alpha])

    got = second_derivatives(QF.cross_attention, QF.gated_residual)
    assert (asked["composite_attention_backward"], asked["composite_gate_backward"]) == (1, 1)
    expected = second_derivatives(lambda *a: reference.cross_attention(*a, 8**-0.5), reference.gated_residual)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert rel(g, e) <= 1e-12, f"input {i}: relative error {rel(g, e):.2e}"
    out_a, out_b = QF.cross_attention(*inputs)
    (out_a.sum() + out_b.sum() + QF.gated_residual(f, f, f, alpha).sum()).backward()  # no create_graph
    assert (asked["composite_attention_backward"], asked["composite_gate_backward"]) == (1, 1), (
        "a plain backward took the composite path"
    )


@pytest.mark.skipif(_C is None, reason="without the extension the whole suite tests the Python definitions")
def test_the_python_definitions_pass_the_attention_tests(without_extension) -> None:
    """``AQCF_NO_EXTENSION=1``: the ops as defined without the extension, through the op's tests."""
    check = "from aqcf_kernels.ops import attention; assert not attention.NATIVE, 'the extension defines the ops'"
    without_extension(
        "tests/attention/test_cross_attention.py", "tests/attention/test_native_attention.py", check=check
    )


@native
def test_the_remembered_signatures_are_bounded(asked) -> None:
    """A program that keeps changing shapes stops adding signatures at the bound (csrc/cpu/choices.h); the
    calls past it are served through Python, correctly."""
    bound = 4096
    alpha = torch.tensor(0.5)
    for n in range(1, bound + 3):
        f = torch.full((1, 4, n), 2.0)
        y = torch.ops.aqcf.gated_residual(f, f, f, alpha)
    assert _C._remembered_attention_choices() == bound
    assert torch.equal(y, f + 0.5 * torch.sigmoid(f) * f)
    before = asked["gated_residual"]
    torch.ops.aqcf.gated_residual(f, f, f, alpha)  # the last shape, never remembered: Python again
    assert asked["gated_residual"] == before + 1

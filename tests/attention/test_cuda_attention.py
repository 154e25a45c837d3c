"""The ``torch`` attention backend on CUDA: PyTorch's flash and memory-efficient kernels through their
aten ops (``backends/torch/attention.py``), against the float64 reference, on a GPU.

Contract (DESIGN.md, FlashAttention's rule): fp32 ≤ 1e-5 relative to the float64 reference (the
memory-efficient kernel computes in fp32; tf32 off); fp16/bf16 within 2x the error of the materialised
attention run in the same dtype. Each case also checks which kernel served, so a silent fall back to
the chunked path fails.

Without a GPU the last tests still run: the aten calls (argument order, which outputs are taken, the
log-sum-exp's padding) on meta tensors, through PyTorch's own meta functions of those ops, and the
eligibility check's early answers. ``make check-cuda`` runs the meta test against the CUDA build too.
"""

from __future__ import annotations

import pytest
import torch

from aqcf_kernels.backends.torch import attention as TA

from ._util import ATTN_NAMES, attention_inputs, output_grads, reference_attention, rel, run_attention

needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def on_gpu(test):
    for mark in needs_gpu:
        test = mark(test)
    return test


@pytest.fixture(autouse=True)
def force_torch(monkeypatch):
    monkeypatch.setenv("AQCF_BACKEND", "torch")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _op(*inputs):
    return torch.ops.aqcf.cross_attention(*inputs, inputs[0].shape[-1] ** -0.5)


def _on_cuda(fn):
    def run(*inputs):
        return fn(*(t.cuda() for t in inputs))

    return run


def _served_by(inputs, dtype) -> str | None:
    q, k, v = (t.to(dtype).cuda() for t in inputs[:3])
    return TA.cuda_kernel(q, k, v)


# (B, H, N_qa, N_ka, N_qb, N_kb, E): unequal token counts, pooled keys, counts not multiples of 32
CASES = [(2, 2, 150, 150, 97, 97, 16), (1, 3, 130, 29, 70, 41, 32), (3, 1, 33, 8, 5, 64, 8)]
IDS = ["Na!=Nb-E16", "pooled-E32", "odd-E8"]


@on_gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float32_runs_the_efficient_kernel_within_contract(case):
    inputs = attention_inputs(*case, seed=41)
    assert _served_by(inputs, torch.float32) == "efficient"
    grads = output_grads(inputs, seed=42)
    ref = run_attention(reference_attention, inputs, torch.float64, grads)
    got = run_attention(_on_cuda(_op), inputs, torch.float32, grads)
    for name, o, r in zip(ATTN_NAMES, got, ref, strict=True):
        assert o.dtype == torch.float32 and o.is_cuda
        assert rel(o, r) <= 1e-5, f"{name}: relative error {rel(o, r):.2e}"


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_half_runs_flash_within_twice_materialised_reference(case, dtype):
    inputs = attention_inputs(*case, seed=43)
    assert _served_by(inputs, dtype) == "flash"
    grads = output_grads(inputs, seed=44)
    ref = run_attention(reference_attention, inputs, torch.float64, grads)
    baseline = run_attention(_on_cuda(reference_attention), inputs, dtype, grads)
    got = run_attention(_on_cuda(_op), inputs, dtype, grads)
    for name, o, e, r in zip(ATTN_NAMES, got, baseline, ref, strict=True):
        assert o.dtype == dtype
        assert rel(o, r) <= 2 * rel(e, r), f"{name}: {rel(o, r):.2e} vs materialised {dtype}: {rel(e, r):.2e}"


@on_gpu
def test_lse_matches_reference():
    inputs = attention_inputs(2, 2, 45, 20, 33, 70, 16, seed=45)
    scale = 16**-0.5
    q_a, k_a, v_a, q_b, k_b, v_b = inputs
    ref_a = torch.logsumexp(q_a @ k_b.transpose(-1, -2) * scale, dim=-1)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.ops.aqcf.cross_attention(*(t.to(dtype).cuda() for t in inputs), scale)
        assert out[2].shape == ref_a.shape and out[2].dtype == torch.float32
        assert rel(out[2], ref_a) <= (1e-5 if dtype == torch.float32 else 1e-2)


@on_gpu
@pytest.mark.parametrize(("dtype", "e"), [(torch.float64, 16), (torch.float32, 12)], ids=["fp64", "E12"])
def test_other_calls_take_the_chunked_path(dtype, e):
    """No fused kernel for float64 or a head size that is not a multiple of 8: the chunked path serves."""
    inputs = attention_inputs(1, 2, 20, 9, 11, 7, e, seed=46)
    assert _served_by(inputs, dtype) is None
    grads = output_grads(inputs, seed=47)
    ref = run_attention(reference_attention, inputs, torch.float64, grads)
    got = run_attention(_on_cuda(_op), inputs, dtype, grads)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, o, r in zip(ATTN_NAMES, got, ref, strict=True):
        assert rel(o, r) <= tol, f"{name}: relative error {rel(o, r):.2e}"


@on_gpu
def test_auto_picks_torch_on_cuda(monkeypatch):
    from aqcf_kernels.ops import attention as attention_ops

    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    assert attention_ops._select_attention(torch.zeros(1, 1, 1, 8, device="cuda")).name == "torch"


# ---- without a GPU: the calls' plumbing on meta tensors, through PyTorch's meta functions of the aten ops


@pytest.mark.parametrize(("kernel", "dtype"), [("flash", torch.bfloat16), ("efficient", torch.float32)])
@pytest.mark.parametrize("n_q", [50, 64], ids=["Nq-not-a-multiple-of-32", "Nq-64"])
def test_aten_calls_on_meta_tensors(kernel, dtype, n_q):
    """Argument order, the outputs taken, shapes and dtypes: the op's contract is ``out`` (B, H, Nq, E)
    contiguous in the input dtype and ``lse`` (B, H, Nq) in fp32 (the efficient kernel's is padded to a
    multiple of 32 rows: cut on the way out, padded again for its backward)."""
    b, h, n_k, e = 2, 3, 37, 16
    q = torch.empty(b, h, n_q, e, dtype=dtype, device="meta")
    k, v = (torch.empty(b, h, n_k, e, dtype=dtype, device="meta") for _ in range(2))
    out, lse = TA._cuda_fused_forward(kernel, q, k, v, 0.25)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, h, n_q) and lse.dtype == torch.float32
    grads = TA._cuda_fused_backward(kernel, torch.empty_like(out), q, k, v, out, lse, 0.25)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(g.dtype == dtype and g.is_contiguous() for g in grads)


@pytest.mark.parametrize(("dtype", "e"), [(torch.float64, 16), (torch.float32, 12), (torch.float16, 4)])
def test_no_fused_kernel_for_float64_or_head_sizes_off_the_multiple_of_8(dtype, e):
    q = torch.zeros(1, 1, 3, e, dtype=dtype)
    assert TA.cuda_kernel(q, q, q) is None


def test_eligibility_asks_pytorch_and_answers_on_a_cpu_tensor():
    """PyTorch's checks run (its SDPAParams constructor takes these arguments in this torch) and refuse
    a tensor that is not on a GPU."""
    q = torch.zeros(1, 1, 3, 16)
    assert TA.cuda_kernel(q, q, q) is None

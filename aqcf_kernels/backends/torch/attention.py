"""The ``torch`` backend of the attention family: any device, any floating dtype, always available.

On CPU it is PyTorch's own flash-attention kernel (what ``F.scaled_dot_product_attention`` runs
there), called through the aten op that also returns the log-sum-exp the backward needs, so the
forward/backward split of ``aqcf::cross_attention`` costs nothing extra; for fp16/bf16 inputs its float32
kernel serves the backward, and the forward whichever ``auto`` measured faster (:data:`IN_DTYPE`). On
CUDA it is, the same way, the kernel ``F.scaled_dot_product_attention`` would pick: FlashAttention-2
for fp16/bf16, the memory-efficient kernel for fp32, whenever PyTorch's own eligibility checks pass
(:func:`cuda_kernel`) — so the A-QCF block's attention is SDPA's by construction. Everything else
(float64, head sizes that are not a multiple of 8, other devices) runs a query-chunked attention in
plain PyTorch: memory grows with ``chunk × N_k``, never with ``N_q × N_k``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import tuning
from ..base import AttentionBackend, has_own_methods, lse_dtype

# Query rows per chunk of the generic path: 256 rows × 16384 keys × 4 B = 16 MB of scores.
CHUNK_ROWS = 256


def chunked_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``softmax(q kᵀ·scale) v`` and its log-sum-exp, ``CHUNK_ROWS`` query rows at a time (arithmetic in
    :func:`lse_dtype`)."""
    ct = lse_dtype(q.dtype)
    kc, vc = k.to(ct), v.to(ct)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=lse_dtype(q.dtype), device=q.device)
    for start in range(0, q.shape[-2], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        s = (q[..., rows, :].to(ct) @ kc.transpose(-1, -2)) * scale
        m = torch.logsumexp(s, dim=-1, keepdim=True)
        out[..., rows, :] = (torch.exp(s - m) @ vc).to(q.dtype)
        lse[..., rows] = m.squeeze(-1).to(lse.dtype)
    return out, lse


def chunked_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Flash-attention backward: recompute P from the saved log-sum-exp, one query chunk at a time.

    With ``δ = rowsum(dO ⊙ O)``: ``dV = Pᵀ dO``, ``dS = P ⊙ (dO Vᵀ − δ)``, ``dQ = dS K·scale``,
    ``dK = dSᵀ Q·scale``.
    """
    ct = lse_dtype(q.dtype)
    kc, vc = k.to(ct), v.to(ct)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=k.device)
    dv = torch.zeros(v.shape, dtype=ct, device=v.device)
    delta = (grad_out.to(ct) * out.to(ct)).sum(-1, keepdim=True)
    for start in range(0, q.shape[-2], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        qc, go = q[..., rows, :].to(ct), grad_out[..., rows, :].to(ct)
        p = torch.exp((qc @ kc.transpose(-1, -2)) * scale - lse[..., rows, None].to(ct))
        dv += p.transpose(-1, -2) @ go
        ds = p * (go @ vc.transpose(-1, -2) - delta[..., rows, :])
        dq[..., rows, :] = ((ds @ kc) * scale).to(q.dtype)
        dk += (ds.transpose(-1, -2) @ qc) * scale
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _dense_rows(t: Tensor) -> Tensor:
    # The private CPU kernel assumes unit stride along the head dim (F.scaled_dot_product_attention
    # checks that before calling it; we call it directly, so we must): a strided view gave wrong
    # results silently (one quaternion channel per head makes such views).
    return t if t.stride(-1) == 1 else t.contiguous()


def _cpu_flash_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, in_float32: bool = False
) -> tuple[Tensor, Tensor]:
    """PyTorch's CPU flash kernel; ``in_float32``: its float32 kernel on float32 copies, the output rounded once."""
    q, k, v = _dense_rows(q), _dense_rows(k), _dense_rows(v)
    dtype = q.dtype
    if in_float32:
        q, k, v = q.float(), k.float(), v.float()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out.to(dtype).contiguous(), lse.to(lse_dtype(dtype)).contiguous()


#: How PyTorch's CPU flash kernel may serve fp16/bf16 inputs (``auto``'s candidates): its kernel in the dtype, or its
#: float32 kernel on float32 copies with the output rounded once. Both meet the accuracy contract (the float32 one
#: with less error: tests/attention/test_cross_attention.py); which is faster depends on the CPU. On an AMD EPYC
#: (avx512_bf16, 2 threads, torch 2.13) float32 took 0.45-0.66x the fp16 kernel's time and 0.89-0.98x the bf16
#: one's; a CPU with AMX runs bf16 matrix products natively, so no rule holds for both. ``auto`` measures it per
#: call signature, as it measures conv algorithms; the rule (heuristic mode, deterministic algorithms) is float32,
#: the more accurate. The backward always runs in float32 (:func:`_cpu_flash_backward` says why).
IN_DTYPE = tuning.Candidate("torch", "cpu_flash")
IN_FLOAT32 = tuning.Candidate("torch", "cpu_flash_float32")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _half_route_fast_key(q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """The cheap key :func:`tuning.recall` takes for a half-precision CPU attention direction (the shapes, strides
    and dtype the kernels see, the thread count)."""
    return ("cpu_flash_half", q.dtype, *((t.shape, t.stride()) for t in (q, k, v)), torch.get_num_threads())


def _half_route_key(q: Tensor, k: Tensor, v: Tensor) -> str:
    """The tuning cache's key of the same direction, also naming where it runs (CPU model, threads): formatted
    only where :func:`tuning.recall` does not know the choice."""
    where = f"cpu:{tuning.fingerprint()['cpu']}:{torch.get_num_threads()}t"
    parts = ";".join(f"{list(t.shape)}/{list(t.stride())}" for t in (q, k, v))
    return f"cpu_flash_half|{where}|{str(q.dtype).removeprefix('torch.')}|{parts}"


def _cpu_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The CPU flash kernel; for fp16/bf16 inputs in the dtype or in float32, as ``auto`` measured
    (:data:`IN_DTYPE`)."""
    if q.dtype not in HALF_DTYPES:
        return _cpu_flash_forward(q, k, v, scale)
    fast_key = _half_route_fast_key(q, k, v)
    known = tuning.recall(fast_key)
    if known is None:

        def run(route: tuning.Candidate) -> tuple[Tensor, Tensor]:
            return _cpu_flash_forward(q, k, v, scale, in_float32=route == IN_FLOAT32)

        key = _half_route_key(q, k, v)
        choice, output = tuning.choose(key, [IN_FLOAT32, IN_DTYPE], IN_FLOAT32, run, (q, k, v), fast_key)
        if output is not None:
            return output
        known = choice.candidate
    return _cpu_flash_forward(q, k, v, scale, in_float32=known == IN_FLOAT32)


def cpu_kernel_chosen(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """The kernel that serves this CPU direction's later calls: ``'cpu_flash'``, or for fp16/bf16 inputs the one
    ``auto`` chose (``'cpu_flash_float32'`` for :data:`IN_FLOAT32`); ``None`` while that choice is provisional (its
    next calls still time the candidates) or unknown."""
    if q.dtype not in HALF_DTYPES:
        return "cpu_flash"
    if not tuning.measuring():
        return IN_FLOAT32.algorithm
    known = tuning.recall(_half_route_fast_key(q, k, v))
    return None if known is None else known.algorithm


def query_chunks(batch_heads: int, queries: int) -> int:
    """How many query chunks the CPU backward runs as extra heads: PyTorch's kernel runs one thread per
    (batch, head), since dK and dV sum over the queries; with fewer of them than threads (the 3D
    model's level 0: batch 1, one head, 32768 queries) the others idle. Then the queries are cut into
    chunks, each a head of its own with the same keys, and the chunks' dK and dV are added: 36 ms ->
    18 ms on 2 threads (Intel Xeon, 32768 x 512 keys, E 16). At least two chunks per thread (for
    balance), a divisor of the query count."""
    threads = torch.get_num_threads()
    if batch_heads >= threads:
        return 1
    chunks = -(-2 * threads // batch_heads)
    while chunks > 1 and queries % chunks:
        chunks -= 1
    return chunks


def cuda_kernel(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Which of PyTorch's fused CUDA attention kernels serves ``(q, k, v)``: ``'flash'``, ``'efficient'``
    or ``None`` (the chunked path). PyTorch's own checks decide (dtype, head size, strides, the GPU's
    architecture: the ones ``F.scaled_dot_product_attention`` runs), plus one of ours: SDPA pads the
    head dim to a multiple of 8 before calling these kernels; we call them directly, so we don't pad
    and leave other head sizes to the chunked path. Flash first where it can serve (fp16/bf16), as
    SDPA orders them."""
    if q.shape[-1] % 8 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    from torch.backends import cuda as sdp

    params = sdp.SDPAParams(q, k, v, None, 0.0, False, False)
    if q.dtype != torch.float32 and sdp.can_use_flash_attention(params):
        return "flash"
    if sdp.can_use_efficient_attention(params):
        return "efficient"
    return None


def _cuda_fused_forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    aten = torch.ops.aten
    if kernel == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
        lse = lse[..., : q.shape[-2]]  # the kernel pads its log-sum-exp rows to a multiple of 32
    return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


def _cuda_fused_backward(kernel: str, grad_out, q, k, v, out, lse, scale) -> tuple[Tensor, Tensor, Tensor]:
    aten = torch.ops.aten
    grad_out, out, lse = grad_out.contiguous(), _dense_rows(out), lse.float()
    # Without dropout neither kernel reads the RNG state its forward returned; these stand in for it.
    seed, offset = (torch.zeros(n, dtype=torch.int64, device=q.device) for n in ((2,), ()))
    if kernel == "flash":
        nq, nk = q.shape[-2], k.shape[-2]
        grads = aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, None, None, nq, nk, 0.0, False, seed, offset, scale=scale
        )
    else:
        padded = -(-q.shape[-2] // 32) * 32
        lse = torch.nn.functional.pad(lse, (0, padded - lse.shape[-1]))
        grads = aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, None, out, lse, seed[0], offset, 0.0, [True, True, True, False], False, scale=scale
        )
    return tuple(g.contiguous() for g in grads[:3])


def _cpu_flash_backward(grad_out, q, k, v, out, lse, scale) -> tuple[Tensor, Tensor, Tensor]:
    dtype = q.dtype
    q, k, v, out = _dense_rows(q), _dense_rows(k), _dense_rows(v), _dense_rows(out)
    if dtype in (torch.float16, torch.bfloat16):
        # PyTorch's float32 kernel: its fp16/bf16 one adds each block of 32 queries' dK and dV into its output in the
        # dtype, so the error grows with the query count (bf16, 32768 queries x 512 keys: 3.6 roundings, 2.8x the
        # materialised product's; FlashAttention's rule allows 2x), and the chunks' sums below would add partials
        # already rounded. Its fp16 kernel is also 8-10x slower than the float32 one (its bf16 one 1.1-1.7x faster;
        # AMD EPYC with avx512_bf16, 2 threads, torch 2.13).
        grad_out, q, k, v, out = (t.float() for t in (grad_out, q, k, v, out))
    # The kernel reads the log-sum-exp in its own dtype (what the forward returns: fp32 for half inputs).
    lse, grad_out = lse.to(q.dtype), grad_out.contiguous()
    b, h, nq, e = q.shape
    c = query_chunks(b * h, nq)
    if c > 1:  # (B, H, Nq, E) -> (B, H*c, Nq/c, E): a view of contiguous rows; K, V repeated per chunk
        q, out, grad_out = (t.contiguous().view(b, h * c, nq // c, e) for t in (q, out, grad_out))
        lse = lse.contiguous().view(b, h * c, nq // c)
        k, v = (t.unsqueeze(2).expand(b, h, c, *t.shape[2:]).reshape(b, h * c, *t.shape[2:]) for t in (k, v))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, scale=scale
    )
    if c > 1:
        dq = dq.reshape(b, h, nq, e)
        dk, dv = (t.view(b, h, c, *t.shape[2:]).sum(2) for t in (dk, dv))
    return tuple(t.to(dtype).contiguous() for t in (dq, dk, dv))


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    device_types = ("cpu", "cuda", "mps", "xpu")

    def unavailable(self) -> str | None:
        return None

    def cannot_serve_attention(self, q: Tensor) -> str | None:
        return None

    def cannot_serve_gate(self, f: Tensor, gate_logits: Tensor) -> str | None:
        return None

    def kernel(self, q: Tensor, k: Tensor, v: Tensor) -> str | None:
        """The PyTorch kernel that serves one direction: ``'cpu_flash'`` on CPU, ``'flash'`` or
        ``'efficient'`` on CUDA (:func:`cuda_kernel`, asked about the rows of unit stride the kernels get),
        or ``None``: the chunked path."""
        if q.device.type == "cpu":
            return "cpu_flash"
        if q.device.type == "cuda":
            return cuda_kernel(_dense_rows(q), _dense_rows(k), _dense_rows(v))
        return None

    def attention_forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        q, k, v = _dense_rows(q), _dense_rows(k), _dense_rows(v)
        kernel = self.kernel(q, k, v)
        if kernel == "cpu_flash":
            return _cpu_attention_forward(q, k, v, scale)
        if kernel is not None:
            return _cuda_fused_forward(kernel, q, k, v, scale)
        return chunked_attention_forward(q, k, v, scale)

    def attention_backward(self, grad_out, q, k, v, out, lse, scale) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = _dense_rows(q), _dense_rows(k), _dense_rows(v)
        kernel = self.kernel(q, k, v)  # the forward's: same tensors, same checks
        if kernel == "cpu_flash":
            return _cpu_flash_backward(grad_out, q, k, v, out, lse, scale)
        if kernel is not None:
            return _cuda_fused_backward(kernel, grad_out, q, k, v, out, lse, scale)
        return chunked_attention_backward(grad_out, q, k, v, out, lse, scale)

    def native_attention_kernel(self, q: Tensor, k: Tensor, v: Tensor) -> str | None:
        """:meth:`kernel`: the extension calls these kernels as this module does (csrc/cpu/attention_op.cpp,
        tested against it), unless a subclass or a test replaced the methods that run them."""
        own = ("kernel", "attention_forward", "attention_backward", "cross_attention", "cross_attention_backward")
        if not has_own_methods(self, TorchAttentionBackend, own):
            return None
        kernel = self.kernel(q, k, v)
        return cpu_kernel_chosen(_dense_rows(q), _dense_rows(k), _dense_rows(v)) if kernel == "cpu_flash" else kernel

    def native_gate(self) -> bool:
        return has_own_methods(self, TorchAttentionBackend, ("gated_residual", "gated_residual_backward"))

    def cross_attention(self, q_a, k_a, v_a, q_b, k_b, v_b, scale):
        out_a, lse_a = self.attention_forward(q_a, k_b, v_b, scale)
        out_b, lse_b = self.attention_forward(q_b, k_a, v_a, scale)
        return out_a, out_b, lse_a, lse_b

    def cross_attention_backward(self, grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, scale):
        dq_a, dk_b, dv_b = self.attention_backward(grad_a, q_a, k_b, v_b, out_a, lse_a, scale)
        dq_b, dk_a, dv_a = self.attention_backward(grad_b, q_b, k_a, v_a, out_b, lse_b, scale)
        return dq_a, dk_a, dv_a, dq_b, dk_b, dv_b

    # The extension's gate (csrc/cpu/attention_op.cpp) runs these ops in this order: results are identical.
    def gated_residual(self, f: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor) -> Tensor:
        # alpha · (s ⊙ o) added to f in one pass (addcmul), not two
        return torch.addcmul(f, alpha, torch.sigmoid(gate_logits) * o)

    def gated_residual_backward(self, grad, o, gate_logits, alpha) -> tuple[Tensor, Tensor, Tensor]:
        s = torch.sigmoid(gate_logits)
        d_alpha = (grad * (s * o)).sum().reshape(alpha.shape)
        go = grad * alpha
        # d sigmoid(g)/dg = s (1 - s), in one pass; the gate may broadcast (one value per channel): its
        # gradient sums over what it spans.
        d_g = torch.ops.aten.sigmoid_backward(go * o, s).sum_to_size(gate_logits.shape)
        return go * s, d_g, d_alpha

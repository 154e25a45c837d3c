"""Launchers for the Triton attention kernels, and the ``triton`` backend of the attention family.

Serves CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (as the conv backend does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import AttentionBackend
from . import common
from .common import triton

if triton is not None:
    from .attention_kernels import (
        attention_bwd_dkdv_kernel,
        attention_bwd_dq_kernel,
        attention_fwd_kernel,
        gated_residual_bwd_kernel,
        gated_residual_fwd_kernel,
    )

GATE_BLOCK = 1024


def _head_block(e: int) -> int:
    return max(16, common.next_power_of_2(e))


def _tiles(e: int) -> tuple[int, int]:
    if common.INTERPRET:  # interpreted programs cost per program: few, big tiles
        return 64, 64
    # Keep q, k, v tiles and the fp32 accumulator in registers up to E = 128.
    return (128, 64) if e <= 64 else (64, 64)


def _launch_options() -> dict:
    # FlashAttention's Triton settings for 128-row tiles at head sizes up to 128 (8 warps, a
    # 3-stage load pipeline); the interpreter takes none.
    return {} if common.INTERPRET else {"num_warps": 8, "num_stages": 3}


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


def cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale: float):
    q_a, k_a, v_a, q_b, k_b, v_b = _contiguous(q_a, k_a, v_a, q_b, k_b, v_b)
    b, h, n_qa, e = q_a.shape
    n_ka, n_qb, n_kb = k_a.shape[2], q_b.shape[2], k_b.shape[2]
    out_a, out_b = torch.empty_like(q_a), torch.empty_like(q_b)
    lse_a = torch.empty((b, h, n_qa), dtype=torch.float32, device=q_a.device)
    lse_b = torch.empty((b, h, n_qb), dtype=torch.float32, device=q_a.device)
    block_m, block_n = _tiles(e)
    dot_dtype, precision = common.dot_config(q_a.dtype)
    tiles_a = common.cdiv(n_qa, block_m)
    for bh0, count in common.axis_slices(b * h):
        attention_fwd_kernel[(tiles_a + common.cdiv(n_qb, block_m), count)](
            q_a, k_b, v_b, out_a, lse_a, q_b, k_a, v_a, out_b, lse_b,
            n_qa, n_ka, n_qb, n_kb, tiles_a, scale, bh0,
            E=e, DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_E=_head_block(e),
            **_launch_options(),
        )  # fmt: skip
    return out_a, out_b, lse_a, lse_b


def cross_attention_backward(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, scale):
    grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b = _contiguous(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b)
    lse_a, lse_b = lse_a.float().contiguous(), lse_b.float().contiguous()
    b, h, n_qa, e = q_a.shape
    n_ka, n_qb, n_kb = k_a.shape[2], q_b.shape[2], k_b.shape[2]
    # δ = rowsum(dO ⊙ O): one cheap elementwise pass, shared by both backward kernels.
    delta_a = (grad_a.float() * out_a.float()).sum(-1).contiguous()
    delta_b = (grad_b.float() * out_b.float()).sum(-1).contiguous()
    grads = [torch.empty_like(t) for t in (q_a, k_a, v_a, q_b, k_b, v_b)]
    dq_a, dk_a, dv_a, dq_b, dk_b, dv_b = grads
    block_m, block_n = _tiles(e)
    dot_dtype, precision = common.dot_config(q_a.dtype)
    consts = dict(E=e, DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_E=_head_block(e), **_launch_options())
    tiles_b = common.cdiv(n_kb, block_n)
    for bh0, count in common.axis_slices(b * h):
        attention_bwd_dkdv_kernel[(tiles_b + common.cdiv(n_ka, block_n), count)](
            q_a, k_b, v_b, grad_a, lse_a, delta_a, dk_b, dv_b,
            q_b, k_a, v_a, grad_b, lse_b, delta_b, dk_a, dv_a,
            n_qa, n_ka, n_qb, n_kb, tiles_b, scale, bh0, BLOCK_M=block_m, BLOCK_N=block_n, **consts,
        )  # fmt: skip
    tiles_a = common.cdiv(n_qa, block_m)
    for bh0, count in common.axis_slices(b * h):
        attention_bwd_dq_kernel[(tiles_a + common.cdiv(n_qb, block_m), count)](
            q_a, k_b, v_b, grad_a, lse_a, delta_a, dq_a,
            q_b, k_a, v_a, grad_b, lse_b, delta_b, dq_b,
            n_qa, n_ka, n_qb, n_kb, tiles_a, scale, bh0, BLOCK_M=block_m, BLOCK_N=block_n, **consts,
        )  # fmt: skip
    return dq_a, dk_a, dv_a, dq_b, dk_b, dv_b


def gated_residual(f: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor) -> Tensor:
    f, o, g = _contiguous(f, o, gate_logits.expand_as(f))
    y = torch.empty_like(f)
    numel = f.numel()
    gated_residual_fwd_kernel[(common.cdiv(numel, GATE_BLOCK),)](f, o, g, alpha, y, numel, BLOCK=GATE_BLOCK)
    return y


def gated_residual_backward(grad: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor):
    grad, o, g = _contiguous(grad, o, gate_logits.expand_as(o))
    d_o, d_g = torch.empty_like(o), torch.empty_like(g)
    programs = common.cdiv(o.numel(), GATE_BLOCK)
    partial = torch.empty(programs, dtype=torch.float32, device=o.device)
    gated_residual_bwd_kernel[(programs,)](grad, o, g, alpha, d_o, d_g, partial, o.numel(), BLOCK=GATE_BLOCK)
    d_alpha = partial.sum().to(alpha.dtype).reshape(alpha.shape)
    return d_o, d_g.sum_to_size(gate_logits.shape), d_alpha


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    device_types = ("cuda", "cpu")

    def unavailable(self) -> str | None:
        return common.unavailable()

    def cannot_serve_attention(self, q: Tensor) -> str | None:
        why = common.cannot_serve_tensor(q)
        if why is None and q.shape[-1] > 256:
            return f"head size {q.shape[-1]} > 256 reals does not fit the kernel's register tiles"
        return why

    def cannot_serve_gate(self, f: Tensor, gate_logits: Tensor) -> str | None:
        return common.cannot_serve_tensor(f)

    cross_attention = staticmethod(cross_attention)
    cross_attention_backward = staticmethod(cross_attention_backward)
    gated_residual = staticmethod(gated_residual)
    gated_residual_backward = staticmethod(gated_residual_backward)

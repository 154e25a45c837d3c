"""Plain helpers shared by the attention tests (seeded inputs, relative errors, forward+backward runs).

Everything here only drives the code under test and the reference; nothing re-derives attention.
"""

from __future__ import annotations

import torch

from aqcf_kernels import reference

ATTN_NAMES = ("out_a", "out_b", "dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b")


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> torch.Tensor:
    """Fresh normal values from a private generator (drawn in float64, then cast): never zeros, and the
    same seed gives the same numbers in every dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ over the whole tensor, measured in float64 on the CPU."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).norm() / ref.norm()).item()


def attention_inputs(b: int, h: int, n_qa: int, n_ka: int, n_qb: int, n_kb: int, e: int, seed: int):
    """``(q_a, k_a, v_a, q_b, k_b, v_b)`` in float64; k/v of a stream share their token count."""
    shapes = [(b, h, n, e) for n in (n_qa, n_ka, n_ka, n_qb, n_kb, n_kb)]
    return [rand(*s, seed=seed * 10 + i) for i, s in enumerate(shapes)]


def output_grads(inputs, seed: int):
    """Upstream gradients (float64) for out_a (shape of q_a) and out_b (shape of q_b)."""
    return rand(*inputs[0].shape, seed=seed), rand(*inputs[3].shape, seed=seed + 1)


def run_attention(fn, inputs, dtype, grads, use=("a", "b")):
    """``[out_a, out_b, d q_a, d k_a, d v_a, d q_b, d k_b, d v_b]`` of ``fn(*inputs)`` in ``dtype``.

    The loss is ``Σ out_s ⊙ grad_s`` over the streams in ``use``; a leaf that does not reach it keeps
    ``grad = None``.
    """
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out_a, out_b = fn(*leaves)[:2]
    loss = 0
    if "a" in use:
        loss = loss + (out_a * grads[0].to(dtype)).sum()
    if "b" in use:
        loss = loss + (out_b * grads[1].to(dtype)).sum()
    loss.backward()
    return [out_a.detach(), out_b.detach()] + [t.grad for t in leaves]


def reference_attention(*inputs, scale=None):
    """reference.cross_attention with the op's default scale 1/sqrt(E)."""
    scale = inputs[0].shape[-1] ** -0.5 if scale is None else scale
    return reference.cross_attention(*inputs, scale)


def reference_lse(inputs, scale=None):
    """The reference log-sum-exps ``(lse_a, lse_b)``: a's queries over b's keys, b's over a's."""
    q_a, k_a, v_a, q_b, k_b, v_b = inputs
    scale = q_a.shape[-1] ** -0.5 if scale is None else scale
    return reference.attention(q_a, k_b, v_b, scale)[1], reference.attention(q_b, k_a, v_a, scale)[1]

"""Launchers for the Triton attention kernels, and the ``triton`` backend of the attention family.

Serves CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (as the conv backend does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..base import AttentionBackend
from . import common
from .common import triton

if triton is not None:
    from triton.runtime import OutOfResources

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


class Tiles(NamedTuple):
    """A launch configuration of one attention kernel: its tiles of query rows (``BLOCK_M``) and key rows
    (``BLOCK_N``), its warps and its load pipeline's stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


#: The kernels' GPU configurations (``fwd``, ``dkdv``, ``dq``), by the dot's kind (``'half'``: fp16/bf16 operands,
#: ``'tf32'``, ``'ieee'``: fp32's default, FMAs) and BLOCK_E. Each is the largest that triton 3.6 compiles for
#: sm_90 without a spill within an H100's 227 KB of shared memory; with tensor cores, with both of the loop's
#: operands copied asynchronously where the dot allows (tests/triton_kernels/test_attention_static.py proves each,
#: ``tools/triton_resources.py --attention`` prints its figures). Up to 64 reals a head, FlashAttention's Triton
#: settings (128 query rows, 64 keys, 8 warps, a 3-stage load pipeline) serve. The dk/dv kernel holds dk, dv, k
#: and v for its whole loop, so it keeps the fewest key rows: above E = 128 (in TF32 from 128) only 32 fit, and
#: its P·dO and dS·Q products then run as ``mma.sync`` (a wgmma needs 64 rows). An FMA dot holds a row of one
#: operand and a column of the other per output a thread computes, so IEEE fp32 takes small tiles.
_FLASH = {"fwd": Tiles(128, 64, 8, 3), "dkdv": Tiles(128, 64, 8, 3), "dq": Tiles(128, 64, 8, 3)}
GPU_TILES: dict[tuple[str, int], dict[str, Tiles]] = {
    **{(dot, e): _FLASH for dot in ("half", "tf32") for e in (16, 32, 64)},
    ("half", 128): {"fwd": Tiles(64, 64, 8, 3), "dkdv": Tiles(64, 64, 8, 3), "dq": Tiles(64, 64, 8, 3)},
    ("half", 256): {"fwd": Tiles(64, 64, 8, 2), "dkdv": Tiles(64, 32, 8, 3), "dq": Tiles(64, 32, 8, 3)},
    ("tf32", 128): {"fwd": Tiles(64, 64, 8, 3), "dkdv": Tiles(64, 32, 8, 3), "dq": Tiles(64, 64, 8, 3)},
    ("tf32", 256): {"fwd": Tiles(64, 32, 8, 2), "dkdv": Tiles(32, 32, 8, 2), "dq": Tiles(32, 32, 8, 2)},
    ("ieee", 16): {"fwd": Tiles(128, 64, 8, 3), "dkdv": Tiles(64, 64, 8, 2), "dq": Tiles(128, 64, 8, 3)},
    ("ieee", 32): {"fwd": Tiles(128, 64, 8, 3), "dkdv": Tiles(32, 64, 8, 2), "dq": Tiles(128, 64, 8, 3)},
    ("ieee", 64): {"fwd": Tiles(64, 32, 8, 2), "dkdv": Tiles(16, 64, 8, 2), "dq": Tiles(64, 32, 8, 2)},
    ("ieee", 128): {"fwd": Tiles(64, 32, 8, 2), "dkdv": Tiles(16, 16, 8, 2), "dq": Tiles(64, 32, 8, 2)},
    ("ieee", 256): {"fwd": Tiles(32, 32, 8, 2), "dkdv": Tiles(16, 16, 8, 1), "dq": Tiles(32, 32, 8, 2)},
}
#: Under the interpreter, programs cost per program, not per element: few, big tiles (it takes no options).
INTERPRETER_TILES = Tiles(64, 64, 0, 0)
KERNEL_NAMES = ("fwd", "dkdv", "dq")


def dot_kind(dtype: torch.dtype) -> str:
    """The kind of dot the kernels run on a GPU for operands of ``dtype``: a key of :data:`GPU_TILES`."""
    return "half" if dtype.itemsize == 2 else common.dot_config(dtype)[1]


def gpu_tiles(kernel: str, dot: str, block_e: int) -> Tiles:
    """The configuration of ``kernel`` (``'fwd'``, ``'dkdv'``, ``'dq'``) on a GPU for a ``dot`` (:func:`dot_kind`)
    on head tiles of ``block_e`` reals (:data:`GPU_TILES`)."""
    return GPU_TILES[(dot, block_e)][kernel]


def first_tiles(kernel: str, dtype: torch.dtype, block_e: int) -> Tiles:
    """The configuration a launch of ``kernel`` tries first: :func:`gpu_tiles`, or the interpreter's."""
    return INTERPRETER_TILES if common.INTERPRET else gpu_tiles(kernel, dot_kind(dtype), block_e)


def smaller(tiles: Tiles) -> Tiles | None:
    """The next configuration to try where ``tiles`` needs more shared memory than the GPU has (an A100 has
    163 KB, a consumer GPU 99 KB, an H100 227): one stage fewer, then half the larger tile (down to 16 rows);
    ``None`` when nothing smaller is left."""
    if tiles.num_stages > 1:
        return tiles._replace(num_stages=tiles.num_stages - 1)
    if tiles.block_m >= tiles.block_n and tiles.block_m > 16:
        return tiles._replace(block_m=tiles.block_m // 2)
    if tiles.block_n > 16:
        return tiles._replace(block_n=tiles.block_n // 2)
    return None


#: The configuration a kernel launches with where its first did not fit the device, by (device, kernel, dtype,
#: dot precision, BLOCK_E): the first of :func:`first_tiles`' :func:`smaller` ones that the device could hold.
_LAUNCHED: dict[tuple, Tiles] = {}


def _launch(name: str, kernel, q: Tensor, heads: int, call: Callable[[Tiles], tuple[int, tuple]]) -> None:
    """Launch ``kernel`` (``name`` in :data:`KERNEL_NAMES`) in the configuration that fits ``q``'s device, on
    ``programs`` x ``heads`` programs where ``programs, args = call(tiles)`` (``args``: the kernel's arguments
    before the first (batch, head) of a slice of axis 1, which each slice's launch adds)."""
    e = q.shape[-1]
    block_e = _head_block(e)
    dot_dtype, precision = common.dot_config(q.dtype)
    consts = dict(E=e, BLOCK_E=block_e, DOT_DTYPE=dot_dtype, PRECISION=precision)
    key = (q.device.type, q.device.index, name, q.dtype, precision, block_e)
    first = first_tiles(name, q.dtype, block_e)
    tiles = _LAUNCHED.get(key, first)
    for i, (bh0, count) in enumerate(common.axis_slices(heads)):
        while True:
            programs, args = call(tiles)
            options = {} if common.INTERPRET else {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
            try:
                kernel[(programs, count)](*args, bh0, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **consts, **options)
                break
            except OutOfResources:
                # Raised before anything runs (triton checks a kernel's shared memory as it loads it): the first
                # launch tries smaller configurations until one fits; the later ones reuse it.
                if i > 0 or smaller(tiles) is None:
                    raise
                tiles = smaller(tiles)
    if tiles != first:
        _LAUNCHED[key] = tiles


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


def cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale: float):
    q_a, k_a, v_a, q_b, k_b, v_b = _contiguous(q_a, k_a, v_a, q_b, k_b, v_b)
    b, h, n_qa, e = q_a.shape
    n_ka, n_qb, n_kb = k_a.shape[2], q_b.shape[2], k_b.shape[2]
    out_a, out_b = torch.empty_like(q_a), torch.empty_like(q_b)
    lse_a = torch.empty((b, h, n_qa), dtype=torch.float32, device=q_a.device)
    lse_b = torch.empty((b, h, n_qb), dtype=torch.float32, device=q_a.device)

    def call(t: Tiles) -> tuple[int, tuple]:  # query tiles of a, then of b
        tiles_a = common.cdiv(n_qa, t.block_m)
        args = (q_a, k_b, v_b, out_a, lse_a, q_b, k_a, v_a, out_b, lse_b, n_qa, n_ka, n_qb, n_kb, tiles_a, scale)
        return tiles_a + common.cdiv(n_qb, t.block_m), args

    _launch("fwd", attention_fwd_kernel, q_a, b * h, call)
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
    sizes = (n_qa, n_ka, n_qb, n_kb)

    def dkdv_call(t: Tiles) -> tuple[int, tuple]:  # key tiles of b, then of a
        tiles_b = common.cdiv(n_kb, t.block_n)
        args = (
            q_a, k_b, v_b, grad_a, lse_a, delta_a, dk_b, dv_b, q_b, k_a, v_a, grad_b, lse_b, delta_b, dk_a, dv_a,
            *sizes, tiles_b, scale,
        )  # fmt: skip
        return tiles_b + common.cdiv(n_ka, t.block_n), args

    def dq_call(t: Tiles) -> tuple[int, tuple]:  # query tiles of a, then of b
        tiles_a = common.cdiv(n_qa, t.block_m)
        args = (q_a, k_b, v_b, grad_a, lse_a, delta_a, dq_a, q_b, k_a, v_a, grad_b, lse_b, delta_b, dq_b, *sizes)
        return tiles_a + common.cdiv(n_qb, t.block_m), (*args, tiles_a, scale)

    _launch("dkdv", attention_bwd_dkdv_kernel, q_a, b * h, dkdv_call)
    _launch("dq", attention_bwd_dq_kernel, q_a, b * h, dq_call)
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

"""The A-QCF block: bidirectional, gated quaternion cross-attention between two feature streams.

The paper (arXiv 2512.21760) does not publish its equations; this is OUR definition (README,
"A-QCF block"). For streams a and b, per direction (a ← b shown; b ← a has its own parameters):

* ``Q_a = QLinear_q(F_a)``, ``K_b = QLinear_k(F_b)``, ``V_b = QLinear_v(F_b)`` — quaternion 1×1 maps
  over tokens; ``kv_pool`` optionally average-pools K and V to at most that many tokens;
* heads split the quaternion channels, never the components (``layout.split_heads``);
* ``score = Re(Σ_c q_c ⊗ conj(k_c)) / sqrt(4·d)`` — the real dot product of a head's 4·d reals;
  softmax over b's tokens; ``Z_a = A · V_b`` (all four components weighted alike);
* ``O_a = QLinear_o(Z_a)``; gate ``G_a = sigmoid(QLinear_g(qcat(F_a, O_a)))``;
  ``F_a' = F_a + α_a · G_a ⊙ O_a`` with α_a a learnable scalar starting at 0 (a fresh block is the
  identity).

Parameters are grouped by the stream they read: ``qkv_a`` maps F_a to [Q for a ← b | K, V for
b ← a] in ONE quaternion conv (the same maps as three separate ones, one GEMM instead of three).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as QF
from .._fx import fx_leaf
from ..layout import like_layout, merge_heads, qcat, qsplit, quaternion_channels, split_heads
from .conv import QuaternionConv1d

GATES = ("token", "channel", "none")


def pooled_size(spatial: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
    """Spatial size after average-pooling by the smallest integer factor r (every dim ceil(s/r))
    that leaves at most ``max_tokens`` tokens."""
    r = 1
    while math.prod([-(-s // r) for s in spatial]) > max_tokens:  # (a list: torch.compile traces no generator here)
        r += 1
    return tuple(-(-s // r) for s in spatial)


class AQCFBlock(nn.Module):
    """Adaptive quaternion cross-fusion of two streams; ``forward(f_a, f_b) -> (f_a', f_b')``.

    Args:
        channels: real channels of both streams (blocked ``[r|i|j|k]``), a multiple of ``4·heads``.
        heads: attention heads; each owns ``channels / 4 / heads`` quaternion channels.
        kv_pool: if set, keys and values are average-pooled to at most this many tokens.
        gate: ``'token'`` (a gate per token and channel), ``'channel'`` (per channel, from the
            token-averaged features) or ``'none'`` (G = 1).
        bias: bias of the quaternion projections.
        algorithm: quaternion product algorithm of the projections ('auto', 'hamilton', 'fast8').

    Inputs ``f_a (B, C, *S_a)`` and ``f_b (B_b, C, *S_b)``: token counts may differ; sample n of a is
    fused with sample n of b; ``B_b = 1`` broadcasts (then ``f_b'`` has batch B). ``forward(f_a, None)``
    returns ``(f_a, None)`` untouched: one modality at inference.
    """

    def __init__(
        self,
        channels: int,
        heads: int = 4,
        kv_pool: int | None = None,
        gate: str = "token",
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        algorithm: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:
            raise ValueError(f"AQCFBlock: heads must be a positive int, got {heads!r}")
        if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0 or channels % (4 * heads):
            raise ValueError(
                f"AQCFBlock: channels must be a positive multiple of 4 * heads = {4 * heads} (each head owns whole "
                f"quaternion channels of all four components), got {channels!r}"
            )
        if kv_pool is not None and (not isinstance(kv_pool, int) or isinstance(kv_pool, bool) or kv_pool <= 0):
            raise ValueError(f"AQCFBlock: kv_pool must be None or a positive int, got {kv_pool!r}")
        if gate not in GATES:
            raise ValueError(f"AQCFBlock: gate must be one of {GATES}, got {gate!r}")
        self.channels, self.heads, self.kv_pool, self.gate = channels, heads, kv_pool, gate
        factory = {"device": device, "dtype": dtype, "bias": bias, "algorithm": algorithm}
        self.qkv_a = QuaternionConv1d(channels, 3 * channels, 1, **factory)
        self.qkv_b = QuaternionConv1d(channels, 3 * channels, 1, **factory)
        self.out_a = QuaternionConv1d(channels, channels, 1, **factory)
        self.out_b = QuaternionConv1d(channels, channels, 1, **factory)
        if gate != "none":
            self.gate_a = QuaternionConv1d(2 * channels, channels, 1, **factory)
            self.gate_b = QuaternionConv1d(2 * channels, channels, 1, **factory)
        self.alpha_a = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        self.alpha_b = nn.Parameter(torch.zeros((), device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """A fresh block: the projections initialised again (each by its own ``reset_parameters``) and
        ``alpha_a = alpha_b = 0``, so the block is the identity. Deferred initialisation calls this (a
        block built under ``torch.device('meta')``, then ``to_empty``: FSDP's ``reset_parameters`` loop),
        where the alphas would otherwise keep whatever the new memory held."""
        for module in self.children():
            module.reset_parameters()  # type: ignore[operator]
        with torch.no_grad():
            self.alpha_a.zero_()
            self.alpha_b.zero_()

    def _check(self, f_a: Tensor, f_b: Tensor) -> None:
        for name, f in (("f_a", f_a), ("f_b", f_b)):
            if not isinstance(f, Tensor) or f.dim() < 3:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"AQCFBlock: {name} must be (batch, channels, *spatial), got {shape}")
            quaternion_channels(f, f"AQCFBlock: {name}")
            if f.shape[1] != self.channels:
                raise ValueError(
                    f"AQCFBlock: {name} has {f.shape[1]} channels, the block was built for {self.channels}"
                )
            if 0 in f.shape[2:]:
                raise ValueError(f"AQCFBlock: {name} has no tokens (spatial size {tuple(f.shape[2:])})")
        if f_b.dtype != f_a.dtype or f_b.device != f_a.device:
            raise ValueError(f"AQCFBlock: f_b is {f_b.dtype} on {f_b.device} but f_a is {f_a.dtype} on {f_a.device}")
        if f_b.shape[0] not in (f_a.shape[0], 1):
            raise ValueError(
                f"AQCFBlock: batch sizes {f_a.shape[0]} (f_a) and {f_b.shape[0]} (f_b) differ; sample n of a is fused "
                "with sample n of b, or f_b has batch 1 and is shared"
            )

    def _keys_values(self, k: Tensor, v: Tensor, spatial: torch.Size) -> tuple[Tensor, Tensor]:
        if self.kv_pool is None or math.prod(spatial) <= self.kv_pool:
            return k, v
        size = pooled_size(tuple(spatial), self.kv_pool)
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(spatial) - 1]
        # Pooling commutes with the (linear) projections, so pooling their output is exact.
        kv = pool(torch.cat([k, v], 1).unflatten(2, spatial), size).flatten(2)
        return kv.chunk(2, dim=1)

    def _gate(self, conv: nn.Module, f: Tensor, o: Tensor) -> Tensor:
        if self.gate == "token":
            return conv(qcat([f, o]))
        return conv(qcat([f, o]).mean(2, keepdim=True))  # 'channel': (B, C, 1), broadcast over tokens

    @fx_leaf
    def forward(self, f_a: Tensor, f_b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if f_b is None:
            return f_a, None
        self._check(f_a, f_b)
        batch, cq = f_a.shape[0], self.channels // 4
        t_a, t_b = f_a.flatten(2), f_b.flatten(2)
        q_a, k_a, v_a = qsplit(self.qkv_a(t_a), cq)
        q_b, k_b, v_b = qsplit(self.qkv_b(t_b), cq)
        k_a, v_a = self._keys_values(k_a, v_a, f_a.shape[2:])
        k_b, v_b = self._keys_values(k_b, v_b, f_b.shape[2:])
        if f_b.shape[0] != batch:  # a shared batch-1 stream: broadcast views, no copies
            t_b, q_b, k_b, v_b = (t.expand(batch, -1, -1) for t in (t_b, q_b, k_b, v_b))
        heads = [split_heads(t, self.heads) for t in (q_a, k_a, v_a, q_b, k_b, v_b)]
        z_a, z_b = QF.cross_attention(*heads)
        o_a, o_b = self.out_a(merge_heads(z_a)), self.out_b(merge_heads(z_b))
        if self.gate == "none":
            out_a, out_b = t_a + self.alpha_a * o_a, t_b + self.alpha_b * o_b
        else:
            g_a, g_b = self._gate(self.gate_a, t_a, o_a), self._gate(self.gate_b, t_b, o_b)
            out_a = QF.gated_residual(t_a, o_a, g_a, self.alpha_a)
            out_b = QF.gated_residual(t_b, o_b, g_b, self.alpha_b)
        # Outputs in the inputs' layout (the tokens were computed channels-first): a channels_last
        # network stays channels_last past the block.
        return like_layout(out_a.view(f_a.shape), f_a), like_layout(out_b.view(batch, *f_b.shape[1:]), f_b)

    def extra_repr(self) -> str:
        s = f"channels={self.channels}, heads={self.heads}"
        if self.kv_pool is not None:
            s += f", kv_pool={self.kv_pool}"
        return s + f", gate={self.gate!r}"

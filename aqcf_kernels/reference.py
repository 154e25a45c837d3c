"""Ground truth for every quaternion op, in plain, readable PyTorch.

Nothing here is fast on purpose. Tests compare every backend and algorithm to these functions,
and the benchmarks use two of them as the baselines a user would otherwise run:

* :func:`quaternion_conv_naive` — 16 real convolutions, one per Hamilton-product term;
* :func:`quaternion_conv_expanded` — the 4x4 block real weight of Parcollet et al.
  (``torch.cat`` of signed component kernels) and one real convolution, which is what
  Pytorch-Quaternion-Neural-Networks, speechbrain, hTorch and HyperNets all do.

Conventions (see README): quaternion tensors are blocked ``[r | i | j | k]`` along dim 1; a
quaternion conv computes ``y = W ⊗ x`` (weight on the left); the weight is one tensor of shape
``(4, out/4, in/4/groups, *kernel)`` (transposed: ``(4, in/4, out/4/groups, *kernel)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# HAMILTON[c][a] = (p, sign): output component c receives sign * (W_p * x_a).
# Row c of Parcollet's expanded weight is [sign * W_p for a in r, i, j, k].
R, I, J, K = 0, 1, 2, 3
HAMILTON: tuple[tuple[tuple[int, int], ...], ...] = (
    ((R, +1), (I, -1), (J, -1), (K, -1)),  # y_r = W_r x_r - W_i x_i - W_j x_j - W_k x_k
    ((I, +1), (R, +1), (K, -1), (J, +1)),  # y_i = W_i x_r + W_r x_i - W_k x_j + W_j x_k
    ((J, +1), (K, +1), (R, +1), (I, -1)),  # y_j = W_j x_r + W_k x_i + W_r x_j - W_i x_k
    ((K, +1), (J, -1), (I, +1), (R, +1)),  # y_k = W_k x_r - W_j x_i + W_i x_j + W_r x_k
)


def split_components(x: Tensor, dim: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a blocked ``[r | i | j | k]`` tensor into its four components along ``dim``."""
    if x.shape[dim] % 4:
        raise ValueError(f"dimension {dim} has size {x.shape[dim]}, not a multiple of 4")
    return tuple(x.chunk(4, dim=dim))  # type: ignore[return-value]


def hamilton_product(q: Tensor, p: Tensor, dim: int = 1) -> Tensor:
    """Element-wise Hamilton product ``q ⊗ p`` of two blocked quaternion tensors."""
    qc, pc = split_components(q, dim), split_components(p, dim)
    out = []
    for row in HAMILTON:
        terms = [sign * qc[comp] * pc[a] for a, (comp, sign) in enumerate(row)]
        out.append(terms[0] + terms[1] + terms[2] + terms[3])
    return torch.cat(out, dim=dim)


def conjugate(q: Tensor, dim: int = 1) -> Tensor:
    """Quaternion conjugate ``(r, -i, -j, -k)`` of a blocked tensor."""
    r, i, j, k = split_components(q, dim)
    return torch.cat([r, -i, -j, -k], dim=dim)


def expand_weight(weight: Tensor) -> Tensor:
    """Parcollet's real block weight: ``(4, A, B, *k)`` -> ``(4A, 4B, *k)``.

    Exactly the ``torch.cat`` construction of Pytorch-Quaternion-Neural-Networks::

        [[r, -i, -j, -k],
         [i,  r, -k,  j],
         [j,  k,  r, -i],
         [k, -j,  i,  r]]

    For a conv, A = out/4 and B = in/4; for a transposed conv, A = in/4 and B = out/4 (the
    same matrix, read as torch's ``(in, out)`` transposed-conv weight).
    """
    r, i, j, k = weight.unbind(0)
    return torch.cat(
        [
            torch.cat([r, -i, -j, -k], dim=1),
            torch.cat([i, r, -k, j], dim=1),
            torch.cat([j, k, r, -i], dim=1),
            torch.cat([k, -j, i, r], dim=1),
        ],
        dim=0,
    )


def _conv_fn(spatial_dims: int, transposed: bool):
    if transposed:
        return (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial_dims - 1]
    return (F.conv1d, F.conv2d, F.conv3d)[spatial_dims - 1]


def _real_conv(x, w, spatial_dims, transposed, stride, padding, dilation, groups, output_padding):
    fn = _conv_fn(spatial_dims, transposed)
    if transposed:
        return fn(x, w, None, stride, padding, output_padding, groups, dilation)
    return fn(x, w, None, stride, padding, dilation, groups)


def quaternion_conv_naive(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    transposed: bool = False,
    output_padding=0,
) -> Tensor:
    """Quaternion (transposed) convolution as 16 real (transposed) convolutions.

    ``groups`` partitions the quaternion channels; inside one component block that is exactly
    torch's own ``groups``, so each of the 16 products is a plain grouped real conv.
    A transposed conv is the adjoint of the conv with the same weight: output component c
    collects the products of column c of the Hamilton matrix.
    """
    spatial_dims = weight.dim() - 3
    xs = split_components(input)
    outs = []
    for c in range(4):
        y = None
        for a in range(4):
            p, sign = HAMILTON[a][c] if transposed else HAMILTON[c][a]
            term = sign * _real_conv(
                xs[a],
                weight[p],
                spatial_dims,
                transposed,
                stride,
                padding,
                dilation,
                groups,
                output_padding,
            )
            y = term if y is None else y + term
        outs.append(y)
    y = torch.cat(outs, dim=1)
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * spatial_dims))
    return y


def _to_group_major(x: Tensor, groups: int) -> Tensor:
    """``[r|i|j|k]`` with each block split in ``groups`` -> ``[g0: r i j k | g1: r i j k | ...]``."""
    n, c = x.shape[:2]
    return x.reshape(n, 4, groups, c // 4 // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def _from_group_major(x: Tensor, groups: int) -> Tensor:
    n, c = x.shape[:2]
    return x.reshape(n, groups, 4, c // 4 // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def quaternion_conv_expanded(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    transposed: bool = False,
    output_padding=0,
) -> Tensor:
    """Quaternion (transposed) convolution as ONE real conv on Parcollet's expanded weight.

    With ``groups > 1`` the expanded weight of each group is built separately and the channels
    are reordered group-major around the conv, because torch's ``groups`` on a blocked tensor
    would pair r-channels of one group with i-channels of another (the speechbrain bug).
    """
    spatial_dims = weight.dim() - 3
    per_group = weight.chunk(groups, dim=1)
    w = torch.cat([expand_weight(wg) for wg in per_group], dim=0)
    x = _to_group_major(input, groups) if groups > 1 else input
    y = _real_conv(x, w, spatial_dims, transposed, stride, padding, dilation, groups, output_padding)
    if groups > 1:
        y = _from_group_major(y, groups)
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * spatial_dims))
    return y


# --------------------------------------------------------------------------------------------
# A-QCF cross-attention (see aqcf_kernels.nn.attention for the block this is part of)
# --------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Materialised ``softmax(q kᵀ · scale) v`` and the log-sum-exp of each score row.

    ``q`` is ``(B, H, Nq, E)``, ``k`` and ``v`` are ``(B, H, Nk, E)``. With a head's ``E = 4·d``
    reals laid out ``[r | i | j | k]``, the real dot product ``q·k`` is ``Re(Σ_c q_c ⊗ conj(k_c))``
    over the head's ``d`` quaternion channels, so this is the quaternion score of the A-QCF block.
    """
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def cross_attention(
    q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor, v_b: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Both directions of the A-QCF attention: a's queries read b's keys/values and vice versa."""
    return attention(q_a, k_b, v_b, scale)[0], attention(q_b, k_a, v_a, scale)[0]


def gated_residual(f: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor) -> Tensor:
    """``f + α · sigmoid(g) ⊙ o``: the A-QCF block's gate-and-residual epilogue."""
    return f + alpha * torch.sigmoid(gate_logits) * o


# --------------------------------------------------------------------------------------------
# Quaternion recurrent layers (see aqcf_kernels.nn.recurrent), the way speechbrain builds them
# --------------------------------------------------------------------------------------------
#
# Everything here is time-major: ``input`` is ``(T, B, in_features)``, states are ``(B, H)``.
# Every projection is the expanded-weight quaternion linear map (speechbrain's ``QLinear``: the
# 4x4 block real weight, rebuilt on every call, and one real matmul). A layer projects the input of
# all time steps at once, then loops over time adding the projection of the previous hidden state.
#
# Gates, as speechbrain's q_RNN.py applies them: the projection of one step, ``G * H`` reals laid
# out [r | i | j | k] (``G * Hq`` quaternions each), is cut into G equal consecutive pieces, and each
# piece, ``H`` reals, is one gate read as a blocked ``[r | i | j | k]`` tensor of ``Hq`` quaternions
# (speechbrain's ``gates.chunk(4 * G)`` and ``torch.cat`` of four chunks is exactly ``chunk(G)``). So
# with G = 4 the first gate is the real component block of the projection, the second the i block,
# and so on; Parcollet's original QLSTM instead gives each gate a quaternion linear map of its own.
# Gate order: LSTM (input, forget, output, candidate), speechbrain's, not torch.nn.LSTM's (i, f, g, o);
# LiGRU (candidate, update).


def quaternion_linear_expanded(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = W ⊗ x`` over the last dim as ONE real matmul on the expanded weight; ``weight`` ``(4, out/4, in/4)``.

    ``expand_weight(W)`` is ``(out, in)``; its transpose is speechbrain's ``cat_kernels_4_quaternion``
    (``(in, out)``, the same ``torch.cat`` construction with its ``(in/4, out/4)`` components), so
    ``input @ expand_weight(W).T`` is ``quaternion_linear_op``.
    """
    y = input @ expand_weight(weight).t()
    return y if bias is None else y + bias


def quaternion_batch_norm_rows(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-4,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
) -> Tensor:
    """speechbrain's ``QBatchNorm`` output on rows ``x`` ``(N, 4Cq)``: ``γ (x − μ) / sqrt(σ² + eps) + β``.

    ``μ`` per real column and ``σ² = mean |x − μ|²`` per quaternion column, from the batch, or from
    ``running_mean`` / ``running_var`` when given (eval mode). ``weight`` (γ) is ``(Cq,)``, ``bias`` (β) ``(4Cq,)``.
    """
    if running_mean is None:
        mean = x.mean(0)
        r, i, j, k = split_components(x - mean, dim=1)
        var = (r * r + i * i + j * j + k * k).mean(0)
    else:
        mean, var = running_mean, running_var
    scale = torch.cat([var, var, var, var]).add(eps).rsqrt() * torch.cat([weight, weight, weight, weight])
    return (x - mean) * scale + bias


def _time_order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def quaternion_rnn_layer(
    input: Tensor,
    h0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    nonlinearity: str = "tanh",
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One direction of a quaternion Elman RNN: ``h_t = act(W_ih ⊗ x_t + b_ih + W_hh ⊗ h_{t−1} + b_hh)``.

    ``act`` is tanh or ReLU (speechbrain's ``QRNN``). ``reverse`` runs from the last step to the first.
    Returns ``(output (T, B, H), h_last)`` where ``h_last`` is the state after the last step processed.
    """
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    wx = quaternion_linear_expanded(input, weight_ih, bias_ih)  # every time step at once
    h, outputs = h0, [None] * input.shape[0]
    for t in _time_order(input.shape[0], reverse):
        h = act(wx[t] + quaternion_linear_expanded(h, weight_hh, bias_hh))
        outputs[t] = h
    return torch.stack(outputs), h


def quaternion_lstm_layer(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of a quaternion LSTM (speechbrain's ``QLSTM`` cell, gates i, f, o, g).

    ``c_t = σ(f) c_{t−1} + σ(i) tanh(g)``, ``h_t = σ(o) tanh(c_t)``, element-wise on every real
    component. Returns ``(output (T, B, H), h_last, c_last)``.
    """
    wx = quaternion_linear_expanded(input, weight_ih, bias_ih)
    h, c, outputs = h0, c0, [None] * input.shape[0]
    for t in _time_order(input.shape[0], reverse):
        i, f, o, g = (wx[t] + quaternion_linear_expanded(h, weight_hh, bias_hh)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs[t] = h
    return torch.stack(outputs), h, c


def quaternion_ligru_layer(
    input: Tensor,
    h0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    norm=None,
    nonlinearity: str = "relu",
    negative_slope: float = 0.01,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One direction of a quaternion light GRU (Ravanelli et al. 2018; speechbrain's ``QLiGRU``).

    ``[a | z] = norm(W_ih ⊗ x_t + b_ih) + W_hh ⊗ h_{t−1}``, ``z ← σ(z)``, ``h_t = z h_{t−1} + (1 − z) act(a)``:
    one update gate, no reset gate, a ReLU candidate (or leaky ReLU / tanh), and ``norm`` (a function
    of the ``(T·B, 2H)`` rows, e.g. :func:`quaternion_batch_norm_rows`; ``None`` for none) on the input
    projection of all steps together. Returns ``(output (T, B, H), h_last)``.
    """
    act = {
        "relu": torch.relu,
        "tanh": torch.tanh,
        "leaky_relu": lambda v: F.leaky_relu(v, negative_slope),
    }[nonlinearity]
    wx = quaternion_linear_expanded(input, weight_ih, bias_ih)
    if norm is not None:
        wx = norm(wx.reshape(-1, wx.shape[-1])).reshape(wx.shape)
    h, outputs = h0, [None] * input.shape[0]
    for t in _time_order(input.shape[0], reverse):
        a, z = (wx[t] + quaternion_linear_expanded(h, weight_hh)).chunk(2, dim=-1)
        z = torch.sigmoid(z)
        h = z * h + (1 - z) * act(a)
        outputs[t] = h
    return torch.stack(outputs), h


def quaternion_recurrent(
    mode: str,
    input: Tensor,
    layers: list[list[dict]],
    h0: Tensor,
    c0: Tensor | None = None,
    **cell_kwargs,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A stack of quaternion recurrent layers, torch.nn's way: time-major, every layer and direction looped.

    ``mode`` is 'rnn', 'lstm' or 'ligru'; ``layers[l][d]`` holds the keyword arguments of layer
    ``l``, direction ``d`` (0 forward, 1 reverse) for :func:`quaternion_rnn_layer` /
    :func:`quaternion_lstm_layer` / :func:`quaternion_ligru_layer` (``weight_ih``, ``weight_hh``,
    ``bias_ih``, ``bias_hh`` or ``norm``). ``h0`` (and ``c0``) are ``(layers · directions, B, H)``,
    index ``l · directions + d``. A layer's output is the plain concatenation of its directions'
    outputs along the features (forward first), as torch.nn and speechbrain do, and is the next
    layer's input. Returns ``(output (T, B, directions · H), h_n, c_n)`` (``c_n`` None but for LSTM).
    """
    x, hs, cs = input, [], []
    for lay, directions in enumerate(layers):
        outs = []
        for d, params in enumerate(directions):
            k = lay * len(directions) + d
            if mode == "lstm":
                out, h, c = quaternion_lstm_layer(x, h0[k], c0[k], **params, reverse=d == 1, **cell_kwargs)
                cs.append(c)
            elif mode == "rnn":
                out, h = quaternion_rnn_layer(x, h0[k], **params, reverse=d == 1, **cell_kwargs)
            else:
                out, h = quaternion_ligru_layer(x, h0[k], **params, reverse=d == 1, **cell_kwargs)
            outs.append(out)
            hs.append(h)
        x = torch.cat(outs, dim=-1)
    return x, torch.stack(hs), torch.stack(cs) if cs else None


# --------------------------------------------------------------------------------------------
# Rotation ("spinor") layers: y = W ⊗ x ⊗ W⁻¹ on the pure part (see aqcf_kernels.nn.rotation)
# --------------------------------------------------------------------------------------------
#
# Written literally: every weight quaternion rotates every input quaternion it meets with two
# Hamilton products, independently of the library's closed-form rotation matrix. Components are
# stacked on dim 0 here (``(4, ...)``), so one product broadcasts over any (out, in, tap, position).


def _hamilton_stacked(q: Tensor, p: Tensor) -> Tensor:
    """``q ⊗ p`` for quaternions stacked on dim 0 (``(4, ...)``, broadcasting), with the HAMILTON table."""
    rows = []
    for row in HAMILTON:
        terms = [sign * q[comp] * p[a] for a, (comp, sign) in enumerate(row)]
        rows.append(terms[0] + terms[1] + terms[2] + terms[3])
    return torch.stack(rows)


def rotate_pure(w: Tensor, v: Tensor, eps: float = 1e-4) -> Tensor:
    """``(w ⊗ v ⊗ w* + eps · v) / (|w|² + eps)`` for ``w`` ``(4, ...)`` and pure ``v`` ``(3, ...)``: ``(3, ...)``.

    Parcollet's and speechbrain's rotation normalises ``q = w / sqrt(|w|² + eps)`` and applies the
    matrix with ``1 - 2(q_j² + q_k²)`` etc. on its diagonal; for ``|q| < 1`` that matrix is the
    rotation ``q ⊗ v ⊗ q*`` plus ``(1 - |q|²) v``, which is this expression. ``eps=0``: the pure rotation.
    """
    x = torch.cat([torch.zeros_like(v[:1]), v])
    w_conj = torch.cat([w[:1], -w[1:]])
    rotated = _hamilton_stacked(_hamilton_stacked(w, x), w_conj)[1:]
    return (rotated + eps * v) / ((w * w).sum(0) + eps)


def _pure_blocks(x: Tensor, dim: int, quaternion_format: bool) -> Tensor:
    """The ``[i|j|k]`` blocks of ``x`` along ``dim``, stacked on a new dim 0: ``(3, ...)``."""
    blocks = x.chunk(4 if quaternion_format else 3, dim=dim)
    return torch.stack(blocks[1:] if quaternion_format else blocks)


def _with_real_block(pure: Tensor, dim: int, quaternion_format: bool) -> Tensor:
    """``(3, ...)`` components back to one blocked tensor, a zero real block first if ``quaternion_format``."""
    blocks = list(pure.unbind(0))
    if quaternion_format:
        blocks.insert(0, torch.zeros_like(blocks[0]))
    return torch.cat(blocks, dim=dim)


def quaternion_rotation_conv_reference(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    transposed: bool = False,
    output_padding=0,
    scale: Tensor | None = None,
    quaternion_format: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """Rotation conv ``y_o(t) = Σ_{i, tap} scale · rotate_pure(W_{o,i,tap}, x_i(t + tap))``, literally.

    The input patches are gathered with a one-hot (im2col) conv, so stride, padding and dilation
    are torch's; then every (output, input, tap) weight quaternion rotates every patch quaternion
    (:func:`rotate_pure`) and the results are summed. ``groups`` partitions the quaternion channels.
    The real output block is zero with ``quaternion_format`` (the real input block is ignored);
    without it input and output are ``[i|j|k]`` tensors. A transposed conv is the adjoint of the
    conv with the same weight, computed here as the vector-Jacobian product of this conv.
    """
    spatial_dims = weight.dim() - 3
    n_blocks = 4 if quaternion_format else 3
    if transposed:
        out_sizes = [
            (size - 1) * s - 2 * p + d * (k - 1) + op + 1
            for size, s, p, d, k, op in zip(
                input.shape[2:],
                _ntuple(stride, spatial_dims),
                _ntuple(padding, spatial_dims),
                _ntuple(dilation, spatial_dims),
                weight.shape[3:],
                _ntuple(output_padding, spatial_dims),
                strict=True,
            )
        ]
        z = input.new_zeros((input.shape[0], n_blocks * weight.shape[2] * groups, *out_sizes), requires_grad=True)
        with torch.enable_grad():
            forward = quaternion_rotation_conv_reference(
                z,
                weight,
                None,
                stride,
                padding,
                dilation,
                groups,
                scale=scale,
                quaternion_format=quaternion_format,
                eps=eps,
            )
            (y,) = torch.autograd.grad(forward, z, grad_outputs=input, create_graph=True)
    else:
        kernel = weight.shape[3:]
        taps = 1
        for k in kernel:
            taps *= k
        one_hot = torch.eye(taps, dtype=input.dtype, device=input.device).reshape(taps, 1, *kernel)
        channels = input.shape[1]
        patches = _real_conv(
            input,
            one_hot.repeat(channels, *([1] * (spatial_dims + 1))),
            spatial_dims,
            False,
            stride,
            padding,
            dilation,
            channels,
            0,
        )  # (N, C * taps, *out): channel-major
        out_spatial = patches.shape[2:]
        patches = patches.reshape(input.shape[0], channels, taps, *out_spatial)
        v = _pure_blocks(patches, 1, quaternion_format)  # (3, N, Cq, taps, *out)
        cq_group = v.shape[2] // groups
        v = v.reshape(3, v.shape[1], groups, 1, cq_group, taps, *out_spatial)  # (3, N, G, 1, B, taps, *out)
        a_group = weight.shape[1] // groups
        w = weight.reshape(4, 1, groups, a_group, cq_group, taps, *([1] * spatial_dims))  # (4, 1, G, A, B, taps)
        rotated = rotate_pure(w, v, eps)  # (3, N, G, A, B, taps, *out)
        if scale is not None:
            rotated = rotated * scale.reshape(1, 1, groups, a_group, cq_group, taps, *([1] * spatial_dims))
        pure = rotated.sum(dim=(4, 5)).flatten(2, 3)  # (3, N, out quaternions, *out)
        y = _with_real_block(pure, 1, quaternion_format)
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * spatial_dims))
    return y


def quaternion_rotation_linear_reference(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    quaternion_format: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """Rotation linear map over the last dim, weight ``(4, A, B)``.

    ``y_o = Σ_i scale_{o,i} · rotate_pure(W_{o,i}, x_i)``, blocks as in :func:`quaternion_rotation_conv_reference`.
    """
    v = _pure_blocks(input, -1, quaternion_format).unsqueeze(-2)  # (3, ..., 1, B)
    rotated = rotate_pure(weight, v, eps)  # (3, ..., A, B)
    if scale is not None:
        rotated = rotated * scale
    y = _with_real_block(rotated.sum(-1), -1, quaternion_format)
    return y if bias is None else y + bias


def _ntuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n

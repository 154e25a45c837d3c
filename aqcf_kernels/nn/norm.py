"""Quaternion batch and instance normalisation, with ``torch.nn.BatchNorm*d`` / ``InstanceNorm*d`` signatures.

``num_features`` counts REAL channels of a blocked ``[r|i|j|k]`` tensor (a multiple of 4); a
quaternion channel ``c`` is the real channels ``(c, Cq + c, 2Cq + c, 3Cq + c)``. Two modes:

**Shared variance** (default; Parcollet et al. 2019, speechbrain's ``QBatchNorm``). With ``μ`` the
mean of each real channel and ``σ²`` ONE variance per quaternion channel, the expected squared
modulus of the centred quaternion,

    σ² = E|x − μ|² = E[(x_r − μ_r)² + (x_i − μ_i)² + (x_j − μ_j)² + (x_k − μ_k)²],
    y  = γ · (x − μ) / sqrt(σ² + eps) + β,

with ``γ`` one scalar per quaternion channel (shape ``(Cq,)``) and ``β`` one per real channel
(``(4Cq,)``). Every component of a quaternion is divided by the same number, so the layer keeps its
direction: with ``β = 0`` it commutes with multiplying the input by a unit quaternion (a rotation of R⁴).

**Whitening** (``whiten=True``; Gaudet & Maida 2018). ``V = E[(x − μ)(x − μ)ᵀ]`` is the 4×4
covariance of the four components of each quaternion channel, and

    V + eps·I = L Lᵀ  (Cholesky),   y = γ · L⁻¹ (x − μ) + β,

so ``L⁻¹(x − μ)`` has identity covariance. Where the components are (nearly) linearly dependent, V is
singular and ``eps`` can be below its rounding (float32, V ~ 1e6): those channels' factorisation gets a
jitter of ``3e-5 · tr V`` on top of ``eps`` instead of failing (NaN); see :func:`_whitening_matrix`.
``γ`` is a full 4×4 matrix per quaternion channel
(``(Cq, 4, 4)``), ``β`` is ``(4Cq,)``. All channels are whitened at once: one batched covariance
(a batched matmul), one batched 4×4 Cholesky and triangular solve, ``γ·L⁻¹`` folded into one 4×4
matrix, and one batched matmul over the data; no Python loop over channels.

Running statistics follow ``torch.nn.BatchNorm``: exponential average with ``momentum`` (``None``:
cumulative average over ``num_batches_tracked``), unbiased (``n/(n−1)``) variances, the biased
ones for normalising. ``running_mean`` is per real channel ``(4Cq,)``; ``running_var`` is per
quaternion channel ``(Cq,)``, or in whitening mode ``running_cov`` ``(Cq, 4, 4)``. Their initial
values (``1`` and ``I/4``, same trace) and ``γ``'s (``1`` and ``I/2``) make an untrained layer in
eval mode the identity in both modes, and its training-mode output ``E|y − β|² = 1`` in both.

speechbrain's ``QBatchNorm`` state dicts load into the shared-variance mode (``gamma``/``beta`` become
``weight``/``bias``); build the layer with ``eps=1e-4`` (speechbrain's default) and the outputs match
in both modes. What differs is only how the running statistics move in training: speechbrain tracks
the biased variance and copies the first batch's statistics instead of averaging them in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._fx import fx_leaf
from ..backends._extension import _C
from ..backends.base import activate
from ..layout import like_layout, quaternion_channels
from ..ops import norm as norm_ops
from ..ops.conv import ACTIVATIONS
from ..ops.lowerings import exporting_to_onnx
from ._base import check_quaternion_channels, check_real_dtype


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics in at least float32 (as cuDNN's BN does for half inputs): squares of fp16/bf16
    # activations overflow or lose most digits, and the 4x4 factorisations need float32 anyway.
    return torch.promote_types(dtype, torch.float32)


def _check_dtypes(fn: str, input: Tensor, **tensors: Tensor | None) -> None:
    """A module's input: floating-point, and by torch.nn's rule for its norms, the affine parameters and running
    statistics have the input's dtype, or float32 for a half-precision input (its mixed mode, as under autocast).
    A float64 input through float32 parameters was normalised in float64 without a word, its float32 running
    statistics updated from it, where torch.nn's norms and this package's convs refuse it. (The shared body,
    :func:`_quaternion_norm`, and the ops take statistics in another dtype on purpose: the lowerings, the eval
    statistics of the fused op, the tests' float64 references on a module's float32 statistics.)"""
    if not input.is_floating_point():  # (torch's norms refuse integers too, instead of truncating)
        raise TypeError(f"{fn}: input must be a floating-point tensor, got {input.dtype}")
    allowed = (input.dtype, torch.float32) if input.dtype in (torch.float16, torch.bfloat16) else (input.dtype,)
    for name, t in tensors.items():
        if t is not None and t.dtype not in allowed:
            also = " (or float32 for a half-precision input)" if len(allowed) > 1 else ""
            raise TypeError(
                f"{fn}: {name} has dtype {t.dtype}, the input {input.dtype}: they must match{also}; move the "
                f"module with .to({input.dtype}) or pass a {t.dtype} input"
            )


def _check_shape(fn: str, name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")


#: the jitter, relative to the trace of V, that :func:`_whitening_matrix` adds to the covariances that
#: ``V + eps·I`` does not make positive definite in floating point (float32: ~250 ulp of tr V); more for a
#: covariance stored in half precision (:func:`whitening_jitter`)
WHITENING_JITTER = 3e-5


def whitening_jitter(stored: torch.dtype) -> float:
    """The jitter relative to ``|tr V|`` for a covariance ``V`` that was rounded to ``stored`` (a running
    covariance buffer of that dtype): rounding each entry of a positive semi-definite ``V`` by at most
    ``u = eps/2`` moves its eigenvalues by at most ``u·‖V‖_F ≤ u·tr V``, so ``eps·tr V`` (twice that) restores
    what the rounding took (bf16: 0.8% of tr V, where :data:`WHITENING_JITTER` is 130x below one rounding)."""
    return max(WHITENING_JITTER, torch.finfo(stored).eps)


def _whitening_matrix(cov: Tensor, eps: float, stored: torch.dtype | None = None) -> Tensor:
    """``L⁻¹`` with ``cov + eps·I = L Lᵀ``: lower triangular, and ``L⁻¹ (cov + eps·I) L⁻ᵀ = I``.

    Batched over every leading dim. Why Cholesky and not ZCA (``V^(-1/2)`` by ``eigh``, what
    Trabelsi et al. use for complex BN): ``cholesky_ex`` and ``solve_triangular`` never synchronise
    with the host, whereas ``linalg.eigh`` checks its LAPACK/cuSOLVER status on every call (a
    device sync per layer per step, and no CUDA graphs); their gradients are stable and twice
    differentiable, whereas eigh's backward divides by eigenvalue gaps, which vanish exactly when
    the components are isotropic, the common case for quaternion features; and it is what Gaudet &
    Maida proposed for quaternion BN. Any two whitening matrices differ by an orthogonal matrix on
    the left, which the full 4x4 ``γ`` that follows can absorb, so nothing is lost in expressiveness.

    ``stored``: the dtype ``cov`` was rounded to, if lower than its own (a half-precision running covariance).
    """
    jitter_scale = whitening_jitter(stored or cov.dtype)
    if exporting_to_onnx():
        # ONNX has no Cholesky or triangular solve; torch.onnx.export of a model with a whitening norm
        # gets the same matrix as elementwise ops (torch.compile sees False here: dynamo folds the call).
        return _unrolled_whitening_matrix(cov, eps, jitter_scale)
    eye = torch.eye(4, dtype=cov.dtype, device=cov.device)
    # eps > 0 keeps V + eps·I positive definite in exact arithmetic, not in floating point: where the
    # components are (nearly) linearly dependent (i = j = k = r, a constant offset between two of them),
    # V is singular and its computed entries carry rounding errors of ~ε·|V|, next to which eps is nothing
    # (V ~ 1e6 in float32: ulp 0.06 against eps = 1e-5), and the factorisation failed: NaN in the output
    # and every gradient. So each matrix is factorised once to probe it (no graph, no sync: cholesky_ex
    # reports failure in a tensor), and the ones that failed get, on top of eps, a jitter relative to
    # their scale (whitening_jitter · tr V, above the rounding) before the factorisation that counts.
    # The others are unchanged, and only one factorisation is in the autograd graph (a where over a
    # failed one would leak its NaN into the gradients).
    reg = cov + eps * eye
    with torch.no_grad():
        failed = torch.linalg.cholesky_ex(reg).info > 0
        jitter = _whitening_jitter(cov.diagonal(dim1=-2, dim2=-1).sum(-1), failed, eps, jitter_scale)
    chol = torch.linalg.cholesky_ex(reg + jitter[..., None, None] * eye).L
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)


def _whitening_jitter(trace: Tensor, failed: Tensor, eps: float, scale: float) -> Tensor:
    """What the factorisation of ``V + eps·I`` adds to its diagonal where it ``failed`` (0 elsewhere):
    ``scale`` (:func:`whitening_jitter`) of ``|tr V|`` (``trace``), and eps again; no gradient flows through it."""
    return torch.where(failed, scale * trace.detach().abs() + eps, 0.0)


def _unrolled_whitening_matrix(cov: Tensor, eps: float, jitter_scale: float = WHITENING_JITTER) -> Tensor:
    """:func:`_whitening_matrix`'s value (``L⁻¹`` with ``cov + eps·I = L Lᵀ``, batched over the
    leading dims of ``cov`` ``(..., 4, 4)``) unrolled into elementwise ops on the 4x4 entries: the
    Cholesky-Banachiewicz recurrence (LAPACK's, for a matrix this small), then forward substitution.

    For a whitening norm on its input's statistics, whose covariance exists only at run time: ONNX has
    no Cholesky or triangular solve, and a 4x4 needs 4 ``Sqrt``, 4 ``Reciprocal`` and a few dozen
    ``Mul``/``Sub``/``Div`` on ``(N, Cq)`` tensors, nothing next to the matmul over the data.
    """
    a = [[cov[..., i, j] for j in range(4)] for i in range(4)]
    # As the eager path: where the factorisation of cov + eps·I fails (a pivot not positive, or NaN), it is
    # done again with the jitter on top of eps, so an exported model whitens degenerate channels as eager
    # mode does (NaN before).
    chol, ok = _unrolled_cholesky(a, eps)
    trace = a[0][0] + a[1][1] + a[2][2] + a[3][3]
    chol, _ = _unrolled_cholesky(a, eps + _whitening_jitter(trace, ~ok, eps, jitter_scale))
    inv: list[list[Tensor]] = [[] for _ in range(4)]  # row i holds L⁻¹[i, 0..i]
    for i in range(4):
        d = chol[i][i].reciprocal()
        for j in range(i):  # L[i, j..i] · L⁻¹[j..i, j] = 0 below the diagonal
            s = chol[i][j] * inv[j][j]
            for k in range(j + 1, i):
                s = s + chol[i][k] * inv[k][j]
            inv[i].append(-s * d)
        inv[i].append(d)
    zero = torch.zeros_like(a[0][0])
    return torch.stack([torch.stack(row + [zero] * (3 - i), dim=-1) for i, row in enumerate(inv)], dim=-2)


def _unrolled_cholesky(a: list[list[Tensor]], diagonal: float | Tensor) -> tuple[list[list[Tensor]], Tensor]:
    """The lower Cholesky factor of ``a + diagonal·I`` (row ``i`` holds ``L[i, 0..i]``) by the
    Cholesky-Banachiewicz recurrence, and where every pivot was positive (the factorisation succeeded)."""
    chol: list[list[Tensor]] = [[] for _ in range(4)]
    ok: Tensor | None = None
    for i in range(4):
        for j in range(i + 1):
            s = a[i][j] + diagonal if i == j else a[i][j]
            for k in range(j):
                s = s - chol[i][k] * chol[j][k]
            if i == j:
                ok = s > 0 if ok is None else ok & (s > 0)  # (False for NaN)
            chol[i].append(s.sqrt() if i == j else s / chol[j][j])
    return chol, ok


def _quaternion_norm(
    fn: str,
    input: Tensor,
    per_sample: bool,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    whiten: bool,
    activation: str | None = None,
    negative_slope: float = 0.01,
    fused: bool = True,
) -> Tensor:
    """Shared body of batch norm (statistics over batch and space) and instance norm (space only),
    followed by ``activation`` (None, 'relu', 'leaky_relu' with ``negative_slope``, 'gelu').

    With ``fused`` (default) the compiled ``aqcf::qnorm`` op does it in one pass where it can
    (:func:`aqcf_kernels.ops.norm.available`: CPU, float32/64, shared variance); the composite code
    below is the reference and serves everything else."""
    cq = quaternion_channels(input, name=f"{fn}: input")
    _check_shape(fn, "weight", weight, (cq, 4, 4) if whiten else (cq,))
    _check_shape(fn, "bias", bias, (4 * cq,))
    _check_shape(fn, "running_mean", running_mean, (4 * cq,))
    _check_shape(fn, "running_var", running_var, (cq, 4, 4) if whiten else (cq,))
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together")
    if not use_input_stats and running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are required when not using input statistics")

    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    _check_dtypes(fn, input)  # (floating point; the statistics may have another dtype here: see there)
    # values per statistic: the spatial size, times the batch for batch norm (no view made to count them)
    count = math.prod(input.shape[2:]) * (1 if per_sample else input.shape[0])
    # An empty input (a zero-size batch or spatial dim) is normalised to an empty output, the running
    # statistics untouched, as torch's norms do: no statistics to take, nothing to check.
    empty = input.numel() == 0
    if use_input_stats and count <= 1 and not empty:
        what = "spatial element" if per_sample else "value per channel"
        raise ValueError(f"{fn}: expected more than 1 {what} when training, got input size {tuple(input.shape)}")

    # torch.onnx.export captures the composite below: standard ops (ONNX has no function for the fused op)
    if fused and not empty and not exporting_to_onnx() and norm_ops.available(input, whiten):
        stats = (None, None) if use_input_stats else (running_mean, running_var)
        y, mean, var = torch.ops.aqcf.qnorm(
            input, weight, bias, *stats, use_input_stats, per_sample, eps, activation, float(negative_slope)
        )
        if use_input_stats and running_mean is not None:
            if _NATIVE_UPDATE is not None and not torch.compiler.is_compiling():
                _NATIVE_UPDATE(running_mean, running_var, mean, var, count, momentum)
            else:
                _update_running(running_mean, running_var, mean, var, count, momentum, cq, whiten)
        return y

    if whiten and _autocast_on(input.device.type):
        # The covariance and the whitening are matmuls, which autocast would run in its half dtype: the
        # statistics (and the running covariance) from bf16-rounded operands, 3e-3 off under CPU bf16 autocast,
        # where the shared-variance mode (elementwise ops) stays in float32. Norms run in float32 under
        # autocast, as torch.nn's do: this one too.
        with torch.autocast(input.device.type, enabled=False):
            return _quaternion_norm(
                fn, input, per_sample, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                whiten, activation, negative_slope, fused,
            )  # fmt: skip

    acc = _stat_dtype(input.dtype)
    spatial = tuple(range(3, input.dim() + 1))
    ones = (1,) * len(spatial)
    reduce = spatial if per_sample else (0, *spatial)
    x = input.unflatten(1, (4, cq)).to(acc)  # (N, 4, Cq, *S): component axis 1, quaternion channel axis 2
    if empty:  # the shapes below, no data: centring by 0 and scaling by 1 keeps γ and β in the graph
        xc = x
        stat = torch.eye(4, dtype=acc, device=x.device).expand(cq, 4, 4) if whiten else x.new_ones((1, 1, cq, *ones))
    elif use_input_stats:
        mean = x.mean(reduce, keepdim=True)  # (N or 1, 4, Cq, 1...)
        xc = x - mean
        # The data is centred by the mean rounded to acc, off by δ (up to half an ulp of μ: 5e-4 at 1e4 in
        # float32), so E[xc²] = σ² + δ²; the corrected two-pass formula E[xc²] − E[xc]² takes δ² out (a
        # reduction more): 3e-7 relative at μ = 1e4 σ, 10x torch's Welford, without it. (Zero in exact
        # arithmetic, the correction adds nothing to the gradients.)
        shift = xc.mean(reduce, keepdim=True)  # δ per real channel
        if whiten:
            # Components on the second-to-last axis, every sample of the statistic on the last:
            # (Cq, 4, N*S) for batch norm, (N, Cq, 4, S) for instance norm; V = Z Zᵀ / count − δ δᵀ.
            if per_sample:
                z, d = xc.permute(0, 2, 1, *spatial).flatten(3), shift.permute(0, 2, 1, *spatial).flatten(3)
            else:
                z, d = xc.permute(2, 1, 0, *spatial).flatten(2), shift.permute(2, 1, 0, *spatial).flatten(2)
            stat = z @ z.mT / count - d @ d.mT  # (Cq, 4, 4) or (N, Cq, 4, 4)
        else:
            stat = (xc.square().mean(reduce, keepdim=True) - shift.square()).sum(1, keepdim=True)  # (N|1, 1, Cq, 1…)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, stat, count, momentum, cq, whiten)
    else:
        xc = x - running_mean.to(acc).view(1, 4, cq, *ones)
        stat = running_var.to(acc) if whiten else running_var.to(acc).view(1, 1, cq, *ones)

    beta = None if bias is None else bias.to(acc).view(1, 4, cq, *ones)
    if whiten:
        m = _whitening_matrix(stat, eps, stored=None if use_input_stats else running_var.dtype)
        if weight is not None:
            m = weight.to(acc) @ m  # fold γ into the whitening: one 4x4 per channel touches the data
        # y[n, i, c] = Σ_j m[(n,) c, i, j] · xc[n, j, c]: a batched 4x4 matmul over every position.
        y = torch.einsum("cij,njc...->nic..." if m.dim() == 3 else "ncij,njc...->nic...", m, xc)
        if beta is not None:
            y = y + beta
    else:
        scale = (stat + eps).rsqrt()
        if weight is not None:
            scale = scale * weight.to(acc).view(1, 1, cq, *ones)
        # (x - μ)·scale rather than x·scale - μ·scale (one pass fewer): no cancellation when |μ| >> σ.
        y = xc * scale if beta is None else torch.addcmul(beta, xc, scale)
    # A channels_last input gets a channels_last output, as torch's norms give: the einsum writes channels-first,
    # and so do the elementwise ops on the (N, 4, Cq, *S) view of some channels_last inputs (a batch of 1, height 1).
    y = like_layout(y.flatten(1, 2).to(input.dtype), input)
    return y if activation is None else activate(y, activation, negative_slope)


# The same update in C++ (csrc/cpu/norm_op.cpp), for the fused path's eager calls: the Python costs ~4 µs more a
# call, of a norm's whole host time of ~20-25. Dynamo traces the Python one (it cannot see into a pybind function); an
# extension built before it has none.
_NATIVE_UPDATE = getattr(_C, "_update_running_stats", None)


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    stat: Tensor,
    count: int,
    momentum: float,
    cq: int,
    whiten: bool,
) -> None:
    """torch.nn.BatchNorm's update from this batch's statistics (biased ``stat``; unbiased into the average).

    Instance norm tracks the average over the batch of the per-sample statistics (torch does too). Batch
    norm has one set: no average to take. Two ops then (one multi-tensor lerp, then the variance's unbiased
    part added in place: no temporary), where a layer of a training step ran seven (a launch each on a GPU);
    the statistics are detached, so nothing is recorded for autograd. The fused path's eager calls run the
    same two ops in C++ (``_C._update_running_stats``, csrc/cpu/norm_op.cpp).
    """
    shape = (cq, 4, 4) if whiten else (cq,)
    if mean.numel() == 4 * cq:  # one set of statistics
        new_mean, new_var = mean.detach().reshape(4 * cq), stat.detach().reshape(shape)
    else:
        new_mean = mean.detach().reshape(-1, 4 * cq).mean(0)
        new_var = stat.detach().reshape(-1, *shape).mean(0)
    if new_mean.dtype != running_mean.dtype:  # (statistics in float32 for a half-precision module's input)
        new_mean, new_var = new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)
    if exporting_to_onnx():  # ONNX has no multi-tensor lerp (a model exported in training mode)
        running_mean.lerp_(new_mean, momentum)
        running_var.lerp_(new_var, momentum)
    else:  # one multi-tensor launch for both averages on a GPU (two lerp_ launches otherwise)
        torch._foreach_lerp_([running_mean, running_var], [new_mean, new_var], momentum)
    # the unbiased variance count / (count - 1) · var is var + var / (count - 1): its second part, in place
    running_var.add_(new_var, alpha=momentum / (count - 1))


def quaternion_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    whiten: bool = False,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """Quaternion batch norm of a blocked ``(N, 4Cq, *S)`` tensor; arguments as ``F.batch_norm``.

    Statistics are over the batch and spatial dims. Shared variance (default):
    ``y = γ (x − μ) / sqrt(E|x − μ|² + eps) + β`` with ``μ`` per real channel and ``E|x − μ|²`` per
    quaternion channel; ``weight`` ``(Cq,)``, ``running_var`` ``(Cq,)``. ``whiten=True``:
    ``y = γ L⁻¹ (x − μ) + β`` with ``V + eps·I = L Lᵀ`` the Cholesky factor of the 4×4 component
    covariance; ``weight`` ``(Cq, 4, 4)``, ``running_var`` holds the covariance ``(Cq, 4, 4)``.
    ``bias`` and ``running_mean`` are ``(4Cq,)``. In training, the input's statistics are used and
    the running ones (if given) move towards the unbiased batch statistics by ``momentum``; otherwise
    the running statistics are used. ``activation`` (None, 'relu', 'leaky_relu' with ``negative_slope``,
    'gelu') follows, fused into the normalisation pass where the compiled op serves the call.
    """
    return _quaternion_norm(
        "quaternion_batch_norm",
        input,
        False,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        whiten,
        activation,
        negative_slope,
    )


def quaternion_instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    whiten: bool = False,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """Quaternion instance norm of a blocked ``(N, 4Cq, *S)`` tensor; arguments as ``F.instance_norm``.

    The math of :func:`quaternion_batch_norm` with statistics over the spatial dims of each sample
    separately. Running statistics (if given and ``use_input_stats``) move towards the batch average
    of the per-sample unbiased statistics.
    """
    return _quaternion_norm(
        "quaternion_instance_norm",
        input,
        True,
        running_mean,
        running_var,
        weight,
        bias,
        use_input_stats,
        momentum,
        eps,
        whiten,
        activation,
        negative_slope,
    )


class _QuaternionNorm(nn.Module):
    """Shared body of the quaternion batch and instance norms.

    Subclasses fix ``_per_sample`` (instance norm), ``_ranks`` (accepted input ranks, batched last)
    and ``_unbatched_rank`` (the rank of an unbatched input, instance norm only).
    """

    _per_sample: bool
    _ranks: tuple[int, ...]
    _unbatched_rank: int | None = None
    #: the compiled fused op where it serves the call (``False``: the composite reference, then the
    #: activation; what benchmarks/baselines.py's ``use_composite_norms`` sets)
    fused: bool = True

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        device: Any,
        dtype: Any,
        whiten: bool,
        activation: str | None = None,
        negative_slope: float = 0.01,
        bias: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        num_features = check_quaternion_channels(name, "num_features", num_features)
        check_real_dtype(name, dtype)
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be None or one of {ACTIVATIONS}, got {activation!r}")
        self.activation, self.negative_slope = activation, negative_slope
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats, self.whiten = affine, track_running_stats, whiten
        cq = num_features // 4
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty((cq, 4, 4) if whiten else (cq,), **factory))
            # bias=False: a scale without a shift (torch.nn's norms' keyword)
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.empty(num_features, **factory))
            self.register_buffer(self._var_name, torch.empty((cq, 4, 4) if whiten else (cq,), **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer(self._var_name, None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # speechbrain's QBatchNorm names its affine parameters gamma (Cq,) and beta (4Cq,): the
        # shared-variance mode's weight and bias. Its buffers (running_mean (4Cq,), running_var (Cq,),
        # num_batches_tracked) already have our names and shapes. load_state_dict hands us its own copy.
        if not self.whiten and prefix + "weight" not in state_dict and prefix + "gamma" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "gamma")
            if prefix + "beta" in state_dict:
                state_dict[prefix + "bias"] = state_dict.pop(prefix + "beta")
        # As torch.nn's norms: a dict with running statistics but no count (torch < 0.4.1's, hand-made ones)
        # loads, keeping this module's count.
        count = prefix + "num_batches_tracked"
        if self.num_batches_tracked is not None and count not in state_dict and prefix + "running_mean" in state_dict:
            meta = self.num_batches_tracked.device.type == "meta"
            state_dict[count] = torch.tensor(0, dtype=torch.long) if meta else self.num_batches_tracked
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def _var_name(self) -> str:
        return "running_cov" if self.whiten else "running_var"

    def reset_running_stats(self) -> None:
        """Mean 0; variance 1, or covariance ``I/4`` (the same trace ``E|x − μ|² = 1``); no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            var = getattr(self, self._var_name)
            if self.whiten:
                var.copy_(torch.eye(4, dtype=var.dtype, device=var.device).div(4).expand_as(var))
            else:
                var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """``γ = 1`` (shared variance) or ``γ = I/2`` (whitening), ``β = 0``, and fresh running statistics.

        ``γ = I/2`` (Gaudet & Maida's ``1/sqrt(4)``) gives whitened outputs covariance ``I/4``, i.e.
        ``E|y − β|² = 1`` as in the shared-variance mode, so switching modes keeps the activation scale.
        """
        self.reset_running_stats()
        if self.affine:
            with torch.no_grad():
                if self.whiten:
                    eye = torch.eye(4, dtype=self.weight.dtype, device=self.weight.device)
                    self.weight.copy_(eye.div(2).expand_as(self.weight))
                else:
                    self.weight.fill_(1.0)
                if self.bias is not None:
                    self.bias.zero_()

    def _check_input(self, input: Tensor) -> bool:
        """Rank and channel checks; returns whether ``input`` is unbatched."""
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        ranks = (self._unbatched_rank, *self._ranks) if self._unbatched_rank else self._ranks
        if input.dim() not in ranks:
            expected = " or ".join(f"{r}D" for r in ranks)
            raise ValueError(f"{name}: expected {expected} input (got {input.dim()}D input)")
        unbatched = input.dim() == self._unbatched_rank
        channel_dim = 0 if unbatched else 1
        quaternion_channels(input, name=f"{name}: input", dim=channel_dim)
        if input.shape[channel_dim] != self.num_features:
            raise ValueError(
                f"{name}: input has {input.shape[channel_dim]} channels in dim {channel_dim}, "
                f"expected num_features={self.num_features}"
            )
        return unbatched

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        unbatched = self._check_input(input)
        x = input.unsqueeze(0) if unbatched else input
        use_input_stats = self.training or not self.track_running_stats
        if not self._per_sample and (self.eps < 0 or (self.eps == 0 and use_input_stats)):  # (torch's batch norms too)
            raise ValueError(
                f"{type(self).__name__}: eps must be positive to normalise by a batch's statistics, and never "
                f"negative; got eps={self.eps}"
            )
        name, running_var = type(self).__name__, getattr(self, self._var_name)
        _check_dtypes(
            name, x, weight=self.weight, bias=self.bias, running_mean=self.running_mean, running_var=running_var
        )
        # torch.nn.BatchNorm's bookkeeping (after the checks: a refused batch is not counted): count batches, and
        # momentum=None means a cumulative average.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        y = _quaternion_norm(
            type(self).__name__,
            x,
            self._per_sample,
            self.running_mean,
            getattr(self, self._var_name),
            self.weight,
            self.bias,
            use_input_stats,
            factor,
            self.eps,
            self.whiten,
            self.activation,
            self.negative_slope,
            fused=self.fused,
        )
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.affine and self.bias is None:
            s += ", bias=False"
        if self.whiten:
            s += ", whiten=True"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                s += f", negative_slope={self.negative_slope}"
        return s


class _QuaternionBatchNorm(_QuaternionNorm):
    _per_sample = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        whiten: bool = False,
        activation: str | None = None,
        negative_slope: float = 0.01,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, whiten, activation, negative_slope,
            bias,
        )  # fmt: skip


class _QuaternionInstanceNorm(_QuaternionNorm):
    _per_sample = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        whiten: bool = False,
        activation: str | None = None,
        negative_slope: float = 0.01,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, whiten, activation, negative_slope,
            bias,
        )  # fmt: skip


class QuaternionBatchNorm1d(_QuaternionBatchNorm):
    """Quaternion batch norm of ``(N, C)`` or ``(N, C, L)``; arguments as ``torch.nn.BatchNorm1d`` plus ``whiten``."""

    _ranks = (2, 3)


class QuaternionBatchNorm2d(_QuaternionBatchNorm):
    """Quaternion batch norm of ``(N, C, H, W)``; arguments as ``torch.nn.BatchNorm2d`` plus ``whiten``."""

    _ranks = (4,)


class QuaternionBatchNorm3d(_QuaternionBatchNorm):
    """Quaternion batch norm of ``(N, C, D, H, W)``; arguments as ``torch.nn.BatchNorm3d`` plus ``whiten``."""

    _ranks = (5,)


class QuaternionInstanceNorm1d(_QuaternionInstanceNorm):
    """Quaternion instance norm of ``(N, C, L)`` or ``(C, L)``; as ``torch.nn.InstanceNorm1d`` plus ``whiten``."""

    _ranks, _unbatched_rank = (3,), 2


class QuaternionInstanceNorm2d(_QuaternionInstanceNorm):
    """Quaternion instance norm of ``(N, C, H, W)`` or ``(C, H, W)``; as ``torch.nn.InstanceNorm2d`` plus ``whiten``."""

    _ranks, _unbatched_rank = (4,), 3


class QuaternionInstanceNorm3d(_QuaternionInstanceNorm):
    """Quaternion instance norm of ``(N, C, D, H, W)`` or ``(C, D, H, W)``; as ``nn.InstanceNorm3d`` plus ``whiten``."""

    _ranks, _unbatched_rank = (5,), 4

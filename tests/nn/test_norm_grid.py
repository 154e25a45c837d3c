"""The quaternion norms over a hypothesis grid, against a naive per-quaternion-channel reference.

tests/nn/test_norm.py, test_norm_fused.py and test_norm_robustness.py hold the norms to their definitions on fixed
shapes; this grid draws what those fix (see :func:`norm_configs`): batch or instance norm, 1d/2d/3d and the
unbatched forms the modules accept ((N, C) for QuaternionBatchNorm1d, (C, *S) for the instance norms), 1-5
quaternion channels, a batch of 1-4, spatial sizes 1-7, the input's memory layout (contiguous, channels_last,
a strided view whose gaps hold NaN, a transposed view) and the output gradient's, training or eval after 0-2
training steps (momentum None or a float, running statistics tracked or not), affine or not, shared variance or
whitening, a fused activation or none, eps, and differentiable gradients or not. Each example checks the output,
the gradients of ``<g, y>`` with respect to the input, weight and bias, the running statistics and the batch count
(and, float64 with ``create_graph``, the second-order gradients of ``<v, input gradient>``), on three routes:

* ``default``: the modules as built, the compiled ``aqcf::qnorm`` (csrc/cpu/norm.cpp) where it serves (CPU,
  float32/64, shared variance, a batched input), the composite code of ``nn.norm._quaternion_norm`` elsewhere;
* ``composite``: ``module.fused = False``, the composite code everywhere;
* ``triton``: the Triton kernels (backends/triton/norm.py) under triton's interpreter, the ``triton`` backend
  forced (tests/conftest.py sets ``TRITON_INTERPRET=1`` without a GPU); only calls they serve are drawn.

A spy checks that the route drawn is the route taken. A count of 1 value per statistic in training must raise
torch's error. A channels_last (batched) input must give a channels_last output, as torch.nn's norms do.

The reference (:func:`reference_norm`, :func:`reference_running`) loops over (sample group) x (quaternion
channel) with the statistics written out plainly, as tests/nn/test_norm.py's ``naive_norm`` and
``manual_stats``; whitening by Gram-Schmidt in training (test_norm.py's ``gram_schmidt_whiten``: no linalg call)
and by a hand-written 4x4 Cholesky and forward substitution on the running covariance in eval, with nn/norm.py's
documented jitter where ``V + eps·I`` is not positive definite. It is differentiated by autograd. In eval it
normalises with the module's running buffers (which are checked on their own against the reference's running
statistics), so that a half-precision buffer's rounding is not counted against the eval output; where even the
jitter leaves that buffer indefinite, the whitening is undefined and the example fails (:func:`_check_defined`).

Criteria, by dtype (norm-wise below float64, ``‖got − want‖ / ‖want‖`` over the whole tensor):

* float64: ``torch.testing.assert_close`` defaults (rtol 1e-7, atol 1e-7) element-wise against the reference, and
  the fused routes against the composite code within 1e-9 (two float64 computations of the same formula).
* float32: at most ``max(FP32_TOLERANCE, 4 x the error of the same reference run in float32)``.
* bfloat16 / float16: at most ``max(HALF_FLOOR eps, r, min(2 x the error of the same reference run in that dtype,
  HALF_CEILING eps + r))``, ``r`` the error rounding to the dtype implies (HALF_SENSITIVITY).
* whitening, below float64: at least WHITEN_FACTOR float32 eps times the condition number of ``V + eps·I``.
* weight and bias gradients, below float64: at least SUM_FACTOR eps times the ratio of the sum of their terms'
  sizes to their size (a sum that cancels).

With ReLU / leaky ReLU below float64 the output gradient is zeroed where the float64 pre-activation is within
rounding of the kink (see KINK), as tests/conv/test_qconv_reference.py does. Each constant says why it is what it is.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from _grid import grid
from hypothesis import given
from hypothesis import strategies as st

from aqcf_kernels import backends
from aqcf_kernels.backends.triton import common as triton_common
from aqcf_kernels.nn import (
    QuaternionBatchNorm1d,
    QuaternionBatchNorm2d,
    QuaternionBatchNorm3d,
    QuaternionInstanceNorm1d,
    QuaternionInstanceNorm2d,
    QuaternionInstanceNorm3d,
)
from aqcf_kernels.nn.norm import whitening_jitter
from aqcf_kernels.ops import norm as norm_ops

# Tiny tensors: one intra-op thread runs them faster (tests/conftest.py's fixture restores the count after).
pytestmark = pytest.mark.usefixtures("single_threaded")

F64 = torch.float64
MODULES = {
    ("batch", 1): QuaternionBatchNorm1d,
    ("batch", 2): QuaternionBatchNorm2d,
    ("batch", 3): QuaternionBatchNorm3d,
    ("instance", 1): QuaternionInstanceNorm1d,
    ("instance", 2): QuaternionInstanceNorm2d,
    ("instance", 3): QuaternionInstanceNorm3d,
}
ACTIVATIONS = [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("gelu", 0.01)]


@dataclass(frozen=True)
class NormConfig:
    kind: str  # batch | instance
    dims: int  # the module's 1d / 2d / 3d
    unbatched: bool  # instance norm: (C, *S); QuaternionBatchNorm1d: (N, C), no spatial dim
    batch: int
    cq: int
    spatial: tuple[int, ...]
    layout: str  # contiguous | channels_last | strided (NaN in the gaps) | transposed (last two dims swapped)
    grad_layout: str  # contiguous | strided
    training: bool  # the checked call's mode
    track: bool  # track_running_stats
    momentum: float | None
    steps: int  # training steps (no grad) before the checked call
    affine: bool
    whiten: bool
    activation: str | None
    slope: float
    eps: float
    offset: float  # scale of the per-real-channel mean offsets
    create_graph: bool  # differentiable gradients (the fused routes' backward then runs the composite code)
    seed: int

    @property
    def per_sample(self) -> bool:
        return self.kind == "instance"

    @property
    def shape(self) -> tuple[int, ...]:
        """The module's input."""
        if self.unbatched and self.per_sample:
            return (4 * self.cq, *self.spatial)
        return (self.batch, 4 * self.cq, *self.spatial)

    @property
    def uses_input_stats(self) -> bool:
        return self.training or not self.track

    @property
    def count(self) -> int:
        """Values per statistic (of each real channel)."""
        return math.prod(self.spatial) * (1 if self.per_sample else self.batch)

    def module(self, dtype: torch.dtype) -> torch.nn.Module:
        cls = MODULES[(self.kind, self.dims)]
        return cls(
            4 * self.cq, eps=self.eps, momentum=self.momentum, affine=self.affine, track_running_stats=self.track,
            dtype=dtype, whiten=self.whiten, activation=self.activation, negative_slope=self.slope,
        )  # fmt: skip


@st.composite
def norm_configs(draw, fusable: bool = False, max_3d: int = 7) -> NormConfig:
    """``fusable``: only calls the fused kernels serve (shared variance, a batched (N, C, *S) input after the
    instance norms' unsqueeze of an unbatched one). ``max_3d``: the largest 3d spatial size (triton's interpreter
    takes ~5 s on a (4, 20, 7, 7, 7) map, ~1 s on (4, 20, 4, 4, 4))."""
    kind = draw(st.sampled_from(["batch", "instance"]))
    dims = draw(st.sampled_from([1, 2, 3]))
    if kind == "instance":
        unbatched = draw(st.booleans())
    else:
        unbatched = dims == 1 and not fusable and draw(st.booleans())
    batch = 1 if unbatched and kind == "instance" else draw(st.integers(1, 4))
    size = st.integers(1, max_3d if dims == 3 else 7)
    spatial = () if unbatched and kind == "batch" else draw(st.tuples(*[size] * dims))
    # channels_last: of the batched (N, C, *S) map, which an unbatched instance norm input is a slice of
    layouts = ["contiguous", "strided", "transposed"] + (["channels_last"] if dims > 1 else [])
    activation, slope = draw(st.sampled_from(ACTIVATIONS))
    config = NormConfig(
        kind=kind,
        dims=dims,
        unbatched=unbatched,
        batch=batch,
        cq=draw(st.integers(1, 5)),
        spatial=spatial,
        layout=draw(st.sampled_from(layouts)),
        grad_layout=draw(st.sampled_from(["contiguous", "strided"])),
        training=draw(st.booleans()),
        track=draw(st.booleans()),
        momentum=draw(st.sampled_from([None, 0.1, 0.6])),
        steps=draw(st.integers(0, 2)),
        affine=draw(st.booleans()),
        whiten=False if fusable else draw(st.booleans()),
        activation=activation,
        slope=slope,
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        offset=draw(st.sampled_from([0.0, 3.0])),
        create_graph=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if config.count <= 1:  # a training step would raise (checked below): none before the checked call
        config = _replace(config, steps=0)
    return config


def _replace(c: NormConfig, **changes) -> NormConfig:
    return NormConfig(**{**c.__dict__, **changes})


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _in_layout(t: torch.Tensor, layout: str, unbatched: bool = False) -> torch.Tensor:
    """``t``'s values in a tensor of the given memory layout (a leaf): a strided view's gaps hold NaN, so a
    kernel that reads them (wrong strides) poisons its output. channels_last is that of ``t.unsqueeze(0)`` for an
    ``unbatched`` one (the channels innermost)."""
    if layout == "contiguous":
        out = t.contiguous().clone()
    elif layout == "channels_last":
        b = t.unsqueeze(0) if unbatched else t
        out = b.contiguous(memory_format=torch.channels_last if b.dim() == 4 else torch.channels_last_3d).clone()
        out = out[0] if unbatched else out
    elif layout == "strided":
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
        out = wide[..., ::2]
        out.copy_(t)
    else:  # transposed: the last two dims swapped in memory
        out = torch.empty((*t.shape[:-2], t.shape[-1], t.shape[-2]), dtype=t.dtype).transpose(-1, -2)
        out.copy_(t)
    assert out.shape == t.shape and torch.equal(out, t)
    return out.detach()


def _input(c: NormConfig, dtype: torch.dtype, step: int) -> torch.Tensor:
    """Batch ``step`` of the example (the checked call's is step ``c.steps``), in ``dtype`` and ``c.layout``.

    Each quaternion is ``A_q z + b_q`` with ``z`` iid normal: correlated components (a covariance far from
    diagonal and isotropic, so whitening and the shared variance differ) and per-real-channel offsets (so
    centring matters). ``A`` and ``b`` are the example's; ``z`` is the step's."""
    g = torch.Generator().manual_seed(c.seed)
    a = 0.5 * torch.randn(c.cq, 4, 4, generator=g, dtype=F64) + torch.eye(4, dtype=F64)
    b = c.offset * torch.randn(4, c.cq, generator=g, dtype=F64)
    g.manual_seed(c.seed + 1 + step)
    z = torch.randn(c.batch, 4, c.cq, *c.spatial, generator=g, dtype=F64)
    x = torch.einsum("qij,njq...->niq...", a, z) + b.view(1, 4, c.cq, *(1,) * len(c.spatial))
    x = x.flatten(1, 2).to(dtype)
    if c.unbatched and c.per_sample:
        x = x[0]
    return _in_layout(x, c.layout, c.unbatched and c.per_sample)


def _randomise(layer: torch.nn.Module, c: NormConfig) -> None:
    """γ and β away from their init (γ = 1 or I/2, β = 0 would hide a mis-wired parameter)."""
    if not c.affine:
        return
    g = torch.Generator().manual_seed(c.seed + 100)
    with torch.no_grad():
        w = layer.weight
        if c.whiten:
            w.copy_(0.5 * torch.randn(w.shape, generator=g, dtype=F64) + 0.5 * torch.eye(4, dtype=F64))
        else:
            w.copy_(0.5 * torch.randn(w.shape, generator=g, dtype=F64) + 1.0)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=F64))


# --------------------------------------------------------------------------------------------------
# The naive reference: one statistic group and one quaternion channel at a time, in the dtype it is given.
# --------------------------------------------------------------------------------------------------


def _groups(n: int, per_sample: bool) -> list[list[int]]:
    return [[i] for i in range(n)] if per_sample else [list(range(n))]


def _chans(cq: int, q: int) -> list[int]:
    return [q, cq + q, 2 * cq + q, 3 * cq + q]  # r, i, j, k of quaternion channel q (blocked layout)


def _components(x: torch.Tensor, samples: list[int], chans: list[int]) -> torch.Tensor:
    return torch.stack([x[samples, ch].reshape(-1) for ch in chans])  # (4, M)


def gram_schmidt_whiten(d: torch.Tensor, eps: float) -> torch.Tensor:
    """``L⁻¹ d`` for rows ``d`` (4, M) of centred components and ``V + eps·I = L Lᵀ``, ``V = d dᵀ / M``, by
    Gram-Schmidt in the order r, i, j, k under ``<u, v> = mean(u·v)`` with the eps ridge as four extra columns
    ``sqrt(eps·M)·I`` (tests/nn/test_norm.py's)."""
    m = d.shape[1]
    rows = torch.cat([d, (eps * m) ** 0.5 * torch.eye(4, dtype=d.dtype)], dim=1)
    basis: list[torch.Tensor] = []
    for a in range(4):
        v = rows[a]
        for u in basis:
            v = v - (v @ u) / m * u
        basis.append(v / ((v @ v) / m) ** 0.5)
    return torch.stack(basis)[:, :m]


def _cholesky_lower(a: torch.Tensor) -> tuple[list[list[torch.Tensor]], bool]:
    """The lower Cholesky factor of a 4x4 ``a`` by the textbook recurrence (row ``i`` holds ``L[i, 0..i]``), and
    whether every pivot was positive (``a`` positive definite in the arithmetic of its dtype)."""
    chol: list[list[torch.Tensor]] = [[] for _ in range(4)]
    ok = True
    for i in range(4):
        for j in range(i + 1):
            s = a[i, j] - sum((chol[i][k] * chol[j][k] for k in range(j)), torch.zeros((), dtype=a.dtype))
            if i == j:
                ok = ok and bool(s > 0)
            chol[i].append(s.sqrt() if i == j else s / chol[j][j])
    return chol, ok


def _regularised_cholesky(
    cov: torch.Tensor, eps: float, stored: torch.dtype | None = None
) -> tuple[list[list[torch.Tensor]], bool]:
    """The factor of ``cov + eps·I``, or where that is not positive definite, of ``cov + (eps + jitter)·I`` with
    nn/norm.py's documented jitter ``whitening_jitter(stored)·|tr cov|`` (``stored``: the dtype of the buffer ``cov``
    was read from; no gradient through it); and whether the factorisation that counts succeeded (else the whitening
    is undefined: NaN)."""
    eye = torch.eye(4, dtype=cov.dtype)
    chol, ok = _cholesky_lower(cov + eps * eye)
    if not ok:
        jitter = whitening_jitter(stored or cov.dtype) * cov.detach().diagonal().sum().abs() + eps
        chol, ok = _cholesky_lower(cov + (eps + jitter) * eye)
    return chol, ok


def _forward_substitution(chol: list[list[torch.Tensor]], d: torch.Tensor) -> torch.Tensor:
    """``L⁻¹ d`` for rows ``d`` (4, M)."""
    rows: list[torch.Tensor] = []
    for i in range(4):
        r = d[i]
        for j in range(i):
            r = r - chol[i][j] * rows[j]
        rows.append(r / chol[i][i])
    return torch.stack(rows)


@dataclass
class Reference:
    """:func:`reference_norm`'s results: ``y = act(z)`` (with its graph), ``z`` and ``s`` (float64, no graph), and
    ``cond``, the largest 2-norm condition number of the (regularised) ``V + eps·I`` that whitening factorises
    (1: shared variance), ``V`` the input's float64 covariance or the running one; ``defined``: False where the
    whitening of a running covariance is undefined (not positive definite even with the jitter)."""

    y: torch.Tensor
    z: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor  # the normalised values before γ and β (float64, no graph)
    cond: float
    defined: bool


def reference_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    c: NormConfig,
    running: tuple[torch.Tensor, torch.Tensor] | None,
    z_noise: torch.Tensor | None = None,
    stored: torch.dtype | None = None,
) -> Reference:
    """The norm of a batched ``x`` ``(N, 4Cq, *S)``, every op in ``x``'s dtype, on the input's statistics (``running``
    None) or on ``running = (mean (4Cq,), var (Cq,) or cov (Cq, 4, 4))``. Besides ``y`` (see :class:`Reference`):
    ``z`` the normalised and affine output before the activation, and ``s`` a bound on the size of the terms that
    ``z`` sums, elementwise, for the kink mask: ``|γ|(|x − μ| + |μ|)/σ + |β|`` (shared variance),
    ``|M|(|x − μ| + |μ|) + |β|`` with ``M = γ L⁻¹`` (whitening). ``z_noise``: the activation takes
    ``z·(1 + z_noise)`` (a rounding of z, for :func:`_half_sensitivity`). ``stored``: the dtype of the running
    buffers (the whitening's jitter depends on it).
    """
    n, cq = x.shape[0], x.shape[1] // 4
    z = torch.zeros_like(x)
    s = torch.zeros_like(x, dtype=F64)
    u = torch.zeros_like(x, dtype=F64)
    eye64 = torch.eye(4, dtype=F64)
    cond, defined = 1.0, True
    for samples in _groups(n, c.per_sample and running is None):
        for q in range(cq):
            chans = _chans(cq, q)
            comps = _components(x, samples, chans)
            mu = comps.mean(dim=1) if running is None else running[0][chans]
            d = comps - mu.unsqueeze(1)
            if c.whiten:
                if running is None:
                    y = gram_schmidt_whiten(d, c.eps)
                else:
                    cov = running[1][q]
                    chol, ok = _regularised_cholesky(cov, c.eps, stored)
                    y = _forward_substitution(chol, d)
                    defined = defined and ok
                normalised = y.detach().double()
                if weight is not None:
                    y = weight[q] @ y
                with torch.no_grad():
                    d64 = d.double()
                    cov64 = d64 @ d64.T / d64.shape[1] if running is None else cov.double()
                    chol64, ok64 = _regularised_cholesky(cov64, c.eps, stored if running is not None else None)
                    m = _forward_substitution(chol64, eye64)  # L⁻¹
                    if ok64:  # κ(L Lᵀ) = κ(L⁻¹)² (svdvals for the bounds only: the reference uses no linalg)
                        sv = torch.linalg.svdvals(m)
                        cond = max(cond, (sv[0] / sv[-1]).item() ** 2)
                    else:
                        cond = math.inf
                    m = m if weight is None else weight[q].double() @ m  # γ L⁻¹
                    size = m.abs() @ (d64.abs() + mu.double().abs().unsqueeze(1))
            else:
                var = sum(((d[a] ** 2).mean() for a in range(4)), torch.zeros((), dtype=x.dtype))
                if running is not None:
                    var = running[1][q]
                y = d / torch.sqrt(var + c.eps)
                normalised = y.detach().double()
                if weight is not None:
                    y = weight[q] * y
                with torch.no_grad():
                    scale = (var.double() + c.eps).rsqrt() * (1.0 if weight is None else weight[q].double().abs())
                    size = scale * (d.double().abs() + mu.double().abs().unsqueeze(1))
            if bias is not None:
                y = y + bias[chans].unsqueeze(1)
                size = size + bias[chans].detach().double().abs().unsqueeze(1)
            for a, ch in enumerate(chans):
                z[samples, ch] = y[a].reshape(z[samples, ch].shape)
                s[samples, ch] = size[a].reshape(s[samples, ch].shape)
                u[samples, ch] = normalised[a].reshape(u[samples, ch].shape)
    z_act = z if z_noise is None else z * (1 + z_noise)
    if c.activation == "relu":
        out = F.relu(z_act)
    elif c.activation == "leaky_relu":
        out = F.leaky_relu(z_act, c.slope)
    elif c.activation == "gelu":
        out = F.gelu(z_act)
    else:
        out = z_act
    return Reference(out, z.detach().double(), s, u, cond, defined)


def reference_batch_stats(x: torch.Tensor, c: NormConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's mean (4Cq,) and unbiased variance (Cq,) or covariance (Cq, 4, 4), averaged over the samples
    for instance norm (as torch.nn.InstanceNorm tracks them), in ``x``'s dtype."""
    n, cq = x.shape[0], x.shape[1] // 4
    groups = _groups(n, c.per_sample)
    mean = torch.zeros(4 * cq, dtype=x.dtype)
    var = torch.zeros((cq, 4, 4) if c.whiten else (cq,), dtype=x.dtype)
    for samples in groups:
        for q in range(cq):
            chans = _chans(cq, q)
            comps = _components(x, samples, chans)
            mu = comps.mean(dim=1)
            d = comps - mu.unsqueeze(1)
            mean[chans] += mu / len(groups)
            unbiased = (d @ d.T if c.whiten else (d**2).sum()) / (d.shape[1] - 1)
            var[q] += unbiased / len(groups)
    return mean, var


def reference_running(batches: list[torch.Tensor], c: NormConfig, dtype: torch.dtype):
    """Running mean and variance (or covariance) after training on ``batches``, from the modules' initial
    values (0 and 1, or I/4), in ``dtype``: torch.nn.BatchNorm's exponential (or, momentum None, cumulative)
    average of the unbiased batch statistics."""
    mean = torch.zeros(4 * c.cq, dtype=dtype)
    var = torch.eye(4, dtype=dtype).div(4).repeat(c.cq, 1, 1) if c.whiten else torch.ones(c.cq, dtype=dtype)
    for t, x in enumerate(batches, start=1):
        factor = 1.0 / t if c.momentum is None else c.momentum
        new_mean, new_var = reference_batch_stats(x.to(dtype), c)
        mean = (1 - factor) * mean + factor * new_mean
        var = (1 - factor) * var + factor * new_var
    return mean, var


# --------------------------------------------------------------------------------------------------
# Running an example: the module on a route, and the reference on the same (rounded) inputs
# --------------------------------------------------------------------------------------------------


def _batched(x: torch.Tensor, c: NormConfig) -> torch.Tensor:
    return x.unsqueeze(0) if c.unbatched and c.per_sample else x


def _output_grad(c: NormConfig, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The example's output gradient: drawn in float64, times ``mask``, rounded to ``dtype``, in c.grad_layout."""
    g = torch.randn(c.shape, generator=torch.Generator().manual_seed(c.seed + 7), dtype=F64)
    if mask is not None:
        g = g * mask
    return _in_layout(g.to(dtype), c.grad_layout)


@contextlib.contextmanager
def _route(path: str, counter: list[int]):
    """The route ``path`` forced, counting the fused kernels' calls in ``counter[0]``: the Triton launchers' forward
    and backward, the compiled op's forward (its backward is dispatched from C++, out of a spy's reach)."""

    def counting(real):
        def call(*args):
            counter[0] += 1
            return real(*args)

        return call

    if path == "triton":
        from aqcf_kernels.backends.triton import norm as triton_norm

        with (
            backends.use("triton"),
            mock.patch.object(triton_norm, "forward", counting(triton_norm.forward)),
            mock.patch.object(triton_norm, "backward", counting(triton_norm.backward)),
        ):
            yield
    else:
        with mock.patch.object(torch.ops.aqcf, "qnorm", counting(torch.ops.aqcf.qnorm)):
            yield


def _second_order(gx: torch.Tensor, v: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradients of ``<v, gx>`` with respect to ``leaves`` (zeros where gx does not depend on them: all of them
    where the input gradient is constant, e.g. eval without an activation)."""
    h = (gx * v).sum()
    if not h.requires_grad:
        return {name: torch.zeros_like(t) for name, t in leaves.items()}
    return dict(zip(leaves, torch.autograd.grad(h, list(leaves.values()), materialize_grads=True), strict=True))


@dataclass
class Run:
    """The checked call of the module: its output (with its graph), leaves, buffers after it, batch count."""

    c: NormConfig
    path: str
    y: torch.Tensor
    leaves: dict[str, torch.Tensor]  # input, weight, bias (those that exist)
    buffers: dict[str, torch.Tensor]  # running_mean, running_var (whatever its name); empty if not tracked
    batches_tracked: int | None
    served: list[int]  # fused kernel calls in the checked call (forward and backward)

    def grads(self, gy: torch.Tensor) -> dict[str, torch.Tensor]:
        with _route(self.path, self.served):
            grads = torch.autograd.grad(
                self.y, list(self.leaves.values()), gy, retain_graph=True, create_graph=self.c.create_graph
            )
        return dict(zip(self.leaves, grads, strict=True))

    def second_order(self, grads: dict[str, torch.Tensor], v: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradients of ``<v, input gradient>`` (a Hessian-vector product), with ``create_graph``."""
        with _route(self.path, self.served):
            return _second_order(grads["input"], v, self.leaves)


def run_module(c: NormConfig, dtype: torch.dtype, path: str) -> Run | None:
    """Trains ``c.steps`` steps (no grad), then makes the checked call. None when the checked call raised the error
    for a single value per statistic (checked here)."""
    layer = c.module(dtype)
    _randomise(layer, c)
    if path == "composite":
        layer.fused = False
    served = [0]
    with _route(path, served):
        with torch.no_grad():
            layer.train()
            for step in range(c.steps):
                layer(_input(c, dtype, step))
        layer.train(c.training)
        x = _input(c, dtype, c.steps).requires_grad_()
        served[0] = 0
        if c.uses_input_stats and c.count <= 1:
            what = "spatial element" if c.per_sample else "value per channel"
            with pytest.raises(ValueError, match=f"expected more than 1 {what} when training"):
                layer(x)
            return None
        y = layer(x)
    leaves = {"input": x}
    if c.affine:
        leaves.update(weight=layer.weight, bias=layer.bias)
    buffers = {}
    if c.track:
        buffers = {"running_mean": layer.running_mean, "running_var": getattr(layer, layer._var_name)}
    batches = None if layer.num_batches_tracked is None else layer.num_batches_tracked.item()
    return Run(c, path, y, leaves, {k: v.detach().clone() for k, v in buffers.items()}, batches, served)


@dataclass
class ReferenceRun:
    """The reference on the module's inputs and parameters (rounded to its dtype) and, in eval, its running
    buffers, every op in ``dtype``; ``stats``: the reference's own running statistics (None: not tracked)."""

    ref: Reference
    leaves: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] | None
    unbatched: bool

    @property
    def y(self) -> torch.Tensor:
        return self.ref.y.detach()[0] if self.unbatched else self.ref.y.detach()

    @property
    def z(self) -> torch.Tensor:
        return self.ref.z[0] if self.unbatched else self.ref.z

    @property
    def s(self) -> torch.Tensor:
        return self.ref.s[0] if self.unbatched else self.ref.s

    def grads(self, gy: torch.Tensor, create_graph: bool = False) -> dict[str, torch.Tensor]:
        g = gy.to(self.ref.y.dtype).unsqueeze(0) if self.unbatched else gy.to(self.ref.y.dtype)
        grads = torch.autograd.grad(
            self.ref.y, list(self.leaves.values()), g, retain_graph=True, create_graph=create_graph
        )
        out = dict(zip(self.leaves, grads, strict=True))
        if self.unbatched:
            out["input"] = out["input"][0]
        return out

    def second_order(self, grads: dict[str, torch.Tensor], v: torch.Tensor) -> dict[str, torch.Tensor]:
        out = _second_order(grads["input"], v.unsqueeze(0) if self.unbatched else v, self.leaves)
        if self.unbatched:
            out["input"] = out["input"][0]
        return out


def run_reference(
    c: NormConfig, module_dtype: torch.dtype, dtype: torch.dtype, run: Run, z_noise: torch.Tensor | None = None
) -> ReferenceRun:
    """The reference in ``dtype`` on the inputs of the module run in ``module_dtype``."""
    layer = c.module(module_dtype)
    _randomise(layer, c)
    x = _batched(_input(c, module_dtype, c.steps), c).to(dtype).contiguous().requires_grad_()
    leaves = {"input": x}
    w = b = None
    if c.affine:
        w, b = (t.detach().to(dtype).requires_grad_() for t in (layer.weight, layer.bias))
        leaves.update(weight=w, bias=b)
    running = stored = None
    if not c.uses_input_stats:
        running = tuple(run.buffers[k].to(dtype) for k in ("running_mean", "running_var"))
        stored = run.buffers["running_var"].dtype
    stats = None
    if c.track:
        batches = [_batched(_input(c, module_dtype, step), c) for step in range(c.steps + c.training)]
        stats = dict(zip(("running_mean", "running_var"), reference_running(batches, c, dtype), strict=True))
    ref = reference_norm(x, w, b, c, running, z_noise, stored)
    return ReferenceRun(ref, leaves, stats, c.unbatched and c.per_sample)


def _check_defined(c: NormConfig, dtype: torch.dtype, run: Run, ref: ReferenceRun) -> None:
    """The eval whitening is defined: the running covariance (as the module stores it, in its dtype) plus eps·I,
    or where that fails the documented jitter, is positive definite in float64."""
    if not ref.ref.defined:
        cov = run.buffers["running_var"].double()
        low = torch.linalg.eigvalsh(cov).min(-1).values
        jitter = whitening_jitter(dtype) * cov.diagonal(dim1=-2, dim2=-1).sum(-1).abs() + 2 * c.eps
        raise AssertionError(
            f"eval whitening on a running covariance that is not positive definite even with nn/norm.py's jitter: "
            f"smallest eigenvalues {low.tolist()}, eps + jitter {jitter.tolist()} (buffers in {dtype}; the "
            f"module's output: max |y| {run.y.detach().abs().max().item():.3g}; {c})"
        )


def _should_serve(c: NormConfig, dtype: torch.dtype, path: str) -> bool:
    """Whether the fused kernels serve the checked call on ``path`` (the composite code otherwise)."""
    if path == "composite" or c.whiten or (c.unbatched and not c.per_sample):
        return False
    if path == "triton":
        return True
    return norm_ops._C is not None and dtype in (torch.float32, torch.float64)


def _check_common(c: NormConfig, dtype: torch.dtype, run: Run, grads: dict[str, torch.Tensor]) -> None:
    assert run.y.shape == c.shape and run.y.dtype == dtype
    for name, g in grads.items():
        assert g.dtype == dtype and g.shape == run.leaves[name].shape, name
    assert run.batches_tracked == (c.steps + c.training if c.track else None)
    if c.layout == "channels_last" and not c.unbatched:  # (the layout of an unbatched input's output: not promised)
        fmt = torch.channels_last if c.dims == 2 else torch.channels_last_3d
        if not _input(c, dtype, 0).is_contiguous():  # (a tensor both NCHW and channels_last is contiguous to torch)
            assert run.y.is_contiguous(memory_format=fmt), f"a channels_last input gives a channels_last output ({c})"
    # The route drawn is the route taken: the fused kernels served (the Triton route counts its forward and
    # backward launches, the compiled one the op's forward calls; a differentiable gradient is the composite
    # code's), or the composite code did.
    if _should_serve(c, dtype, run.path):
        least = 2 if run.path == "triton" and not c.create_graph else 1
        assert run.served[0] >= least, f"{run.path}: the fused kernels did not serve"
    else:
        assert run.served[0] == 0, f"{run.path}: the fused kernels served a call they do not take"


# --------------------------------------------------------------------------------------------------
# float64: element-wise against the reference, and the fused routes against the composite code
# --------------------------------------------------------------------------------------------------

# Examples per test sized for CI; a longer hunt multiplies them: AQCF_GRID_SCALE=20 pytest <this file>.
GRID = grid(200)
HALF_GRID = grid(150)
TRITON_GRID = grid(25)
TRITON = pytest.mark.skipif(triton_common.unavailable() is not None, reason="triton unavailable")


def _float64(c: NormConfig, path: str) -> None:
    run = run_module(c, F64, path)
    if run is None:
        return
    gy = _output_grad(c, F64)
    grads = run.grads(gy)
    _check_common(c, F64, run, grads)
    ref = run_reference(c, F64, F64, run)
    _check_defined(c, F64, run, ref)
    torch.testing.assert_close(run.y, ref.y, msg=lambda m: f"forward: {m}")
    grads_ref = ref.grads(gy)
    assert grads.keys() == grads_ref.keys()
    for name, got in grads.items():
        torch.testing.assert_close(got, grads_ref[name], msg=lambda m, name=name: f"{name} gradient: {m}")
    for name, got in run.buffers.items():
        torch.testing.assert_close(got, ref.stats[name], msg=lambda m, name=name: f"{name}: {m}")
    second = {}
    if c.create_graph:
        # Differentiable gradients (what the fused routes' backward hands to the composite code): second order too.
        v = torch.randn(c.shape, generator=torch.Generator().manual_seed(c.seed + 11), dtype=F64)
        second = run.second_order(grads, v)
        second_ref = ref.second_order(ref.grads(gy, create_graph=True), v)
        for name, got in second.items():
            torch.testing.assert_close(got, second_ref[name], msg=lambda m, name=name: f"second order, {name}: {m}")
    if path != "composite":
        # The same computation twice in float64: the fused kernels against the composite code, tightly.
        other = run_module(c, F64, "composite")
        other_grads = other.grads(gy)
        tight = {"rtol": 1e-9, "atol": 1e-9}
        torch.testing.assert_close(run.y, other.y, **tight, msg=lambda m: f"forward vs composite: {m}")
        for name, got in grads.items():
            torch.testing.assert_close(
                got, other_grads[name], **tight, msg=lambda m, name=name: f"{name} gradient vs composite: {m}"
            )
        for name, got in run.buffers.items():
            torch.testing.assert_close(got, other.buffers[name], **tight, msg=lambda m, name=name: f"{name}: {m}")
        if second:
            other_second = other.second_order(other_grads, v)
            for name, got in second.items():
                torch.testing.assert_close(
                    got, other_second[name], **tight, msg=lambda m, name=name: f"second order, {name} vs composite: {m}"
                )


@pytest.mark.parametrize("path", ["default", "composite"])
@GRID
@given(c=norm_configs())
def test_float64_matches_the_naive_reference(path, c):
    _float64(c, path)


@TRITON
@TRITON_GRID
@given(c=norm_configs(fusable=True, max_3d=4))
def test_float64_triton_matches_the_naive_reference(c):
    _float64(c, "triton")


# --------------------------------------------------------------------------------------------------
# float32 and half precision: norm-wise, against the float64 reference and the reference run in the dtype
# --------------------------------------------------------------------------------------------------

#: float32's floor: the library's float32 contract (tests/nn/test_norm_fused.py: 1e-5 relative to the float64
#: reference, forward and gradients), ~84 float32 eps. Above it, 4x the error of the naive reference run in
#: float32 on the same inputs: where the problem is ill-conditioned (GELU's negative tail, a gradient that nearly
#: cancels, ...) any float32 computation is off, the library's and the textbook's alike, and a factor of 4
#: (test_norm_robustness.py's against torch's own) leaves room for the two algorithms' different constants
#: without hiding an O(1) error. On the grid (~100,000 float32 results) the largest error this floor bounded was
#: 7.5e-6: one quaternion channel's weight gradient in eval, a sum of ~500 products, both routes alike (the order
#: of PyTorch's reduction over a strided output gradient; the reference's sum was 1e-7 off).
FP32_TOLERANCE = 1e-5
FP32_FACTOR = 4.0
#: half precision: at least HALF_FLOOR eps. The library takes the statistics in float32 and rounds the output (and
#: each gradient) to the dtype once or twice (the activation's gradient is taken in the dtype): up to ~1 eps an
#: element; the reference run in the dtype rounds at every op, but on a map of a few elements it can be lucky.
#: 4 eps (3% in bf16, 0.4% in fp16) still fails a wrong statistic, sample or channel (O(1) in what it touches).
HALF_FACTOR, HALF_FLOOR = 2.0, 4.0
#: The rounding allowance: HALF_SENSITIVITY times :func:`_half_sensitivity`, the error that rounding z and the
#: activation's gradient to the dtype makes, in exact arithmetic otherwise (a weight gradient of one quaternion channel
#: that nearly cancels: 3 eps where the reference in the dtype was lucky, 1.3 eps). And at most HALF_CEILING eps plus
#: that allowance, whatever the reference in the dtype does: it takes its statistics and its Gram-Schmidt in half
#: precision, and on a small or offset map it is off by 1e2-1e5 eps (its Cholesky can fail: NaN), where twice its
#: error would pass any result; the library's statistics are float32, its own error the roundings to the dtype (at
#: most 3.5 eps on the grid, ~80,000 results, where the allowance is under 2 eps).
HALF_CEILING, HALF_SENSITIVITY = 16.0, 2.0
#: Whitening forms the 4x4 covariance V and factorises ``V + eps·I``: with float32 statistics, V's entries carry
#: rounding errors of ~eps32·|V|, against its smallest eigenvalue eps where V is singular (4 or fewer values per
#: statistic: rank < 4), so the whitening matrix is off by ~eps32·κ(V + eps·I) relative (κ ~ |V|/eps ~ 1e5 in
#: the grid), the standard forward error of a Cholesky factorisation. The Gram-Schmidt reference works on the
#: data (a QR, error ~ eps32·sqrt(κ)) and is far better there: so the bound has a third term, WHITEN_FACTOR
#: eps32 κ (κ from the float64 reference's factor). On the grid the library's float32 whitened results with κ > 1e3
#: were at most 3 eps32 κ off (25,000 of them): 8 leaves a margin.
WHITEN_FACTOR = 8.0
#: The weight and bias gradients are sums over the batch and space (of a few hundred terms, mostly): where they nearly
#: cancel, the roundings of their terms (act' and the products in float32 or in the dtype, a few eps each) add up
#: to SUM_FACTOR eps times :func:`_sum_conditions`'s ratio at most. Where the ratio is small (no cancellation) the
#: term is far below the floors; it matters where one quaternion channel's weight gradient with GELU is ~400 times
#: smaller than its terms: 1.01e-5 (85 eps) off in float32 on the compiled route (the composite one: 1.8e-6, the
#: float32 reference: 6.8e-7; elementwise, GELU's derivative in float32 is up to 80 eps off near its zero).
SUM_FACTOR = 8.0
#: ReLU's and leaky ReLU's gradients jump where the pre-activation z crosses 0: a z computed within its rounding
#: error of 0 may take the other slope, an O(1) error in that element that is no fault of the norm. So the output
#: gradient is zeroed where ``|z| < KINK eps s`` (``s``: reference_norm's bound on the terms z sums); the
#: gradients of ``<g, y>`` are still compared in full, for a g a little sparser.
KINK = 8.0


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).norm().item()
    return 0.0 if diff == 0 else diff / max(want.norm().item(), 1e-300)


def _half_sensitivity(
    c: NormConfig, dtype: torch.dtype, run: Run, ref64: ReferenceRun, gy: torch.Tensor
) -> dict[str, float]:
    """How much each float64 result moves when what the half-precision route rounds to its dtype is perturbed by
    up to one eps (relative, elementwise, uniform): the pre-activation z (the composite code rounds it before the
    activation) and the output gradient (the activation's gradient is taken in the dtype). Its norm-wise relative
    change is the error any implementation with those roundings makes, within a small factor: large where a
    gradient is a sum that nearly cancels (a weight gradient of a few elements)."""
    eps = torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(c.seed + 13)
    z_noise = eps * (2 * torch.rand(ref64.ref.z.shape, generator=g, dtype=F64) - 1)
    noisy = run_reference(c, dtype, F64, run, z_noise=z_noise)
    gy_noisy = gy.double() * (1 + eps * (2 * torch.rand(gy.shape, generator=g, dtype=F64) - 1))
    out = {"forward": _rel(noisy.y, ref64.y)}
    exact = ref64.grads(gy)
    for name, grad in noisy.grads(gy_noisy).items():
        out[f"{name} gradient"] = _rel(grad, exact[name])
    return out


def _sum_conditions(
    c: NormConfig, ref64: ReferenceRun, gy: torch.Tensor, exact: dict[str, torch.Tensor]
) -> dict[str, float]:
    """``‖Σ |terms|‖ / ‖Σ terms‖`` for the weight and bias gradients, sums over the batch and space of
    ``gz·û`` and ``gz`` (``gz = gy·act'(z)``, ``û`` the normalised values before γ and β), each term's size taken as
    ``|gy|·a(z)`` with ``a`` the size of what act' adds up (GELU's ``Φ(z) + z φ(z)``: ``|Φ| + |z φ|``, which cancel
    where act' crosses 0 at z = -0.75): the standard bound on the relative error of a sum whose terms carry a
    relative error, which is what a weight gradient of few channels that nearly cancels makes of the roundings."""
    z, u = ref64.ref.z, ref64.ref.u
    g = _batched(gy, c).double().abs()
    if c.activation == "gelu":
        size = torch.special.ndtr(z).abs() + (z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)).abs()
    elif c.activation == "relu":
        size = (z > 0).double()
    elif c.activation == "leaky_relu":
        size = torch.where(z > 0, 1.0, abs(c.slope))
    else:
        size = torch.ones_like(z)
    a = (g * size).unflatten(1, (4, c.cq))  # (N, 4, Cq, *S)
    u = u.abs().unflatten(1, (4, c.cq))
    spatial = tuple(range(3, a.dim()))
    if c.whiten:  # dγ[q, i, j] = Σ gz_i û_j
        weight = torch.einsum("niq...,njq...->qij", a, u)
    else:
        weight = (a * u).sum((0, 1, *spatial))
    bias = a.sum((0, *spatial)).flatten()
    out = {}
    if "weight" in exact:
        out["weight gradient"] = weight.norm().item() / max(exact["weight"].norm().item(), 1e-300)
        out["bias gradient"] = bias.norm().item() / max(exact["bias"].norm().item(), 1e-300)
    return out


def _low_precision(c: NormConfig, dtype: torch.dtype, path: str) -> list[tuple[str, float, float, float]]:
    """``(what, error, the dtype reference's error, bound)`` for each result, asserting each within its bound."""
    run = run_module(c, dtype, path)
    if run is None:
        return []
    ref64, ref_lo = run_reference(c, dtype, F64, run), run_reference(c, dtype, dtype, run)
    _check_defined(c, dtype, run, ref64)
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    mask = None
    if c.activation in ("relu", "leaky_relu"):
        mask = (ref64.z.abs() >= KINK * max(eps, eps32 * ref64.ref.cond) * ref64.s).to(F64)
    gy = _output_grad(c, dtype, mask)
    grads = run.grads(gy)
    _check_common(c, dtype, run, grads)
    got = {"forward": run.y, **{f"{k} gradient": v for k, v in grads.items()}, **run.buffers}
    grads64 = ref64.grads(gy)
    want = {"forward": ref64.y, **{f"{k} gradient": v for k, v in grads64.items()}, **(ref64.stats or {})}
    lo = {"forward": ref_lo.y, **{f"{k} gradient": v for k, v in ref_lo.grads(gy).items()}, **(ref_lo.stats or {})}
    assert got.keys() == want.keys() == lo.keys()
    sensitivity = {} if dtype == torch.float32 else _half_sensitivity(c, dtype, run, ref64, gy)
    sums = _sum_conditions(c, ref64, gy, grads64)
    results = []
    for what in got:
        error, lo_error = _rel(got[what], want[what]), _rel(lo[what], want[what])
        assert math.isfinite(error), f"{path} {dtype} {what}: not finite ({c})"
        if not math.isfinite(lo_error):  # the reference in the dtype broke down (a half-precision Cholesky): no bound
            lo_error = 0.0
        if dtype == torch.float32:
            bound = max(FP32_TOLERANCE, FP32_FACTOR * lo_error)
        else:
            rounding = HALF_SENSITIVITY * sensitivity.get(what, 0.0)
            bound = max(HALF_FLOOR * eps, rounding, min(HALF_FACTOR * lo_error, HALF_CEILING * eps + rounding))
        if c.whiten and what != "running_mean":
            bound = max(bound, WHITEN_FACTOR * eps32 * ref64.ref.cond)
        if what in sums:
            bound = max(bound, SUM_FACTOR * eps * sums[what])
        results.append((what, error, lo_error, bound))
        assert error <= bound, (
            f"{path} {dtype} {what}: relative error {error:.3g} ({error / eps:.3g} eps), the reference's in "
            f"{dtype} {lo_error:.3g} (bound {bound:.3g}; condition {ref64.ref.cond:.3g}; {c})"
        )
    return results


@pytest.mark.parametrize("path", ["default", "composite"])
@GRID
@given(c=norm_configs())
def test_float32_within_the_contract(path, c):
    _low_precision(c, torch.float32, path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@HALF_GRID
@given(c=norm_configs())
def test_half_precision_within_twice_the_references_error(dtype, c):
    """Half precision runs the composite code on CPU (the compiled kernel takes float32/64): statistics in float32."""
    _low_precision(c, dtype, "default")


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@TRITON_GRID
@given(c=norm_configs(fusable=True, max_3d=4))
def test_low_precision_triton_within_the_contract(dtype, c):
    _low_precision(c, dtype, "triton")

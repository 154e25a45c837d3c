"""The Triton fused quaternion norm (``aqcf::qnorm`` on backends/triton/norm.py) against the composite path.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and these tests force the ``triton`` backend
(``AQCF_BACKEND=triton``), under which ``aqcf::qnorm`` runs the Triton kernels on CPU tensors; on a GPU
they run natively on CUDA tensors. The composite code of :func:`aqcf_kernels.nn.norm._quaternion_norm`
(``fused=False``) in float64 is the reference. Shapes are tiny but odd, so every case crosses partial
tiles, several tiles per program and several chunks per sample (the interpreter's 16 x 16 tiles, two
tiles a chunk): every merge of the statistics runs. A spy checks that the kernels actually served.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aqcf_kernels.backends.triton import common
from aqcf_kernels.nn.norm import _quaternion_norm
from aqcf_kernels.ops import norm as norm_ops

pytestmark = pytest.mark.skipif(common.unavailable() is not None, reason=f"triton: {common.unavailable()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTIVATIONS = [(None, 0.01), ("relu", 0.01), ("leaky_relu", -0.3), ("gelu", 0.01)]
# (shape, channels_last): 1d, 2d NCHW, 2d channels_last, 3d channels_last; S = 37, 35, 35, 30
LAYOUTS = [((2, 12, 37), False), ((3, 12, 7, 5), False), ((3, 12, 7, 5), True), ((2, 8, 3, 5, 2), True)]


@pytest.fixture
def triton_calls(monkeypatch):
    """Force the triton backend and count the Triton forward/backward launches of ``aqcf::qnorm``."""
    from aqcf_kernels.backends.triton import norm as triton_norm

    monkeypatch.setenv("AQCF_BACKEND", "triton")
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(triton_norm, name)

        def spy(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(triton_norm, name, spy)
    return calls


def _inputs(shape, dtype, channels_last=False, seed=0, offset=3.0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    # an offset mean and unequal component scales: centring and the shared variance both matter
    x = x * torch.linspace(0.5, 2.0, shape[1], dtype=torch.float64).view(1, -1, *[1] * (len(shape) - 2))
    x = (x * spread + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    cq = shape[1] // 4
    w = (torch.randn(cq, generator=g, dtype=torch.float64) * 0.5 + 1.0).to(dtype)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    rm = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.1).float()
    rv = (torch.rand(cq, generator=g, dtype=torch.float64) + 0.5).float()
    gy = torch.randn(shape, generator=g, dtype=torch.float64)  # contiguous even when x is channels_last
    return x, w, b, rm, rv, gy


def _run(fused, x, w, b, rm, rv, gy, per_sample, training, act, slope, dtype=None, device=DEVICE):
    """``(y, (dx, dw, db), running_mean, running_var)``, inputs cast to ``dtype`` (running stats stay float32)."""
    to = dict(device=device, dtype=dtype or x.dtype)
    x = x.to(**to).detach().requires_grad_()
    w, b = (t.to(**to).detach().requires_grad_() for t in (w, b))
    rm, rv = rm.to(device).clone(), rv.to(device).clone()
    y = _quaternion_norm("t", x, per_sample, rm, rv, w, b, training, 0.1, 1e-5, False, act, slope, fused=fused)
    grads = torch.autograd.grad(y, [x, w, b], gy.to(y))
    return y, grads, rm, rv


def _rel(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def _check(got, ref, tol, names=("y", "grad_input", "grad_weight", "grad_bias")):
    for name, o, r in zip(names, (got[0], *got[1]), (ref[0], *ref[1]), strict=True):
        assert _rel(o, r) <= tol, f"{name}: relative error {_rel(o, r):.2e} > {tol}"


@pytest.mark.parametrize("act,slope", ACTIVATIONS, ids=[a or "none" for a, _ in ACTIVATIONS])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_float32_matches_reference_and_running_stats(triton_calls, act, slope, per_sample):
    shape, channels_last = LAYOUTS[(ACTIVATIONS.index((act, slope)) + per_sample) % len(LAYOUTS)]
    x, w, b, rm, rv, gy = _inputs(shape, torch.float64, channels_last, seed=len(shape) + per_sample)
    ref = _run(False, x, w, b, rm, rv, gy, per_sample, True, act, slope, device="cpu")
    composite32 = _run(False, x, w, b, rm, rv, gy, per_sample, True, act, slope, torch.float32, device="cpu")
    got = _run(True, x, w, b, rm, rv, gy, per_sample, True, act, slope, torch.float32)
    assert triton_calls == {"forward": 1, "backward": 1}
    assert got[0].dtype == torch.float32
    _check(got, ref, 1e-5)
    # the running statistics move exactly as the composite path moves them (same dtype)
    torch.testing.assert_close(got[2].cpu(), composite32[2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[3].cpu(), composite32[3], rtol=1e-6, atol=1e-7)
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert got[0].is_contiguous(memory_format=fmt) and got[1][0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_eval_mode_uses_running_stats(triton_calls, per_sample):
    shape, channels_last = LAYOUTS[1 + per_sample]
    x, w, b, rm, rv, gy = _inputs(shape, torch.float64, channels_last, seed=11)
    ref = _run(False, x, w, b, rm.double(), rv.double(), gy, per_sample, False, "leaky_relu", 0.2, device="cpu")
    got = _run(True, x, w, b, rm, rv, gy, per_sample, False, "leaky_relu", 0.2, torch.float32)
    assert triton_calls == {"forward": 1, "backward": 1}
    _check(got, ref, 1e-5)
    assert torch.equal(got[2].cpu(), rm) and torch.equal(got[3].cpu(), rv)  # untouched in eval


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_half_precision_within_twice_the_composite_error(triton_calls, dtype, per_sample):
    """fp16/bf16 in, fp32 statistics and arithmetic: at most 2x the composite path's error in the same dtype."""
    if dtype == torch.bfloat16 and per_sample:
        pytest.skip("one bf16 case is enough: the kernels upcast at load, as for fp16")
    shape, channels_last = LAYOUTS[2 - per_sample]
    x, w, b, rm, rv, gy = _inputs(shape, torch.float64, channels_last, seed=21)
    ref = _run(False, x, w, b, rm, rv, gy, per_sample, True, "gelu", 0.01, device="cpu")
    composite = _run(False, x, w, b, rm, rv, gy, per_sample, True, "gelu", 0.01, dtype, device="cpu")
    got = _run(True, x, w, b, rm, rv, gy, per_sample, True, "gelu", 0.01, dtype)
    assert triton_calls == {"forward": 1, "backward": 1}
    for name, o, c, r in zip(("y", "dx", "dw", "db"), (got[0], *got[1]), (composite[0], *composite[1]),
                             (ref[0], *ref[1]), strict=True):  # fmt: skip
        assert o.dtype == dtype
        assert _rel(o, r) <= max(2 * _rel(c, r), 2e-3), f"{name}: {_rel(o, r):.2e} vs composite {_rel(c, r):.2e}"


def test_no_cancellation_when_the_mean_dwarfs_the_spread(triton_calls):
    """|μ| = 3000 σ: the naive E[x²] − E[x]² in float32 would lose every digit of σ² (μ² ε ≈ 50 σ²)."""
    shape = (3, 8, 9, 5)
    x, w, b, rm, rv, gy = _inputs(shape, torch.float32, seed=31, offset=300.0, spread=0.1)
    x64 = x.double()  # the reference sees exactly the float32 values
    for per_sample in (False, True):
        reduce = (3, 4) if per_sample else (0, 3, 4)
        xq = x64.unflatten(1, (4, 2))
        want_mean = xq.mean(reduce, keepdim=True)
        want_var = (xq - want_mean).square().mean(reduce, keepdim=True).sum(1).reshape(-1, 2)
        _, mean, var = torch.ops.aqcf.qnorm(x.to(DEVICE), None, None, None, None, True, per_sample, 1e-5, None, 0.0)
        assert mean.dtype == var.dtype == torch.float32
        assert _rel(var, want_var) <= 1e-6
        assert _rel(mean, want_mean.reshape(var.shape[0], 8)) <= 1e-7
        ref = _run(False, x64, w, b, rm, rv, gy, per_sample, True, None, 0.01, device="cpu")
        composite = _run(False, x, w, b, rm, rv, gy, per_sample, True, None, 0.01, device="cpu")
        got = _run(True, x, w, b, rm, rv, gy, per_sample, True, None, 0.01)
        for name, o, c, r in zip(("y", "dx", "dw", "db"), (got[0], *got[1]), (composite[0], *composite[1]),
                                 (ref[0], *ref[1]), strict=True):  # fmt: skip
            assert _rel(o, r) <= max(2 * _rel(c, r), 1e-5), f"{name}: {_rel(o, r):.2e} vs composite {_rel(c, r):.2e}"
    assert triton_calls == {"forward": 4, "backward": 2}


def test_non_contiguous_input_without_affine(triton_calls):
    x, _, _, rm, rv, _ = _inputs((2, 8, 6, 5), torch.float64, seed=41)
    x = x.transpose(2, 3)  # neither NCHW nor channels_last: made contiguous on the way in
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(42), dtype=torch.float64)

    def run(fused, dtype):
        xx = x.to(device=DEVICE if fused else "cpu", dtype=dtype).requires_grad_()
        y = _quaternion_norm("t", xx, True, None, None, None, None, True, 0.1, 1e-5, False, "relu", 0.01, fused=fused)
        return y, torch.autograd.grad(y, [xx], gy.to(y))

    got, ref = run(True, torch.float32), run(False, torch.float64)
    assert triton_calls == {"forward": 1, "backward": 1}
    _check(got, ref, 1e-5, names=("y", "grad_input"))


@pytest.mark.parametrize(
    "per_sample,act,slope", [(False, "gelu", 0.01), (True, "leaky_relu", 0.2)], ids=["batch", "instance"]
)
def test_gradcheck_float64(triton_calls, act, slope, per_sample):
    """float64 runs the same kernels with float64 accumulation; fast-mode gradcheck (random projections)."""
    x, w, b, *_ = _inputs((2, 8, 3, 5), torch.float64, seed=51)

    def f(x, w, b):
        return _quaternion_norm("t", x, per_sample, None, None, w, b, True, 0.1, 1e-5, False, act, slope)

    inputs = tuple(t.to(DEVICE).detach().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert triton_calls["forward"] > 0 and triton_calls["backward"] > 0


def test_cpu_tensors_go_to_the_compiled_kernel_unless_triton_is_forced(monkeypatch):
    x = torch.randn(2, 8, 3, 3)
    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    assert not norm_ops._triton_serves(x)
    assert not norm_ops.available(x.half(), whiten=False)  # composite: no CPU kernel in half precision
    monkeypatch.setenv("AQCF_BACKEND", "triton")
    assert norm_ops._triton_serves(x) == common.INTERPRET
    assert not norm_ops.available(x, whiten=True) and not norm_ops.available(x.flatten(1), whiten=False)


def test_kernels_compile_for_sm90_without_spills_and_with_vector_loads():
    """The static check (tools/triton_resources.py --norm): each kernel compiled for sm_90 as a real launch
    specialises it; no stack (spills) and 16-byte loads of the streamed tensors. Interpreted tests never
    run triton's compiler, so this is what proves the kernels compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    tool = root / "tools" / "triton_resources.py"
    result = subprocess.run(
        [sys.executable, str(tool), "--norm", "--quick"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no spills, vectorised loads" in result.stdout


def test_opcheck_half_input_float32_statistics(triton_calls):
    """The fake (meta) implementation agrees with the kernels: half in, half out, float32 statistics."""
    x, w, b, *_ = _inputs((2, 8, 3, 5), torch.float16, seed=61)
    args = [t.to(DEVICE).requires_grad_() for t in (x, w, b)]
    y, mean, var = torch.ops.aqcf.qnorm(*args, None, None, True, True, 1e-5, "gelu", 0.01)
    assert y.dtype == torch.float16 and mean.dtype == var.dtype == torch.float32
    torch.library.opcheck(
        torch.ops.aqcf.qnorm.default,
        (*args, None, None, True, True, 1e-5, "gelu", 0.01),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_eval_without_affine_runs_no_sums_pass(triton_calls, monkeypatch):
    """Running statistics and no γ/β to differentiate: dx = γ r gz needs no reduction, so the backward skips the
    sums pass and the coefficient kernel writes A alone (B = D = 0)."""
    from aqcf_kernels.backends.triton import norm as triton_norm

    launched = _spy_kernels(monkeypatch, triton_norm)
    x, _, _, rm, rv, gy = _inputs((3, 12, 7, 5), torch.float64, channels_last=True, seed=71)

    def run(fused, dtype, device):
        xx = x.to(device=device, dtype=dtype).requires_grad_()
        stats = (rm.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
                 rv.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32))  # fmt: skip
        y = _quaternion_norm("t", xx, False, *stats, None, None, False, 0.1, 1e-5, False, "gelu", 0.01, fused=fused)
        return y, torch.autograd.grad(y, [xx], gy.to(y))

    got, ref = run(True, torch.float32, DEVICE), run(False, torch.float64, "cpu")
    assert triton_calls == {"forward": 1, "backward": 1}
    assert launched == ["qnorm_apply_kernel", "qnorm_bwd_coefficients_kernel", "qnorm_bwd_input_kernel"]
    _check(got, ref, 1e-5, names=("y", "grad_input"))


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_affine_gradients_without_the_input_gradient(triton_calls, monkeypatch, per_sample):
    """dγ and dβ alone (a frozen input): the sums pass and the coefficient kernel run, the input pass does not."""
    from aqcf_kernels.backends.triton import norm as triton_norm

    launched = _spy_kernels(monkeypatch, triton_norm)
    x, w, b, *_, gy = _inputs((2, 8, 6, 5), torch.float64, seed=81 + per_sample)

    def run(fused, dtype):
        device = DEVICE if fused else "cpu"
        ww, bb = (t.to(device=device, dtype=dtype).requires_grad_() for t in (w, b))
        y = _quaternion_norm("t", x.to(device=device, dtype=dtype), per_sample, None, None, ww, bb, True, 0.1, 1e-5,
                             False, "leaky_relu", -0.3, fused=fused)  # fmt: skip
        return y, torch.autograd.grad(y, [ww, bb], gy.to(y))

    got, ref = run(True, torch.float32), run(False, torch.float64)
    assert triton_calls == {"forward": 1, "backward": 1}
    assert "qnorm_bwd_input_kernel" not in launched and "qnorm_bwd_coefficients_kernel" in launched
    _check(got, ref, 1e-5, names=("y", "grad_weight", "grad_bias"))


def _spy_kernels(monkeypatch, module, run: bool = True) -> list[str]:
    """Record the names of ``module``'s norm kernels as they launch; they still run unless ``run`` is False."""
    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid] if run else lambda *args, **kwargs: None

    for name in dir(module):
        if name.startswith("qnorm_") and name.endswith("_kernel"):
            monkeypatch.setattr(module, name, Spy(name, getattr(module, name)))
    return launched


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_a_training_step_is_six_launches_and_no_torch_kernel(monkeypatch, per_sample):
    """The host cost of a norm on a GPU, where a small layer's norm is host-bound: its training forward is three
    kernels (statistics, pooling, apply) and its backward three (sums, coefficients, input gradient), with no
    torch op that would launch a kernel of its own between them (the pooling and the coefficients were ~12 and
    ~25 torch ops). Counted with the kernels replaced by recorders: nothing runs but the launchers' host code."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from aqcf_kernels.backends.triton import norm as triton_norm

    launched = _spy_kernels(monkeypatch, triton_norm, run=False)

    class TorchKernels(TorchDispatchMode):
        """The torch ops that compute (a kernel launch each on a GPU): not views, not allocations."""

        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not (func.is_view or func.overloadpacket.__name__.startswith(("empty", "new_empty"))):
                self.ops.append(func.overloadpacket.__name__)
            return out

    x = torch.randn(2, 16, 5, 3).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4), torch.randn(16)
    with TorchKernels() as forward_ops:
        y, mean, var = triton_norm.forward(x, w, b, None, None, True, per_sample, 1e-5, "relu", 0.0)
    assert launched == ["qnorm_stats_kernel", "qnorm_stats_pool_kernel", "qnorm_apply_kernel"]
    launched.clear()
    gy = torch.randn_like(x)
    with TorchKernels() as backward_ops:
        triton_norm.backward(gy, x, w, b, mean, var, True, per_sample, 1e-5, "relu", 0.0, [True] * 3)
    assert launched == ["qnorm_bwd_sums_kernel", "qnorm_bwd_coefficients_kernel", "qnorm_bwd_input_kernel"]
    assert forward_ops.ops == [] and backward_ops.ops == []
    assert (mean.shape, var.shape) == (((2 if per_sample else 1), 16), ((2 if per_sample else 1), 4))


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_a_scale_without_a_shift(triton_calls, per_sample):
    """A weight and no bias (the norms' ``bias=False``: HAS_WEIGHT without HAS_BIAS): output, input and weight
    gradients against the composite path in float64."""
    x, w, _, rm, rv, gy = _inputs((2, 8, 3, 5), torch.float64, False, seed=61)

    def run(fused, device):
        xi, wi = (t.to(device).detach().requires_grad_() for t in (x, w))
        args = (per_sample, None, None, wi, None, True, 0.1, 1e-5, False, "relu", 0.0)
        y = _quaternion_norm("t", xi, *args, fused=fused)
        return y, torch.autograd.grad(y, [xi, wi], gy.to(y))

    ref = run(False, "cpu")
    got = run(True, DEVICE)
    assert triton_calls == {"forward": 1, "backward": 1}
    _check(got, ref, 1e-10, names=("y", "grad_input", "grad_weight"))

"""Backend registry and selection, the ``aqcf_kernels.backends()`` table, and empty batches."""

from __future__ import annotations

import os

import pytest
import torch

import aqcf_kernels
from aqcf_kernels import backends, reference, tuning
from aqcf_kernels import functional as qF
from aqcf_kernels.backends import PRIORITY, BackendError, registered, select
from aqcf_kernels.backends.torch import TorchConvBackend as TorchBackend
from aqcf_kernels.params import ConvParams

# Tiny convs only: one intra-op thread runs them faster (see tests/conv/conftest.py).
pytestmark = pytest.mark.usefixtures("single_threaded")


def test_cpp_backend_available_when_required():
    # CI builds the extension and sets AQCF_REQUIRE_CPP=1: from then on a missing or broken
    # extension must fail the run instead of quietly testing only the torch backend.
    assert "cpp" in registered()
    why = registered()["cpp"].unavailable()
    if os.environ.get("AQCF_REQUIRE_CPP", "").strip() == "1":
        assert why is None, f"AQCF_REQUIRE_CPP=1 but the cpp backend is unavailable: {why}"
    elif why is not None:
        pytest.skip(f"cpp backend not built ({why}); AQCF_REQUIRE_CPP=1 makes this a failure")


class FakeBackend(TorchBackend):
    """A registry entry we control: delegates to the torch backend and counts its calls."""

    device_types = ("cpu",)

    def __init__(self, name: str, unavailable: str | None = None):
        self.name, self._unavailable, self.calls = name, unavailable, 0

    def unavailable(self):
        return self._unavailable

    def conv(self, *args):
        self.calls += 1
        return super().conv(*args)


@pytest.fixture
def fake_backends(monkeypatch):
    """Register a broken ('fake-broken') and a working ('fake-ok') backend, for this test only.

    These tests are about the priority rule, so 'auto' follows the rule here instead of timing every
    backend on its first call (measuring is tested in test_tuning.py).
    """
    monkeypatch.setattr(tuning, "mode", "heuristic")
    fakes = {"fake-broken": FakeBackend("fake-broken", "simulated: library missing"), "fake-ok": FakeBackend("fake-ok")}
    for name, impl in fakes.items():
        monkeypatch.setitem(backends.CONV.backends, name, impl)
    return fakes


def _args():
    x = torch.randn(1, 8, 5, 5, generator=torch.Generator().manual_seed(40))
    w = torch.randn(4, 2, 2, 3, 3, generator=torch.Generator().manual_seed(41))
    return x, w, ConvParams(2, (1, 1), (0, 0), (1, 1), False, (0, 0), 1)


@pytest.mark.parametrize("env", [None, "", "auto"])
def test_default_cpu_selection_is_first_available_backend_in_priority(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("AQCF_BACKEND", raising=False)
    else:
        monkeypatch.setenv("AQCF_BACKEND", env)
    x, w, p = _args()
    impls = registered()
    available = [
        name
        for name in PRIORITY["cpu"]
        if name in impls and impls[name].unavailable() is None and "cpu" in impls[name].device_types
    ]
    assert available, f"no available CPU backend in PRIORITY['cpu'] = {PRIORITY['cpu']}"
    for algorithm in ("hamilton", "fast8"):
        assert select(x, w, p, algorithm).name == available[0]


def test_selection_passes_over_an_unavailable_backend(monkeypatch, fake_backends):
    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    monkeypatch.setitem(PRIORITY, "cpu", ["fake-broken", "fake-ok", *PRIORITY["cpu"]])
    x, w, p = _args()
    assert select(x, w, p, "hamilton").name == "fake-ok"
    y = qF.quaternion_conv2d(x, w)
    assert fake_backends["fake-ok"].calls == 1  # the selected backend really computed the call
    torch.testing.assert_close(y, reference.quaternion_conv_naive(x, w))


def test_forced_backend_wins_over_priority(monkeypatch, fake_backends):
    monkeypatch.setitem(PRIORITY, "cpu", ["fake-ok", *PRIORITY["cpu"]])
    monkeypatch.setenv("AQCF_BACKEND", "torch")
    x, w, p = _args()
    assert select(x, w, p, "fast8").name == "torch"
    qF.quaternion_conv2d(x, w)
    assert fake_backends["fake-ok"].calls == 0


def test_forced_unavailable_backend_is_an_error_not_a_fallback(monkeypatch, fake_backends):
    monkeypatch.setenv("AQCF_BACKEND", "fake-broken")
    x, w, _ = _args()
    with pytest.raises(BackendError, match=r"AQCF_BACKEND='fake-broken' cannot serve this call: simulated"):
        qF.quaternion_conv2d(x, w)


def test_no_backend_for_the_device_is_an_error(monkeypatch, fake_backends):
    # Every candidate can refuse; the error then lists each one's reason.
    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    monkeypatch.setitem(PRIORITY, "cpu", ["fake-broken"])
    monkeypatch.setitem(backends.CONV.backends, "torch", FakeBackend("torch", "simulated: torch refuses"))
    x, w, p = _args()
    with pytest.raises(
        BackendError, match=r"no conv backend serves cpu tensors: fake-broken: simulated.*torch: simulated"
    ):
        select(x, w, p, "hamilton")


class AskedBackend(FakeBackend):
    """A fake backend that counts how often the registry asks whether it can serve a call."""

    def __init__(self, name: str):
        super().__init__(name)
        self.asked = 0

    def cannot_serve(self, input, weight, params, algorithm):
        self.asked += 1
        return None


def test_candidates_are_remembered_per_signature_until_what_decides_them_changes(monkeypatch, fake_backends):
    # Listing the candidates asks every backend (availability, refusals): a signature's list is remembered,
    # so a second identical call asks nobody; another signature, a registry or priority change and a tuning
    # change each make the registry ask again. A forced backend (use() or the environment) has lists of its
    # own, and the unforced ones outlive it.
    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    asked = AskedBackend("fake-asked")
    monkeypatch.setitem(backends.CONV.backends, "fake-asked", asked)
    monkeypatch.setitem(PRIORITY, "cpu", ["fake-asked", *PRIORITY["cpu"]])
    x, w, p = _args()

    def resolve(x=x, p=p, algorithm="auto"):
        return backends.resolve_conv(x, w, p, algorithm, "forward")[0].name

    assert resolve() == "fake-asked"
    first = asked.asked
    assert first >= 1
    assert resolve() == "fake-asked" and asked.asked == first  # remembered
    resolve(x=x[:, :, :4])  # another shape
    assert asked.asked > first
    n = asked.asked
    resolve(p=ConvParams(2, (2, 2), (0, 0), (1, 1), False, (0, 0), 1))  # another geometry
    assert asked.asked > n
    with backends.use("torch"):
        assert resolve() == "torch"
    monkeypatch.setenv("AQCF_BACKEND", "torch")
    assert resolve() == "torch"  # the environment is read per call
    monkeypatch.delenv("AQCF_BACKEND")
    n = asked.asked
    assert resolve() == "fake-asked" and asked.asked == n  # (remembered before the forcing)
    resolve(x=x[:, :, :3])
    assert asked.asked > n  # a signature first met now is listed
    monkeypatch.setitem(PRIORITY, "cpu", ["fake-ok", "fake-asked", *PRIORITY["cpu"]])
    assert resolve() == "fake-ok"
    n = asked.asked
    monkeypatch.setattr(tuning, "half_fast8", "balanced")  # a tuning setting: announced
    resolve()
    assert asked.asked > n


def test_half_precision_candidates_under_the_balance_guard_are_asked_every_call(monkeypatch, fake_backends):
    # With tuning.half_fast8 = 'balanced', whether 'auto' may consider fast8 in half precision depends on
    # the operands' data (their component balance): nothing of it may be remembered by signature.
    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    monkeypatch.setattr(tuning, "half_fast8", "balanced")
    asked = AskedBackend("fake-asked")
    monkeypatch.setitem(backends.CONV.backends, "fake-asked", asked)
    monkeypatch.setitem(PRIORITY, "cpu", ["fake-asked", *PRIORITY["cpu"]])
    x, w, p = _args()
    x, w = x.bfloat16(), w.bfloat16()
    offered = []
    for scale in (1.0, 0.01):  # balanced, then imaginary parts at 1% of the real part
        xs = torch.cat([x[:, :2], x[:, 2:] * scale], dim=1)
        before = asked.asked
        backends.resolve_conv(xs, w, p, "auto", "forward")
        offered.append(asked.asked - before)
    # fast8 and hamilton asked for balanced data, hamilton only for unbalanced: asked both times
    assert offered == [2, 1]


def test_backends_table_lists_every_backend_with_reasons(fake_backends):
    table = str(aqcf_kernels.backends())
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.split()[1] == "conv"}
    assert set(rows) == set(registered())
    for name, impl in registered().items():
        why = impl.unavailable()
        if why is None:
            assert "unavailable" not in rows[name] and "available" in rows[name]
        else:
            assert f"unavailable: {why}" in rows[name]
        for device in impl.device_types:
            assert device in rows[name]
    assert "unavailable: simulated: library missing" in rows["fake-broken"]


# Empty batch: every rank, conv and transposed (strided, with output_padding), with bias.
EMPTY_CASES = {
    "conv1d": ((0, 8, 7), (4, 2, 2, 3), dict(stride=2)),
    "conv_transpose1d": ((0, 8, 7), (4, 2, 1, 3), dict(stride=2, output_padding=1, transposed=True)),
    "conv2d": ((0, 8, 5, 4), (4, 4, 1, 3, 2), dict(padding=1, groups=2)),
    "conv_transpose2d": ((0, 8, 5, 4), (4, 2, 2, 3, 3), dict(stride=2, output_padding=1, transposed=True)),
    "conv3d": ((0, 4, 3, 4, 3), (4, 2, 1, 2, 2, 2), dict()),
    "conv_transpose3d": ((0, 8, 2, 3, 2), (4, 2, 1, 2, 2, 2), dict(stride=2, groups=2, transposed=True)),
}


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_batch_gives_empty_output_and_zero_grads(backend, algorithm, case, qrand, served):
    x_shape, w_shape, kwargs = EMPTY_CASES[case]
    # float32: the one dtype every backend serves (triton has no float64)
    x = torch.empty(x_shape, dtype=torch.float32, requires_grad=True)
    w = qrand(*w_shape, dim=0, seed=50, dtype=torch.float32, requires_grad=True)
    served(backend, x, w, algorithm, **kwargs)
    out_channels = 4 * (w_shape[2] * kwargs.get("groups", 1) if kwargs.get("transposed") else w_shape[1])
    b = qrand(out_channels, dim=0, seed=51, dtype=torch.float32, requires_grad=True)
    y = qF.quaternion_conv(x, w, b, **kwargs, algorithm=algorithm)
    # torch's own convs handle empty batches: the naive reference gives the expected shape.
    assert y.shape == reference.quaternion_conv_naive(x.detach(), w.detach(), b.detach(), **kwargs).shape
    assert y.shape[0] == 0 and y.shape[1] == out_channels
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_cuda_calls_go_to_cudnn_on_the_expanded_weight_unless_forced(monkeypatch):
    # The GPU benchmarks (benchmarks/results/*-gpu-*) found cuDNN on the expanded weight faster
    # than the fused kernels everywhere: the rule (no measurement) picks it on CUDA, through the
    # extension's ATen path (served without Python once remembered), else the torch backend.
    from aqcf_kernels.backends import CONV, use
    from aqcf_kernels.backends.policy import FAST8_MIN_CHANNELS_PER_GROUP, fast8_pays_off

    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    assert CONV.priority["cuda"] == ["cuda", "torch", "triton"]
    wide = FAST8_MIN_CHANNELS_PER_GROUP * 2
    _, _, p = _args()
    x_meta = torch.empty(2, 4 * wide, 9, 9, device="meta")
    w_meta = torch.empty(4, wide, wide, 3, 3, device="meta")
    assert fast8_pays_off(torch.empty(x_meta.shape), torch.empty(w_meta.shape), p)  # the same on CPU: fast8
    assert not fast8_pays_off(x_meta, w_meta, p)  # any non-CPU device: hamilton
    from aqcf_kernels.backends import select_in

    first = "cuda" if registered()["cuda"].unavailable() is None else "torch"  # (no GPU or extension: torch)
    assert select_in(CONV, "cuda", lambda b: None).name == first
    with use("triton"):
        assert select_in(CONV, "cuda", lambda b: None).name == "triton"


def test_on_cuda_auto_times_neither_torch_where_cuda_runs_the_same_nor_triton():
    # measured on an H200 (bf16, 2026-12-04): the cuda backend's ATen path 0.91-1.01x of cuDNN-expanded
    # fwd+bwd, the torch backend (the same cuDNN conv behind Python) 0.69-1.02x, Triton's kernels 0.37-0.65x;
    # auto, served by torch/hamilton then, 0.69-0.82x at 16q and 64q
    from aqcf_kernels.backends import policy

    impls = registered()
    algorithms = ("hamilton", "fast8")
    candidates = [(impls[name], algorithm) for name in ("cuda", "torch", "triton") for algorithm in algorithms]
    _, w, p = _args()
    for algorithm in algorithms:
        assert policy.plausible(impls["cuda"], algorithm, candidates, w, p)
        assert not policy.plausible(impls["torch"], algorithm, candidates, w, p)
        assert not policy.plausible(impls["triton"], algorithm, candidates, w, p)
    # where the cuda backend does not offer an algorithm (a dtype it refuses, no extension), torch's is timed
    without_cuda = [c for c in candidates if c[0].name != "cuda" or c[1] == "hamilton"]
    assert policy.plausible(impls["torch"], "fast8", without_cuda, w, p)
    assert not policy.plausible(impls["torch"], "hamilton", without_cuda, w, p)


@pytest.mark.parametrize(
    ("dims", "channels", "fast8"),
    [
        (2, 8, False),
        (2, 16, True),
        (2, 24, False),
        (2, 32, True),
        (3, 16, True),
        (3, 8, False),
        (3, 32, True),
        (1, 16, False),
    ],
)
def test_auto_policy_on_cpu_follows_the_measured_channel_counts(dims, channels, fast8):
    # From one-process A/B runs (see backends.policy.fast8_pays_off): fast8 from 32 quaternion channels per
    # group, and at exactly 16 in 2d and 3d; hamilton elsewhere.
    from aqcf_kernels.backends.policy import fast8_pays_off
    from aqcf_kernels.params import check_conv_args

    x = torch.empty(1, 4 * channels, *[6] * dims)
    w = torch.empty(4, channels, channels, *[3] * dims)
    p, _ = check_conv_args(x, w, None, dims, 1, 1, 1, 1, False, 0, "auto")
    assert fast8_pays_off(x, w, p) is fast8


@pytest.mark.parametrize(
    ("channels", "groups", "fast8"), [(64, 2, True), (32, 2, True), (48, 2, False), (32, 4, False)]
)
def test_auto_policy_counts_channels_per_group(channels, groups, fast8):
    from aqcf_kernels.backends.policy import fast8_pays_off
    from aqcf_kernels.params import check_conv_args

    x = torch.empty(1, 4 * channels, 6, 6)
    w = torch.empty(4, channels, channels // groups, 3, 3)
    p, _ = check_conv_args(x, w, None, 2, 1, 1, 1, groups, False, 0, "auto")
    assert fast8_pays_off(x, w, p) is fast8

"""The conv ops defined by the compiled extension (csrc/cpu/op.cpp) and, without it, by Python.

With the extension, a call signature is resolved in Python once (backend, algorithm, maybe measured)
and served in C++ afterwards when the extension's own conv won; anything that decides choices drops
the remembered ones. Without it (``AQCF_NO_EXTENSION=1``) the same schemas come from Python.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch

from aqcf_kernels import backends, reference, tuning
from aqcf_kernels import functional as qF
from aqcf_kernels.backends._extension import _C
from aqcf_kernels.backends.cuda.conv import CudaConvBackend
from aqcf_kernels.ops import conv as conv_ops

ROOT = Path(__file__).resolve().parents[2]

native = pytest.mark.skipif(not conv_ops.NATIVE, reason="aqcf_kernels._C is not built")


def test_the_extension_defines_the_ops_when_built() -> None:
    if os.environ.get("AQCF_REQUIRE_CPP", "").strip() == "1":
        assert conv_ops.NATIVE, "AQCF_REQUIRE_CPP=1 but the conv ops are not the extension's"
    # The schemas are those Python infers from the signatures that define the ops without the
    # extension: a program exported on either install calls the same ops.
    for name, fn in (("qconv", conv_ops.qconv), ("qconv_weight_grad", conv_ops.qconv_weight_grad)):
        registered = str(getattr(torch.ops.aqcf, name).default._schema)
        inferred = torch.library.infer_schema(fn, mutates_args=())
        assert registered == f"aqcf::{name}{inferred}"


def _step(x, w, b, algorithm="hamilton", **kw):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = qF.quaternion_conv2d(x, w, b, padding=1, algorithm=algorithm, **kw)
    grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    return y, grads


@native
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8", "auto"])
def test_a_signature_is_resolved_in_python_once_then_served_natively(asked, qrand, algorithm) -> None:
    x, w, b = qrand(2, 12, 7, 6, dtype=torch.float64, seed=1), qrand(4, 5, 3, 3, 3, seed=2), qrand(20, seed=3)
    y1, g1 = _step(x, w, b, algorithm)
    if algorithm == "auto":  # the first runs are re-checked on the next calls before a choice is remembered
        for _ in range(tuning.max_provisional_calls(2)):
            if _C._remembered_conv_choices() == 3:
                break
            y1, g1 = _step(x, w, b, algorithm)
        y1, g1 = _step(x, w, b, algorithm)
    else:  # forward and input gradient ask for qconv, the weight gradient for qconv_weight_grad
        assert (asked.conv, asked.weight_grad) == (2, 1)
    assert _C._remembered_conv_choices() == 3
    asked_before = (asked.conv, asked.weight_grad)
    y2, g2 = _step(x, w, b, algorithm)
    assert (asked.conv, asked.weight_grad) == asked_before, "a remembered signature went back to Python"
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    for a, b_ in zip(g2, g1, strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    torch.testing.assert_close(y2, reference.quaternion_conv_naive(x, w, b, padding=1))


@native
def test_activation_and_channels_last_served_natively_match_python(asked, qrand) -> None:
    x = qrand(2, 8, 6, 5, dtype=torch.float64, seed=4).contiguous(memory_format=torch.channels_last)
    w, b = qrand(4, 3, 2, 3, 3, seed=5), qrand(12, seed=6)
    first = _step(x, w, b, activation="gelu")
    second = _step(x, w, b, activation="gelu")
    assert asked.conv == 2  # the second step never asked
    assert second[0].stride() == first[0].stride() and second[0].is_contiguous(memory_format=torch.channels_last)
    for a, b_ in zip((second[0], *second[1]), (first[0], *first[1]), strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)


@native
def test_what_decides_a_choice_drops_the_remembered_ones(asked, qrand, monkeypatch) -> None:
    x, w, b = qrand(1, 8, 5, 5, dtype=torch.float64, seed=7), qrand(4, 2, 2, 3, 3, seed=8), qrand(8, seed=9)
    _step(x, w, b)
    assert _C._remembered_conv_choices() == 3
    with backends.use("torch"):  # forcing a backend: its calls are other signatures (next test)
        asked_before = asked.conv
        _step(x, w, b)
        _step(x, w, b)
        assert asked.conv == asked_before + 4, "the forced torch backend must be asked every time"
    asked_before = asked.conv
    _step(x, w, b)
    assert asked.conv == asked_before, "the choices made before the block still serve after it"
    assert _C._remembered_conv_choices() == 3
    monkeypatch.setattr(tuning, "mode", "heuristic")  # the tuning mode
    assert _C._remembered_conv_choices() == 0
    _step(x, w, b)
    tuning.clear()  # the tuning memory
    assert _C._remembered_conv_choices() == 0
    _step(x, w, b)
    monkeypatch.setitem(backends.PRIORITY, "cpu", ["torch", "cpp"])  # the priorities
    assert _C._remembered_conv_choices() == 0
    monkeypatch.setitem(backends.PRIORITY, "cpu", ["cpp", "torch"])
    _step(x, w, b)
    asked_before = asked.conv
    monkeypatch.setenv("AQCF_BACKEND", "torch")  # the environment is part of the signature
    _step(x, w, b)
    assert asked.conv == asked_before + 2


@native
def test_the_extension_has_cpu_and_cuda_kernels_for_the_conv_ops() -> None:
    # Registered whatever the build (a CPU-only torch has the CUDA dispatch key): on a GPU, a signature the
    # cuda backend served is served by the CUDA kernel afterwards; activation_grad_bias stays Python's there
    # (one Triton pass).
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in ("qconv", "qconv_weight_grad", "qconv_weight_bias_grad"):
        assert has(f"aqcf::{name}", "CPU") and has(f"aqcf::{name}", "CUDA"), name
    assert has("aqcf::activation_grad_bias", "CPU") and not has("aqcf::activation_grad_bias", "CUDA")


@native
def test_choices_are_kept_per_forced_backend(asked, qrand) -> None:
    # A loop may enter use() around every step (the benchmarks' forced providers do): what was chosen under a
    # forced backend is served natively the next time it is forced, and what was chosen without forcing
    # after the block; neither is served for the other. (Each entry and exit used to drop every choice.)
    x, w, b = qrand(1, 8, 5, 5, dtype=torch.float64, seed=27), qrand(4, 2, 2, 3, 3, seed=28), qrand(8, seed=29)
    _step(x, w, b)
    assert (asked.conv, asked.weight_grad) == (2, 1)
    with backends.use("cpp"):
        _step(x, w, b)
    assert (asked.conv, asked.weight_grad) == (4, 2), "a choice made without forcing served a forced call"
    assert _C._remembered_conv_choices() == 6
    for _ in range(2):
        with backends.use("cpp"):
            forced = _step(x, w, b)
        free = _step(x, w, b)
    assert (asked.conv, asked.weight_grad) == (4, 2), "entering or leaving use() sent calls back to Python"
    with backends.use("torch"):  # another forced backend: its own signatures (torch's are never remembered)
        _step(x, w, b)
    assert (asked.conv, asked.weight_grad) == (6, 3)
    for y in (forced[0], free[0]):
        torch.testing.assert_close(y, reference.quaternion_conv_naive(x, w, b, padding=1))


def test_an_extension_that_cannot_be_told_the_forced_backend_forgets_its_choices_instead(monkeypatch) -> None:
    # (an extension built before use() announced the forced backend: its signatures do not include it)
    from aqcf_kernels.backends import _extension

    forgotten = []
    stale = types.SimpleNamespace(_forget_conv_choices=lambda: forgotten.append("conv"))
    monkeypatch.setattr(_extension, "_C", stale)
    with backends.use("torch"):
        assert forgotten == ["conv"]
    assert forgotten == ["conv", "conv"]


class AtenOnCpu(CudaConvBackend):
    """The ``cuda`` backend's code (the extension's ATen path, ``conv_aten``) serving CPU tensors: what the
    extension's CUDA kernels run once they remember a choice of the ``cuda`` backend, proven here on CPU."""

    name = "aten-cpu"
    device_types = ("cpu",)

    def unavailable(self):
        return None

    def cannot_serve(self, input, weight, params, algorithm):
        return None


@native
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("geometry", ["plain", "transposed-groups-channels-last"])
def test_the_aten_path_is_remembered_and_served_natively(asked, qrand, monkeypatch, geometry, algorithm, activation):
    # A signature the ATen path served (the cuda backend on a GPU) is remembered with its engine: the next
    # calls never ask Python, and compute what Python's calls computed (the same conv_aten), bit for bit.
    monkeypatch.setitem(backends.CONV.backends, "aten-cpu", AtenOnCpu())
    assert AtenOnCpu().native_engine() == "aten"
    if geometry == "plain":
        x, w, b = qrand(2, 12, 7, 6, dtype=torch.float64, seed=11), qrand(4, 5, 3, 3, 3, seed=12), qrand(20, seed=13)
        kwargs, conv, naive = {"padding": 1}, qF.quaternion_conv2d, {"padding": 1}
    else:
        x = qrand(2, 16, 5, 4, dtype=torch.float64, seed=14).contiguous(memory_format=torch.channels_last)
        w, b = qrand(4, 4, 3, 3, 2, seed=15), qrand(24, seed=16)
        kwargs = {"stride": 2, "padding": 1, "groups": 2, "output_padding": 1}
        conv, naive = qF.quaternion_conv_transpose2d, {**kwargs, "transposed": True}

    def step():
        leaves = tuple(t.detach().requires_grad_() for t in (x, w, b))
        y = conv(*leaves, algorithm=algorithm, activation=activation, **kwargs)
        return y, torch.autograd.grad(y, leaves, torch.ones_like(y))

    with backends.use("aten-cpu"):
        first = step()
        assert (asked.conv, asked.weight_grad) == (2, 1)
        assert _C._remembered_conv_choices() == 3
        second = step()
        assert (asked.conv, asked.weight_grad) == (2, 1), "a remembered signature went back to Python"
    assert second[0].stride() == first[0].stride()
    for a, b_ in zip((second[0], *second[1]), (first[0], *first[1]), strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    z = reference.quaternion_conv_naive(x, w, b, **naive)
    expected = {None: z, "relu": torch.relu(z), "gelu": torch.nn.functional.gelu(z)}[activation]
    torch.testing.assert_close(second[0], expected)


@native
def test_a_bias_and_weight_gradient_ask_python_once_for_both(asked, qrand) -> None:
    # Not remembered, aqcf::qconv_weight_bias_grad asks Python's implementation of it (on CUDA the Triton
    # weight-gradient launch sums the bias gradient), not the weight gradient's then a sum.
    x, w, b = qrand(1, 8, 5, 5, dtype=torch.float64, seed=17), qrand(4, 2, 2, 3, 3, seed=18), qrand(8, seed=19)
    calls = []
    _C._set_fallbacks(asked.qconv, lambda *a: calls.append("weight") or conv_ops.qconv_weight_grad(*a),
                      lambda *a: calls.append("weight+bias") or conv_ops.qconv_weight_bias_grad(*a))  # fmt: skip
    with backends.use("torch"):  # never remembered: every call asks
        _, grads = _step(x, w, b)
    assert calls == ["weight+bias"]
    torch.testing.assert_close(grads[2], torch.ones(1, 8, 5, 5, dtype=torch.float64).sum(dim=(0, 2, 3)))


def test_tuning_mode_assignments_are_checked() -> None:
    with pytest.raises(ValueError, match="tuning mode must be one of"):
        tuning.mode = "fastest"


@pytest.mark.skipif(_C is None, reason="without the extension the whole suite tests the Python definitions")
# One file per test, so the test workers share the three runs (together ~70 s on the 2-core CI machine).
@pytest.mark.parametrize(
    "test_file", ["tests/conv/test_qconv_opcheck.py", "tests/conv/test_qconv_gradcheck.py", "tests/conv/test_tuning.py"]
)
def test_the_python_definitions_pass_opcheck_and_gradcheck(test_file: str, without_extension) -> None:
    """``AQCF_NO_EXTENSION=1``: the ops as defined without the extension, through the same tests."""
    check = "from aqcf_kernels.ops import conv; assert not conv.NATIVE, 'the extension still defines the ops'"
    without_extension(test_file, check=check)

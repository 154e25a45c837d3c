"""A hypothesis grid: the extension's C++-served calls equal the Python-served ones (csrc/cpu/op.cpp,
norm_op.cpp, attention_op.cpp, choices.h).

The first call of a signature goes to Python (ops/*.py, backends/), which picks a backend and algorithm and,
when the extension's own kernels won, remembers the signature; later calls with that signature are served in
C++. Two risks, each a property here:

1. served vs Python: for the same inputs, the C++-served call returns what the Python-served call returned,
   bit for bit (outputs, their strides, every gradient, double backward too), and both are within tolerance of
   the float64 reference: conv (1d/2d/3d, transposed, groups, pointwise, bias none/dense/strided view, every
   activation, float64, float32, bf16, contiguous/channels_last/strided/permuted/offset inputs,
   hamilton/fast8/auto, heuristic and measured choices: a provisional measured choice is never remembered),
   the fused norm (its backward served by Python too), the cross attention and the gate (likewise);
2. a signature that omits a property that matters: remember call A, then call B that differs from A in one
   drawn property; B must match the reference, and B run with nothing remembered, bit for bit (the same
   kernel runs both: the grid keeps to the heuristic rule, which makes the same choice for both).

The faults this grid found (a half_fast8 choice served past the balance guard, an attention signature without
the thread count, GELU applied in another order by C++, bf16 weight gradients under a kernel larger than its input)
are fixed; each keeps a minimal regression test at the end, and the grids draw their corners again (GELU outputs
bit for bit, bf16 3d weight gradients and double backward), except where a corner needs a measurement the grid
cannot stand in for (named at each).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from _grid import grid as _grid
from _threads import intra_op_threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqcf_kernels import backends, reference, tuning
from aqcf_kernels.backends import policy
from aqcf_kernels.backends._extension import _C
from aqcf_kernels.backends.registry import _conv_candidates, forget_choices
from aqcf_kernels.backends.torch import attention as TA
from aqcf_kernels.nn.norm import _quaternion_norm
from aqcf_kernels.ops import attention as attention_ops
from aqcf_kernels.ops import conv as conv_ops
from aqcf_kernels.ops import norm as norm_ops
from aqcf_kernels.params import ConvParams
from aqcf_kernels.quaternion import component_balance

pytestmark = pytest.mark.skipif(
    not (conv_ops.NATIVE and norm_ops.NATIVE and attention_ops.NATIVE), reason="aqcf_kernels._C is not built"
)


def grid(examples: int) -> settings:
    """``_grid.grid``: the fixtures (monkeypatch, the counting fallbacks) are per test, and every example starts from
    nothing remembered itself."""
    return _grid(examples, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large)


@pytest.fixture(autouse=True)
def _quiet_tuning(monkeypatch):
    """No tuning cache file (a choice another example wrote would come back 'cached' and be re-timed), one
    intra-op thread unless an example asks for two, and the rule's choices unless an example measures."""
    monkeypatch.setenv("AQCF_TUNING_CACHE", "off")
    with intra_op_threads(1), tuning.using("heuristic"):
        yield
    tuning.clear()


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

ACTIVATIONS = [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("gelu", 0.01)]
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


def _rand(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Fresh normal values (never zeros) drawn in float64 from a private generator, then cast."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in a memory layout: contiguous, channels_last (4d/5d), a strided view (last dim stride 2),
    a permuted layout (the last two dims swapped in memory) or a contiguous view at a storage offset."""
    if layout == "channels_last" and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":
        return torch.stack([t, torch.full_like(t, 7.0)], -1)[..., 0]
    if layout == "permuted" and t.dim() >= 3:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "offset":
        buf = torch.full((t.numel() + 3,), 7.0, dtype=t.dtype)
        view = buf[3:].view(t.shape)
        view.copy_(t)
        return view
    return t.contiguous()


def _same(got, expected, names) -> None:
    """Bit for bit: dtype, shape, strides and values."""
    assert len(got) == len(expected)
    for name, g, e in zip(names[: len(got)], got, expected, strict=True):
        if e is None:
            assert g is None, name
            continue
        assert g.dtype == e.dtype and g.shape == e.shape, (name, g.dtype, e.dtype, g.shape, e.shape)
        assert g.stride() == e.stride(), (name, g.stride(), e.stride())
        assert torch.equal(g, e), f"{name}: max difference {(g.double() - e.double()).abs().max().item():.3e}"


def _close(got, ref, tol: float, name: str) -> None:
    """‖got − ref‖ ≤ tol · (‖ref‖ + 1), in float64 (the +1: a gradient that relu zeroed almost everywhere)."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    err = (got - ref).norm().item()
    assert err <= tol * (ref.norm().item() + 1.0), f"{name}: error {err:.3e}, reference norm {ref.norm().item():.3e}"


@contextlib.contextmanager
def _environ(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _measured_until_final(step, cap: int, invariant=None) -> None:
    """Measure mode: call ``step`` until no measured choice is provisional any more (each call is computed by the
    candidate being timed, so only then do later calls run one pair); ``invariant()`` holds after every call."""
    for _ in range(cap):
        step()
        assert invariant is None or invariant()
        if not tuning.provisional():
            break
    step()  # (the last refining call may have been computed by a pair that lost)


# ------------------------------------------------------------------------------------------------
# Conv: the case, the call, the reference
# ------------------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw, dtypes=tuple(DTYPES), algorithms=("hamilton", "fast8", "auto")):
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))  # quaternion channels
    if dims > 1 and draw(st.integers(0, 5)) == 0:  # 16 per group: where the rule picks fast8 for 'auto'
        cin, cout = 16 * groups, 16 * groups

    def tup(lo, hi):
        return tuple(draw(st.integers(lo, hi)) for _ in range(dims))

    kernel, stride, dilation, padding = tup(1, 3), tup(1, 2), tup(1, 2), tup(0, 2)
    if draw(st.integers(0, 4)) == 0:  # pointwise: one GEMM in the engine, whose output is channels-first
        kernel, stride, dilation, padding = (1,) * dims, (1,) * dims, (1,) * dims, (0,) * dims
    output_padding = (0,) * dims
    if transposed:
        # below the stride: what aqcf_kernels.params hands the op (a larger one allowed by a dilation becomes
        # zero rows of input more, params.geometry)
        output_padding = tuple(draw(st.integers(0, s - 1)) for s in stride)
    spatial = tup(1, {1: 9, 2: 6, 3: 4}[dims])
    if not transposed:  # at least one output position: the input covers the dilated kernel once padded
        spatial = tuple(max(s, d * (k - 1) + 1 - 2 * p) for s, d, k, p in zip(spatial, dilation, kernel, padding,
                                                                                strict=True))  # fmt: skip
    else:  # the transposed output is (s - 1)·stride - 2·padding + span + output_padding + 1: padding at most that
        padding = tuple(min(p, ((s - 1) * st_ + d * (k - 1) + op) // 2) for p, s, st_, d, k, op in
                        zip(padding, spatial, stride, dilation, kernel, output_padding, strict=True))  # fmt: skip
    layouts = ["contiguous", "strided", "offset"] + (["channels_last"] * 2 + ["permuted"] if dims > 1 else [])
    dtype = draw(st.sampled_from(dtypes))
    needs = draw(st.sampled_from([(True, True, True), (True, True, True), (True, False, False), (False, True, True),
                                  (False, False, True), (False, False, False)]))  # fmt: skip
    double = draw(st.sampled_from([False, False, False, True]))  # double backward (create_graph)
    return {
        "dims": dims,
        "transposed": transposed,
        "groups": groups,
        "batch": draw(st.integers(1, 2)),
        "cin": cin,
        "cout": cout,
        "kernel": kernel,
        "stride": list(stride),
        "padding": list(padding),
        "dilation": list(dilation),
        "output_padding": list(output_padding),
        "spatial": spatial,
        "dtype": dtype,
        "layout": draw(st.sampled_from(layouts)),
        "bias": draw(st.sampled_from(["none", "dense", "strided"])),
        "act": draw(st.sampled_from(ACTIVATIONS)),
        "algorithm": draw(st.sampled_from(algorithms)),
        "needs": needs,
        "double": double,
        "seed": draw(st.integers(0, 2**16)),
    }  # fmt: skip


def conv_tensors(case: dict, dtype=None):
    """``(x, w, b)`` of a case in its layouts; ``b`` None for no bias."""
    dtype = DTYPES[case["dtype"]] if dtype is None else dtype
    g, s = case["groups"], case["seed"]
    x = _rand((case["batch"], 4 * case["cin"], *case["spatial"]), s, dtype)
    if case["transposed"]:
        w = _rand((4, case["cin"], case["cout"] // g, *case["kernel"]), s + 1, dtype)
    else:
        w = _rand((4, case["cout"], case["cin"] // g, *case["kernel"]), s + 1, dtype)
    b = None
    if case["bias"] == "dense":
        b = _rand((4 * case["cout"],), s + 2, dtype)
    elif case["bias"] == "strided":  # every other element of a longer vector: stride 2
        b = _rand((8 * case["cout"],), s + 2, dtype)[1::2]
    return _laid_out(x, case["layout"]), w, b


def conv_geometry(case: dict) -> tuple:
    return (case["stride"], case["padding"], case["dilation"], case["transposed"], case["output_padding"],
            case["groups"])  # fmt: skip


def conv_step(case: dict, x, w, b, needs=None, grad_mode=True):
    """``[y, pre, dx, dw, db]`` of ``aqcf::qconv`` (a gradient None where not asked for), the upstream gradient
    fixed by the case's seed; with the case's ``double``, then ``[ddx, ddw, ddb]``: the gradients of
    ``Σ <grad, v>`` over the first gradients (create_graph), ``v`` fixed by the seed too."""
    needs = case["needs"] if needs is None else needs
    act, slope = case["act"]
    leaves = [t.detach().requires_grad_(n and grad_mode) if t is not None else None
              for t, n in zip((x, w, b), needs, strict=True)]  # fmt: skip
    with torch.set_grad_enabled(grad_mode):
        y, pre = torch.ops.aqcf.qconv(
            leaves[0], leaves[1], leaves[2], *conv_geometry(case), case["algorithm"], act, slope, "forward"
        )
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = [None, None, None]
    if wrt and grad_mode:
        gy = _rand(y.shape, case["seed"] + 5, y.dtype)
        double = case.get("double", False)
        first = torch.autograd.grad(y, wrt, gy, create_graph=double)
        got = iter(first)
        grads = [next(got) if t is not None and t.requires_grad else None for t in leaves]
        if double:
            vs = [_rand(g.shape, case["seed"] + 6 + i, g.dtype) for i, g in enumerate(first)]
            inner = sum((g * v).sum() for g, v in zip(first, vs, strict=True))
            # (a gradient that does not depend on the leaves, a linear conv's dx: zero second derivatives)
            second = iter(torch.autograd.grad(inner, wrt, allow_unused=True, materialize_grads=True)
                          if inner.requires_grad else [torch.zeros_like(t) for t in wrt])  # fmt: skip
            seconds = [next(second) if t is not None and t.requires_grad else None for t in leaves]
            return [y.detach(), pre.detach(), *[g.detach() if g is not None else None for g in grads], *seconds]
    return [y.detach(), pre.detach(), *grads]


def _gate(case, y, pre, dtype):
    """act'(z) as the op decided it (relu/leaky kinks read off the op's own output), in float64: the reference
    gradients follow the op's side of each kink, so a bf16 z that rounds across zero is not an error."""
    act, slope = case["act"]
    if act in ("relu", "leaky_relu"):
        sign = (pre if pre.numel() else y).double() > 0
        return sign.double() + (~sign).double() * (slope if act == "leaky_relu" else 0.0)
    return None


def check_conv_reference(case: dict, x, w, b, got, tol: float) -> None:
    """The op's outputs and gradients (``got``, from :func:`conv_step`) against the float64 naive reference on
    the same (rounded) values."""
    act, slope = case["act"]
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    stride, padding, dilation, transposed, output_padding, groups = conv_geometry(case)
    z = reference.quaternion_conv_naive(x64, w64, b64, stride, padding, dilation, groups, transposed=transposed,
                                        output_padding=output_padding)  # fmt: skip
    y_ref = {None: z, "relu": F.relu(z), "gelu": F.gelu(z)}.get(act) if act != "leaky_relu" else F.leaky_relu(z, slope)
    y, pre = got[0], got[1]
    _close(y, y_ref, tol, "y")
    if pre.numel():
        _close(pre, z, tol, "pre")
    wanted = [t for t, g in zip((x64, w64, b64), got[2:5], strict=True) if g is not None]
    if not wanted:
        return
    gy = _rand(y.shape, case["seed"] + 5, y.dtype).double()
    mask = _gate(case, y, pre, y.dtype)
    double = len(got) > 5
    if mask is not None:
        ref = torch.autograd.grad(z, wanted, gy * mask, create_graph=double)
    else:
        ref = torch.autograd.grad(y_ref, wanted, gy, create_graph=double)
    kept = [(name, g) for name, g in zip(("dx", "dw", "db"), got[2:5], strict=True) if g is not None]
    for (name, g), r in zip(kept, ref, strict=True):
        _close(g, r, tol, name)
    if double:  # the same v as conv_step's, in float64
        vs = [_rand(r.shape, case["seed"] + 6 + i, y.dtype).double() for i, r in enumerate(ref)]
        inner = sum((r * v).sum() for r, v in zip(ref, vs, strict=True))
        ref2 = (torch.autograd.grad(inner, wanted, allow_unused=True, materialize_grads=True)
                if inner.requires_grad else [torch.zeros_like(t) for t in wanted])  # fmt: skip
        kept2 = [(name, g) for name, g in zip(("ddx", "ddw", "ddb"), got[5:], strict=True) if g is not None]
        for (name, g), r in zip(kept2, ref2, strict=True):  # (several convs and GELU'' in the dtype: 3x the error)
            _close(g, r, 3 * tol, name)


def conv_tolerance(case: dict, dtype=None) -> float:
    dtype = DTYPES[case["dtype"]] if dtype is None else dtype
    if dtype == torch.float64:
        return 1e-9
    if dtype == torch.float32:
        return 2e-4 if case["algorithm"] == "hamilton" else 2e-3
    return 4e-2


def conv_kinds(needs) -> int:
    """The signatures a step remembers: the forward; the input gradient; the weight gradient."""
    return 1 + int(needs[0]) + int(needs[1])


def _conv_served_then_python(case, x, w, b, asked, measure: bool):
    """A Python-served step, then a C++-served one, of the same call."""
    forget_choices()
    if measure:
        # a provisional choice is never remembered: each signature is either still being timed or served in C++
        # (or neither: another backend won), never both (the example's own signatures only: tuning.clear())
        kinds = conv_kinds(case["needs"])

        def invariant():
            return case["double"] or _C._remembered_conv_choices() + len(tuning.provisional()) <= kinds

        _measured_until_final(lambda: conv_step(case, x, w, b), tuning.max_provisional_calls(4) + 2, invariant)
        forget_choices()  # the extension's table only: the measured choices stay final in tuning's memory
    before = asked.conv + asked.weight_grad
    python = conv_step(case, x, w, b)
    assert asked.conv + asked.weight_grad > before, "the first call of a signature did not ask Python"
    remembered = _C._remembered_conv_choices()
    before = asked.conv + asked.weight_grad
    served = conv_step(case, x, w, b)
    single = not case["double"] and not any(case["needs"][:2])  # (a forward or bias gradient only)
    if not measure and not case["double"]:  # the rule's pick is the cpp engine, always remembered
        assert remembered == conv_kinds(case["needs"]), remembered
    if remembered == conv_kinds(case["needs"]) and (not case["double"] or single):
        assert asked.conv + asked.weight_grad == before, "a remembered signature went back to Python"
    before = asked.conv + asked.weight_grad
    again = conv_step(case, x, w, b)  # (a double backward's inner signatures are remembered on the way)
    if not measure:
        assert asked.conv + asked.weight_grad == before, "a remembered signature went back to Python"
    _same(again, served, NAMES)
    return python, served


# ------------------------------------------------------------------------------------------------
# 1. Conv: C++-served == Python-served, both within tolerance of the reference
# ------------------------------------------------------------------------------------------------

NAMES = ("y", "pre", "dx", "dw", "db", "ddx", "ddw", "ddb")


@grid(160)
@given(case=conv_cases(), measure=st.sampled_from([False, False, False, True]))
def test_conv_served_in_cpp_equals_python(asked, case, measure) -> None:
    tuning.clear()
    x, w, b = conv_tensors(case)
    with tuning.using("measure") if measure else contextlib.nullcontext():
        python, served = _conv_served_then_python(case, x, w, b, asked, measure)
    _same(served, python, NAMES)
    assert served[0].stride() == conv_ops._output_strides(x, served[0].shape), "the output's memory format"
    check_conv_reference(case, x, w, b, served, conv_tolerance(case))


# ------------------------------------------------------------------------------------------------
# 2. Conv: remember A, then call B that differs from A in one property
# ------------------------------------------------------------------------------------------------

CONV_CHANGES = ("bias", "bias_view", "activation", "slope_sign", "offset", "no_grad", "inference_mode",
                "requires_grad", "layout", "autocast", "threads", "deterministic", "values", "weight_view",
                "mkldnn_off", "use_cpp", "env_cpp")  # fmt: skip


def _changed(case: dict, change: str, draw) -> tuple[dict, dict]:
    """(B's case, how B is called) from A's case and the one property that differs."""
    b_case, call = dict(case), {}
    if change == "bias":
        b_case["bias"] = "none" if case["bias"] != "none" else "dense"
    elif change == "bias_view":
        b_case["bias"] = "strided" if case["bias"] != "strided" else "dense"
    elif change == "activation":
        b_case["act"] = draw(st.sampled_from([a for a in ACTIVATIONS if a != case["act"]]))
    elif change == "slope_sign":  # a negative slope keeps the pre-activation, a positive one does not
        b_case["act"] = ("leaky_relu", -0.3) if case["act"] != ("leaky_relu", -0.3) else ("leaky_relu", 0.2)
    elif change == "offset":  # the same strides at another storage offset
        b_case["layout"] = "offset" if case["layout"] != "offset" else "contiguous"
    elif change == "layout":
        others = ["contiguous", "strided"] + (["channels_last", "permuted"] if case["dims"] > 1 else [])
        b_case["layout"] = draw(st.sampled_from([lo for lo in others if lo != case["layout"]]))
    elif change == "requires_grad":
        b_case["needs"] = draw(st.sampled_from([n for n in [(True, True, True), (True, False, False),
                                                            (False, True, False), (False, False, True),
                                                            (False, False, False)] if n != case["needs"]]))  # fmt: skip
    elif change == "values":  # other data (a real-dominant input) of the same signature
        b_case["seed"] = case["seed"] + 1000
        call["real_dominant"] = True
    else:
        call[change] = True
    return b_case, call


def _call_context(call: dict):
    stack = contextlib.ExitStack()
    if call.get("inference_mode"):
        stack.enter_context(torch.inference_mode())
    if call.get("autocast"):
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    if call.get("threads"):
        stack.enter_context(intra_op_threads(2))
    if call.get("use_cpp"):  # a forced backend (the same engine the rule picks)
        stack.enter_context(backends.use("cpp"))
    if call.get("env_cpp"):
        stack.enter_context(_environ("AQCF_BACKEND", "cpp"))
    if call.get("mkldnn_off"):  # the engine's route to oneDNN reads the switch at each call
        was_enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False  # (mkldnn.flags() also sets TF32 and warns that no Intel GPU has it)
        stack.callback(setattr, torch.backends.mkldnn, "enabled", was_enabled)
    if call.get("deterministic"):
        was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        stack.callback(torch.use_deterministic_algorithms, was[0], warn_only=was[1])
    return stack


def _b_tensors(b_case: dict, call: dict):
    x, w, b = conv_tensors(b_case)
    if call.get("weight_view"):  # the same weight values with other strides (kernel dims reversed in memory)
        w = w.transpose(-1, 1).contiguous().transpose(-1, 1)
    if call.get("real_dominant"):
        x = x.clone()
        x[:, x.shape[1] // 4 :] *= 0.01
        x = _laid_out(x, b_case["layout"])
    return x, w, b


def _b_step(b_case: dict, call: dict, x, w, b):
    grad_mode = not (call.get("no_grad") or call.get("inference_mode"))
    with _call_context(call):
        return conv_step(b_case, x, w, b, grad_mode=grad_mode)


@grid(160)
@given(case=conv_cases(), change=st.sampled_from(CONV_CHANGES), data=st.data())
def test_conv_a_remembered_signature_does_not_serve_a_call_it_does_not_fit(case, change, data) -> None:
    # (tuning.half_fast8 = 'balanced' with bf16 'auto': such calls are not remembered at all, so there is no A to
    # serve B; test_a_half_fast8_choice_is_not_remembered; the grid keeps half_fast8 'never')
    b_case, call = _changed(case, change, data.draw)
    if call.get("autocast"):  # autocast casts float32 to bf16: A is a float32 call
        case = b_case = {**case, "dtype": "fp32"}
    forget_choices()
    xa, wa, ba = conv_tensors(case)
    conv_step(case, xa, wa, ba)
    conv_step(case, xa, wa, ba)  # served in C++ from here: remembered
    remembered = _C._remembered_conv_choices()
    assert remembered >= conv_kinds(case["needs"]) and (case["double"] or remembered == conv_kinds(case["needs"]))
    x, w, b = _b_tensors(b_case, call)
    served = _b_step(b_case, call, x, w, b)
    forget_choices()
    fresh = _b_step(b_case, call, x, w, b)
    _same(served, fresh, NAMES)
    dtype = torch.bfloat16 if call.get("autocast") else None
    if call.get("autocast"):  # the reference on the bf16-rounded operands
        x, w = x.to(dtype), w.to(dtype)
        b = None if b is None else b.to(dtype)
    check_conv_reference(b_case, x, w, b, served, conv_tolerance(b_case, dtype))


# ------------------------------------------------------------------------------------------------
# 3. Norm: C++-served == Python-served; a remembered dtype serves every other property
# ------------------------------------------------------------------------------------------------


@st.composite
def norm_cases(draw):
    dims = draw(st.integers(1, 3))
    layouts = ["contiguous", "strided", "offset"] + (["channels_last", "permuted"] if dims > 1 else [])
    return {
        "shape": (
            draw(st.integers(2, 3)),
            4 * draw(st.integers(1, 3)),
            *[draw(st.integers(1, {1: 9, 2: 5, 3: 3}[dims])) for _ in range(dims)],
        ),  # fmt: skip
        "dtype": draw(st.sampled_from(["fp64", "fp32"])),
        "layout": draw(st.sampled_from(layouts)),
        "act": draw(st.sampled_from(ACTIVATIONS)),
        "per_sample": draw(st.booleans()),
        "training": draw(st.booleans()),
        "affine": draw(st.booleans()),
        "needs_x": draw(st.booleans()),
        "threads": draw(st.sampled_from([1, 1, 2])),
        "seed": draw(st.integers(0, 2**16)),
    }


def norm_step(case: dict, fused: bool = True, dtype=None, python_backward: bool = False):
    """``[y, dx, dw, db, running_mean, running_var]`` of the functional norm; ``python_backward``: the choice the
    forward remembered is dropped before the backward (the signature is the same), so Python serves it too."""
    dtype = DTYPES[case["dtype"]] if dtype is None else dtype
    shape, s, cq = case["shape"], case["seed"], case["shape"][1] // 4
    if case["per_sample"] and case["training"] and math.prod(shape[2:]) == 1:
        shape = (*shape[:2], *[2] * (len(shape) - 2))  # one value per instance has no variance
    scales = torch.linspace(0.5, 2.0, shape[1], dtype=torch.float64).view(1, -1, *[1] * (len(shape) - 2))
    x = _laid_out((_rand(shape, s) * scales + 1.5).to(dtype), case["layout"])
    w = (_rand((cq,), s + 1) * 0.5 + 1.0).to(dtype) if case["affine"] else None
    b = _rand((4 * cq,), s + 2, dtype) if case["affine"] else None
    rm, rv = _rand((4 * cq,), s + 3, dtype) * 0.1, _rand((cq,), s + 4).abs().to(dtype) + 0.5
    xl = x.detach().requires_grad_(case["needs_x"])
    params = [t.detach().requires_grad_() for t in (w, b) if t is not None]
    w_, b_ = (params + [None, None])[:2]
    act, slope = case["act"]
    with intra_op_threads(case["threads"]):
        y = _quaternion_norm("t", xl, case["per_sample"], rm, rv, w_, b_, case["training"], 0.1, 1e-5, False, act,
                             slope, fused=fused)  # fmt: skip
        wrt = [t for t in (xl, *params) if t.requires_grad]
        grads = [None, None, None]
        if wrt and python_backward:
            forget_choices()
        if wrt:
            gy = _rand(y.shape, s + 5, y.dtype)
            got = iter(torch.autograd.grad(y, wrt, gy))
            grads = [next(got) if t is not None and t.requires_grad else None for t in (xl, w_, b_)]
    return [y.detach(), *grads, rm, rv]


NORM_NAMES = ("y", "dx", "dw", "db", "running_mean", "running_var")


@grid(100)
@given(case=norm_cases(), other=norm_cases())
def test_norm_served_in_cpp_equals_python(counting_fallbacks, case, other) -> None:
    names = ("qnorm", "qnorm_backward")
    with counting_fallbacks(_C._set_norm_fallbacks, norm_ops, names, norm_ops.composite_backward) as asked:
        python = norm_step(case, python_backward=True)
        wrt = case["needs_x"] or case["affine"]
        assert asked["qnorm"] == 1 and asked["qnorm_backward"] == int(wrt) and _C._remembered_norm_choices() == 1
        served = norm_step(case)
        assert asked["qnorm"] == 1 and asked["qnorm_backward"] == int(wrt), "a remembered norm signature asked Python"
        _same(served, python, NORM_NAMES)
        # another call of the same dtype: every other property differs (layout, activation, statistics, ...)
        other = {**other, "dtype": case["dtype"]}
        served_other = norm_step(other)
        assert asked["qnorm"] == 1
        forget_choices()
        fresh_other = norm_step(other, python_backward=True)
        assert asked["qnorm"] == 2
        _same(served_other, fresh_other, NORM_NAMES)
    tol = 1e-9 if case["dtype"] == "fp64" else 2e-5
    for c, got in ((case, served), (other, served_other)):
        ref = norm_step(c, fused=False, dtype=torch.float64)
        for name, g, r in zip(NORM_NAMES, got, ref, strict=True):
            if r is not None:
                _close(g, r, tol, name)


# ------------------------------------------------------------------------------------------------
# 4. Attention and gate: C++-served == Python-served; a remembered signature and other properties
# ------------------------------------------------------------------------------------------------

ATTENTION_OPS = ("cross_attention", "cross_attention_backward", "gated_residual", "gated_residual_backward",
                 "composite_attention_backward", "composite_gate_backward")  # fmt: skip


@st.composite
def attention_cases(draw, dtypes=("fp64", "fp32", "bf16")):
    return {
        "b": draw(st.integers(1, 2)),
        "h": draw(st.integers(1, 2)),
        # queries a, tokens a, queries b, tokens b (query counts with divisors: the backward's query chunks)
        "n": [draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9, 12])) for _ in range(4)],
        "e": draw(st.sampled_from([4, 8, 12])),
        "dtype": draw(st.sampled_from(dtypes)),
        "views": draw(st.booleans()),
        "scale": draw(st.sampled_from([None, 0.3])),
        "grad": draw(st.sampled_from([True, True, False])),
        "threads": draw(st.sampled_from([1, 2])),
        "gate": draw(st.sampled_from(["full", "channel"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def attention_tensors(case: dict, dtype=None):
    dtype = DTYPES[case["dtype"]] if dtype is None else dtype
    b, h, (nqa, nka, nqb, nkb), e, s = case["b"], case["h"], case["n"], case["e"], case["seed"]
    shapes = [(b, h, n, e) for n in (nqa, nka, nka, nqb, nkb, nkb)]
    ts = [_rand(shape, s * 10 + i, dtype) for i, shape in enumerate(shapes)]
    if case["views"]:  # a head dim of stride 2, a transposed layout, a batch broadcast with stride 0
        q_a, k_a, v_a, q_b, k_b, v_b = ts
        q_a = torch.stack([q_a, torch.full_like(q_a, 7.0)], -1)[..., 0]
        k_b = k_b.transpose(1, 2).contiguous().transpose(1, 2)
        v_b = v_b[:1].expand_as(v_b)
        ts = [q_a, k_a, v_a, q_b, k_b, v_b]
    return ts


def attention_step(case: dict, ts, python_backward: bool = False):
    """``[out_a, out_b, lse_a, lse_b, y_gate, *the six attention gradients, d f, d g, d alpha]``;
    ``python_backward``: the choices the forwards remembered are dropped before the backward (the backward ops
    share the forwards' signatures), so Python serves it too."""
    scale = case["e"] ** -0.5 if case["scale"] is None else case["scale"]
    leaves = [t.detach().requires_grad_(case["grad"]) for t in ts]
    with intra_op_threads(case["threads"]):
        out_a, out_b, lse_a, lse_b = torch.ops.aqcf.cross_attention(*leaves, scale)
        # the gate on out_a as a (B, H·N, E) map: f from q_a's values, its logits per element or per channel
        f = leaves[0].detach().reshape(out_a.shape[0], -1, out_a.shape[-1]).requires_grad_(case["grad"])
        o = out_a.reshape(f.shape)
        g_shape = f.shape if case["gate"] == "full" else (1, 1, f.shape[-1])
        gl = _rand(g_shape, case["seed"] + 7, f.dtype).requires_grad_(case["grad"])
        alpha = _rand((1,), case["seed"] + 8, f.dtype).requires_grad_(case["grad"])
        y = torch.ops.aqcf.gated_residual(f, o, gl, alpha)
        outs = [out_a.detach(), out_b.detach(), lse_a, lse_b, y.detach()]
        if not case["grad"]:
            return outs
        g_out = [_rand(t.shape, case["seed"] + 20 + i, t.dtype) for i, t in enumerate((out_b, y))]
        if python_backward:
            forget_choices()
        grads = torch.autograd.grad([out_b, y], [*leaves, f, gl, alpha], g_out)
    return outs + list(grads)


ATTENTION_NAMES = ("out_a", "out_b", "lse_a", "lse_b", "y", "dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b", "df",
                   "dg", "dalpha")  # fmt: skip


def check_attention_reference(case: dict, ts, got) -> None:
    scale = case["e"] ** -0.5 if case["scale"] is None else case["scale"]
    leaves = [t.detach().double().requires_grad_() for t in ts]
    q_a, k_a, v_a, q_b, k_b, v_b = leaves
    (out_a, lse_a), (out_b, lse_b) = reference.attention(q_a, k_b, v_b, scale), reference.attention(q_b, k_a, v_a,
                                                                                                     scale)  # fmt: skip
    f = leaves[0].detach().reshape(out_a.shape[0], -1, out_a.shape[-1]).requires_grad_()
    g_shape = f.shape if case["gate"] == "full" else (1, 1, f.shape[-1])
    gl = _rand(g_shape, case["seed"] + 7, DTYPES[case["dtype"]]).double().requires_grad_()
    alpha = _rand((1,), case["seed"] + 8, DTYPES[case["dtype"]]).double().requires_grad_()
    y = reference.gated_residual(f, out_a.reshape(f.shape), gl, alpha)
    ref = [out_a, out_b, lse_a, lse_b, y]
    if case["grad"]:
        dt = DTYPES[case["dtype"]]
        g_out = [_rand(t.shape, case["seed"] + 20 + i, dt).double() for i, t in enumerate((out_b, y))]
        ref += list(torch.autograd.grad([out_b, y], [*leaves, f, gl, alpha], g_out))
    tol = {"fp64": 1e-9, "fp32": 1e-4, "bf16": 4e-2}[case["dtype"]]
    for name, g, r in zip(ATTENTION_NAMES[: len(got)], got, ref, strict=True):
        # (the gate's gradients of alpha and of a per-channel gate are sums of f.numel() / numel products, each
        # rounded in the dtype: their error grows with the square root of that count, whatever the cancellation)
        summed = f.numel() // r.numel() if name in ("dalpha", "dg") else 1
        _close(g, r, tol * math.sqrt(summed), name)


@grid(100)
@given(case=attention_cases(), measure=st.sampled_from([False, False, True]))
def test_attention_served_in_cpp_equals_python(counting_fallbacks, monkeypatch, case, measure) -> None:
    monkeypatch.setenv("AQCF_BACKEND", "torch")
    tuning.clear()
    ts = attention_tensors(case)
    mode = tuning.using("measure") if measure else contextlib.nullcontext()
    with counting_fallbacks(_C._set_attention_fallbacks, attention_ops, ATTENTION_OPS) as asked, mode:
        if measure:  # bf16's route (in the dtype or in float32) is measured per signature and thread count
            _measured_until_final(lambda: attention_step(case, ts), tuning.max_provisional_calls(2) + 2)
            forget_choices()
        before = dict(asked)
        python = attention_step(case, ts, python_backward=True)
        calls = {k: asked[k] - before[k] for k in asked}
        assert calls["cross_attention"] == calls["gated_residual"] == 1
        assert calls["cross_attention_backward"] == calls["gated_residual_backward"] == int(case["grad"])
        # (the forwards' signatures were dropped before the backward, which remembers its own: the gate's
        # backward reads the upstream gradient's strides where its forward read f's)
        first_served = attention_step(case, ts)
        calls = dict(asked)
        served = attention_step(case, ts)
        assert dict(asked) == calls, "a remembered attention or gate signature went back to Python"
    _same(first_served, python, ATTENTION_NAMES[: len(python)])
    _same(served, python, ATTENTION_NAMES[: len(python)])
    check_attention_reference(case, ts, served)


ATTENTION_CHANGES = ("threads", "scale", "views", "grad", "gate", "autocast", "dtype")


@grid(90)
@given(case=attention_cases(), change=st.sampled_from(ATTENTION_CHANGES), data=st.data())
def test_attention_a_remembered_signature_does_not_serve_a_call_it_does_not_fit(monkeypatch, case, change,
                                                                                data) -> None:  # fmt: skip
    # (bf16 under measure mode and another thread count: the route is measured, which the grid cannot stand in
    # for; test_attention_half_route_is_not_served_at_another_thread_count; the grid keeps to the rule's route)
    monkeypatch.setenv("AQCF_BACKEND", "torch")
    b_case = dict(case)
    autocast = contextlib.nullcontext()
    if change == "threads":
        b_case["threads"] = 3 - case["threads"]
    elif change == "scale":
        b_case["scale"] = 0.3 if case["scale"] is None else None
    elif change in ("views", "grad"):
        b_case[change] = not case[change]
    elif change == "gate":
        b_case["gate"] = "full" if case["gate"] == "channel" else "channel"
    elif change == "dtype":
        b_case["dtype"] = data.draw(st.sampled_from([d for d in ("fp64", "fp32", "bf16") if d != case["dtype"]]))
    else:  # float32 A; B under autocast (bf16)
        case = {**case, "dtype": "fp32"}
        b_case = {**case, "dtype": "bf16"}
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    forget_choices()
    a = attention_tensors(case)
    attention_step(case, a)
    attention_step(case, a)
    assert _C._remembered_attention_choices() >= 2  # the attention's and the gate's
    ts = attention_tensors(b_case, torch.float32 if change == "autocast" else None)
    with autocast:
        served = attention_step(b_case, ts)
    forget_choices()
    with autocast:
        fresh = attention_step(b_case, ts, python_backward=True)
    _same(served, fresh, ATTENTION_NAMES[: len(fresh)])
    if change != "autocast":  # (under autocast the gate's operands mix dtypes: compared with fresh only)
        check_attention_reference(b_case, ts, served)


# ------------------------------------------------------------------------------------------------
# Faults this grid found, fixed: one minimal regression test each
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [("gelu", 0.01), ("leaky_relu", -0.3), ("relu", 0.01)])
def test_gelu_output_served_in_cpp_equals_python(act) -> None:
    """A conv whose engine output is not in the output format (a channels_last input to a pointwise conv: the
    engine writes channels-first), with an activation and the pre-activation kept: the C++-served y equals the
    Python-served one bit for bit (op.cpp applies the activation before the copy into the output format, as
    ops/conv.py does; ATen's vectorised and scalar GELU differ in the last bit, an element's lane depends on the
    layout)."""
    x = _rand((1, 4, 5, 5), 1).contiguous(memory_format=torch.channels_last)
    w = _rand((4, 1, 1, 1, 1), 2)
    args = (x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, "hamilton", *act, "forward")
    forget_choices()
    y_python, z_python = torch.ops.aqcf.qconv(*args)
    assert _C._remembered_conv_choices() == 1
    y_served, z_served = torch.ops.aqcf.qconv(*args)
    _same([y_served, z_served], [y_python, z_python], ("y", "pre"))


# (weight shape given as the op takes it: (4, cout, cin/g, *k), or (4, cin, cout/g, *k) transposed; x: (N, C, *s))
BF16_LARGER_KERNELS = {
    # the grid's draw: a 3d transposed conv whose output is 1 deep under a 3-deep kernel (stride 2, padding 1)
    "3d_transposed": ((1, 64, 2, 1, 1), (4, 16, 16, 1, 3, 1), ([1, 2, 1], [0, 1, 0], [1, 1, 1], True)),
    "3d_depth2": ((1, 32, 2, 3, 3), (4, 4, 8, 3, 3, 3), ([1, 1, 1], [1, 1, 1], [1, 1, 1], False)),
    "2d_width1": ((1, 64, 5, 1), (4, 4, 16, 3, 3), ([1, 2], [0, 1], [1, 1], False)),
    "2d_transposed": ((1, 64, 3, 1), (4, 16, 4, 3, 3), ([1, 2], [0, 1], [1, 1], True)),
    "1d_width1": ((1, 64, 1), (4, 4, 16, 3), ([2], [2], [1], False)),
    "1d_dilated": ((2, 32, 4), (4, 4, 8, 3), ([1], [2], [2], False)),
}


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("case", list(BF16_LARGER_KERNELS), ids=list(BF16_LARGER_KERNELS))
def test_bf16_weight_gradient_under_a_kernel_larger_than_its_input(case, backend, algorithm) -> None:
    """A bf16 weight gradient where the kernel's dilated extent is larger than its input along some spatial dim
    (for a transposed conv: than the output, which the weight gradient correlates with the input), through the op,
    in the cpp and torch backends, hamilton and fast8, served by Python then by C++: within the bf16 contract of the
    float64 reference. (Upstream, for the record: plain PyTorch's F.conv_transpose3d bf16 weight gradient, torch
    2.13 CPU, of the 3d_transposed case is wrong, relative error ~1, the gradient on the wrong kernel tap; float32 and
    float64 are right. The op takes the float32 weight gradient there: csrc/cpu/real_conv.cpp,
    backends/torch/conv.py's bf16_kernel_larger_than_input.)"""
    x_shape, w_shape, (stride, padding, dilation, transposed) = BF16_LARGER_KERNELS[case]
    dims = len(x_shape) - 2
    x = _rand(x_shape, 1, torch.bfloat16)
    w = _rand(w_shape, 2, torch.bfloat16)
    geometry = (stride, padding, dilation, transposed, [0] * dims, 1)
    w64 = w.double().requires_grad_()
    z = reference.quaternion_conv_naive(x.double(), w64, None, stride, padding, dilation, 1, transposed=transposed)
    gy = _rand(z.shape, 3, torch.bfloat16)
    ref = torch.autograd.grad(z, w64, gy.double())[0]
    forget_choices()
    with backends.use(backend):
        for _ in range(2):  # Python-served, then C++-served where the extension's engine ran it
            wl = w.detach().requires_grad_()
            y = torch.ops.aqcf.qconv(x, wl, None, *geometry, algorithm, None, 0.01, "forward")[0]
            assert y.shape == z.shape
            gw = torch.autograd.grad(y, wl, gy)[0]
            assert gw.dtype == torch.bfloat16 and torch.isfinite(gw).all()
            _close(gw, ref, 4e-2, f"dw ({backend}, {algorithm})")


def _seed_conv_choice(x, w, p, kind: str, winner: tuning.Candidate) -> None:
    """Stand in for a measurement that ``winner`` won (measuring is timing-dependent): tuning's in-process
    memory for the signature ``policy.choose_conv`` looks up, so the first call takes it as final."""
    cands = _conv_candidates(x, w, p, "auto", kind)
    prior = policy.heuristic(cands, x, w, p)
    kept = [c for c in cands if c == prior or policy.plausible(c[0], c[1], cands, w, p)]
    names = [str(tuning.Candidate(b.name, a)) for b, a in kept]
    assert winner in [tuning.Candidate(b.name, a) for b, a in kept]
    tuning._memory[policy.signature(x, w, p, kind, names)] = winner


def test_a_half_fast8_choice_is_not_remembered(monkeypatch) -> None:
    """With tuning.half_fast8='balanced', a bf16 'auto' conv's candidates depend on the data (the balance guard), which
    no signature holds: such a call is not remembered by the extension, so a later call of the same signature on
    unbalanced data goes to Python, which keeps to hamilton for it (before: C++ served it fast8)."""
    monkeypatch.setattr(tuning, "half_fast8", "balanced")
    tuning.clear()
    with tuning.using("measure"):
        x = _rand((1, 16, 5, 6), 1, torch.bfloat16)
        w = _rand((4, 3, 4, 3, 3), 2, torch.bfloat16)
        geometry = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        p = ConvParams.from_op_args(2, *geometry)
        _seed_conv_choice(x, w, p, "forward", tuning.Candidate("cpp", "fast8"))
        forget_choices()
        balanced = torch.ops.aqcf.qconv(x, w, None, *geometry, "auto")[0]  # balanced: fast8 allowed and chosen
        assert _C._remembered_conv_choices() == 0, "a data-dependent half_fast8 choice was remembered"
        assert torch.equal(balanced, torch.ops.aqcf.qconv(x, w, None, *geometry, "fast8")[0])
        forget_choices()  # (the explicit fast8 call is remembered: its candidates do not read the data)
        unbalanced = x.clone()
        unbalanced[:, 4:] *= 0.01  # real-dominant: the guard forbids fast8 for it
        assert component_balance(x) >= tuning.HALF_FAST8_MIN_BALANCE > component_balance(unbalanced)
        served = torch.ops.aqcf.qconv(unbalanced, w, None, *geometry, "auto")[0]
        assert _C._remembered_conv_choices() == 0
        forget_choices()
        fresh = torch.ops.aqcf.qconv(unbalanced, w, None, *geometry, "auto")[0]
        hamilton = torch.ops.aqcf.qconv(unbalanced, w, None, *geometry, "hamilton")[0]
    assert torch.equal(fresh, hamilton)  # Python keeps to hamilton for unbalanced bf16 data
    assert torch.equal(served, hamilton), "fast8 served to an unbalanced bf16 call"


def test_attention_half_route_is_not_served_at_another_thread_count(monkeypatch) -> None:
    """The bf16/fp16 CPU attention route (in the dtype or in float32) is measured per thread count
    (backends/torch/attention.py's _half_route_fast_key); attention_op.cpp's signature holds the thread count, so a
    route remembered at one thread count is not served at another: the call at two threads equals a fresh one."""
    monkeypatch.setenv("AQCF_BACKEND", "torch")
    tuning.clear()
    case = {"b": 1, "h": 2, "n": [7, 5, 6, 9], "e": 8, "dtype": "bf16", "views": False, "scale": 0.3,
            "grad": False, "threads": 1, "gate": "full", "seed": 3}  # fmt: skip
    ts = attention_tensors(case)
    q_a, k_a, v_a, q_b, k_b, v_b = ts
    with tuning.using("measure"):
        # stand in for two measurements: in the dtype won at one thread, in float32 at two
        for threads, route in ((1, TA.IN_DTYPE), (2, TA.IN_FLOAT32)):
            with intra_op_threads(threads):
                for q, k, v in ((q_a, k_b, v_b), (q_b, k_a, v_a)):
                    tuning._memory[TA._half_route_key(q, k, v)] = route
        forget_choices()
        one = attention_step(case, ts)  # one thread: remembered with the in-dtype route
        assert _C._remembered_attention_choices() == 2
        two = {**case, "threads": 2}
        served = attention_step(two, ts)
        assert _C._remembered_attention_choices() == 4  # (the two-thread signatures are their own)
        forget_choices()
        fresh = attention_step(two, ts)
        one_fresh = attention_step(case, ts)
    _same(served, fresh, ATTENTION_NAMES[: len(fresh)])
    _same(one, one_fresh, ATTENTION_NAMES[: len(one)])
    assert not torch.equal(served[0], one[0]), "the routes stood in for give the same bits: the test checks nothing"

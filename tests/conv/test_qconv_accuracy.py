"""The numerical contract (DESIGN.md) in float32 and half precision, against a float64 reference.

Relative error = ‖out − ref‖ / ‖ref‖ over the whole tensor and per component, for the forward,
the input gradient and the weight gradient, on isotropic data and on real-dominant data
(imaginary parts 0.01x the real part, in both input and weight: fast8's worst case, where its
sums mix large real parts into small imaginary ones). The reference runs in float64 on the very
same (already rounded) low-precision inputs, so only the computation's error is measured.
Channels are realistic (16 quaternion channels: sums of several hundred terms) so the errors mean
something; these tests use all threads so multi-threaded kernels are held to the contract too.
"""

from __future__ import annotations

import os

import pytest
import torch

from aqcf_kernels import functional as qF
from aqcf_kernels import params, reference
from aqcf_kernels.backends import policy

# (input shape, weight shape, kwargs): conv and transposed conv, 16q in and out.
CASES = {
    "conv2d": ((2, 64, 9, 7), (4, 16, 16, 3, 3), dict(padding=1)),
    "conv_transpose2d": (
        (2, 64, 5, 4),
        (4, 16, 16, 3, 3),
        dict(stride=2, padding=1, transposed=True, output_padding=1),
    ),
    "conv3d": ((1, 64, 5, 4, 3), (4, 16, 16, 3, 3, 3), dict(padding=1)),
}
FP32_TOLERANCE = {"hamilton": 1e-5, "fast8": 5e-4}


def _data(case: str, dtype: torch.dtype, real_dominant: bool, qrand):
    """Input, weight, bias and grad_output in ``dtype`` (as leaves), drawn in float64 and rounded."""
    x_shape, w_shape, kwargs = CASES[case]
    x = qrand(*x_shape, seed=10, real_dominant=real_dominant, dtype=dtype, requires_grad=True)
    w = qrand(*w_shape, dim=0, seed=11, real_dominant=real_dominant, dtype=dtype, requires_grad=True)
    b = qrand(4 * w_shape[2 if kwargs.get("transposed") else 1], dim=0, seed=12, dtype=dtype, requires_grad=True)
    return x, w, b, kwargs


def _run(fn, x, w, b, g_seed: int, qrand):
    """(output, input grad, weight grad) for <g, fn(x, w, b)> with a fixed isotropic g in x's dtype."""
    y = fn(x, w, b)
    g = qrand(*y.shape, seed=g_seed, dtype=y.dtype)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    return y, gx, gw


def _reference(x, w, b, kwargs, qrand):
    """float64 naive reference on the same rounded inputs, with the same (rounded) grad_output."""
    up = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    y = reference.quaternion_conv_naive(*up, **kwargs)
    g = qrand(*y.shape, seed=13, dtype=x.dtype).double()
    gx, gw = torch.autograd.grad(y, up[:2], g)
    return y, gx, gw


def _errors(outs, refs, rel_errors) -> dict[str, dict[str, float]]:
    return {
        name: rel_errors(o, r, dim=0 if name == "weight grad" else 1)
        for name, o, r in zip(("forward", "input grad", "weight grad"), outs, refs, strict=True)
    }


@pytest.mark.parametrize("real_dominant", [False, True], ids=["isotropic", "real-dominant"])
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_error_within_contract(backend, algorithm, case, real_dominant, qrand, rel_errors, served, all_threads):
    x, w, b, kwargs = _data(case, torch.float32, real_dominant, qrand)
    served(backend, x, w, algorithm, **kwargs)
    outs = _run(lambda x, w, b: qF.quaternion_conv(x, w, b, **kwargs, algorithm=algorithm), x, w, b, 13, qrand)
    errors = _errors(outs, _reference(x, w, b, kwargs, qrand), rel_errors)
    tol = FP32_TOLERANCE[algorithm]
    too_big = {f"{what}[{comp}]": e for what, es in errors.items() for comp, e in es.items() if not e <= tol}
    assert not too_big, f"relative errors above {tol:g}: {too_big} (all: {errors})"


@pytest.mark.parametrize("real_dominant", [False, True], ids=["isotropic", "real-dominant"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_half_precision_error_at_most_twice_the_expanded_conv(
    backend, case, dtype, real_dominant, qrand, rel_errors, served, all_threads
):
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter converts fp32 to bf16 by truncation (2x the rounding error of a GPU's
        # round-to-nearest store); bf16 through triton is asserted by tests/gpu on a GPU.
        pytest.skip("bf16 results are not representative under TRITON_INTERPRET")
    x, w, b, kwargs = _data(case, dtype, real_dominant, qrand)
    p, _ = params.check_conv_args(
        x,
        w,
        b,
        spatial_dims=w.dim() - 3,
        stride=kwargs.get("stride", 1),
        padding=kwargs["padding"],
        dilation=1,
        groups=1,
        transposed=kwargs.get("transposed", False),
        output_padding=kwargs.get("output_padding", 0),
        algorithm="auto",
    )
    # The 'auto' policy must never pick fast8 in half precision, even where the channel count is
    # big enough for it in float32 (so it is the dtype that decides, not the size).
    assert not policy.fast8_pays_off(x, w, p)
    wide = policy.FAST8_MIN_CHANNELS_PER_GROUP
    x_wide = x.new_empty(x.shape[0], 4 * wide, *x.shape[2:])
    w_wide = w.new_empty(4, wide, wide, *w.shape[3:])
    assert not policy.fast8_pays_off(x_wide, w_wide, p)
    assert policy.fast8_pays_off(x_wide.float(), w_wide.float(), p)
    served(backend, x, w, "hamilton", **kwargs)

    ours = _run(lambda x, w, b: qF.quaternion_conv(x, w, b, **kwargs, algorithm="auto"), x, w, b, 13, qrand)
    hamilton = _run(lambda x, w, b: qF.quaternion_conv(x, w, b, **kwargs, algorithm="hamilton"), x, w, b, 13, qrand)
    for o, h in zip(ours, hamilton, strict=True):  # 'auto' ran hamilton: bit for bit the same results
        assert torch.equal(o, h)
    expanded = _run(lambda x, w, b: reference.quaternion_conv_expanded(x, w, b, **kwargs), x, w, b, 13, qrand)
    ref = _reference(x, w, b, kwargs, qrand)
    ours_err, expanded_err = _errors(ours, ref, rel_errors), _errors(expanded, ref, rel_errors)
    too_big = {
        f"{what}[{comp}]": (e, expanded_err[what][comp])
        for what, es in ours_err.items()
        for comp, e in es.items()
        if not e <= 2 * expanded_err[what][comp]
    }
    assert not too_big, f"(ours, expanded) relative errors where ours > 2x expanded: {too_big}"

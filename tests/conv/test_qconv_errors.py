"""Every bad input raises the promised error, and the message names the argument at fault.

All of these are caught before any kernel runs (``aqcf_kernels.params``) or at backend selection,
so they do not depend on which backend would have served the call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aqcf_kernels import functional as qF
from aqcf_kernels.backends import BackendError, registered, select
from aqcf_kernels.params import ConvParams

# Tiny convs only: one intra-op thread runs them faster (see tests/conv/conftest.py).
pytestmark = pytest.mark.usefixtures("single_threaded")

F64 = torch.float64


def _x(*shape, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype).to(device)


X = (2, 8, 5, 5)  # 2 quaternion channels
W = (4, 2, 2, 3, 3)  # conv: (4, Cq_out, Cq_in, 3, 3); as a transposed weight (4, Cq_in, Cq_out, 3, 3)

# id: (call, exception type, regex the message must match: it names the argument)
BAD_CALLS = {
    "channels not a multiple of 4": (
        lambda: qF.quaternion_conv2d(_x(2, 6, 5, 5), _x(*W)),
        ValueError,
        r"input has 6 channels, not a multiple of 4 \* groups = 4",
    ),
    "channels not a multiple of 4*groups": (
        lambda: qF.quaternion_conv2d(_x(2, 12, 5, 5), _x(4, 2, 3, 3, 3), groups=2),
        ValueError,
        r"input has 12 channels, not a multiple of 4 \* groups = 8",
    ),
    # (a 3-D input to a 2d conv is one unbatched sample, as in F.conv2d)
    "input ndim": (lambda: qF.quaternion_conv2d(_x(8, 5), _x(*W)), ValueError, r"input must be 4-D"),
    "input ndim (transposed 3d)": (
        lambda: qF.quaternion_conv_transpose3d(_x(8, 5, 5), _x(4, 2, 2, 3, 3, 3)),
        ValueError,
        r"input must be 5-D",
    ),
    "weight rank for the function": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(4, 2, 2, 3)),
        ValueError,
        r"weight must be 5-D",
    ),
    "weight rank for quaternion_conv": (
        lambda: qF.quaternion_conv(_x(*X), _x(4, 2, 2)),
        ValueError,
        r"weight must have 4, 5 or 6 dims",
    ),
    "weight leading dim not 4": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(3, 2, 2, 3, 3)),
        ValueError,
        r"weight must have shape \(4, out/4, in/4/groups",
    ),
    "weight in-channels mismatch": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(4, 2, 3, 3, 3)),
        ValueError,
        r"weight shape \(4, 2, 3, 3, 3\) does not fit input with 8 channels",
    ),
    "weight out-channels not divisible by groups": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(4, 3, 1, 3, 3), groups=2),
        ValueError,
        r"weight shape \(4, 3, 1, 3, 3\) does not fit input with 8 channels and groups=2",
    ),
    "transposed weight in-channels mismatch": (
        lambda: qF.quaternion_conv_transpose2d(_x(*X), _x(4, 3, 2, 3, 3)),
        ValueError,
        r"weight shape \(4, 3, 2, 3, 3\) does not fit input",
    ),
    "weight not a tensor": (
        lambda: qF.quaternion_conv(_x(*X), [[1.0]]),
        TypeError,
        r"weight must be a Tensor",
    ),
    "input not a tensor": (lambda: qF.quaternion_conv2d([1.0], _x(*W)), TypeError, r"input must be a Tensor"),
    "integer input": (
        lambda: qF.quaternion_conv2d(_x(*X, dtype=torch.int64), _x(*W, dtype=torch.int64)),
        TypeError,
        r"input must be a floating-point tensor",
    ),
    "dtype input/weight": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W, dtype=torch.float32)),
        TypeError,
        r"weight dtype torch.float32 does not match input dtype torch.float64",
    ),
    "dtype input/bias": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), _x(8, dtype=torch.float32)),
        TypeError,
        r"bias dtype torch.float32 does not match input dtype torch.float64",
    ),
    "device input/weight": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W, device="meta")),
        ValueError,
        r"weight is on meta but input is on cpu",
    ),
    "device input/bias": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), _x(8, device="meta")),
        ValueError,
        r"bias is on meta but input is on cpu",
    ),
    "bias shape": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), _x(4)),
        ValueError,
        r"bias must have shape \(8,\), got \(4,\)",
    ),
    "negative padding": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), padding=-1),
        ValueError,
        r"padding must be non-negative",
    ),
    "negative padding in one dim (transposed)": (
        lambda: qF.quaternion_conv_transpose2d(_x(*X), _x(*W), padding=(0, -1)),
        ValueError,
        r"padding must be non-negative",
    ),
    "unknown padding string": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), padding="full"),
        ValueError,
        r"padding must be an int, a sequence, 'same' or 'valid'",
    ),
    "padding string on a transposed conv": (
        lambda: qF.quaternion_conv(_x(*X), _x(*W), padding="same", transposed=True),
        ValueError,
        r"padding='same' is only supported for non-transposed convs",
    ),
    "'same' padding with stride 2": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), stride=2, padding="same"),
        ValueError,
        r"padding='same' needs stride 1",
    ),
    "stride zero": (lambda: qF.quaternion_conv2d(_x(*X), _x(*W), stride=0), ValueError, r"stride must be positive"),
    "stride of the wrong length": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), stride=(1, 1, 1)),
        ValueError,
        r"stride must have 2 elements",
    ),
    "dilation zero": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), dilation=(1, 0)),
        ValueError,
        r"dilation must be positive",
    ),
    "groups zero": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), groups=0),
        ValueError,
        r"groups must be a positive int",
    ),
    "output_padding equal to stride": (
        lambda: qF.quaternion_conv_transpose2d(_x(*X), _x(*W), stride=2, output_padding=2),
        ValueError,
        r"output_padding must be in \[0, max\(stride, dilation\)\)",
    ),
    "output_padding with stride 1": (
        lambda: qF.quaternion_conv_transpose1d(_x(2, 8, 5), _x(4, 2, 2, 3), output_padding=1),
        ValueError,
        r"output_padding must be in \[0, max\(stride, dilation\)\)",
    ),
    "output_padding equal to the dilation, above the stride": (
        lambda: qF.quaternion_conv_transpose1d(_x(2, 8, 5), _x(4, 2, 2, 3), stride=2, dilation=3, output_padding=3),
        ValueError,
        r"output_padding must be in \[0, max\(stride, dilation\)\)",
    ),
    "stride with a float element": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), stride=(1.5, 1)),
        TypeError,
        r"stride must be an int or a sequence of 2 ints, got \(1.5, 1\)",
    ),
    "output_padding on a conv": (
        lambda: qF.quaternion_conv(_x(*X), _x(*W), output_padding=1),
        ValueError,
        r"output_padding is only meaningful for transposed convs",
    ),
    "input smaller than the kernel": (
        lambda: qF.quaternion_conv2d(_x(2, 8, 2, 5), _x(*W)),
        ValueError,
        r"input spatial size \(2, 5\) is too small for kernel \(3, 3\)",
    ),
    "unknown algorithm": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), algorithm="fast16"),
        ValueError,
        r"unknown algorithm 'fast16'",
    ),
    "bias not a tensor": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), [0.0] * 8),
        TypeError,
        r"quaternion_conv2d: bias must be a Tensor or None, got list",
    ),
    "zero-size kernel": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(4, 2, 2, 0, 3)),
        ValueError,
        r"quaternion_conv2d: weight has a zero-size kernel \(0, 3\)",
    ),
    "a bool stride": (
        lambda: qF.quaternion_conv2d(_x(*X), _x(*W), stride=torch.tensor(True)),
        TypeError,
        r"stride must be an int or a sequence of 2 ints",
    ),
    "linear: bias not a tensor": (
        lambda: qF.quaternion_linear(_x(3, 8), _x(4, 2, 2), [0.0] * 8),
        TypeError,
        r"quaternion_linear: bias must be a Tensor or None, got list",
    ),
    "linear: bias shape": (
        lambda: qF.quaternion_linear(_x(3, 8), _x(4, 2, 2), _x(4)),
        ValueError,
        r"quaternion_linear: bias must have shape \(8,\), got \(4,\)",
    ),
    "linear: unknown algorithm": (
        lambda: qF.quaternion_linear(_x(3, 8), _x(4, 2, 2), algorithm="x"),
        ValueError,
        r"quaternion_linear: unknown algorithm 'x'",
    ),
    "linear: integer input": (
        lambda: qF.quaternion_linear(_x(3, 8, dtype=torch.int64), _x(4, 2, 2, dtype=torch.int64)),
        TypeError,
        r"quaternion_linear: input must be a floating-point tensor",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_argument_raises_error_naming_it(case):
    call, exc, match = BAD_CALLS[case]
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "stride, padding",
    [(np.int64(2), np.int64(1)), (torch.tensor(2), torch.tensor(1)), ((np.int64(2), torch.tensor(2)), 1)],
    ids=["numpy", "0-d tensor", "sequence"],
)
def test_integer_like_geometry_is_taken_as_f_conv2d_takes_it(stride, padding):
    """A numpy integer or a 0-d integer tensor alone, not only inside a sequence (F.conv2d accepts both)."""
    x, w = _x(*X), _x(*W)
    expected = qF.quaternion_conv2d(x, w, stride=2, padding=1, algorithm="hamilton")
    got = qF.quaternion_conv2d(x, w, stride=stride, padding=padding, algorithm="hamilton")
    assert torch.equal(got, expected)


def test_unknown_aqcf_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("AQCF_BACKEND", "no-such-backend")
    with pytest.raises(BackendError, match=r"AQCF_BACKEND='no-such-backend' is not a backend; known: \[.*'torch'"):
        qF.quaternion_conv2d(_x(*X), _x(*W))


@pytest.mark.parametrize("name", ["cpp", "torch"])
def test_forced_backend_that_cannot_serve_the_device_is_an_error(monkeypatch, name):
    # Neither CPU backend serves meta tensors. Through the public functions a meta call runs the
    # op's fake impl (shape inference: no backend computes anything), so selection is checked
    # directly, with the resolved arguments the op would pass.
    monkeypatch.setenv("AQCF_BACKEND", name)
    assert "meta" not in registered()[name].device_types
    x, w = _x(*X, device="meta"), _x(*W, device="meta")
    p = ConvParams(2, (1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    with pytest.raises(BackendError, match=rf"AQCF_BACKEND='{name}' cannot serve this call: does not run on meta"):
        select(x, w, p, "hamilton")


def test_forced_cpp_backend_without_the_extension_is_an_error(monkeypatch):
    # If the extension is missing, forcing cpp must raise (never fall back to torch); if it is
    # built, the forced call must simply work. Either way the outcome is asserted.
    monkeypatch.setenv("AQCF_BACKEND", "cpp")
    why = registered()["cpp"].unavailable()
    if why is None:
        assert qF.quaternion_conv2d(_x(*X), _x(*W)).shape == (2, 8, 3, 3)
    else:
        with pytest.raises(BackendError, match=r"AQCF_BACKEND='cpp' cannot serve this call: .*_C"):
            qF.quaternion_conv2d(_x(*X), _x(*W))


def test_a_call_like_one_that_passed_is_still_checked():
    """The checks remember the calls that passed (aqcf_kernels.params.check_conv_args): a call that differs
    from one of them in any single property the checks read still gets its error."""
    x, w, b = _x(*X), _x(*W), _x(8)
    ok = qF.quaternion_conv2d(x, w, b, padding=1, stride=1, groups=1)
    torch.testing.assert_close(qF.quaternion_conv2d(x, w, b, padding=1, stride=1, groups=1), ok)  # remembered
    bad = [
        (lambda: qF.quaternion_conv2d(x, w, b.float(), padding=1), TypeError, r"bias dtype torch.float32"),
        (lambda: qF.quaternion_conv2d(x, w, b[:4], padding=1), ValueError, r"bias must have shape \(8,\)"),
        (lambda: qF.quaternion_conv2d(x, w, b.to("meta"), padding=1), ValueError, r"bias is on meta"),
        (lambda: qF.quaternion_conv2d(x, w.float(), b, padding=1), TypeError, r"weight dtype torch.float32"),
        (lambda: qF.quaternion_conv2d(x.float(), w, b, padding=1), TypeError, r"weight dtype torch.float64"),
        (lambda: qF.quaternion_conv2d(x[..., :1, :1], w, b), ValueError, r"too small for kernel"),
        (lambda: qF.quaternion_conv2d(x, w, b, padding=1, groups=True), ValueError, r"groups must be a positive"),
        (lambda: qF.quaternion_conv2d(x, w, b, padding=1, stride=True), TypeError, r"stride must be an int"),
        (lambda: qF.quaternion_conv2d(x, w, b, padding=1, algorithm="fast16"), ValueError, r"unknown algorithm"),
        (lambda: qF.quaternion_conv(x, w, b, padding=1, output_padding=1), ValueError, r"only meaningful"),
    ]
    for call, error, match in bad:
        with pytest.raises(error, match=match):
            call()
    # mixed dtypes pass under autocast only: a call remembered there is checked again outside
    xb, wf = _x(*X, dtype=torch.bfloat16), _x(*W, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qF.quaternion_conv2d(xb, wf, padding=1)
    with pytest.raises(TypeError, match=r"weight dtype torch.float32 does not match input dtype torch.bfloat16"):
        qF.quaternion_conv2d(xb, wf, padding=1)

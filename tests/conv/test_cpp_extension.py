"""The compiled CPU extension ``aqcf_kernels._C``, called directly, against the float64 reference.

The op-level tests reach ``_C`` only through backend selection; these pin its own contract: the
forward and the weight gradient of both algorithms on a small grid of conv shapes (1d/2d/3d,
transposed, stride/padding/dilation/output_padding, groups, bias), the input layouts it must accept
(channels_last, non-contiguous) and the layout it returns, low precision, and fast8's batch slicing.
Each for both pairs of entry points: the CPU ones (``conv``, ``conv_weight_grad``) and the device-agnostic
ATen path the ``cuda`` backend runs on CUDA tensors (``conv_aten``, ``conv_weight_grad_aten``: fast8's
products in sequence; cuDNN instead of oneDNN under ``at::convolution`` there). CI builds the extension,
so a missing one is a failure here, not a skip.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._prims_common import suggest_memory_format

from aqcf_kernels import reference
from aqcf_kernels.params import ConvParams

try:
    from aqcf_kernels import _C
except ImportError as e:  # pragma: no cover - exercised only when the build is missing
    _C, _IMPORT_ERROR = None, e


class _Entries:
    """One pair of entry points of the extension, called as ``conv`` and ``conv_weight_grad``."""

    def __init__(self, conv, conv_weight_grad):
        self.conv, self.conv_weight_grad = conv, conv_weight_grad


@pytest.fixture(scope="module", params=["cpu", "aten"], ids=["cpu-entries", "aten-entries"])
def ext(request):
    if _C is None:
        pytest.fail(
            f"aqcf_kernels._C is not built ({_IMPORT_ERROR}): run `make ext` "
            "(or `python setup.py build_ext --inplace`) first"
        )
    if request.param == "cpu":
        return _Entries(_C.conv, _C.conv_weight_grad)
    return _Entries(_C.conv_aten, _C.conv_weight_grad_aten)


def _case(
    qrand, dims, transposed, groups, stride, padding, dilation, bias, *, batch=2, size=7, dtype=torch.float64, kernel=3
):
    cq_in, cq_out = 2 * groups, 3 * groups
    x = qrand(batch, 4 * cq_in, *[size - d for d in range(dims)], dtype=dtype, seed=1)  # odd, unequal sizes
    a, b = (cq_in, cq_out // groups) if transposed else (cq_out, cq_in // groups)
    w = qrand(4, a, b, *[kernel] * dims, dim=0, dtype=dtype, seed=2)
    bias_t = qrand(4 * cq_out, dim=0, dtype=dtype, seed=3) if bias else None
    p = ConvParams(
        dims,
        (stride,) * dims,
        (padding,) * dims,
        (dilation,) * dims,
        transposed,
        (stride - 1 if transposed else 0,) * dims,
        groups,
    )
    return x, w, bias_t, p


def _reference(x, w, bias, p):
    """Forward and weight gradient (for a fixed random grad_output) of the naive 16-conv reference."""
    wr = w.detach().clone().requires_grad_()
    y = reference.quaternion_conv_naive(
        x, wr, bias, p.stride, p.padding, p.dilation, p.groups, transposed=p.transposed, output_padding=p.output_padding
    )
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=y.dtype)
    (gw,) = torch.autograd.grad(y, wr, gy)
    return y.detach(), gy, gw


def _check(ext, x, w, bias, p, fast8, tol=1e-12):
    y_ref, gy, gw_ref = _reference(x.double(), w.double(), None if bias is None else bias.double(), p)
    y = ext.conv(x, w, bias, *p.as_op_args(), fast8)
    gw = ext.conv_weight_grad(x, gy.to(x.dtype), list(w.shape), *p.as_op_args(), fast8)
    assert y.dtype == x.dtype and gw.dtype == x.dtype
    assert y.shape == y_ref.shape and gw.shape == w.shape
    for out, ref, what in ((y, y_ref, "conv"), (gw, gw_ref, "conv_weight_grad")):
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
    return y


GRID = [
    # dims, transposed, groups, stride, padding, dilation, bias
    *itertools.product((1, 2, 3), (False, True), (1, 2), (1,), (1,), (1,), (True,)),
    (2, False, 1, 2, 0, 2, False),
    (2, True, 2, 2, 1, 2, False),
    (1, False, 2, 2, 2, 1, True),
    (3, True, 1, 2, 0, 1, True),
]


@pytest.mark.parametrize("fast8", [False, True], ids=["hamilton", "fast8"])
@pytest.mark.parametrize("dims,transposed,groups,stride,padding,dilation,bias", GRID)
def test_matches_reference_float64(ext, qrand, dims, transposed, groups, stride, padding, dilation, bias, fast8):
    _check(ext, *_case(qrand, dims, transposed, groups, stride, padding, dilation, bias), fast8)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_pointwise_convs_match_reference_float64(ext, qrand, transposed, bias, batch, layout):
    """1x1 convs are one GEMM over the tokens (conv_pointwise; one sample: the bias is the GEMM's addend)."""
    x, w, b, p = _case(qrand, 2, transposed, 1, 1, 0, 1, bias, batch=batch, kernel=1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
    _check(ext, x, w, b, p, fast8=False)


@pytest.mark.parametrize("fast8", [False, True], ids=["hamilton", "fast8"])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dims,transposed,groups", [(2, False, 1), (2, True, 2), (3, False, 2)])
def test_input_layouts(ext, qrand, dims, transposed, groups, layout, fast8):
    x, w, bias, p = _case(qrand, dims, transposed, groups, 2, 1, 1, True)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    else:  # every other element of a bigger tensor along each spatial dim
        x = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
        assert not x.is_contiguous()
    y = _check(ext, x, w, bias, p, fast8)
    if fast8:  # fast8 allocates its output itself, in the input's layout (the op layer needs no copy)
        assert y.is_contiguous(memory_format=suggest_memory_format(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast8", [False, True], ids=["hamilton", "fast8"])
def test_low_precision(ext, qrand, dtype, fast8):
    # Same products as the expanded conv in the same dtype; fast8 combines them in float32.
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    x, w, bias, p = _case(qrand, 2, False, 2, 1, 1, 1, True, dtype=dtype)
    _check(ext, x, w, bias, p, fast8, tol=tol)


@pytest.mark.parametrize("transposed", [False, True])
def test_fast8_batch_slices(ext, qrand, transposed):
    # One sample's component (2 channels x 70000 x 8 bytes = 1.1 MB) is over half the slice target
    # (2 MB), so fast8 runs one sample per slice: outputs are written slice by slice and the weight
    # gradient accumulates across slices.
    x, w, bias, p = _case(qrand, 1, transposed, 1, 1, 1, 1, True, batch=3, size=70000)
    _check(ext, x, w, bias, p, True)


@pytest.mark.parametrize("entry", ["conv", "conv_aten"])
def test_bad_arguments_raise_instead_of_crashing(entry):
    """The raw entry points check what they are given (the old CUDA kernels' launcher segfaulted on one
    error path; the ATen path that replaced it raises)."""
    if _C is None:
        pytest.fail(f"aqcf_kernels._C is not built ({_IMPORT_ERROR})")
    conv = getattr(_C, entry)
    x, w = torch.randn(1, 8, 5, 5), torch.randn(4, 2, 2, 3, 3)
    args = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1, False)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        conv(torch.randn(1, 6, 5, 5), w, None, *args)
    with pytest.raises(RuntimeError, match="entries each"):
        conv(x, w, None, [1], [0, 0], [1, 1], False, [0, 0], 1, False)
    with pytest.raises(RuntimeError, match="input must be"):
        conv(x, torch.randn(4, 2, 2, 3), None, *args)
    if entry == "conv_aten":
        with pytest.raises(RuntimeError, match="one dtype"):
            conv(x, w.double(), None, *args)
        with pytest.raises(RuntimeError, match="one dtype"):
            conv(x, w, torch.randn(8, dtype=torch.float64), *args)

"""32-bit index overflow on large tensors: offsets past 2**31 elements.

A 3D segmentation net meets them early: 4 volumes of 128 real channels at 160×192×192 are 3.0e9 elements,
and in one sample of 512 channels a channels_last depth row starts past 2**31 from depth 143 on.

* The compiled CPU extension (csrc/cpu) does its index arithmetic in int64 and hands every buffer to
  ATen / oneDNN (no im2col buffer of its own); nothing here for it in the default run.
* Triton: the implicit GEMMs (igemm.py, igemm_wgrad.py) refuse tensors of 2**31 elements or more, and the
  first-design kernels (conv_kernels.py) serve them, so their offsets must be int64. Program ids, aranges and
  every integer argument below 2**31 are int32, and ``idd * s_xd`` or ``n * s_xn`` wrapped (the weight
  gradient's and the output's offsets sum such products before they meet a pointer, so any element past
  2**31 did). Under ``TRITON_INTERPRET=1`` the interpreter computes in int32 as a GPU does, and
  tests/_interpreter_checks.py turns the wrapped address into :class:`OutOfBoundsAccess`.

The big input is a 4.3 GB fp16 tensor of which only the pixels the conv reads are ever written (the rest
is never touched, so never resident): a conv whose dilations reach from the first pixel to the last.
"""

from __future__ import annotations

import pytest
import torch

from aqcf_kernels import reference
from aqcf_kernels.backends import registered
from aqcf_kernels.params import ConvParams

TRITON = registered()["triton"]
needs_triton = pytest.mark.skipif(
    TRITON.unavailable() is not None, reason=f"triton backend unavailable: {TRITON.unavailable()}"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (1, 4, D, H, W) channels_last_3d: 4 real channels a pixel, so depth row d starts at element 4·H·W·d,
# and row 512 at 2**31 exactly; D·H·W·4 = 2,151,677,952 elements.
D, H, W = 513, 1024, 1024
# the pixels a 3×3×3 conv with dilation (256, 511, 511) reads: its 1×2×2 outputs reach both ends of every dim
DEPTHS = [0, 256, 512]
ROWS = [0, 1, 511, 512, 1022, 1023]
PARAMS = ConvParams(3, (1, 1, 1), (0, 0, 0), (256, 511, 511), False, (0, 0, 0), 1)
# ...and the same conv on those pixels gathered densely (3×6×6): dilation (1, 2, 2)
COMPACT = dict(stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 2, 2), groups=1)
CQ_OUT = 2


@pytest.fixture(scope="module")
def far_input():
    """``(x, xc)``: the big channels_last_3d fp16 input, random at the pixels the conv reads only, and those
    pixels gathered into a dense ``(1, 4, 3, 6, 6)`` tensor."""
    assert D * H * W * 4 > 2**31 and 512 * H * W * 4 >= 2**31
    x = torch.empty((1, 4, D, H, W), dtype=torch.float16, device=DEVICE, memory_format=torch.channels_last_3d)
    generator = torch.Generator().manual_seed(20261201)
    xc = torch.randn((1, 4, len(DEPTHS), len(ROWS), len(ROWS)), generator=generator).to(torch.float16)
    index = (
        torch.zeros(1, 1, 1, 1, 1, dtype=torch.long),
        torch.arange(4).view(1, 4, 1, 1, 1),
        torch.tensor(DEPTHS).view(1, 1, -1, 1, 1),
        torch.tensor(ROWS).view(1, 1, 1, -1, 1),
        torch.tensor(ROWS).view(1, 1, 1, 1, -1),
    )
    x.index_put_(tuple(i.to(DEVICE) for i in index), xc.to(DEVICE))
    yield x, xc
    del x


def _weight(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn((4, CQ_OUT, 1, 3, 3, 3), generator=generator) / 4).to(torch.float16)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def _first_design_serves(x: torch.Tensor, gy: torch.Tensor, algorithm: str) -> None:
    """The call goes to conv_kernels.py: both implicit GEMMs refuse it for its size."""
    from aqcf_kernels.backends.triton import igemm, igemm_wgrad

    w = torch.empty((4, CQ_OUT, 1, 3, 3, 3), device="meta")
    assert "2**31" in (igemm.cannot_serve(x, w, PARAMS, algorithm) or "")
    assert "2**31" in (igemm_wgrad.cannot_serve(x, gy, algorithm) or "")
    assert TRITON.cannot_serve(x, w, PARAMS, algorithm) is None


@needs_triton
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
def test_triton_conv_reads_past_2_31_elements(far_input, algorithm):
    """Forward: the taps of depth 512 read x at element 2**31 and on (``idd * s_xd`` wrapped in int32)."""
    x, xc = far_input
    w = _weight(1)
    _first_design_serves(x, torch.empty((1, 4 * CQ_OUT, 1, 2, 2), device="meta"), algorithm)
    y = TRITON.conv(x, w.to(DEVICE), None, PARAMS, algorithm)
    ref = reference.quaternion_conv_naive(xc.double(), w.double(), None, **COMPACT)
    assert y.shape == ref.shape == (1, 4 * CQ_OUT, 1, 2, 2)
    assert _rel(y, ref) <= 2e-3


@needs_triton
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
def test_triton_weight_grad_reads_past_2_31_elements(far_input, algorithm):
    """Weight gradient: x's offsets (``n·s_xn + idd·s_xd + ih·s_xh + iw·s_xw``, summed before they meet the
    pointer) pass 2**31 at depth 512."""
    x, xc = far_input
    w = _weight(2)
    generator = torch.Generator().manual_seed(3)
    gy = torch.randn((1, 4 * CQ_OUT, 1, 2, 2), generator=generator).to(torch.float16)
    _first_design_serves(x, gy, algorithm)
    gw = TRITON.conv_weight_grad(x, gy.to(DEVICE), list(w.shape), PARAMS, algorithm)
    wr = w.double().requires_grad_()
    y = reference.quaternion_conv_naive(xc.double(), wr, None, **COMPACT)
    (ref,) = torch.autograd.grad(y, wr, gy.double())
    assert gw.shape == ref.shape
    assert _rel(gw, ref) <= 2e-3


if TRITON.unavailable() is None:
    import triton
    import triton.language as tl

    from aqcf_kernels.backends.triton import conv_kernels

    @triton.jit
    def _offsets_kernel(coords_ptr, out_ptr, s_n, s_d, s_h, s_w, COUNT: tl.constexpr):
        """``out[i] = _pixel_offset(*coords[i], s_n, s_d, s_h, s_w)`` from int32 coordinates."""
        i = tl.arange(0, COUNT)
        n = tl.load(coords_ptr + 4 * i)
        d = tl.load(coords_ptr + 4 * i + 1)
        h = tl.load(coords_ptr + 4 * i + 2)
        w = tl.load(coords_ptr + 4 * i + 3)
        tl.store(out_ptr + i, conv_kernels._pixel_offset(n, d, h, w, s_n, s_d, s_h, s_w))


@needs_triton
def test_pixel_offset_is_int64():
    """``_pixel_offset`` (every x, y and gy offset of conv_kernels.py) in int64 from int32 coordinates and
    strides: sample 3 of 4 volumes of 128 real channels at 160×192×192 (NCDHW or channels_last), the last
    depth row of one such sample with 512 channels in channels_last, and a stride in [2**31, 2**32) (passed
    as u32). The y and gy offsets are sums of such products: their overflow needs an output of 2**31
    elements, too big for the interpreter to compute."""
    volume, channels = 160 * 192 * 192, 128
    cases = [
        # (strides n, d, h, w), coordinates (n, d, h, w)
        ((channels * volume, 192 * 192, 192, 1), (3, 159, 191, 191)),  # NCDHW: n·s_n = 2.26e9
        ((channels * volume, 192 * 192 * channels, 192 * channels, channels), (3, 159, 191, 191)),  # channels_last
        ((512 * volume, 192 * 192 * 512, 192 * 512, 512), (0, 159, 191, 191)),  # d·s_d = 3.0e9
        ((3_000_000_000, 192 * 192, 192, 1), (1, 159, 191, 191)),  # a u32 stride
    ]
    for strides, coords in cases:
        count = 2  # and a row of zeros
        table = torch.tensor([coords, (0, 0, 0, 0)], dtype=torch.int32, device=DEVICE)
        out = torch.empty(count, dtype=torch.int64, device=DEVICE)
        _offsets_kernel[(1,)](table, out, *strides, COUNT=count)
        expected = sum(c * s for c, s in zip(coords, strides, strict=True))
        assert expected >= 2**31
        assert out.tolist() == [expected, 0], (strides, coords)


@needs_triton
def test_triton_refuses_2_31_pixels():
    """The pixel index (rows of the implicit GEMMs, M and P of the first design) is int32: 2**31 pixels or
    more are refused, not wrapped (the forward's output pixels, or the input's for the input gradient)."""
    x = torch.empty((2, 4, 1024, 1024, 1024), dtype=torch.float16, device="meta")
    w = torch.empty((4, 1, 1, 1, 1, 1), dtype=torch.float16, device="meta")
    p = ConvParams(3, (1, 1, 1), (0, 0, 0), (1, 1, 1), False, (0, 0, 0), 1)
    assert "pixel" in (TRITON.cannot_serve(x, w, p, "hamilton") or "")
    # strided: a small output, but the input gradient writes the input's 2**31 pixels
    p2 = ConvParams(3, (2, 2, 2), (0, 0, 0), (1, 1, 1), False, (0, 0, 0), 1)
    assert "pixel" in (TRITON.cannot_serve(x, w, p2, "fast8") or "")
    small = torch.empty((1, 4, 1024, 1024, 1024), dtype=torch.float16, device="meta")
    assert TRITON.cannot_serve(small, w, p, "hamilton") is None


@needs_triton
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
def test_weight_grad_refused_when_its_partial_sums_reach_2_31(algorithm):
    """The implicit GEMM's weight gradient sums each pixel split into a buffer of the expanded weight's 16
    blocks (fast8: 8 products of 2 per component), with int32 offsets: a weight whose buffer reaches 2**31
    elements goes to the first design (it launched no split and returned an uninitialised buffer)."""
    from aqcf_kernels.backends.triton import igemm_wgrad

    x = torch.empty((1, 4 * 4096, 8, 8, 8), dtype=torch.float16, device="meta")
    gy = torch.empty((1, 4 * 4096, 8, 8, 8), dtype=torch.float16, device="meta")
    big = [4, 4096, 4096, 3, 3, 3]  # 1.8e9 elements of weight; partial sums 3.6e9 (fast8) or 7.2e9
    assert "partial sums" in (igemm_wgrad.cannot_serve(x, gy, algorithm, big) or "")
    assert igemm_wgrad.cannot_serve(x, gy, algorithm, [4, 4096, 256, 3, 3, 3]) is None  # 1.1e8 elements


@needs_triton
def test_triton_norm_leaves_a_sample_of_2_31_values_to_the_composite_path():
    """The norm kernels' offsets within a sample are int32: such a sample (512 real channels at 160×192×192
    is 3.0e9 values) is not theirs to serve, so the composite path does (they raised a ValueError)."""
    from aqcf_kernels.backends.triton import norm as triton_norm

    small = torch.randn(1, 8, 5, 7, device=DEVICE)
    big = small[..., :1, :1].expand(1, 8, 2**14, 2**14)  # 2**31 values a sample, no memory
    assert triton_norm.serves(small)
    assert not triton_norm.serves(big)
    assert triton_norm.serves(big[:, :, : 2**13])

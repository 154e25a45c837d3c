"""The CUDA kernels (csrc/cuda/qconv_kernels.cuh) run on CPU by a block emulator, against the reference.

Proves the kernels' tiling, indexing and quaternion algebra on machines without a GPU:
kernel_emulator.cpp compiles the kernel source as plain C++ (256 std::threads per block, shared
memory as statics, __syncthreads as a barrier) behind the extension's own launch planning
(qconv_plan.h). It cannot prove what only hardware shows (the launch code in qconv_launch.cu, races
the barrier-per-phase emulation hides, memory limits, speed): tests/gpu/test_cuda_backend.py does.

Slow (builds a C++20 extension, ~1 min on 2 cores, and emulates every thread): `pytest -m slow`.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from aqcf_kernels import reference

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_CUDA = os.path.join(HERE, "..", "..", "csrc", "cuda")


@pytest.fixture(scope="module")
def emu():
    if shutil.which("ninja") is None and not _has_ninja_module():
        pytest.skip("ninja is needed to build the kernel emulator")
    from torch.utils.cpp_extension import load

    build = tempfile.mkdtemp(prefix="aqcf-kernel-emulator-")
    try:
        yield load(
            "aqcf_kernel_emulator",
            [os.path.join(HERE, "kernel_emulator.cpp")],
            extra_include_paths=[os.path.abspath(CSRC_CUDA)],
            extra_cflags=["-O1", "-std=c++20", "-Wno-unknown-pragmas", "-x", "c++"],
            build_directory=build,
        )
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


# (N, cq_in, cq_out, size, kernel, stride, padding, dilation, groups, transposed, output_padding, bias)
CASES = {
    "2d": (2, 3, 5, (7, 6), (3, 3), 1, 1, 1, 1, False, 0, True),
    "2d-g2-s-d": (1, 4, 6, (9, 8), (3, 2), (2, 1), (1, 0), (1, 2), 2, False, 0, False),
    "2d-T": (2, 3, 2, (5, 4), (3, 3), 2, 1, 1, 1, True, 1, True),
    "2d-T-g2": (1, 4, 6, (4, 5), (2, 3), (2, 3), (0, 1), (2, 1), 2, True, (1, 2), False),
    "1d": (2, 2, 3, (11,), (3,), 2, 1, 2, 1, False, 0, True),
    "1d-T": (1, 2, 2, (5,), (3,), 3, 1, 1, 1, True, 2, True),
    "3d": (1, 2, 3, (4, 5, 3), (2, 3, 1), 1, (1, 0, 0), 1, 1, False, 0, True),
    "3d-T-g3": (1, 3, 3, (3, 3, 2), (2, 2, 2), 2, 0, 1, 3, True, 1, True),
    "channel-tiles": (1, 9, 70, (6, 5), (1, 1), 1, 0, 1, 1, False, 0, True),  # > BL out, > BK in channels
    "pixel-tiles": (3, 20, 12, (9, 11), (3, 3), 1, 1, 1, 2, False, 0, False),  # > BR pixels
    "T-tiles": (1, 12, 40, (5, 7), (3, 3), 2, 1, 1, 1, True, 1, True),
}


def _lst(v, n):
    return [v] * n if isinstance(v, int) else list(v)


def _run(emu, case, algorithm, dtype=torch.float64, channels_last=False, target_blocks=8, seed=0):
    """Relative errors of [y, grad_input, grad_weight] against the float64 reference."""
    n_batch, cq_in, cq_out, size, kernel, stride, padding, dilation, groups, transposed, out_pad, bias = CASES[case]
    n = len(size)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batch, 4 * cq_in, *size, generator=g, dtype=torch.float64, requires_grad=True)
    shape_w = (4, cq_in, cq_out // groups, *kernel) if transposed else (4, cq_out, cq_in // groups, *kernel)
    w = torch.randn(*shape_w, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4 * cq_out, generator=g, dtype=torch.float64) if bias else None
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, transposed=transposed)
    y_ref = reference.quaternion_conv_naive(x, w, b, **kw, output_padding=out_pad if transposed else 0)
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), gy)

    xd, wd, gyd = x.detach().to(dtype), w.detach().to(dtype), gy.to(dtype)
    bd = None if b is None else b.to(dtype)
    if channels_last:
        fmt = torch.channels_last if n == 2 else torch.channels_last_3d
        xd, gyd = xd.contiguous(memory_format=fmt), gyd.contiguous(memory_format=fmt)
    hyper = (_lst(stride, n), _lst(padding, n), _lst(dilation, n))
    fast8 = algorithm == "fast8"
    op = _lst(out_pad, n) if transposed else [0] * n
    y = emu.cuda_conv(xd, wd, bd, *hyper, transposed, op, groups, fast8)
    gw = emu.cuda_conv_weight_grad(xd, gyd, list(w.shape), *hyper, transposed, op, groups, fast8, target_blocks)
    # input gradient = the adjoint conv of grad_output (as aqcf_kernels.ops.conv.input_grad does it)
    if transposed:
        gx = emu.cuda_conv(gyd, wd, None, *hyper, False, [0] * n, groups, fast8)
    else:
        natural = [
            (o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in zip(gy.shape[2:], *hyper, kernel, strict=True)
        ]
        extra = [i - o for i, o in zip(size, natural, strict=True)]
        gx = emu.cuda_conv(gyd, wd, None, *hyper, True, extra, groups, fast8)
    errors = []
    for out, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert out.shape == ref.shape and out.dtype == dtype
        assert not out.isnan().any(), "NaN: an output element was never written"
        errors.append(((out.double() - ref.detach()).norm() / ref.norm()).item())
    return errors


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_kernels_float64(emu, case, algorithm):
    assert max(_run(emu, case, algorithm)) < 1e-12


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", ["2d-g2-s-d", "2d-T-g2", "3d-T-g3"])
def test_emulated_kernels_channels_last(emu, case, algorithm):
    assert max(_run(emu, case, algorithm, channels_last=True)) < 1e-12


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", ["2d", "2d-T-g2", "pixel-tiles"])
def test_emulated_weight_grad_split_over_blocks(emu, case, algorithm):
    """Every pixel slice its own block: the partial sums meet through atomicAdd."""
    assert max(_run(emu, case, algorithm, target_blocks=10**6)) < 1e-12


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
def test_emulated_kernels_reduced_precision(emu, dtype, tol, algorithm):
    # fp32: the contract (fast8 ≤ 5e-4, measured ~1e-7 here); fp16/bf16: a few ulps (float accumulation)
    assert max(_run(emu, "2d-g2-s-d", algorithm, dtype=dtype)) < tol

"""float64 ``gradcheck`` + ``gradgradcheck`` of every backend and algorithm, through the public functions.

The numerical contract holds both algorithms to gradcheck in float64 (fast8 is exact in real
arithmetic, so its rounding is far below gradcheck's tolerance) and we ask gradgradcheck of both:
double backward is built from the same two ops, so a wrong adjoint shows up here.
Shapes are tiny and odd so the slow (full Jacobian) mode stays well under a second per case.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from torch.autograd import gradcheck, gradgradcheck

from aqcf_kernels import functional as qF

# Tiny convs only: one intra-op thread runs them faster (see tests/conv/conftest.py).
pytestmark = pytest.mark.usefixtures("single_threaded")


@dataclass(frozen=True)
class Case:
    input_shape: tuple[int, ...]  # (N, 4*Cq_in, *spatial)
    weight_shape: tuple[int, ...]  # conv: (4, Cq_out, Cq_in/G, *k); transposed: (4, Cq_in, Cq_out/G, *k)
    kwargs: dict  # passed to the public function, besides bias and algorithm

    @property
    def transposed(self) -> bool:
        return "output_padding" in self.kwargs  # every transposed case here has one

    @property
    def out_channels(self) -> int:
        groups = self.kwargs.get("groups", 1)
        return 4 * (self.weight_shape[2] * groups if self.transposed else self.weight_shape[1])


# One conv and one transposed conv per rank: groups=2 in some, strided transposed convs with
# output_padding, uneven stride/padding/dilation per dim in the conv cases.
CASES = {
    "conv1d": (qF.quaternion_conv1d, Case((2, 8, 7), (4, 2, 1, 3), dict(stride=2, padding=1, groups=2))),
    "conv_transpose1d": (
        qF.quaternion_conv_transpose1d,
        Case((1, 8, 3), (4, 2, 1, 3), dict(stride=2, padding=1, output_padding=1, groups=2)),
    ),
    "conv2d": (
        qF.quaternion_conv2d,
        Case((1, 4, 5, 4), (4, 2, 1, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    ),
    "conv_transpose2d": (
        qF.quaternion_conv_transpose2d,
        Case((1, 8, 3, 2), (4, 2, 1, 3, 2), dict(stride=2, padding=1, output_padding=1, groups=2)),
    ),
    # output_padding of a stride or more (allowed below the dilation): the input is padded instead
    "conv_transpose2d_output_padding_above_stride": (
        qF.quaternion_conv_transpose2d,
        Case(
            (1, 8, 3, 2),
            (4, 2, 1, 3, 2),
            dict(stride=(1, 2), padding=(1, 0), dilation=(2, 3), output_padding=(1, 2), groups=2),
        ),
    ),
    "conv3d": (
        qF.quaternion_conv3d,
        Case((1, 4, 3, 4, 3), (4, 2, 1, 2, 3, 1), dict(stride=(1, 2, 1), padding=(0, 1, 1))),
    ),
    "conv_transpose3d": (
        qF.quaternion_conv_transpose3d,
        Case(
            (1, 8, 2, 2, 1),
            (4, 2, 1, 2, 1, 3),
            dict(stride=(2, 1, 1), padding=(1, 0, 0), output_padding=(1, 0, 0), groups=2),
        ),
    ),
    # Pointwise (1x1, unit stride, no padding, one group) convs take the GEMM path of the CPU backends.
    "pointwise1d": (qF.quaternion_conv1d, Case((2, 8, 5), (4, 3, 2, 1), {})),
    "pointwise_transpose2d": (
        qF.quaternion_conv_transpose2d,
        Case((2, 8, 3, 2), (4, 2, 3, 1, 1), dict(output_padding=0)),
    ),
    "pointwise3d": (qF.quaternion_conv3d, Case((1, 4, 2, 3, 2), (4, 2, 1, 1, 1, 1), {})),
}


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_and_gradgradcheck_float64(backend, algorithm, case, qrand, served):
    fn, c = CASES[case]
    x = qrand(*c.input_shape, seed=1, requires_grad=True)
    w = qrand(*c.weight_shape, dim=0, seed=2, requires_grad=True)
    b = qrand(c.out_channels, dim=0, seed=3, requires_grad=True)
    served(backend, x, w, algorithm, transposed=c.transposed, **c.kwargs)

    def f(x, w, b):
        return fn(x, w, b, **c.kwargs, algorithm=algorithm)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))

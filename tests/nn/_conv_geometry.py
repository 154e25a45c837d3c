"""A conv's geometry as the layer grids draw it (test_unit_grid.py, test_rotation_grid.py): kernel, stride, dilation,
padding (ints, ``'same'``, ``'valid'``), output_padding under torch's rule and the padding mode."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...] | str
    output_padding: tuple[int, ...]
    padding_mode: str


def draw_geometry(draw, dims: int, transposed: bool, max_kernel: int) -> ConvGeometry:
    """Kernel sizes 1 to ``max_kernel``, strides and dilations 1-2; a transposed conv pads 0-2 with an output
    padding below its stride or dilation (torch's rule) and zeros only; a forward conv pads 0-2, ``'same'`` (stride 1)
    or ``'valid'``, in any of torch's four padding modes (whether the sizes allow it is the caller's to check)."""

    def tup(values):
        return draw(st.tuples(*[values] * dims))

    kernel, stride, dilation = tup(st.integers(1, max_kernel)), tup(st.integers(1, 2)), tup(st.integers(1, 2))
    output_padding, padding_mode = (0,) * dims, "zeros"
    if transposed:
        padding = tup(st.integers(0, 2))
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True))
    else:
        padding = draw(st.sampled_from(["int", "int", "same", "valid"]))
        if padding == "same":
            stride = (1,) * dims
        elif padding == "int":
            padding = tup(st.integers(0, 2))
        padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    return ConvGeometry(kernel, stride, dilation, padding, output_padding, padding_mode)


def explicit_padding(padding: tuple[int, ...] | str, kernel, dilation) -> list[tuple[int, int]]:
    """(left, right) padding per dim of a forward conv: ``'same'`` puts the odd element of ``d·(k − 1)`` on the
    right, as torch does."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(dilation, kernel, strict=True)]
    return [(p, p) for p in padding]


def output_size(spatial, transposed: bool, kernel, stride, padding, dilation, output_padding) -> tuple[int, ...]:
    """The conv's output spatial size (torch's formulas)."""
    if transposed:
        return tuple(
            (s - 1) * st - 2 * p + d * (k - 1) + op + 1
            for s, k, st, p, d, op in zip(spatial, kernel, stride, padding, dilation, output_padding, strict=True)
        )
    pads = explicit_padding(padding, kernel, dilation)
    return tuple(
        (s + left + right - d * (k - 1) - 1) // st + 1
        for s, k, st, (left, right), d in zip(spatial, kernel, stride, pads, dilation, strict=True)
    )

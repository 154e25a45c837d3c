"""``aqcf_kernels.layout``: ``qcat`` against explicit per-component indexing in every memory format
(channels_last inputs take their own path and must stay channels_last), and ``like_layout``."""

from __future__ import annotations

import pytest
import torch

from aqcf_kernels.layout import is_channels_last, like_layout, qcat, qsplit

CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def hand_qcat(parts: list[torch.Tensor]) -> torch.Tensor:
    """[r_a r_b .. | i_a i_b .. | j_a j_b .. | k_a k_b ..] by explicit slicing."""
    pieces = []
    for c in range(4):
        for t in parts:
            cq = t.shape[1] // 4
            pieces.append(t[:, c * cq : (c + 1) * cq])
    return torch.cat(pieces, 1)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("formats", [("cl", "cl", "cl"), ("cl", "nchw", "cl"), ("nchw", "nchw", "nchw")])
def test_qcat_matches_explicit_slicing_forward_and_backward(spatial, formats) -> None:
    widths = (8, 4, 12)  # quaternion channels 2, 1, 3: unequal, so a wrong block order shows
    parts = []
    for i, (width, fmt) in enumerate(zip(widths, formats, strict=True)):
        t = rand(3, width, *spatial, seed=i)
        if fmt == "cl":
            t = t.contiguous(memory_format=CL[t.dim()])
        parts.append(t.requires_grad_())
    grad = rand(3, sum(widths), *spatial, seed=9)

    got = qcat(parts)
    (got * grad).sum().backward()
    got_grads = [p.grad.clone() for p in parts]
    for p in parts:
        p.grad = None
    ref = hand_qcat(parts)
    (ref * grad).sum().backward()

    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for g, p in zip(got_grads, parts, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)
    # all channels_last in: channels_last out (the model's feature maps keep their layout)
    assert is_channels_last(got) == all(f == "cl" for f in formats)


def test_is_channels_last_and_like_layout() -> None:
    x = rand(2, 8, 3, 5, seed=0)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not is_channels_last(x) and is_channels_last(cl)
    assert not is_channels_last(rand(2, 1, 3, 5, seed=1).contiguous(memory_format=torch.channels_last))
    assert not is_channels_last(rand(2, 8, 3, seed=2))  # 3-d: no channels_last format
    moved = like_layout(x, cl)
    assert is_channels_last(moved) and torch.equal(moved, x)
    assert like_layout(cl, x) is cl  # a channels-first reference changes nothing
    assert like_layout(cl, cl) is cl  # already in the layout: no copy


@pytest.mark.parametrize("dim", [2, -1, -2], ids=["dim2", "dim-1", "dim-2"])
def test_qsplit_and_qcat_on_any_dim(dim) -> None:
    """Split sizes count quaternions; a channel dim counted from the back splits and joins the same (the
    components' view once put the channels at the wrong axis for a negative dim: qcat raised, qsplit split dim 0)."""
    x = rand(3, 5, 12, 6, seed=1).movedim(2, dim)  # 3 quaternions on `dim`
    pieces = qsplit(x, [1, 2], dim=dim)
    moved = [p.movedim(dim, 1) for p in pieces]
    assert torch.equal(hand_qcat(moved), x.movedim(dim, 1))  # per component: the pieces joined
    assert [p.shape[1] for p in moved] == [4, 8]
    assert torch.equal(qcat(pieces, dim=dim), x)
    assert [p.shape[dim] for p in qsplit(x, 2, dim=dim)] == [8, 4]  # a size: pieces of 2 quaternions


def test_qsplit_names_the_quaternion_count() -> None:
    x = rand(1, 16, 4, 4, seed=2)
    with pytest.raises(ValueError, match=r"count quaternion channels: the 16 real channels of dim 1 are 4 quaternions"):
        qsplit(x, [8, 8])  # real channels
    with pytest.raises(ValueError, match="got \\[1, -1, 4\\]"):
        qsplit(x, [1, -1, 4])
    assert [p.shape[1] for p in qsplit(x, [1, 3])] == [4, 12]


@pytest.mark.parametrize(
    ("shapes", "dim", "named"),
    [
        ([(2, 8, 3, 3), (2, 4, 4, 3)], 1, "dimension 2"),
        ([(2, 8, 3, 3), (3, 4, 3, 3)], 1, "dimension 0"),
        ([(2, 8, 3, 3), (2, 4, 3)], 1, "the number of dimensions"),
        ([(2, 3, 8), (2, 4, 4)], -1, "dimension 1"),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_qcat_names_the_mismatched_tensor_and_dimension(shapes, dim, named, channels_last) -> None:
    """In the caller's terms, before torch.cat of the component views named a dimension of its own (2 for the
    batch mismatch of two NCHW tensors)."""
    parts = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    if channels_last:
        parts = [p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p for p in parts]
    joined = dim % len(shapes[0])
    message = (
        rf"qcat: tensor 1 has shape \({', '.join(map(str, shapes[1]))},?\) and tensor 0 .* {named}; .* dim={joined}"
    )
    with pytest.raises(ValueError, match=message):
        qcat(parts, dim=dim)

"""Sliding-window inference, segmentation metrics and mask post-processing over a hypothesis grid, against plain
references written here (numpy, scipy, torch only).

Inference (:mod:`aqcf_kernels.pipeline.inference`), drawn over 2D (slice by slice, windows of ``data.slice_size``)
and 3D models (windows of ``data.patch_size``), window sizes 1-10 per axis and volume sizes from 1 to past two
windows (smaller than the window, equal, larger, odd), 1-12 slices in 2D (across the 8-slice batches), CT or MRI
input, a pad value, deep supervision (a list of heads) or one output, the volume as a plain float32 array, a
read-only one (a cached memmap), float64 or a strided view:

* a POINTWISE network (a per-voxel MLP with fixed random weights): :func:`predict_logits` must equal the network
  applied to the whole volume at once (Gaussian blending of a window-independent output is the identity, padding
  cropped away), and :func:`predict_probabilities` its softmax, with mirroring TTA too (a pointwise network commutes
  with flips); the network runs in eval mode and gets its training flag back;
* the number of windows the ``on_windows`` callback reports equals :func:`count_windows` (with and without TTA) and
  an independent count: per axis, windows start every ``int(0.75 * roi)`` voxels (at least 1), the last flush with
  the far edge, a single window on an axis no longer than the window; 2D: that per slice, times the slices; TTA:
  times 4 (2D, flips of x and y) or 8 (3D);
* a NON-pointwise network whose logits are the voxel's coordinate inside its window (plus a pointwise term): the
  stitched coordinate at each voxel must lie between the smallest and largest coordinate it has in the windows
  covering it (a Gaussian blend is a convex combination), equal it where one window covers the voxel, and along an
  axis shorter than the window be the voxel index plus one constant offset in ``[0, roi - size]`` (the padding);
  the probabilities sum to 1, and with TTA equal the mean over every flip subset of the flipped-back softmax of
  :func:`predict_logits` of the flipped volume (a flip not undone, or the wrong axes, changes them);
* a network whose logits are its window's smallest and largest value: where an axis is shorter than the window,
  every window holds padding and reports the pad value (below or above all the data); elsewhere only data.

Metrics (:mod:`aqcf_kernels.pipeline.metrics`), on 2D and 3D label maps (empty, liver only, iid noise, boxes,
filling the array; the prediction a copy, a perturbed copy or independent) with anisotropic spacings:

* :func:`dice` against ``2|P∩G| / (|P| + |G|)`` per region (liver = {1, 2}, tumour = {2}), NaN when both regions
  are empty, 0 when one is (nnU-Net's rule, the module docstring);
* :func:`hd95` against a brute force of MONAI's definition (the module docstring names MONAI): surface voxels are
  the region's voxels with a face neighbour (6-connectivity in 3D, 4 in 2D) outside it or outside the array; every
  surface point's distance in mm (coordinates times the spacing of each array axis) to the nearest surface point
  of the other side; the 95th percentile (linear interpolation) of each directed set; the larger of the two. NaN if
  either region is empty;
* :func:`case_metrics` the four values above (and a ValueError on a shape mismatch); :func:`summarise` the mean of
  each float metric over the rows where it is not NaN, its count ``_n``, and ``cases``;

Post-processing (:mod:`aqcf_kernels.pipeline.predict`):

* :func:`keep_largest_liver` against ``scipy.ndimage.label`` of labels > 0 with a full 3x3x3 structure
  (26-connectivity): the labels inside one largest component (any of them on a tie: the docstring does not say
  which), 0 elsewhere, the input's dtype, a new array, the input untouched, an empty map unchanged;
* :func:`mask_statistics`: liver (labels 1 and 2) and tumour volumes as voxel counts times the voxel volume of an
  affine built as rotation · diag(spacing) + translation (the product of the spacings, in mL), and the number of
  26-connected tumours;
* ``_probabilities_on_input_grid`` on a case geometry (crop box, reorientation, resampling or not): three
  probabilities summing to 1 in [0, 1] on the input grid, background 1 outside the crop, and without resampling
  the foreground probabilities of the input crop back exactly (forward mapped with nibabel's apply_orientation).

Examples per test are sized for the default run (about 30 s on one core); ``AQCF_GRID_SCALE=5`` multiplies them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import nibabel.orientations as nio
import numpy as np
import pytest
import torch
from _grid import grid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from torch import nn

from aqcf_kernels.pipeline import predict as pr
from aqcf_kernels.pipeline.config import RunConfig
from aqcf_kernels.pipeline.inference import count_windows, predict_logits, predict_probabilities
from aqcf_kernels.pipeline.metrics import case_metrics, dice, hd95, summarise

pytestmark = pytest.mark.usefixtures("single_threaded")


# Examples per test sized for the default run; a longer hunt multiplies them: AQCF_GRID_SCALE=5 pytest <this file>.
def _grid(examples: int) -> settings:
    return grid(examples, HealthCheck.filter_too_much, HealthCheck.data_too_large)


# ----------------------------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class WindowCase:
    dims: int  # 2: slice by slice, 3: patches
    shape: tuple[int, int, int]  # (z, x, y)
    roi: tuple[int, ...]  # the window: (x, y) in 2D, (z, x, y) in 3D
    modality: str
    pad_value: float
    deep_supervision: bool
    tta: bool
    layout: str  # how the volume arrives: plain float32, read-only (a cached memmap), float64, a strided view
    seed: int

    def config(self) -> RunConfig:
        # predict_logits reads the model's spatial dims and the window of that kind; nothing else of the config.
        cfg = RunConfig()
        cfg.model.spatial_dims = self.dims
        if self.dims == 3:
            cfg.data.patch_size = self.roi
        else:
            cfg.data.slice_size = self.roi
        return cfg

    @property
    def window_axes(self) -> tuple[int, ...]:
        """The (z, x, y) array axes the windows tile, in the window's order."""
        return (0, 1, 2) if self.dims == 3 else (1, 2)

    def image(self) -> np.ndarray:
        # Fresh normal values per example, never zeros: a crop or flip error moves distinct values.
        return np.random.default_rng(self.seed).standard_normal(self.shape).astype(np.float32)

    def image_in_layout(self, image: np.ndarray) -> np.ndarray:
        """``image`` (float32) as the drawn layout presents it; the values are the same."""
        if self.layout == "readonly":
            out = image.copy()
            out.flags.writeable = False
            return out
        if self.layout == "float64":
            return image.astype(np.float64)
        if self.layout == "strided":  # every other element of a wider array: not contiguous
            wide = np.full((*image.shape[:2], 2 * image.shape[2]), np.nan, np.float32)
            wide[..., ::2] = image
            return wide[..., ::2]
        return image


@st.composite
def window_cases(draw) -> WindowCase:
    dims = draw(st.sampled_from([2, 3]))
    roi = tuple(draw(st.integers(1, 10)) for _ in range(dims))
    # Per window axis: from 1 to past two windows (smaller, equal, larger, odd sizes); capped to keep the window
    # count (hence the run time) small. 2D: 1-12 slices, across the 8-slice batches predict_logits sends.
    sizes = [draw(st.integers(1, min(2 * r + 2, 20))) for r in roi]
    shape = tuple(sizes) if dims == 3 else (draw(st.integers(1, 12)), *sizes)
    return WindowCase(
        dims=dims,
        shape=shape,  # type: ignore[arg-type]
        roi=roi,
        modality=draw(st.sampled_from(["ct", "mri"])),
        pad_value=draw(st.sampled_from([0.0, -1.5, 3.0])),
        deep_supervision=draw(st.booleans()),
        tta=draw(st.booleans()),
        layout=draw(st.sampled_from(["plain", "readonly", "float64", "strided"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def reference_starts(size: int, roi: int) -> list[int]:
    """Where the windows along one axis start: every ``int(0.75 * roi)`` voxels (at least 1), the last one flush
    with the far edge; one window (the axis padded up to it) where the axis is no longer than the window."""
    if size <= roi:
        return [0]
    interval = max(1, (3 * roi) // 4)
    return sorted({*range(0, size - roi, interval), size - roi})


def reference_count(c: WindowCase, tta: bool) -> int:
    per_pass = math.prod(len(reference_starts(c.shape[a], r)) for a, r in zip(c.window_axes, c.roi, strict=True))
    if c.dims == 2:
        per_pass *= c.shape[0]  # every slice is tiled on its own
    return per_pass * (2 ** len(c.window_axes) if tta else 1)  # every subset of the axes the network sees


def _spatial_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``(n, channels, *spatial)`` with ``ndim`` spatial dims."""
    return v.view(1, -1, *([1] * ndim))


class PointwiseNet(nn.Module):
    """A per-voxel MLP (1 -> 6 -> 3) with fixed random weights: each voxel's logits depend on its value only."""

    def __init__(self, seed: int, deep_supervision: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randn(6, generator=g))
        self.register_buffer("b", torch.randn(6, generator=g))
        self.register_buffer("w", torch.randn(3, 6, generator=g))
        self.register_buffer("c", torch.randn(3, generator=g))
        self.deep_supervision = deep_supervision
        self.modes: list[bool] = []  # self.training at each call

    def forward(self, ct: torch.Tensor | None = None, mri: torch.Tensor | None = None) -> dict:
        assert (ct is None) != (mri is None), "exactly one modality per call"
        key, x = ("ct", ct) if ct is not None else ("mri", mri)
        self.modes.append(self.training)
        n = x.ndim - 2
        h = torch.tanh(x * _spatial_view(self.a, n) + _spatial_view(self.b, n))
        logits = torch.einsum("nh...,ch->nc...", h, self.w) + _spatial_view(self.c, n)
        if self.deep_supervision:  # the full-resolution head first, then a coarser one (a U-Net's deep supervision)
            return {key: [logits, logits[(..., *[slice(None, None, 2)] * n)]]}
        return {key: logits}


class PositionNet(nn.Module):
    """Logits that depend on where a voxel sits in its window: channel ``d`` is the voxel's coordinate along window
    axis ``d`` plus ``alpha[d]`` times its value; a 2D window's third channel is pointwise, ``alpha[2] * x + beta``."""

    def __init__(self, alpha: tuple[float, float, float], beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, ct: torch.Tensor | None = None, mri: torch.Tensor | None = None) -> dict:
        key, x = ("ct", ct) if ct is not None else ("mri", mri)
        v = x[:, 0]
        spatial = v.shape[1:]
        channels = []
        for d, size in enumerate(spatial):
            coord = torch.arange(size, dtype=v.dtype).view(*[size if e == d else 1 for e in range(len(spatial))])
            channels.append(coord + self.alpha[d] * v)
        if len(spatial) == 2:
            channels.append(self.alpha[2] * v + self.beta)
        return {key: torch.stack(channels, 1)}


def _whole_volume_logits(model: PointwiseNet, image: np.ndarray, c: WindowCase) -> torch.Tensor:
    """The network on the whole volume at once, ``(3, z, x, y)``: one 3D input, or every slice as a batch in 2D."""
    volume = torch.from_numpy(image.copy())
    x = volume[None, None] if c.dims == 3 else volume[:, None]
    out = model(**{c.modality: x})[c.modality]
    out = out[0] if isinstance(out, (list, tuple)) else out
    return out[0] if c.dims == 3 else out.permute(1, 0, 2, 3)


@given(c=window_cases())
@_grid(300)
def test_pointwise_network_stitches_to_the_whole_volume(c: WindowCase) -> None:
    cfg, image = c.config(), c.image()
    model = PointwiseNet(c.seed, c.deep_supervision)
    want = _whole_volume_logits(model, image, c)
    model.modes.clear()

    given_image = c.image_in_layout(image)
    seen: list[int] = []
    logits = predict_logits(model, given_image, c.modality, cfg, pad_value=c.pad_value, on_windows=seen.append)
    assert logits.shape == (3, *c.shape) and logits.dtype == torch.float32
    # Blending a window-independent output is the identity; the padding (with pad_value) is cropped away.
    torch.testing.assert_close(logits, want)
    assert sum(seen) == count_windows(c.shape, cfg) == reference_count(c, tta=False)

    model.train()
    model.modes.clear()
    seen.clear()
    probs = predict_probabilities(
        model, given_image, c.modality, cfg, tta=c.tta, pad_value=c.pad_value, on_windows=seen.append
    )
    # A pointwise network commutes with flips: mirroring TTA averages copies of the same probabilities.
    torch.testing.assert_close(probs, torch.softmax(want, 0))
    assert sum(seen) == count_windows(c.shape, cfg, tta=c.tta) == reference_count(c, tta=c.tta)
    assert model.modes and not any(model.modes), "the network must run in eval mode"
    assert model.training, "predict_probabilities must give the network its training flag back"


def _check_window_coordinate(got: np.ndarray, axis: int, size: int, roi: int, what: str) -> None:
    """``got`` (the stitched window coordinate, ``(z, x, y)``) along array ``axis`` against the windows covering
    each voxel: a convex combination of their coordinates, exact where one window covers it."""
    tol = 1e-4  # float32 weighted means of coordinates below 10 (plus a pointwise term that cancels)
    shape = [1, 1, 1]
    shape[axis] = size
    v = np.arange(size)
    if size <= roi:
        # One window, the axis padded up to it on an unspecified side: coordinate = index + one constant offset.
        offset = got - v.reshape(shape)
        o = float(offset.flat[0])
        assert np.abs(offset - o).max() <= tol, f"{what}: offset not constant along a padded axis"
        assert -tol <= o <= roi - size + tol and abs(o - round(o)) <= tol, f"{what}: padding offset {o}"
        return
    starts = np.array(reference_starts(size, roi))
    covers = (starts[None, :] <= v[:, None]) & (v[:, None] < starts[None, :] + roi)  # (voxel, window)
    assert covers.any(1).all()
    local = v[:, None] - starts[None, :]
    lo = np.where(covers, local, np.inf).min(1).reshape(shape)
    hi = np.where(covers, local, -np.inf).max(1).reshape(shape)
    assert (got >= lo - tol).all() and (got <= hi + tol).all(), f"{what}: outside its covering windows' range"
    single = np.broadcast_to(lo == hi, got.shape)
    assert np.abs(got - np.broadcast_to(lo, got.shape))[single].max(initial=0.0) <= tol, f"{what}: one window"


@given(c=window_cases(), alpha=st.tuples(*[st.sampled_from([0.0, 0.5, -2.0])] * 3), beta=st.floats(-2, 2))
@_grid(300)
def test_position_dependent_network_blends_its_windows(
    c: WindowCase, alpha: tuple[float, float, float], beta: float
) -> None:
    cfg, image = c.config(), c.image()
    model = PositionNet(alpha, beta)
    logits = predict_logits(model, image, c.modality, cfg, pad_value=c.pad_value)
    assert logits.shape == (3, *c.shape) and logits.dtype == torch.float32
    got = logits.numpy().astype(np.float64)
    for d, (axis, roi) in enumerate(zip(c.window_axes, c.roi, strict=True)):
        coord = got[d] - alpha[d] * image  # the pointwise term blends to itself
        _check_window_coordinate(coord, axis, c.shape[axis], roi, f"channel {d} (axis {axis}, roi {roi})")
    if c.dims == 2:
        np.testing.assert_allclose(got[2], alpha[2] * image + beta, rtol=1e-5, atol=1e-5)

    seen: list[int] = []
    probs = predict_probabilities(
        model, image, c.modality, cfg, tta=c.tta, pad_value=c.pad_value, on_windows=seen.append
    )
    assert probs.shape == (3, *c.shape) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(0), torch.ones(c.shape))
    assert sum(seen) == count_windows(c.shape, cfg, tta=c.tta) == reference_count(c, tta=c.tta)
    # nnU-Net's mirroring, written out: every subset of the axes the network sees, the volume flipped, its
    # probabilities flipped back, the mean taken. The coordinates are not flip-symmetric, so a flip not undone
    # (or one along the wrong axes) changes the result.
    axes = c.window_axes if c.tta else ()
    flips = [s for r in range(len(axes) + 1) for s in itertools.combinations(axes, r)]
    want = torch.zeros(3, *c.shape)
    for flip in flips:
        view = np.flip(image, flip) if flip else image
        p = torch.softmax(predict_logits(model, view, c.modality, cfg, pad_value=c.pad_value), 0)
        want += p.flip([a + 1 for a in flip]) if flip else p
    torch.testing.assert_close(probs, want / len(flips))


class WindowRangeNet(nn.Module):
    """Logits constant over each window: its smallest value (channel 0) and its largest (channel 1), 0 (channel 2);
    a window that reaches into the padding sees the pad value."""

    def forward(self, ct: torch.Tensor | None = None, mri: torch.Tensor | None = None) -> dict:
        key, x = ("ct", ct) if ct is not None else ("mri", mri)
        flat = x.flatten(1)
        view = (-1, *[1] * (x.ndim - 1))  # (n, 1, 1, ...): one value per window
        lo, hi = flat.min(1).values.view(view), flat.max(1).values.view(view)
        return {key: torch.cat([x * 0 + lo, x * 0 + hi, x * 0], 1)}


@given(c=window_cases(), pad=st.sampled_from([-10.0, 10.0]))
@_grid(150)
def test_windows_are_padded_with_the_pad_value(c: WindowCase, pad: float) -> None:
    image = np.clip(c.image(), -5, 5)  # every value strictly inside (-10, 10): the pad value is an extreme
    logits = predict_logits(WindowRangeNet(), image, c.modality, c.config(), pad_value=pad).numpy()
    if any(c.shape[a] < r for a, r in zip(c.window_axes, c.roi, strict=True)):
        # An axis shorter than the window is padded in every window: each one's extreme is the pad value.
        np.testing.assert_allclose(logits[0 if pad < 0 else 1], pad, rtol=1e-6)
    else:
        # No window reaches outside the volume: the extremes are the data's (per slice in 2D).
        axes = (0, 1, 2) if c.dims == 3 else (1, 2)
        assert (logits[0] >= image.min(axis=axes, keepdims=True) - 1e-5).all()
        assert (logits[1] <= image.max(axis=axes, keepdims=True) + 1e-5).all()


# ------------------------------------------------------------------------------------------------- metrics

REGION_LABELS = {"liver": (1, 2), "tumour": (2,)}
STYLES = ["empty", "liver", "noise", "boxes", "full"]


def make_labels(rng: np.random.Generator, shape: tuple[int, ...], style: str) -> np.ndarray:
    """A uint8 label map (0 background, 1 liver, 2 tumour) of one drawn kind."""
    out = np.zeros(shape, np.uint8)
    if style == "empty":
        return out
    if style == "full":  # every voxel foreground: the surface is the array's border
        out[...] = 1
    elif style in ("liver", "noise"):
        out[rng.random(shape) < rng.uniform(0.05, 0.6)] = 1
    else:  # 1-3 boxes of liver
        for _ in range(rng.integers(1, 4)):
            lo = [rng.integers(0, s) for s in shape]
            hi = [rng.integers(a + 1, s + 1) for a, s in zip(lo, shape, strict=True)]
            out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = 1
    if style == "liver":
        return out
    if style == "boxes":  # a tumour box, anywhere (inside the liver or not)
        lo = [rng.integers(0, s) for s in shape]
        hi = [rng.integers(a + 1, min(a + 4, s) + 1) for a, s in zip(lo, shape, strict=True)]
        out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = 2
    else:
        out[(out > 0) & (rng.random(shape) < rng.uniform(0.0, 0.5))] = 2
    return out


@dataclass(frozen=True)
class MaskCase:
    shape: tuple[int, ...]
    label_style: str
    pred_style: str  # copy | perturbed | one of STYLES (independent)
    spacing: tuple[float, ...]
    seed: int

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        label = make_labels(rng, self.shape, self.label_style)
        if self.pred_style == "copy":
            return label.copy(), label
        if self.pred_style == "perturbed":
            pred = label.copy()
            changed = rng.random(self.shape) < rng.uniform(0.02, 0.3)
            pred[changed] = rng.integers(0, 3, self.shape, dtype=np.uint8)[changed]
            return pred, label
        return make_labels(rng, self.shape, self.pred_style), label


@st.composite
def mask_cases(draw, dims: tuple[int, ...] = (2, 3), max_size: int = 9) -> MaskCase:
    ndim = draw(st.sampled_from(dims))
    return MaskCase(
        shape=tuple(draw(st.integers(1, max_size)) for _ in range(ndim)),
        label_style=draw(st.sampled_from(STYLES)),
        pred_style=draw(st.sampled_from(["copy", "perturbed", *STYLES])),
        # anisotropic, and never all 1: a distance in voxels instead of mm shows
        spacing=tuple(draw(st.sampled_from([0.5, 0.8, 1.0, 1.5, 2.5, 5.0])) for _ in range(ndim)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def reference_dice(pred: np.ndarray, label: np.ndarray, region: str) -> float:
    p = np.isin(pred, REGION_LABELS[region])
    g = np.isin(label, REGION_LABELS[region])
    both, predicted, labelled = int((p & g).sum()), int(p.sum()), int(g.sum())
    if predicted == 0 and labelled == 0:
        return math.nan  # nnU-Net: undefined, left out of the mean
    return 2 * both / (predicted + labelled)  # 0 when exactly one side is empty


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask's voxels with a face neighbour outside it; outside the array counts as outside the mask."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for shift in (0, 2):  # the neighbour before (padded index i) and after (i + 2) along the axis
            index = [slice(1, -1)] * mask.ndim
            index[axis] = slice(shift, shift + mask.shape[axis])
            interior &= padded[tuple(index)]
    return mask & ~interior


def reference_hd95(pred: np.ndarray, label: np.ndarray, region: str, spacing: tuple[float, ...]) -> float:
    p = np.isin(pred, REGION_LABELS[region])
    g = np.isin(label, REGION_LABELS[region])
    if not p.any() or not g.any():
        return math.nan
    sp = np.argwhere(surface(p)) * np.asarray(spacing)  # mm
    sg = np.argwhere(surface(g)) * np.asarray(spacing)
    distances = np.sqrt(((sp[:, None, :] - sg[None, :, :]) ** 2).sum(-1))  # every pair of surface points
    # MONAI's symmetric HD95: the 95th percentile of each directed set of nearest distances, the larger one.
    return max(float(np.percentile(distances.min(1), 95)), float(np.percentile(distances.min(0), 95)))


def _same(got: float, want: float, rel: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return not math.isnan(got) and abs(got - want) <= rel * max(abs(want), 1.0)


@given(c=mask_cases())
@_grid(600)
def test_case_metrics_match_the_definitions(c: MaskCase) -> None:
    pred, label = c.arrays()
    got = case_metrics(pred, label, c.spacing)
    assert set(got) == {"dice_liver", "dice_tumour", "hd95_liver", "hd95_tumour"}
    for region in REGION_LABELS:
        want_dice = reference_dice(pred, label, region)
        assert _same(dice(pred, label, region), want_dice, 1e-12), (region, dice(pred, label, region), want_dice)
        assert _same(got[f"dice_{region}"], want_dice, 1e-12)
        # HD95 comes back in float32 (MONAI's tensor): a float32 rounding of the float64 brute force.
        want_hd = reference_hd95(pred, label, region, c.spacing)
        assert _same(hd95(pred, label, region, c.spacing), want_hd, 1e-5), (region, got, want_hd)
        assert _same(got[f"hd95_{region}"], want_hd, 1e-5), (region, got, want_hd)
    with pytest.raises(ValueError, match="shape"):
        case_metrics(pred, label[..., :-1] if label.shape[-1] > 1 else np.concatenate([label, label], -1), c.spacing)


METRIC_KEYS = ["dice_liver", "dice_tumour", "hd95_liver", "hd95_tumour"]


@st.composite
def metric_rows(draw) -> list[dict]:
    rows = []
    for i in range(draw(st.integers(0, 6))):
        row: dict = {"case_id": f"case-{i}"}  # a text field: not a metric
        for key in METRIC_KEYS:
            kind = draw(st.sampled_from(["value", "value", "nan", "missing"]))
            if kind == "value":
                row[key] = draw(st.floats(0.0, 300.0, allow_nan=False))
            elif kind == "nan":
                row[key] = math.nan
        rows.append(row)
    return rows


@given(rows=metric_rows())
@_grid(250)
def test_summarise_means_over_the_defined_cases(rows: list[dict]) -> None:
    got = summarise(rows)
    want: dict[str, float] = {"cases": float(len(rows))}
    for key in METRIC_KEYS:
        if not any(key in row for row in rows):
            continue  # a metric no row has is not summarised
        defined = [row[key] for row in rows if key in row and not math.isnan(row[key])]
        want[key] = math.fsum(defined) / len(defined) if defined else math.nan
        want[f"{key}_n"] = float(len(defined))
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key, value in want.items():
        assert _same(got[key], value, 1e-12), (key, got[key], value)


# ----------------------------------------------------------------------------------------- post-processing

FULL_3X3X3 = np.ones((3, 3, 3), bool)  # 26-connectivity: faces, edges and corners


@st.composite
def label_maps(draw) -> tuple[MaskCase, np.dtype]:
    c = draw(mask_cases(dims=(3,), max_size=8))
    return c, np.dtype(draw(st.sampled_from(["uint8", "int16", "int64"])))


@given(case=label_maps())
@_grid(500)
def test_keep_largest_liver_keeps_one_largest_component(case: tuple[MaskCase, np.dtype]) -> None:
    c, dtype = case
    _, labels = c.arrays()
    labels = labels.astype(dtype)
    before = labels.copy()
    got = pr.keep_largest_liver(labels)
    np.testing.assert_array_equal(labels, before)  # the input is not modified
    assert got.dtype == labels.dtype and got.shape == labels.shape and not np.shares_memory(got, labels)
    components, n = ndimage.label(labels > 0, structure=FULL_3X3X3)
    if n == 0:
        np.testing.assert_array_equal(got, labels)
        return
    sizes = np.bincount(components.ravel())[1:]
    largest = [k + 1 for k in np.flatnonzero(sizes == sizes.max())]
    # Ties: the docstring says "the largest"; any of them is accepted.
    matches = [k for k in largest if np.array_equal(got, np.where(components == k, labels, 0))]
    assert matches, f"kept {np.count_nonzero(got)} voxels; component sizes {sorted(sizes.tolist(), reverse=True)}"


def _random_affine(rng: np.random.Generator, spacing: tuple[float, ...]) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # a random rotation (or reflection)
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag(spacing)
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    return affine


@given(case=label_maps())
@_grid(400)
def test_mask_statistics_volumes_and_tumour_count(case: tuple[MaskCase, np.dtype]) -> None:
    c, dtype = case
    _, labels = c.arrays()
    labels = labels.astype(dtype)
    affine = _random_affine(np.random.default_rng(c.seed + 1), c.spacing)
    voxel_ml = math.prod(c.spacing) / 1000.0  # mm³ -> mL
    got = pr.mask_statistics(labels, affine)
    assert got["liver_ml"] == pytest.approx(int(np.isin(labels, (1, 2)).sum()) * voxel_ml, rel=1e-9, abs=1e-12)
    assert got["tumour_ml"] == pytest.approx(int((labels == 2).sum()) * voxel_ml, rel=1e-9, abs=1e-12)
    assert got["tumour_count"] == ndimage.label(labels == 2, structure=FULL_3X3X3)[1]


@dataclass(frozen=True)
class GridCase:
    original: tuple[int, int, int]
    box: tuple[tuple[int, int], ...]
    perm: tuple[int, int, int]
    flips: tuple[int, int, int]
    resampled: tuple[int, int, int] | None  # the RAS shape after resampling; None: no resampling
    seed: int


@st.composite
def grid_cases(draw) -> GridCase:
    original = tuple(draw(st.integers(1, 8)) for _ in range(3))
    box = []
    for s in original:
        lo = draw(st.integers(0, s - 1))
        box.append((lo, draw(st.integers(lo + 1, s))))
    resample = draw(st.booleans())
    return GridCase(
        original=original,  # type: ignore[arg-type]
        box=tuple(box),
        perm=tuple(draw(st.permutations([0, 1, 2]))),  # type: ignore[arg-type]
        flips=tuple(draw(st.sampled_from([1, -1])) for _ in range(3)),  # type: ignore[arg-type]
        resampled=tuple(draw(st.integers(1, 8)) for _ in range(3)) if resample else None,  # type: ignore[arg-type]
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _softmax(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    e = np.exp(2 * rng.standard_normal((3, *shape)))
    return (e / e.sum(0)).astype(np.float32)


@given(c=grid_cases())
@_grid(300)
def test_probabilities_on_the_input_grid_are_a_distribution(c: GridCase) -> None:
    rng = np.random.default_rng(c.seed)
    ornt = np.array([[p, f] for p, f in zip(c.perm, c.flips, strict=True)], dtype=float)
    crop_shape = tuple(hi - lo for lo, hi in c.box)
    ras_shape = tuple(nio.apply_orientation(np.zeros(crop_shape), ornt).shape)
    if c.resampled is None:
        # The preprocessing direction, with nibabel: the crop reoriented to RAS, then (x, y, z) -> (z, x, y).
        on_crop = _softmax(rng, crop_shape)
        probs = np.stack([nio.apply_orientation(p, ornt).transpose(2, 0, 1) for p in on_crop])
    else:
        probs = _softmax(rng, (c.resampled[2], c.resampled[0], c.resampled[1]))
    meta = {
        "shape": list(probs.shape[1:]),
        "ras_shape_before_resampling": list(ras_shape),
        "ornt": ornt.tolist(),
        "original": {"shape": list(c.original)},
        "crop_box": [list(b) for b in c.box],
    }
    got = pr._probabilities_on_input_grid(torch.from_numpy(probs), SimpleNamespace(meta=meta))
    assert got.shape == (3, *c.original) and got.dtype == np.float32
    assert (got >= 0).all() and (got <= 1).all()
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-6)
    inside = np.zeros(c.original, bool)
    inside[tuple(slice(lo, hi) for lo, hi in c.box)] = True
    assert (got[0][~inside] == 1).all() and (got[1:][:, ~inside] == 0).all()  # outside the crop: background
    crop = (slice(None), *(slice(lo, hi) for lo, hi in c.box))
    if c.resampled is None:
        np.testing.assert_allclose(got[crop][1:], on_crop[1:], rtol=0, atol=0)  # moved, not interpolated
    else:
        # Linear interpolation stays within each channel's range.
        for k in (1, 2):
            assert got[crop][k].min() >= probs[k].min() - 1e-6 and got[crop][k].max() <= probs[k].max() + 1e-6

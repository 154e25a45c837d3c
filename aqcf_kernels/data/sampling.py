"""Training samples from cached cases: 2D axial slices or 3D patches, with tumour oversampling.

Every sample is a pure function of ``(dataset seed, dataset identity, draw index)``: ``ds[i]`` seeds
its own generator from those, picks a case, a slice/patch and (optionally) augments. Hence:

- the same index gives the same sample in any process, with any number of DataLoader workers;
- an infinite stream is just indices 0, 1, 2, ...; resuming a run means restarting from the index of
  the next step (:class:`InfiniteLoader` keeps it in ``state_dict``);
- DDP ranks draw disjoint index sequences.

Sampling is with replacement (as nnU-Net's patch sampler), not epoch permutations: with oversampling,
"epoch" has no natural meaning anyway.

Tumour oversampling (``tumour_prob=p``): each draw picks, with probability p, a slice (patch) that
contains tumour and otherwise one that contains none, so the fraction of tumour samples is p (not
p plus whatever the random draws hit). Within each kind the case is picked uniformly among the cases
that have one, then the slice/patch uniformly within the case. ``tumour_prob=None`` samples cases and
slices uniformly (the natural rate). If no case has tumour (or none lacks it) the other kind is used.
Fixed-size crops of a tumour sample are placed so that they contain a tumour voxel.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .preprocess import CachedCase

__all__ = [
    "InfiniteBatchSampler",
    "InfiniteLoader",
    "JointLoader",
    "PatchDataset",
    "SliceDataset",
    "flip_intensity_augment",
]

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]


def _stream_key(cases: Sequence[CachedCase]) -> int:
    # Two datasets built with the same seed (the CT and the MRI stream) must still draw independently:
    # the case ids enter the seed, so different case lists give unrelated generators.
    return zlib.crc32("\n".join(c.case_id for c in cases).encode())


def _window_start(rng: np.random.Generator, n: int, size: int, must_include: int | None = None) -> int:
    """Start of a length-``size`` window on an axis of length ``n`` (negative: pad before)."""
    if n <= size:
        return -((size - n) // 2)  # centre the whole axis; it includes every voxel anyway
    lo, hi = 0, n - size
    if must_include is not None:
        lo, hi = max(lo, must_include - size + 1), min(hi, must_include)
    return int(rng.integers(lo, hi + 1))


def _read_window(arr: np.ndarray, starts: Sequence[int], size: Sequence[int], pad: float) -> np.ndarray:
    """``arr[start:start+size]`` per axis, padded with ``pad`` where the window leaves the array."""
    src, dst = [], []
    for s, k, n in zip(starts, size, arr.shape, strict=True):
        a = max(s, 0)
        b = max(a, min(s + k, n))  # (a window wholly outside the array: an empty slice, all padding)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out = np.full(tuple(size), pad, dtype=arr.dtype)
    out[tuple(dst)] = arr[tuple(src)]
    return out


class _Base(Dataset):
    """Shared case bookkeeping and the per-draw generator."""

    def __init__(
        self,
        cases: Sequence[CachedCase],
        *,
        tumour_prob: float | None,
        seed: int,
        length: int,
        transform: Transform | None,
    ) -> None:
        if not cases:
            raise ValueError("no cases to sample from")
        missing = [c.case_id for c in cases if c.meta.get("has_label") is False]
        if missing:
            raise ValueError(f"cases without labels cannot be sampled for training: {', '.join(missing[:10])}")
        if tumour_prob is not None and not 0 <= tumour_prob <= 1:
            raise ValueError(f"tumour_prob must be in [0, 1] or None, got {tumour_prob}")
        self.cases = list(cases)
        self.tumour_prob = tumour_prob
        self.seed = int(seed)
        self.length = int(length)
        self.transform = transform
        self._key = _stream_key(self.cases)

    def __len__(self) -> int:
        # Only a nominal epoch for map-style use; any non-negative index is a valid draw.
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"draw index must be non-negative, got {index}")
        return np.random.default_rng([self.seed, self._key, int(index)])

    def _want_tumour(self, rng: np.random.Generator, has_pos: bool, has_neg: bool) -> bool | None:
        """True: draw a tumour sample; False: a tumour-free one; None: uniform (no constraint)."""
        if self.tumour_prob is None:
            return None
        u = rng.random()  # always drawn, so one kind being unavailable does not shift later draws
        if not has_pos:
            return False if has_neg else None
        if not has_neg:
            return True
        return bool(u < self.tumour_prob)

    def _finish(self, image: np.ndarray, label: np.ndarray, case: CachedCase, rng: np.random.Generator) -> Sample:
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).unsqueeze(0),
            "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
            "case": case.case_id,
        }
        if self.transform is not None:
            sample = self.transform(sample, rng)
        return sample


class SliceDataset(_Base):
    """Axial slices as ``{"image": (1, H, W) float32, "label": (H, W) int64, "case": id}``.

    ``H, W`` index the RAS x and y axes of the cached (z, x, y) volume. ``size`` fixes them:
    ``fit="crop"`` pads with the case's background value and crops (randomly placed, containing a
    tumour pixel for tumour draws); ``fit="resize"`` rescales the whole slice (bilinear image, nearest
    label) and changes the pixel size. ``size=None`` keeps each case's native slice size (batch 1 then).

    ``transform(sample, rng)`` may augment with the draw's generator (see :func:`flip_intensity_augment`);
    using that generator (not a global one) keeps samples reproducible with DataLoader workers.
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        size: tuple[int, int] | None = (256, 256),
        *,
        tumour_prob: float | None = 0.5,
        fit: Literal["crop", "resize"] = "crop",
        seed: int = 0,
        length: int = 1000,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(cases, tumour_prob=tumour_prob, seed=seed, length=length, transform=transform)
        if fit not in ("crop", "resize"):
            raise ValueError(f"fit must be 'crop' or 'resize', got {fit!r}")
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.fit = fit
        per_case = [c.tumour_per_slice > 0 for c in self.cases]
        self._pos = [np.flatnonzero(t) for t in per_case]
        self._neg = [np.flatnonzero(~t) for t in per_case]
        self._pos_cases = np.array([i for i, p in enumerate(self._pos) if len(p)], dtype=np.int64)
        self._neg_cases = np.array([i for i, n in enumerate(self._neg) if len(n)], dtype=np.int64)

    def draw(self, index: int) -> tuple[int, int, bool | None, np.random.Generator]:
        """(case number, slice number, tumour constraint, generator) of draw ``index``."""
        rng = self._rng(index)
        want = self._want_tumour(rng, len(self._pos_cases) > 0, len(self._neg_cases) > 0)
        if want is None:
            ci = int(rng.integers(len(self.cases)))
            z = int(rng.integers(self.cases[ci].shape[0]))
        else:
            pool, per = (self._pos_cases, self._pos) if want else (self._neg_cases, self._neg)
            ci = int(pool[rng.integers(len(pool))])
            z = int(per[ci][rng.integers(len(per[ci]))])
        return ci, z, want, rng

    def __getitem__(self, index: int) -> Sample:
        ci, z, want, rng = self.draw(index)
        case = self.cases[ci]
        image = np.array(case.image[z])  # a copy: the memmap is read-only and must not back the tensor
        label = np.array(case.label[z])  # type: ignore[index]
        if self.size is not None:
            if self.fit == "resize":
                image, label = self._resize(image, label)
            else:
                # A tumour draw keeps a random tumour pixel inside the window, so the crop still has tumour.
                anchor: list[int | None] = [None, None]
                if want:
                    pixels = np.argwhere(label == 2)
                    anchor = [int(a) for a in pixels[rng.integers(len(pixels))]]
                starts = [_window_start(rng, n, k, a) for n, k, a in zip(image.shape, self.size, anchor, strict=True)]
                image = _read_window(image, starts, self.size, case.pad_value)
                label = _read_window(label, starts, self.size, 0)
        return self._finish(image, label, case, rng)

    def _resize(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        im = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        lb = torch.from_numpy(label.astype(np.float32))[None, None]
        im = F.interpolate(im, size=self.size, mode="bilinear", align_corners=False)
        lb = F.interpolate(lb, size=self.size, mode="nearest-exact")
        return im[0, 0].numpy(), lb[0, 0].numpy().astype(np.uint8)


class PatchDataset(_Base):
    """3D patches as ``{"image": (1, D, H, W) float32, "label": (D, H, W) int64, "case": id}``.

    ``patch_size`` is in array axes (z, x, y). Tumour draws centre the window range on a sampled tumour
    voxel (any window position containing it is equally likely); tumour-free draws reject random
    windows that contain tumour, up to ``max_tries`` times (then accept the last: a case whose every
    window has tumour cannot give a tumour-free patch, so the rate can exceed p for huge tumours).
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        patch_size: tuple[int, int, int] = (32, 128, 128),
        *,
        tumour_prob: float | None = 0.5,
        seed: int = 0,
        length: int = 1000,
        transform: Transform | None = None,
        max_tries: int = 10,
    ) -> None:
        super().__init__(cases, tumour_prob=tumour_prob, seed=seed, length=length, transform=transform)
        self.patch_size = tuple(int(k) for k in patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (z, x, y), got {patch_size}")
        self.max_tries = int(max_tries)
        self._pos_cases = np.array([i for i, c in enumerate(self.cases) if c.has_tumour], dtype=np.int64)
        self._neg_cases = np.arange(len(self.cases), dtype=np.int64)  # any case may give a tumour-free window

    def __getitem__(self, index: int) -> Sample:
        rng = self._rng(index)
        want = self._want_tumour(rng, len(self._pos_cases) > 0, True)
        pool = self._pos_cases if want else self._neg_cases
        case = self.cases[int(pool[rng.integers(len(pool))])]
        shape, size, label_arr = case.shape, self.patch_size, case.label
        if want:
            pts = case.tumour_points
            anchor = pts[rng.integers(len(pts))]
            starts = [_window_start(rng, n, k, int(a)) for n, k, a in zip(shape, size, anchor, strict=True)]
            label = _read_window(label_arr, starts, size, 0)  # type: ignore[arg-type]
        else:
            for _ in range(max(1, self.max_tries)):
                starts = [_window_start(rng, n, k) for n, k in zip(shape, size, strict=True)]
                label = _read_window(label_arr, starts, size, 0)  # type: ignore[arg-type]
                if want is None or not (label == 2).any():
                    break
        image = _read_window(case.image, starts, size, case.pad_value)
        return self._finish(image, label, case, rng)


def flip_intensity_augment(
    flip_prob: float = 0.5, scale: float = 0.1, shift: float = 0.1, noise: float = 0.0
) -> Transform:
    """A light, reproducible augmentation: random flips of each spatial axis, intensity ``x*a + b``
    with ``a ~ U(1-scale, 1+scale)``, ``b ~ U(-shift, shift)``, plus Gaussian noise of std ``noise``.

    Uses only the draw's generator, so it is deterministic under workers. For richer augmentation
    apply MONAI transforms to batches in the training loop.
    """

    def apply(sample: Sample, rng: np.random.Generator) -> Sample:
        image, label = sample["image"], sample["label"]
        dims = [d for d in range(label.dim()) if rng.random() < flip_prob]
        if dims:
            label = label.flip(dims)
            image = image.flip([d + 1 for d in dims])
        a = 1 + rng.uniform(-scale, scale)
        b = rng.uniform(-shift, shift)
        image = image * float(a) + float(b)
        if noise > 0:
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            image = image + noise * torch.randn(image.shape, generator=g)
        return {**sample, "image": image.contiguous(), "label": label.contiguous()}

    return apply


# ------------------------------------------------------------------------------------------ loading


class InfiniteBatchSampler(Sampler[list[int]]):
    """Batches of draw indices ``[b*B, ..., b*B + B - 1]`` with ``b = step * world_size + rank``, forever.

    The indices are not shuffled: the datasets randomise per index. Starting at ``start_step``
    resumes the exact stream.
    """

    def __init__(self, batch_size: int, *, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_step < 0:
            raise ValueError(f"bad sampler arguments: {batch_size=}, {rank=}, {world_size=}, {start_step=}")
        self.batch_size, self.start_step, self.rank, self.world_size = batch_size, start_step, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            b = step * self.world_size + self.rank
            yield list(range(b * self.batch_size, (b + 1) * self.batch_size))
            step += 1


class InfiniteLoader:
    """Endless batches of one dataset through a :class:`~torch.utils.data.DataLoader`.

    ``next(loader)`` returns a collated batch; ``state_dict()``/``load_state_dict()`` save and restore
    the position (the number of batches consumed), so a resumed run sees exactly the batches an
    uninterrupted one would have. Batches are identical for any ``num_workers``.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rank, self.world_size = rank, world_size
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.step = 0
        self._it: Iterator | None = None

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            sampler = InfiniteBatchSampler(
                self.batch_size, start_step=self.step, rank=self.rank, world_size=self.world_size
            )
            loader = DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.persistent_workers,
                # the iterator's worker seed drawn from a generator of its own, not torch's global one: a
                # resumed process starts a new iterator where an unbroken one did not, and that extra draw
                # shifted every later one (dropout's masks: resumed weights differed from an unbroken run's)
                generator=torch.Generator().manual_seed(self.step),
            )
            self._it = iter(loader)
        batch = next(self._it)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.step = int(state["step"])

    def close(self) -> None:
        """Stop the worker processes (a new iterator starts at the current step on the next ``next``)."""
        self._it = None  # dropping the DataLoader iterator shuts its workers down


class JointLoader:
    """Unpaired joint batches: every ``next()`` gives ``{"ct": batch, "mri": batch}``.

    The two streams are independent (each dataset randomises per draw with its own seed and case
    list), infinite, and reproducible for any ``num_workers`` (each stream gets its own workers).
    ``batch_size`` is one int or ``(ct, mri)``.
    """

    def __init__(
        self,
        ct: Dataset,
        mri: Dataset,
        batch_size: int | tuple[int, int],
        *,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        bct, bmri = (batch_size, batch_size) if isinstance(batch_size, int) else batch_size
        kw = {
            "num_workers": num_workers,
            "rank": rank,
            "world_size": world_size,
            "pin_memory": pin_memory,
            "persistent_workers": persistent_workers,
        }
        self.ct = InfiniteLoader(ct, bct, **kw)
        self.mri = InfiniteLoader(mri, bmri, **kw)

    def __iter__(self) -> JointLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        return {"ct": next(self.ct), "mri": next(self.mri)}

    @property
    def step(self) -> int:
        return self.ct.step

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"ct": self.ct.state_dict(), "mri": self.mri.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        self.ct.load_state_dict(state["ct"])
        self.mri.load_state_dict(state["mri"])

    def close(self) -> None:
        self.ct.close()
        self.mri.close()

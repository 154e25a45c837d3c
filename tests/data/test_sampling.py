"""Samplers: output contract, determinism, tumour oversampling rate, and the unpaired joint loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aqcf_kernels.data import (
    InfiniteBatchSampler,
    InfiniteLoader,
    JointLoader,
    PatchDataset,
    SliceDataset,
    flip_intensity_augment,
)


def has_tumour(sample) -> bool:
    return bool((sample["label"] == 2).any())


def test_fixture_has_tumour_free_case(ct_cases, mri_cases):
    assert [c.has_tumour for c in ct_cases] == [True, True, False]  # LiTS-like: one case without tumour
    assert all(c.has_tumour for c in mri_cases)


def test_slice_contract_and_determinism(ct_cases):
    ds = SliceDataset(ct_cases, (32, 48), tumour_prob=0.5, seed=1)
    s = ds[7]
    assert s["image"].shape == (1, 32, 48) and s["image"].dtype == torch.float32
    assert s["label"].shape == (32, 48) and s["label"].dtype == torch.int64
    assert s["case"] in {c.case_id for c in ct_cases}
    assert set(s["label"].unique().tolist()) <= {0, 1, 2}
    again = SliceDataset(ct_cases, (32, 48), tumour_prob=0.5, seed=1)[7]
    assert torch.equal(s["image"], again["image"]) and torch.equal(s["label"], again["label"])
    other = [SliceDataset(ct_cases, (32, 48), tumour_prob=0.5, seed=2)[i] for i in range(8)]
    assert any(not torch.equal(o["image"], ds[i]["image"]) for i, o in enumerate(other))
    # 48 > the cropped slice width here: padded with the case's background value (0 for CT in [0, 1]).
    native = SliceDataset(ct_cases, None, tumour_prob=None)[0]
    assert native["image"].shape[1:] == ct_cases[0].image.shape[1:]
    resized = SliceDataset(ct_cases, (20, 20), fit="resize", tumour_prob=1.0)[3]
    assert resized["image"].shape == (1, 20, 20) and set(resized["label"].unique().tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
def test_slice_tumour_rate_is_p(ct_cases, p):
    # Fixed seed: the outcome is deterministic, and 1000 draws put p within 0.05 (> 3 binomial sd).
    ds = SliceDataset(ct_cases, (24, 24), tumour_prob=p, seed=0)
    rate = np.mean([has_tumour(ds[i]) for i in range(1000)])
    assert abs(rate - p) < 0.05, rate


def test_slice_natural_rate_without_oversampling(ct_cases):
    ds = SliceDataset(ct_cases, None, tumour_prob=None, seed=0)
    # Uniform case, then uniform slice: the expected rate is the mean per-case tumour-slice fraction.
    expected = np.mean([len(c.tumour_slices) / c.shape[0] for c in ct_cases])
    rate = np.mean([has_tumour(ds[i]) for i in range(1000)])
    assert 0 < expected < 0.5 and abs(rate - expected) < 0.05


def test_patch_contract_and_tumour_rate(mri_cases):
    ds = PatchDataset(mri_cases, (4, 16, 16), tumour_prob=0.4, seed=0)
    s = ds[0]
    assert s["image"].shape == (1, 4, 16, 16) and s["label"].shape == (4, 16, 16)
    assert s["image"].dtype == torch.float32 and s["label"].dtype == torch.int64
    rate = np.mean([has_tumour(ds[i]) for i in range(600)])
    assert abs(rate - 0.4) < 0.07, rate
    assert all(has_tumour(PatchDataset(mri_cases, (4, 16, 16), tumour_prob=1.0)[i]) for i in range(50))
    # A patch larger than the volume is padded with the background value.
    big = PatchDataset(mri_cases, (16, 64, 64), tumour_prob=None)[0]
    case = next(c for c in mri_cases if c.case_id == big["case"])
    assert big["image"].shape == (1, 16, 64, 64) and float(big["image"][0, 0, 0, 0]) == pytest.approx(case.pad_value)


def test_augment_is_reproducible(ct_cases):
    aug = flip_intensity_augment(flip_prob=0.5, noise=0.05)
    ds = SliceDataset(ct_cases, (24, 24), seed=0, transform=aug)
    plain = SliceDataset(ct_cases, (24, 24), seed=0)
    a, b = ds[5], ds[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], plain[5]["image"])
    # Flips move image and label together: the tumour mask of the flipped sample is one of the flips.
    s = [ds[i] for i in range(6)]
    p = [plain[i] for i in range(6)]
    for x, y in zip(s, p, strict=True):
        assert any(torch.equal(x["label"], y["label"].flip(d)) for d in ([], [0], [1], [0, 1]))


def test_batch_sampler_ranks():
    r0 = iter(InfiniteBatchSampler(2, rank=0, world_size=2))
    r1 = iter(InfiniteBatchSampler(2, rank=1, world_size=2, start_step=1))
    assert [next(r0) for _ in range(3)] == [[0, 1], [4, 5], [8, 9]]
    assert next(r1) == [6, 7]


def _batches(loader, n):
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def test_joint_loader(ct_cases, mri_cases):
    ct = SliceDataset(ct_cases, (24, 24), tumour_prob=0.5, seed=0)
    mri = SliceDataset(mri_cases, (24, 24), tumour_prob=0.5, seed=0)
    loader = JointLoader(ct, mri, batch_size=(4, 3))
    steps = _batches(loader, 4)
    ct_ids, mri_ids = {c.case_id for c in ct_cases}, {c.case_id for c in mri_cases}
    for b in steps:
        assert set(b) == {"ct", "mri"}
        assert b["ct"]["image"].shape == (4, 1, 24, 24) and b["ct"]["label"].shape == (4, 24, 24)
        assert b["mri"]["image"].shape == (3, 1, 24, 24)
        assert set(b["ct"]["case"]) <= ct_ids and set(b["mri"]["case"]) <= mri_ids
    assert loader.step == 4 and loader.state_dict() == {"ct": {"step": 4}, "mri": {"step": 4}}
    # Same seed, different case lists: the streams still decide tumour/no tumour independently.
    ct_t = [has_tumour(ct[i]) for i in range(200)]
    mri_t = [has_tumour(mri[i]) for i in range(200)]
    assert 0.3 < np.mean(np.equal(ct_t, mri_t)) < 0.7

    # Workers change nothing; resuming from a state dict continues the exact stream.
    workers = _batches(JointLoader(ct, mri, batch_size=(4, 3), num_workers=2), 4)
    for a, b in zip(steps, workers, strict=True):
        for m in ("ct", "mri"):
            assert torch.equal(a[m]["image"], b[m]["image"]) and a[m]["case"] == b[m]["case"]
    resumed = JointLoader(ct, mri, batch_size=(4, 3))
    resumed.load_state_dict({"ct": {"step": 2}, "mri": {"step": 2}})
    for a, b in zip(steps[2:], _batches(resumed, 2), strict=True):
        assert torch.equal(a["ct"]["label"], b["ct"]["label"]) and torch.equal(a["mri"]["image"], b["mri"]["image"])


def test_single_stream_loader_and_errors(ct_cases):
    loader = InfiniteLoader(SliceDataset(ct_cases, (16, 16)), batch_size=2)
    assert next(loader)["image"].shape == (2, 1, 16, 16) and loader.state_dict() == {"step": 1}
    with pytest.raises(ValueError, match="no cases"):
        SliceDataset([], (16, 16))
    with pytest.raises(ValueError, match="tumour_prob"):
        SliceDataset(ct_cases, (16, 16), tumour_prob=1.5)
    with pytest.raises(IndexError):
        SliceDataset(ct_cases, (16, 16))[-1]

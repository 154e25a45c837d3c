"""Patient-level split: seeded, disjoint, written once and reused; stale splits are an error."""

from __future__ import annotations

import json
import warnings

import pytest

from aqcf_kernels.data import DataError, load_or_create_split, make_split

IDS = [f"lits-{i}" for i in range(20)]


def test_make_split_is_seeded_disjoint_and_complete():
    a = make_split(IDS, (0.7, 0.1, 0.2), seed=0)
    assert [len(a[k]) for k in ("train", "val", "test")] == [14, 2, 4]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(IDS)
    assert a == make_split(list(reversed(IDS)), (0.7, 0.1, 0.2), seed=0)  # order of the input is irrelevant
    assert a != make_split(IDS, (0.7, 0.1, 0.2), seed=1)
    small = make_split(IDS[:3], seed=0)
    assert all(len(small[k]) == 1 for k in ("train", "val", "test"))  # every non-empty split gets a case
    assert make_split(IDS[:1], seed=0) == {"train": ["lits-0"], "val": [], "test": []}
    with pytest.raises(ValueError, match="fractions"):
        make_split(IDS, (0.5, 0.5, 0.5))


def test_groups_stay_together():
    groups = {c: f"patient-{i // 2}" for i, c in enumerate(IDS)}  # two scans per patient
    split = make_split(IDS, seed=3, groups=groups)
    for k in ("train", "val", "test"):
        patients = {groups[c] for c in split[k]}
        assert all(groups[c] in patients for c in split[k])
        others = {groups[c] for o in ("train", "val", "test") if o != k for c in split[o]}
        assert not patients & others


def test_written_once_then_reused(tmp_path):
    path = tmp_path / "splits" / "ct.json"
    first = load_or_create_split(path, IDS, seed=0)
    stored = json.loads(path.read_text())
    assert stored["seed"] == 0 and stored["train"] == first["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_or_create_split(path, IDS, seed=0) == first
    with pytest.warns(UserWarning, match="reusing the existing split"):
        assert load_or_create_split(path, IDS, seed=5) == first  # the file wins over a new seed
    with pytest.warns(UserWarning, match="not in the split are unused"):
        assert load_or_create_split(path, [*IDS, "lits-99"], seed=0) == first


def test_stale_or_broken_split_file(tmp_path):
    path = tmp_path / "split.json"
    split = load_or_create_split(path, IDS, seed=0)
    gone = split["test"][0]
    with pytest.raises(DataError, match=f"no longer exist.*{gone}") as e:
        load_or_create_split(path, [c for c in IDS if c != gone], seed=0)
    assert str(path) in str(e.value)
    path.write_text("{")
    with pytest.raises(DataError, match="unreadable split file"):
        load_or_create_split(path, IDS)
    path.write_text(json.dumps({"train": IDS, "val": []}))
    with pytest.raises(DataError, match="not a split file"):
        load_or_create_split(path, IDS)
    path.write_text(json.dumps({"train": IDS, "val": IDS[:1], "test": []}))
    with pytest.raises(DataError, match="more than one split"):
        load_or_create_split(path, IDS)

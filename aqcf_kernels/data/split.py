"""Seeded patient-level train/val/test split, written to JSON once and reused ever after.

Two kinds of split: :func:`make_split` cuts the patients into train/val/test by fractions;
:func:`make_folds` / :func:`make_fold_split` hold out a seeded test set and cut the remaining
patients into ``folds`` cross-validation folds (nnU-Net's convention: 5 folds, patient-level, fold
k validates on the k-th part and trains on the others; ``"all"`` trains on every non-test patient
and validates on none). Every fold of a seed shares the same test set.

Reusing the file (rather than re-deriving the split from the seed) keeps the test set fixed even if
the case list, the fractions or this code change later; a split that names cases which no longer
exist is an error, never silently repaired.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["SPLIT_NAMES", "check_fold", "load_or_create_split", "make_fold_split", "make_folds", "make_split"]

SPLIT_NAMES = ("train", "val", "test")


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Group counts per split: rounded, at least one for every non-zero fraction when n allows it."""
    counts = [round(n * f) for f in fractions[1:]]
    nonzero = sum(f > 0 for f in fractions)
    if n >= nonzero:
        counts = [max(c, 1) if f > 0 else 0 for c, f in zip(counts, fractions[1:], strict=True)]
    while sum(counts) > n - (1 if fractions[0] > 0 and n > 0 else 0):  # train keeps at least one group
        i = int(np.argmax(counts))
        counts[i] -= 1
    return [n - sum(counts), *counts]


def make_split(
    case_ids: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Shuffle patients with ``seed`` and cut them into train/val/test by ``fractions``.

    ``groups`` maps case id -> patient id when a patient has several scans; all scans of a patient
    land in the same split (otherwise each case is its own patient). The result only depends on the
    set of ids, not their order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not abs(sum(fractions) - 1) < 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    ids, patient, patients = _patients(case_ids, groups)
    order = np.random.default_rng(seed).permutation(len(patients))
    counts = _counts(len(patients), fractions)
    split: dict[str, list[str]] = {}
    start = 0
    for name, count in zip(SPLIT_NAMES, counts, strict=True):
        chosen = {patients[i] for i in order[start : start + count]}
        split[name] = [c for c in ids if patient[c] in chosen]
        start += count
    return split


def _patients(case_ids: Sequence[str], groups: Mapping[str, str] | None) -> tuple[list[str], dict[str, str], list[str]]:
    """Sorted unique case ids, case -> patient, and the sorted patients (duplicates are an error)."""
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case_ids contains duplicates")
    patient = {c: (groups or {}).get(c, c) for c in ids}
    return ids, patient, sorted(set(patient.values()))


def check_fold(fold: int | str, folds: int) -> int | str:
    """``fold`` if it names one of ``folds`` folds (``0 .. folds-1``) or is ``"all"``; else ValueError."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"the number of folds must be an integer >= 2, got {folds!r}")
    if fold == "all":
        return fold
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(f"fold must be 0..{folds - 1} or 'all', got {fold!r}")
    return fold


def make_folds(
    case_ids: Sequence[str],
    folds: int = 5,
    test_fraction: float = 0.0,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A held-out test set and ``folds`` cross-validation parts of the other patients.

    Patients are shuffled with ``seed``; the first ``round(n * test_fraction)`` (at least one when
    the fraction is positive and there are two patients or more) are the test set, and the rest is
    cut into ``folds`` parts of sizes differing by at most one (as scikit-learn's ``KFold``, which
    nnU-Net uses). All scans of a patient (``groups``: case id -> patient id) land in one part.
    The result only depends on the set of ids, never on their order.

    Returns:
        ``{"test": [case ids], "folds": [[case ids of part 0], ..., [part folds-1]]}``, ids sorted.
    """
    check_fold(0, folds)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    ids, patient, patients = _patients(case_ids, groups)
    n = len(patients)
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    test = {patients[i] for i in order[:n_test]}
    parts = [{patients[i] for i in part} for part in np.array_split(order[n_test:], folds)]
    return {
        "test": [c for c in ids if patient[c] in test],
        "folds": [[c for c in ids if patient[c] in part] for part in parts],
    }


def make_fold_split(
    case_ids: Sequence[str],
    fold: int | str,
    folds: int = 5,
    test_fraction: float = 0.0,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Fold ``fold`` of :func:`make_folds` as train/val/test: val = part ``fold``, train = the other parts.

    ``fold="all"`` trains on every non-test case and validates on none (nnU-Net's ``all``).

    Raises:
        DataError: fewer non-test patients than folds (some fold would validate on nothing).
    """
    fold = check_fold(fold, folds)
    parts = make_folds(case_ids, folds, test_fraction, seed, groups)
    pool = sum(len(part) for part in parts["folds"])
    if fold != "all" and any(not part for part in parts["folds"]):
        raise DataError(
            f"{pool} case(s) outside the test set cannot be cut into {folds} folds: "
            "lower data.folds, lower data.test_fraction, or use fold 'all'"
        )
    if fold == "all":
        train, val = sorted(c for part in parts["folds"] for c in part), []
    else:
        val = parts["folds"][fold]
        train = sorted(c for k, part in enumerate(parts["folds"]) if k != fold for c in part)
    return {"train": train, "val": val, "test": parts["test"]}


def load_or_create_split(
    path: str | os.PathLike,
    case_ids: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
    *,
    fold: int | str | None = None,
    folds: int = 5,
) -> dict[str, list[str]]:
    """The split stored at ``path``; created (and written) if the file is absent.

    Without ``fold`` it is :func:`make_split` by ``fractions``; with ``fold`` (``0 .. folds-1`` or
    ``"all"``) it is :func:`make_fold_split` with the test fraction ``fractions[2]`` (the val
    fraction is unused: the fold is the validation set), and the file records ``fold`` and ``folds``.

    An existing file wins over ``fractions``/``seed``/``folds`` (a warning says so when they differ),
    but never over the fold: a file of another fold (or a fold file where none is asked for, or
    the reverse) is an error. Cases present now but absent from the file are left out of every
    split (with a warning).

    Raises:
        DataError: the file is unreadable, malformed, of another fold, or names cases not in ``case_ids``.
    """
    path = Path(path)
    if fold is not None:
        fold = check_fold(fold, folds)
    if not path.exists():
        if fold is None:
            split = make_split(case_ids, fractions, seed, groups)
            header: dict[str, Any] = {"seed": seed, "fractions": list(fractions)}
        else:
            split = make_fold_split(case_ids, fold, folds, fractions[2], seed, groups)
            header = {"seed": seed, "test_fraction": fractions[2], "folds": folds, "fold": fold}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**header, **split}, f, indent=1)
        os.replace(tmp, path)  # atomic: a crashed or concurrent writer never leaves half a split
        return split
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable split file ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in SPLIT_NAMES):
        raise DataError(f"{path}: not a split file (needs lists 'train', 'val' and 'test')")
    if data.get("fold") != fold:
        held = "no fold (a train/val/test split)" if data.get("fold") is None else f"fold {data['fold']!r}"
        wanted = "no fold" if fold is None else f"fold {fold!r}"
        raise DataError(f"{path}: the split holds {held}, but {wanted} was asked for; a run folder holds one fold")
    split = {k: [str(c) for c in data[k]] for k in SPLIT_NAMES}
    named = [c for k in SPLIT_NAMES for c in split[k]]
    if len(set(named)) != len(named):
        raise DataError(f"{path}: a case appears in more than one split (or twice in one)")
    known = set(case_ids)
    missing = [c for c in named if c not in known]
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise DataError(
            f"{path}: the split names {len(missing)} case(s) that no longer exist ({shown}); "
            "restore them or delete the split file to make a new split"
        )
    if fold is None:
        asked = {"seed": seed, "fractions": list(fractions)}
        stored = {"seed": data.get("seed"), "fractions": list(data.get("fractions", []))}
    else:
        asked = {"seed": seed, "test_fraction": fractions[2], "folds": folds}
        stored = {k: data.get(k) for k in asked}
    if stored != asked:
        warnings.warn(
            f"{path}: reusing the existing split ({', '.join(f'{k} {v}' for k, v in stored.items())}); "
            f"the requested {' / '.join(f'{k} {v}' for k, v in asked.items())} are ignored",
            stacklevel=2,
        )
    unused = sorted(known - set(named))
    if unused:
        warnings.warn(
            f"{path}: {len(unused)} case(s) not in the split are unused: {', '.join(unused[:10])}", stacklevel=2
        )
    return split

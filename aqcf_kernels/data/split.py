"""Seeded patient-level train/val/test split, written to JSON once and reused ever after.

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

import numpy as np

from .errors import DataError

__all__ = ["SPLIT_NAMES", "load_or_create_split", "make_split"]

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
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case_ids contains duplicates")
    patient = {c: (groups or {}).get(c, c) for c in ids}
    patients = sorted(set(patient.values()))
    order = np.random.default_rng(seed).permutation(len(patients))
    counts = _counts(len(patients), fractions)
    split: dict[str, list[str]] = {}
    start = 0
    for name, count in zip(SPLIT_NAMES, counts, strict=True):
        chosen = {patients[i] for i in order[start : start + count]}
        split[name] = [c for c in ids if patient[c] in chosen]
        start += count
    return split


def load_or_create_split(
    path: str | os.PathLike,
    case_ids: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """The split stored at ``path``; created with :func:`make_split` (and written) if the file is absent.

    An existing file wins over ``fractions``/``seed`` (a warning says so when they differ). Cases
    present now but absent from the file are left out of every split (with a warning).

    Raises:
        DataError: the file is unreadable, malformed, or names cases not in ``case_ids``.
    """
    path = Path(path)
    if not path.exists():
        split = make_split(case_ids, fractions, seed, groups)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"seed": seed, "fractions": list(fractions), **split}, f, indent=1)
        os.replace(tmp, path)  # atomic: a crashed or concurrent writer never leaves half a split
        return split
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable split file ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in SPLIT_NAMES):
        raise DataError(f"{path}: not a split file (needs lists 'train', 'val' and 'test')")
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
    if data.get("seed") != seed or list(data.get("fractions", [])) != list(fractions):
        warnings.warn(
            f"{path}: reusing the existing split (seed {data.get('seed')}, fractions {data.get('fractions')}); "
            f"the requested seed {seed} / fractions {list(fractions)} are ignored",
            stacklevel=2,
        )
    unused = sorted(known - set(named))
    if unused:
        warnings.warn(
            f"{path}: {len(unused)} case(s) not in the split are unused: {', '.join(unused[:10])}", stacklevel=2
        )
    return split

"""Deterministic k-fold splits of a dataset's training cases, stored once in ``splits.json``.

The split is written to ``<dataset>/splits.json`` the first time and reused afterwards (even
when a different seed is asked for), so every fold of every run validates on the same cases.
It is the only file this package ever writes into a dataset folder.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segmentation.atomic import write_text_atomic
from segmentation.data.layout import DatasetError

SPLITS_JSON = "splits.json"
ALL_FOLD = "all"  # nnU-Net's fold "all": every case trains, none validates
Split = dict[str, list[str]]


def make_splits(case_ids: Sequence[str], n_folds: int = 5, seed: int = 0) -> list[Split]:
    """Split case ids into ``n_folds`` folds of {"train": [...], "val": [...]}.

    The ids are sorted, shuffled with ``numpy.random.default_rng(seed)`` and cut into
    ``n_folds`` nearly equal validation sets; each fold trains on the other cases. Lists in the
    result are sorted.

    Raises:
        ValueError: for repeated ids, ``n_folds < 2`` or more folds than cases.
    """
    ids = sorted(str(i) for i in case_ids)
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"case ids must be distinct; repeated: {', '.join(repeated)}")
    if n_folds < 2:
        raise ValueError(f"n_folds={n_folds} is not a split; use n_folds >= 2, or fold "
                         f"{ALL_FOLD!r} to train on every case without validation")
    if n_folds > len(ids):
        fix = (f"use n_folds between 2 and {len(ids)}, or" if len(ids) >= 2 else "use")
        raise ValueError(f"n_folds={n_folds} is more than the {len(ids)} case(s) to split; "
                         f"{fix} fold {ALL_FOLD!r} to train on every case without validation "
                         "(nnU-Net's fold all)")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for chunk in np.array_split(order, n_folds):
        val = {ids[i] for i in chunk}
        folds.append({"train": sorted(set(ids) - val), "val": sorted(val)})
    return folds


def check_fold(fold: int | str, n_folds: int) -> None:
    """Refuse a fold that no split of ``n_folds`` folds has (``"all"`` is always fine).

    Raises:
        ValueError: saying which folds exist.
    """
    if fold == ALL_FOLD:
        return
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n_folds:
        raise ValueError(f"fold={fold!r} is out of range: the split has {n_folds} folds, "
                         f"numbered 0 to {n_folds - 1} (or {ALL_FOLD!r}: every case trains, "
                         "none validates)")


def fold_cases(splits: Sequence[Split], fold: int) -> tuple[list[str], list[str]]:
    """The (train, val) case ids of fold ``fold``.

    Raises:
        ValueError: if ``fold`` is not in ``0..len(splits)-1``.
    """
    check_fold(fold, len(splits))
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def load_or_create_splits(root: str | Path, case_ids: Sequence[str], n_folds: int = 5,
                          seed: int = 0) -> list[Split]:
    """Reuse ``root/splits.json``, or make a split of the training ``case_ids`` and write it there.

    An existing file must have ``n_folds`` folds and is reused whatever its seed was.

    Raises:
        DatasetError: naming splits.json if it is malformed, names unknown case ids, misses
            some of ``case_ids``, validates a case in more than one fold, has a fold whose
            train and val lists overlap or together miss a case, or has a different number
            of folds. DatasetError is a ValueError.
        ValueError: if a new split cannot be made (see :func:`make_splits`).
    """
    path = Path(root) / SPLITS_JSON
    if path.is_file():
        splits = _read_splits(path)
        _validate_splits(path, splits, case_ids, n_folds)
        return splits
    splits = make_splits(case_ids, n_folds, seed)
    write_text_atomic(json.dumps(splits, indent=2) + "\n", path)
    return splits


def _read_splits(path: Path) -> list[Split]:
    """Parse splits.json: a list of {"train": [ids], "val": [ids]}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(path, f"invalid JSON ({error}); delete it to re-split") from error
    valid = isinstance(data, list) and bool(data) and all(
        isinstance(fold, dict) and all(
            isinstance(fold.get(side), list) and all(isinstance(i, str) for i in fold[side])
            for side in ("train", "val"))
        for fold in data)
    if not valid:
        raise DatasetError(path, "expected a list of {\"train\": [ids], \"val\": [ids]} folds; "
                                 "delete it to re-split")
    return [{"train": list(fold["train"]), "val": list(fold["val"])} for fold in data]


def _validate_splits(path: Path, splits: list[Split], case_ids: Sequence[str],
                     n_folds: int) -> None:
    """Check a stored split against the dataset's cases.

    Every fold must list each case of the dataset exactly once, in ``train`` or in ``val``,
    and every case must be validated in exactly one fold.
    """
    known = set(case_ids)
    for k, fold in enumerate(splits):
        for side in ("train", "val"):
            unknown = sorted(set(fold[side]) - known)
            if unknown:
                raise DatasetError(path, f"names case(s) that are not in the dataset: "
                                         f"{', '.join(unknown)} (fold {k} {side}); remove them "
                                         "or delete splits.json to re-split")
    for k, fold in enumerate(splits):
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            raise DatasetError(path, f"fold {k} has case(s) on both sides: {', '.join(both)}; "
                                     f"keep each in either fold {k}'s train or its val list")
        for side in ("train", "val"):
            repeated = sorted(i for i, n in Counter(fold[side]).items() if n > 1)
            if repeated:
                raise DatasetError(path, f"fold {k} lists case(s) {', '.join(repeated)} more "
                                         f"than once in {side}; list each once")
    validated_in: dict[str, list[int]] = {}
    for k, fold in enumerate(splits):
        for i in fold["val"]:
            validated_in.setdefault(i, []).append(k)
    for i, folds in sorted(validated_in.items()):
        if len(folds) > 1:
            listing = ", ".join(map(str, folds))
            raise DatasetError(path, f"case {i} is in the validation sets of folds {listing}; "
                                     "keep it in one fold's val and move it to the train list "
                                     "of the others")
    unsplit = sorted(known - set(validated_in))
    if unsplit:
        raise DatasetError(path, f"case(s) {', '.join(unsplit)} are in no validation set (the "
                                 "dataset changed since the split was made); delete "
                                 "splits.json to re-split")
    for k, fold in enumerate(splits):
        left_out = sorted(known - set(fold["train"]) - set(fold["val"]))
        if left_out:
            raise DatasetError(path, f"fold {k} leaves out case(s) {', '.join(left_out)}: they "
                                     "are in neither its train nor its val list; add them to "
                                     f"fold {k}'s train list")
    if len(splits) != n_folds:
        raise DatasetError(path, f"has {len(splits)} folds but n_folds={n_folds} was asked for; "
                                 f"use n_folds={len(splits)} or delete splits.json to re-split")

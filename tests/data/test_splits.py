"""k-fold splits: deterministic and covering, written once to splits.json, hand edits checked."""

from __future__ import annotations

import json
import os
import stat

import pytest

from segmentation.data.layout import DatasetError
from segmentation.data.splits import fold_cases, load_or_create_splits, make_splits

IDS = [f"case_{i:02d}" for i in range(11)]


def test_splits_are_deterministic_disjoint_and_covering():
    splits = make_splits(IDS, n_folds=5, seed=7)
    assert splits == make_splits(list(reversed(IDS)), n_folds=5, seed=7)
    assert splits != make_splits(IDS, n_folds=5, seed=8)
    assert len(splits) == 5
    vals = [set(f["val"]) for f in splits]
    assert sorted(v for s in vals for v in s) == IDS  # every case validated exactly once
    for fold in splits:
        assert set(fold["train"]).isdisjoint(fold["val"])
        assert sorted(fold["train"] + fold["val"]) == IDS
        assert fold["val"] == sorted(fold["val"]) and fold["train"] == sorted(fold["train"])
    assert sorted(len(v) for v in vals) == [2, 2, 2, 2, 3]


@pytest.mark.parametrize("n_folds, message", [
    (12, "n_folds=12 is more than the 11 case"),
    (1, "use n_folds >= 2"),
])
def test_bad_fold_counts_are_refused(n_folds, message):
    with pytest.raises(ValueError, match=message):
        make_splits(IDS, n_folds=n_folds)


def test_splits_json_is_written_once_and_reused(tmp_path):
    previous = os.umask(0o022)
    try:
        first = load_or_create_splits(tmp_path, IDS, n_folds=3, seed=0)
    finally:
        os.umask(previous)
    assert json.loads((tmp_path / "splits.json").read_text()) == first
    assert [p.name for p in tmp_path.iterdir()] == ["splits.json"]  # no temp file left
    assert stat.S_IMODE((tmp_path / "splits.json").stat().st_mode) == 0o644  # not owner-only
    again = load_or_create_splits(tmp_path, IDS, n_folds=3, seed=99)
    assert again == first  # reused, although the seed differs
    assert make_splits(IDS, n_folds=3, seed=99) != first


def test_stale_splits_json_is_refused(tmp_path):
    load_or_create_splits(tmp_path, IDS, n_folds=3)
    with pytest.raises(DatasetError, match=r"splits\.json: names case\(s\) that are not in the "
                                           r"dataset: case_10"):
        load_or_create_splits(tmp_path, IDS[:-1], n_folds=3)
    with pytest.raises(DatasetError, match=r"case\(s\) new are in no validation set.*delete "
                                           r"splits\.json"):
        load_or_create_splits(tmp_path, [*IDS, "new"], n_folds=3)
    with pytest.raises(DatasetError, match="has 3 folds but n_folds=5"):
        load_or_create_splits(tmp_path, IDS, n_folds=5)
    (tmp_path / "splits.json").write_text("[{\"train\": 1}]")
    with pytest.raises(DatasetError, match=r"splits\.json: expected a list"):
        load_or_create_splits(tmp_path, IDS, n_folds=3)


def test_fold_cases_returns_sides_and_checks_range():
    splits = make_splits(IDS, n_folds=4)
    train, val = fold_cases(splits, 3)
    assert (train, val) == (splits[3]["train"], splits[3]["val"])
    with pytest.raises(ValueError, match="fold=4 is out of range: the split has 4 folds"):
        fold_cases(splits, 4)
    with pytest.raises(ValueError, match="out of range"):
        fold_cases(splits, -1)


# A hand-edited splits.json: each edit returns the message it must raise.


def _in_two_val_sets(folds):
    case = folds[0]["val"][0]
    folds[1]["train"].remove(case)
    folds[1]["val"].append(case)
    return rf"case {case} is in the validation sets of folds 0, 1; keep it in one fold's val"


def _left_out_of_train(folds):
    case = folds[2]["train"].pop(0)
    return (rf"fold 2 leaves out case\(s\) {case}: they are in neither its train nor its val "
            r"list; add them to fold 2's train list")


def _unknown_case(folds):
    folds[1]["val"].append("ghost")
    return r"names case\(s\) that are not in the dataset: ghost \(fold 1 val\)"


def _on_both_sides(folds):
    case = folds[1]["val"][0]
    folds[1]["train"].append(case)
    return rf"fold 1 has case\(s\) on both sides: {case}; keep each in either"


def _listed_twice(folds):
    folds[0]["train"].append(folds[0]["train"][0])
    return rf"fold 0 lists case\(s\) {folds[0]['train'][0]} more than once in train"


@pytest.mark.parametrize("edit", [_in_two_val_sets, _left_out_of_train, _unknown_case,
                                  _on_both_sides, _listed_twice])
def test_hand_edited_splits_json_is_checked_per_case_and_fold(tmp_path, edit):
    folds = load_or_create_splits(tmp_path, IDS, n_folds=3)
    message = edit(folds)
    (tmp_path / "splits.json").write_text(json.dumps(folds))
    with pytest.raises(ValueError, match=message) as raised:
        load_or_create_splits(tmp_path, IDS, n_folds=3)
    assert str(raised.value).startswith(f"{tmp_path / 'splits.json'}: ")


def test_hand_edited_splits_json_that_is_consistent_is_used(tmp_path):
    folds = load_or_create_splits(tmp_path, IDS, n_folds=3)
    moved = folds[0]["val"].pop()  # validate it in fold 1 instead of fold 0
    folds[0]["train"].append(moved)
    folds[1]["train"].remove(moved)
    folds[1]["val"].append(moved)
    (tmp_path / "splits.json").write_text(json.dumps(folds))
    assert load_or_create_splits(tmp_path, IDS, n_folds=3) == folds

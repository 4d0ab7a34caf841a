"""Reading a study folder: study.json, the CSV files and the per-split matrices."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from segmentation.study.inputs import (
    StudyPlan,
    read_curves,
    read_results,
    read_runs,
    split_scores,
)
from segmentation.study.statistics import paired_differences
from tests.study.fake_study import (
    COPY,
    FAMILY_REFERENCES,
    FOLDS,
    LOWER,
    PARTIAL,
    REFERENCE,
    SEEDS,
    VARIANTS,
    write_study,
)


def _plan_file(tmp_path: Path, **extra: object) -> Path:
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"name": "x", "reference": "a", "variants": ["a", "b", "c", "d"],
                                "seeds": [0], "folds": [0, 1], "classes": ["liver"], **extra}))
    return path


def test_without_references_every_variant_is_compared_with_the_reference(tmp_path: Path) -> None:
    plan = StudyPlan.load(_plan_file(tmp_path))
    assert plan.pairs() == [("b", "a"), ("c", "a"), ("d", "a")]
    assert plan.reference_of("a") is None
    direct = StudyPlan("x", "a", ("a", "b"), (0,), (0,), ("liver",))  # references None
    assert direct.pairs() == [("b", "a")]


def test_per_variant_references(tmp_path: Path) -> None:
    plan = StudyPlan.load(_plan_file(tmp_path, references={"d": "c", "a": "a", **{
        k: v for k, v in FAMILY_REFERENCES.items() if k != "d"}}))
    assert plan.pairs() == [("b", "a"), ("c", "a"), ("d", "c")]  # display order, a: itself
    assert plan.reference_of("d") == "c" and plan.reference_of("a") is None
    # a variant absent from references is compared with none
    assert StudyPlan.load(_plan_file(tmp_path, references={"b": "a"})).pairs() == [("b", "a")]


@pytest.mark.parametrize(("extra", "message"), [
    ({"references": {"b": "e"}}, "the reference 'e' of 'b' is not one of the variants"),
    ({"references": {"e": "a"}}, "references name 'e'"),
    ({"references": ["b", "a"]}, "references must map"),
    ({"reference": "e"}, "reference 'e' is not one of the variants"),
])
def test_bad_references_are_refused(tmp_path: Path, extra: dict, message: str) -> None:
    path = _plan_file(tmp_path, **extra)
    with pytest.raises(ValueError, match=message) as error:
        StudyPlan.load(path)
    assert "study.json" in str(error.value)


def test_missing_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"name": "x", "reference": "a", "variants": ["a"]}))
    with pytest.raises(ValueError, match="missing key 'seeds'"):
        StudyPlan.load(path)


def test_absent_files_give_nothing(tmp_path: Path) -> None:
    assert read_runs(tmp_path / "runs.csv") == []
    assert read_results(tmp_path / "results.csv") == []
    assert read_curves(tmp_path / "curves.csv") == []


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyPlan, list]:
    root = write_study(tmp_path_factory.mktemp("inputs") / "fake")
    plan = StudyPlan.load(root / "study.json")
    return plan, [s for s in read_results(root / "results.csv") if s.run != PARTIAL]


def test_val_split_has_one_fold_per_case_and_seed(study) -> None:
    plan, scores = study
    val = split_scores(scores, plan, "val")
    assert len(val.cases) == 16 and val.seeds == (0, 1)
    # the copy lacks seed 1 of the fold-1 cases (run to do): those cases pair on seed 0 only
    copy = val.dice[(COPY, "liver")]
    fold_one = np.array([int(case[-2:]) % 2 == 1 for case in val.cases])
    assert np.isnan(copy[fold_one, 1]).all() and not np.isnan(copy[:, 0]).any()
    reference = val.dice[(REFERENCE, "liver")]
    assert paired_differences(copy, reference) == pytest.approx(np.zeros(16))
    # a class absent from prediction and reference: NaN Dice, but scored
    assert math.isnan(val.dice[(REFERENCE, "tumour")][0, 0])
    assert val.scored[(REFERENCE, "tumour")][0, 0]
    assert val.hd95[(REFERENCE, "liver")][2, 0] == math.inf
    # the mean pseudo-class: the liver alone where the tumour is NaN
    liver = val.dice[(REFERENCE, "liver")][0, 0]
    assert val.dice[(REFERENCE, "mean")][0, 0] == pytest.approx(liver)


def test_test_split_averages_folds(study) -> None:
    plan, scores = study
    extra = []
    for variant in VARIANTS:
        for seed in SEEDS:
            for fold in FOLDS:
                for case in ("test_a", "test_b", "test_c"):
                    value = 0.8 + 0.01 * fold - 0.1 * (variant == LOWER)
                    extra.append(scores[0]._replace(split="test", variant=variant, seed=seed,
                                                    fold=fold, case=case, cls="liver",
                                                    dice=value))
    missing = {(COPY, 1, 1), (LOWER, 0, 1)}
    test = split_scores(scores + [s for s in extra if s.run not in missing], plan, "test")
    assert test.cases == ("test_a", "test_b", "test_c")
    assert test.dice[(REFERENCE, "liver")] == pytest.approx(np.full((3, 2), 0.805))
    assert test.dice[(LOWER, "liver")][:, 0] == pytest.approx(np.full(3, 0.7))  # fold 0
    assert test.has_results(COPY)


def test_unplanned_rows_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "fold", "split", "case", "class", "dice", "hd95"])
        writer.writerow(["a", 0, 0, "val", "c1", "liver", "0.5", ""])
        writer.writerow(["zzz", 0, 0, "val", "c1", "liver", "0.9", "1"])
        writer.writerow(["a", 7, 0, "val", "c1", "liver", "0.9", "1"])
    plan = StudyPlan("x", "a", ("a",), (0,), (0,), ("liver",))
    val = split_scores(read_results(path), plan, "val")
    assert val.dice[("a", "liver")].tolist() == [[0.5]]
    assert math.isnan(val.hd95[("a", "liver")][0, 0])

"""Validation cases gathered from every process: each case once, sorted."""

from __future__ import annotations

from segmentation.evaluation.metrics import mean_per_class
from segmentation.training.gather import gather_cases


def test_cases_are_deduplicated_and_sorted_and_means_skip_nan():
    rows = [{"case_id": "b", "dice": [0.5, float("nan")]},
            {"case_id": "a", "dice": [1.0, 0.25]},
            {"case_id": "b", "dice": [0.5, float("nan")]}]  # repeated by a padded sampler
    gathered = gather_cases(rows)
    assert [row["case_id"] for row in gathered] == ["a", "b"]
    assert mean_per_class(gathered, "dice", ["x", "y"]) == {"x": 0.75, "y": 0.25}
    assert mean_per_class([], "dice", ["x"]) == {}

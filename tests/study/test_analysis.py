"""The analysis of a study: comparisons against per-variant references, verdicts, costs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from segmentation.study.analysis import (
    compare,
    coverage_notes,
    curve_bands,
    missing_runs,
    run_costs,
    summarise,
    verdict,
)
from segmentation.study.inputs import Run, Score, StudyPlan, read_results, split_scores
from tests.study.fake_study import FAMILY_OFFSETS, write_family_study

RESAMPLES = 500


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory):
    root = write_family_study(tmp_path_factory.mktemp("analysis") / "families")
    plan = StudyPlan.load(root / "study.json")
    scores = read_results(root / "results.csv")
    return plan, scores, split_scores(scores, plan, "val")


def test_each_variant_is_compared_with_its_reference(families) -> None:
    plan, _, val = families
    comparisons = compare(val, plan, resamples=RESAMPLES, seed=0)
    assert [(c.variant, c.reference, c.cls) for c in comparisons] == [
        (v, r, c) for v, r in (("b", "a"), ("c", "a"), ("d", "c"))
        for c in ("liver", "tumour", "mean")]
    for c in comparisons:
        expected = FAMILY_OFFSETS[c.variant] - FAMILY_OFFSETS[c.reference]
        assert c.difference == pytest.approx(expected, abs=0.005), (c.variant, c.cls)
        assert c.n_pairs == 12
    d = [c for c in comparisons if c.variant == "d"]
    assert all(c.verdict.startswith("lower") for c in d)  # d − c < 0 although d − a > 0
    # Holm over the whole family of 9: 9 × the smallest possible two-sided p of 12 pairs
    assert min(c.holm_p for c in comparisons) == pytest.approx(9 * min(c.p for c in comparisons))


def test_reference_without_results(families) -> None:
    plan, scores, _ = families
    val = split_scores([s for s in scores if s.variant != "c"], plan, "val")
    comparisons = compare(val, plan, resamples=RESAMPLES, seed=0)
    verdicts = {c.variant: c.verdict for c in comparisons}
    assert verdicts == {"b": "lower, significant (Holm p < 0.05)", "c": "no results yet",
                        "d": "reference has no results"}
    assert all(math.isnan(c.p) for c in comparisons if c.variant != "b")
    summary = summarise(val, plan, resamples=RESAMPLES, seed=0)
    assert {row.note for row in summary if row.variant == "d"} == {""}


def test_coverage_is_checked_against_each_reference(families) -> None:
    plan, scores, _ = families
    cases = sorted({s.case for s in scores})
    kept = [s for s in scores if not (s.variant == "c" and s.case in cases[:4])]
    val = split_scores(kept, plan, "val")
    notes = coverage_notes(val, plan)
    assert notes == [
        "validation folds: `c` has results for 8 cases, the reference `a` for 12; comparisons "
        "pair only the 8 cases both have.",
        "validation folds: `d` has results for 12 cases, the reference `c` for 8; comparisons "
        "pair only the 8 cases both have."]
    summary = summarise(val, plan, resamples=RESAMPLES, seed=0)
    notes = {row.variant: row.note for row in summary if row.cls == "liver"}
    assert notes == {"a": "", "b": "", "c": "n cases differ from its reference a (12)",
                     "d": "n cases differ from its reference c (8)"}
    by_pair = {c.variant: c.n_pairs for c in compare(val, plan, resamples=RESAMPLES, seed=0)}
    assert by_pair == {"b": 12, "c": 8, "d": 8}


def test_verdicts() -> None:
    assert verdict(-0.01, 0.02, 0.001) == "no detectable difference"
    assert verdict(0.01, 0.05, 0.01) == "higher, significant (Holm p < 0.05)"
    assert verdict(-0.05, -0.01, 0.2) == "lower, not significant (Holm p ≥ 0.05)"
    assert verdict(math.nan, math.nan, math.nan) == "no pairs"


def test_costs_and_missing_runs() -> None:
    plan = StudyPlan("x", "a", ("a", "b"), (0,), (0, 1), ("liver",))
    runs = [Run("a", 0, 0, "done", params=10, flops_per_patch=2e9, train_seconds=60,
                peak_memory_mb=100, device="H200"),
            Run("a", 0, 1, "done", params=12, train_seconds=120, peak_memory_mb=300,
                device="A100"),
            Run("b", 0, 0, "failed", error="boom")]
    costs = run_costs(plan, runs)
    assert costs[0].params == (10, 12) and costs[0].flops_per_patch == (2e9, 2e9)
    assert costs[0].mean_train_seconds == 90 and costs[0].max_peak_memory_mb == 300
    assert costs[0].devices == ("A100", "H200") and costs[0].runs_planned == 2
    assert costs[1].runs_done == 0 and costs[1].params is None
    scored = [Score("val", "b", 0, 1, "c1", "liver", 0.5, 1.0)]
    assert [(r.key, r.state) for r in missing_runs(plan, runs, scored)] == [
        (("b", 0, 0), "failed")]
    assert [(r.key, r.state) for r in missing_runs(plan, runs, [])] == [
        (("b", 0, 0), "failed"), (("b", 0, 1), "not in runs.csv")]


def test_curve_bands(tmp_path: Path) -> None:
    plan = StudyPlan("x", "a", ("a", "b"), (0, 1), (0, 1), ("liver",))
    curves = [("a", 0, 0, 100, 0.4), ("a", 0, 1, 100, 0.6), ("a", 1, 0, 100, 0.7),
              ("a", 1, 1, 100, 0.1), ("b", 0, 0, 100, 0.9), ("zzz", 0, 0, 100, 0.9)]
    bands = curve_bands(curves, plan, excluded={("a", 1, 1)})
    steps, mean, low, high = bands["a"]
    assert steps.tolist() == [100] and (low[0], high[0]) == (0.5, 0.7)
    assert mean[0] == pytest.approx(0.6)
    assert list(bands) == ["a", "b"]
    assert np.array_equal(bands["b"][1], [0.9])

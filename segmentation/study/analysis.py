"""The analysis of a study: Dice summaries, paired comparisons, costs, coverage, curve bands.

Works on the inputs of :mod:`segmentation.study.inputs` and the statistics of
:mod:`segmentation.study.statistics`, without I/O:

* :func:`summarise`: per variant and class, mean Dice with its nested-bootstrap CI, the SD over
  seeds and HD95 (:class:`SummaryRow`).
* :func:`compare`: every variant against its own reference (``StudyPlan.reference_of``), per
  class: paired difference, CI, Wilcoxon and Holm p, wins / ties / losses and
  :func:`verdict` (:class:`Comparison`).
* :func:`run_costs` (:class:`Cost`) and :func:`missing_runs` from ``runs.csv``.
* :func:`coverage_notes`, :func:`excluded_notes`, :func:`ignored_notes`: warnings for the report.
* :func:`curve_bands`: validation curves per variant, mean and band over seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from segmentation.study.inputs import (
    DONE,
    RESULTS_FILE,
    SPLIT_TITLES,
    SPLITS,
    STUDY_FILE,
    Run,
    RunKey,
    Score,
    SplitScores,
    StudyPlan,
)
from segmentation.study.statistics import (
    holm,
    nested_bootstrap_ci,
    paired_bootstrap_ci,
    paired_differences,
    seed_sd,
    wilcoxon_p,
    wins_ties_losses,
)

if TYPE_CHECKING:
    from segmentation.study.figures import CurveBand

CONFIDENCE = 0.95
ALPHA = 0.05
TIE = 1e-6
"""Absolute Dice difference up to which a case counts as a tie in wins/ties/losses."""
NO_RESULTS = "no results yet"
REFERENCE_WITHOUT_RESULTS = "reference has no results"
NO_PAIRS = "no pairs"
NO_DIFFERENCE = "no detectable difference"


@dataclass(frozen=True)
class SummaryRow:
    """Dice and HD95 of one variant and class in one split (numbers NaN without results)."""

    split: str
    variant: str
    cls: str
    n_cases: int
    mean: float
    low: float
    high: float
    sd_seeds: float
    hd95_median: float
    hd95_inf: int
    hd95_nan: int
    note: str


@dataclass(frozen=True)
class Comparison:
    """One variant against its reference for one class in one split (Dice, variant − ref)."""

    split: str
    variant: str
    reference: str
    cls: str
    n_pairs: int
    difference: float
    low: float
    high: float
    p: float
    holm_p: float
    wins: int
    ties: int
    losses: int
    verdict: str


@dataclass(frozen=True)
class Cost:
    """Training cost of one variant over its ``done`` runs (None where no run reports it)."""

    variant: str
    runs_done: int
    runs_planned: int
    params: tuple[float, float] | None
    flops_per_patch: tuple[float, float] | None
    mean_train_seconds: float | None
    max_peak_memory_mb: float | None
    devices: tuple[str, ...]


def summarise(scores: SplitScores, plan: StudyPlan, *, resamples: int,
              seed: int) -> list[SummaryRow]:
    """Per variant and class: n cases, mean Dice with nested-bootstrap CI, seed SD, HD95.

    A class whose number of cases differs from that of the variant's reference is flagged in
    ``note``.
    """
    rows = []
    for variant in plan.variants:
        for cls in plan.classes_with_mean:
            rows.append(_summary_row(scores, plan, variant, cls, resamples=resamples, seed=seed))
    return rows


def _n_cases(scores: SplitScores, variant: str, cls: str) -> int:
    return int((~np.isnan(scores.dice[(variant, cls)])).any(axis=1).sum())


def _summary_row(scores: SplitScores, plan: StudyPlan, variant: str, cls: str, *,
                 resamples: int, seed: int) -> SummaryRow:
    if not scores.has_results(variant):
        return SummaryRow(scores.split, variant, cls, 0, math.nan, math.nan, math.nan, math.nan,
                          math.nan, 0, 0, NO_RESULTS)
    dice = scores.dice[(variant, cls)]
    estimate, low, high = nested_bootstrap_ci(dice, resamples=resamples, confidence=CONFIDENCE,
                                              seed=seed)
    hd95 = scores.hd95[(variant, cls)][scores.scored[(variant, cls)]]
    finite = hd95[np.isfinite(hd95)]
    n_cases = _n_cases(scores, variant, cls)
    reference = plan.reference_of(variant)
    note = ""
    if reference is not None and scores.has_results(reference):
        n_reference = _n_cases(scores, reference, cls)
        if n_cases != n_reference:
            note = f"n cases differ from its reference {reference} ({n_reference})"
    return SummaryRow(scores.split, variant, cls, n_cases, estimate, low, high, seed_sd(dice),
                      float(np.median(finite)) if finite.size else math.nan,
                      int(np.isinf(hd95).sum()), int(np.isnan(hd95).sum()), note)


def verdict(low: float, high: float, holm_p: float) -> str:
    """The verdict of one comparison from its CI and Holm-adjusted p-value.

    "no detectable difference" when the CI includes 0; otherwise "higher" or "lower" (than the
    reference) with whether the Holm-adjusted Wilcoxon p is below 0.05. A difference is never
    called significant from the means alone.
    """
    if math.isnan(low) or math.isnan(high):
        return NO_PAIRS
    if low <= 0.0 <= high:
        return NO_DIFFERENCE
    direction = "higher" if low > 0.0 else "lower"
    if holm_p < ALPHA:
        return f"{direction}, significant (Holm p < {ALPHA:g})"
    return f"{direction}, not significant (Holm p ≥ {ALPHA:g})"


def compare(scores: SplitScores, plan: StudyPlan, *, resamples: int,
            seed: int) -> list[Comparison]:
    """Every compared variant against its own reference, per class (``mean`` included).

    Per case, the Dice difference variant − reference averaged over the seeds both have;
    case-bootstrap CI of the mean difference; two-sided Wilcoxon signed-rank p; Holm-adjusted
    over every comparison of this split that has at least one pair (the Holm family).
    """
    pending: list[tuple[str, str, str, int, float, float, float, float,
                        tuple[int, int, int]]] = []
    for variant, reference in plan.pairs():
        for cls in plan.classes_with_mean:
            if not (scores.has_results(variant) and scores.has_results(reference)):
                pending.append((variant, reference, cls, 0, *(math.nan,) * 4, (0, 0, 0)))
                continue
            differences = paired_differences(scores.dice[(variant, cls)],
                                              scores.dice[(reference, cls)])
            estimate, low, high = paired_bootstrap_ci(differences, resamples=resamples,
                                                      confidence=CONFIDENCE, seed=seed)
            p = wilcoxon_p(differences) if differences.size else math.nan
            pending.append((variant, reference, cls, int(differences.size), estimate, low, high,
                            p, wins_ties_losses(differences, tie=TIE)))
    adjusted = holm([row[7] for row in pending]) if pending else np.array([])
    comparisons = []
    for (variant, reference, cls, n, estimate, low, high, p, wtl), holm_p in zip(
            pending, adjusted, strict=True):
        if not scores.has_results(variant):
            text = NO_RESULTS
        elif not scores.has_results(reference):
            text = REFERENCE_WITHOUT_RESULTS
        else:
            text = verdict(low, high, float(holm_p))
        comparisons.append(Comparison(scores.split, variant, reference, cls, n, estimate, low,
                                      high, p, float(holm_p), *wtl, text))
    return comparisons


def run_costs(plan: StudyPlan, runs: Sequence[Run]) -> list[Cost]:
    """Per variant: done runs, parameters, FLOPs per patch, mean train time, max peak memory."""
    costs = []
    for variant in plan.variants:
        done = [run for run in runs if run.variant == variant and run.state == DONE]

        def values(name: str, runs_done: list[Run] = done) -> list[float]:
            return [getattr(run, name) for run in runs_done if getattr(run, name) is not None]

        params, flops = values("params"), values("flops_per_patch")
        seconds, memory = values("train_seconds"), values("peak_memory_mb")
        costs.append(Cost(variant=variant, runs_done=len(done),
                          runs_planned=len(plan.seeds) * len(plan.folds),
                          params=(min(params), max(params)) if params else None,
                          flops_per_patch=(min(flops), max(flops)) if flops else None,
                          mean_train_seconds=float(np.mean(seconds)) if seconds else None,
                          max_peak_memory_mb=max(memory) if memory else None,
                          devices=tuple(sorted({run.device for run in done if run.device}))))
    return costs


def missing_runs(plan: StudyPlan, runs: Sequence[Run], scores: Sequence[Score]) -> list[Run]:
    """Planned runs that are not done: ``runs.csv`` rows not ``done``, then unlisted runs.

    A planned run that ``runs.csv`` does not list is missing (state ``not in runs.csv``) unless
    it has results.
    """
    missing = [run for run in runs if run.state != DONE]
    listed = {run.key for run in runs}
    with_results = {s.run for s in scores}
    missing += [Run(*key, state="not in runs.csv") for key in plan.run_keys()
                if key not in listed and key not in with_results]
    return missing


def coverage_notes(scores: SplitScores, plan: StudyPlan) -> list[str]:
    """Variants whose cases or case × seed results differ from their reference's, in one split."""
    title = SPLIT_TITLES.get(scores.split, scores.split)
    notes = []
    for variant, reference in plan.pairs():
        if not (scores.has_results(reference) and scores.has_results(variant)):
            continue
        present, ref_present = scores.present(variant), scores.present(reference)
        cases, ref_cases = present.any(axis=1), ref_present.any(axis=1)
        if not np.array_equal(cases, ref_cases):
            notes.append(f"{title}: `{variant}` has results for {int(cases.sum())} cases, the "
                         f"reference `{reference}` for {int(ref_cases.sum())}; comparisons pair "
                         f"only the {int((cases & ref_cases).sum())} cases both have.")
        elif not np.array_equal(present, ref_present):
            notes.append(f"{title}: `{variant}` has {int(present.sum())} case × seed results, "
                         f"the reference `{reference}` {int(ref_present.sum())} (missing or "
                         "excluded runs); each case's difference uses only the seeds both have.")
    return notes


def excluded_notes(scores: Sequence[Score], runs: Sequence[Run]) -> list[str]:
    """One note per run whose results are left out because ``runs.csv`` says it is not done."""
    not_done = {run.key: run.state for run in runs if run.state != DONE}
    left_out = sorted({s.run for s in scores if s.run in not_done})
    return [f"Results of `{v}` seed {s} fold {f} are left out: the run is {not_done[(v, s, f)]}."
            for v, s, f in left_out]


def ignored_notes(scores: Sequence[Score], plan: StudyPlan) -> list[str]:
    """A note on the rows of ``results.csv`` that ``study.json`` does not plan, if any."""
    planned = (set(plan.variants), set(plan.seeds), set(plan.folds), set(plan.classes),
               set(SPLITS))
    ignored = sum(1 for s in scores if not all(
        key in names for key, names in zip((s.variant, s.seed, s.fold, s.cls, s.split), planned,
                                           strict=True)))
    if not ignored:
        return []
    return [f"{ignored} rows of `{RESULTS_FILE}` name a variant, seed, fold, class or split "
            f"that `{STUDY_FILE}` does not plan; they are ignored."]


def curve_bands(curves: Iterable[tuple[str, int, int, float, float]], plan: StudyPlan,
                excluded: set[RunKey]) -> dict[str, CurveBand]:
    """Per variant: validation Dice per step, mean over seeds with the min–max band over seeds.

    Each seed's curve is first the mean over its folds at each step (the folds that logged the
    step). Runs in ``excluded`` (not done) and unplanned variants are left out.
    """
    per_seed: dict[str, dict[int, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for variant, seed, fold, step, dice in curves:
        if variant in plan.variants and (variant, seed, fold) not in excluded:
            per_seed[variant][seed][step].append(dice)
    bands = {}
    for variant in plan.variants:
        if variant not in per_seed:
            continue
        seeds = per_seed[variant]
        steps = sorted({step for by_step in seeds.values() for step in by_step})
        at_step = [[float(np.mean(by_step[step])) for by_step in seeds.values() if step in by_step]
                   for step in steps]
        bands[variant] = (np.array(steps), np.array([np.mean(v) for v in at_step]),
                          np.array([min(v) for v in at_step]), np.array([max(v) for v in at_step]))
    return bands

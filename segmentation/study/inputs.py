"""The inputs of a study report: ``study.json``, ``runs.csv``, ``results.csv``, ``curves.csv``.

Files in the study folder (written by the study runner):

* ``study.json``: name, main reference variant, per-variant references, variants (display
  order), seeds, folds, classes (:class:`StudyPlan`).
* ``results.csv``: one row per (run, case, class): ``variant,seed,fold,split,case,class,dice,
  hd95``; ``split`` is ``val`` (the run's cross-validation fold) or ``test`` (held-out cases,
  scored by every run); ``dice`` NaN for a class absent from prediction and reference
  (:class:`Score`, :func:`read_results`).
* ``runs.csv``: one row per planned run with its state and costs (:class:`Run`,
  :func:`read_runs`).
* ``curves.csv`` (optional): validation mean Dice per training step of every run
  (:func:`read_curves`).

:func:`split_scores` arranges the scores of one split as (cases × seeds) matrices per variant
and class (:class:`SplitScores`), the input of every statistic.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

STUDY_FILE = "study.json"
RESULTS_FILE = "results.csv"
RUNS_FILE = "runs.csv"
CURVES_FILE = "curves.csv"

MEAN_CLASS = "mean"
"""Pseudo-class: per (run, case) the mean Dice over the foreground classes that have one."""
SPLITS = ("val", "test")
SPLIT_TITLES = {"val": "validation folds", "test": "held-out test set"}
DONE = "done"

RunKey = tuple[str, int, int]
"""(variant, seed, fold) of one training run."""


@dataclass(frozen=True)
class StudyPlan:
    """The contents of ``study.json``: what the study trains and compares.

    Attributes:
        name: the study's name.
        reference: the study's main reference variant.
        variants: every variant, in display order.
        seeds: the training seeds.
        folds: the cross-validation folds.
        classes: the foreground classes.
        references: variant → the variant it is compared with; a variant that is absent (or
            maps to itself) is compared with none. None: every variant other than
            ``reference`` is compared with ``reference``.
    """

    name: str
    reference: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    folds: tuple[int, ...]
    classes: tuple[str, ...]
    references: Mapping[str, str] | None = None

    @classmethod
    def load(cls, path: str | Path) -> StudyPlan:
        """Read ``study.json``.

        Without a ``references`` key every variant other than ``reference`` is compared with
        ``reference``.

        Raises:
            OSError: if the file cannot be read.
            ValueError: if it is not valid JSON, lacks a key, or the reference or a
                per-variant reference (or a variant that has one) is not a variant.
        """
        try:
            data = json.loads(Path(path).read_text())
            plan = cls(name=str(data["name"]), reference=str(data["reference"]),
                       variants=tuple(str(v) for v in data["variants"]),
                       seeds=tuple(int(s) for s in data["seeds"]),
                       folds=tuple(int(f) for f in data["folds"]),
                       classes=tuple(str(c) for c in data["classes"]))
        except KeyError as err:
            raise ValueError(f"{path}: missing key {err}") from err
        if plan.reference not in plan.variants:
            raise ValueError(f"{path}: reference {plan.reference!r} is not one of the variants")
        return replace(plan, references=_references(data.get("references"), plan, path))

    @property
    def classes_with_mean(self) -> tuple[str, ...]:
        """The foreground classes followed by the ``mean`` pseudo-class."""
        return (*self.classes, MEAN_CLASS)

    def reference_of(self, variant: str) -> str | None:
        """The variant that ``variant`` is compared with; None if it is compared with none."""
        if self.references is None:
            return None if variant == self.reference else self.reference
        reference = self.references.get(variant)
        return None if reference == variant else reference

    def pairs(self) -> list[tuple[str, str]]:
        """(variant, its reference) of every compared variant, in display order."""
        return [(variant, reference) for variant in self.variants
                if (reference := self.reference_of(variant)) is not None]

    def run_keys(self) -> list[RunKey]:
        """Every planned run: variants × seeds × folds, in that nesting order."""
        return [(v, s, f) for v in self.variants for s in self.seeds for f in self.folds]


def _references(data: object, plan: StudyPlan, path: str | Path) -> dict[str, str]:
    """The per-variant references of ``study.json`` in display order, self-references left out.

    Raises:
        ValueError: if ``data`` is not a mapping, or a key or value is not a variant.
    """
    if data is None:
        return {v: plan.reference for v in plan.variants if v != plan.reference}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: references must map each variant to its reference")
    references = {str(variant): str(reference) for variant, reference in data.items()}
    for variant, reference in references.items():
        if variant not in plan.variants:
            raise ValueError(f"{path}: references name {variant!r}, which is not one of the "
                             "variants")
        if reference not in plan.variants:
            raise ValueError(f"{path}: the reference {reference!r} of {variant!r} is not one of "
                             "the variants")
    return {v: references[v] for v in plan.variants if references.get(v, v) != v}


@dataclass(frozen=True)
class Run:
    """One row of ``runs.csv``; numbers are None where the row has none."""

    variant: str
    seed: int
    fold: int
    state: str
    params: float | None = None
    flops_per_patch: float | None = None
    train_seconds: float | None = None
    peak_memory_mb: float | None = None
    device: str = ""
    error: str = ""

    @property
    def key(self) -> RunKey:
        """(variant, seed, fold)."""
        return self.variant, self.seed, self.fold


class Score(NamedTuple):
    """One row of ``results.csv``."""

    split: str
    variant: str
    seed: int
    fold: int
    case: str
    cls: str
    dice: float
    hd95: float

    @property
    def run(self) -> RunKey:
        """(variant, seed, fold) of the run that scored it."""
        return self.variant, self.seed, self.fold


def _number(text: str | None) -> float | None:
    """A finite number from a CSV cell, None for an empty, NaN or unreadable one."""
    try:
        value = float(text) if text and text.strip() else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _score(text: str | None) -> float:
    """A score from a CSV cell: ``nan`` and ``inf`` kept, empty or unreadable → NaN."""
    try:
        return float(text) if text and text.strip() else math.nan
    except ValueError:
        return math.nan


def _rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header; none if it is missing or empty."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_runs(path: str | Path) -> list[Run]:
    """Read ``runs.csv``; an absent file gives no runs.

    Raises:
        KeyError, ValueError: for a row without variant, seed, fold or state, or a seed or fold
            that is not an integer.
    """
    return [Run(variant=row["variant"], seed=int(row["seed"]), fold=int(row["fold"]),
                state=row["state"].strip(), params=_number(row.get("params")),
                flops_per_patch=_number(row.get("flops_per_patch")),
                train_seconds=_number(row.get("train_seconds")),
                peak_memory_mb=_number(row.get("peak_memory_mb")),
                device=(row.get("device") or "").strip(), error=(row.get("error") or "").strip())
            for row in _rows(Path(path))]


def read_results(path: str | Path) -> list[Score]:
    """Read ``results.csv``; an absent or empty file gives no scores.

    Raises:
        KeyError, ValueError: for a row without one of the columns, or a seed or fold that is
            not an integer.
    """
    return [Score(split=row["split"].strip(), variant=row["variant"], seed=int(row["seed"]),
                  fold=int(row["fold"]), case=row["case"], cls=row["class"],
                  dice=_score(row["dice"]), hd95=_score(row["hd95"]))
            for row in _rows(Path(path))]


def read_curves(path: str | Path) -> list[tuple[str, int, int, float, float]]:
    """Read ``curves.csv`` as (variant, seed, fold, step, val_dice); absent or empty: none.

    Rows without a finite step or Dice are skipped.
    """
    curves = []
    for row in _rows(Path(path)):
        step, dice = _number(row.get("step")), _number(row.get("val_dice"))
        if step is not None and dice is not None:
            curves.append((row["variant"], int(row["seed"]), int(row["fold"]), step, dice))
    return curves


@dataclass(frozen=True)
class SplitScores:
    """Per-case scores of one split as matrices of shape (cases, seeds).

    For a case and seed the value is the mean over the folds whose run scored that case: for
    ``val`` exactly one fold (the case's cross-validation fold), for ``test`` every fold's model
    (so the matrix holds, per seed, the mean over the fold models). Dice NaN values (class
    absent from prediction and reference) are left out of every mean; an inf HD95 stays inf.

    Attributes:
        split: ``val`` or ``test``.
        cases: case ids of the rows, sorted.
        seeds: seeds of the columns, as in ``study.json``.
        dice: (variant, class) → Dice of shape (cases, seeds), NaN where there is none.
        hd95: (variant, class) → HD95 of shape (cases, seeds), NaN where there is none.
        scored: (variant, class) → bool of shape (cases, seeds): a row exists for it.
    """

    split: str
    cases: tuple[str, ...]
    seeds: tuple[int, ...]
    dice: dict[tuple[str, str], np.ndarray]
    hd95: dict[tuple[str, str], np.ndarray]
    scored: dict[tuple[str, str], np.ndarray]

    def present(self, variant: str) -> np.ndarray:
        """Bool of shape (cases, seeds): the variant has some result for that case and seed."""
        return self.scored[(variant, MEAN_CLASS)]

    def has_results(self, variant: str) -> bool:
        """Whether the variant has any result in this split."""
        return bool(self.present(variant).any())


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN (inf kept), NaN where all are NaN, without warnings."""
    present = ~np.isnan(values)
    counts = present.sum(axis=axis)
    sums = np.where(present, values, 0.0).sum(axis=axis)
    means = np.full(counts.shape, np.nan)
    np.divide(sums, counts, out=means, where=counts > 0)
    return means


def split_scores(scores: Sequence[Score], plan: StudyPlan, split: str) -> SplitScores:
    """The (cases, seeds) matrices of one split (see :class:`SplitScores`).

    Scores of variants, seeds, folds or classes that ``study.json`` does not plan are ignored.
    The ``mean`` pseudo-class is computed per (run, case) as the mean over the foreground
    classes with a Dice (HD95 likewise), before the folds are averaged.
    """
    rows = [s for s in scores if s.split == split]
    cases = tuple(sorted({s.case for s in rows}))
    index = [{name: i for i, name in enumerate(names)}
             for names in (plan.variants, plan.classes, cases, plan.seeds, plan.folds)]
    shape = tuple(len(names) for names in index)  # (variants, classes, cases, seeds, folds)
    dice, hd95 = np.full(shape, np.nan), np.full(shape, np.nan)
    scored = np.zeros(shape, dtype=bool)
    for s in rows:
        keys = (s.variant, s.cls, s.case, s.seed, s.fold)
        if all(key in names for key, names in zip(keys, index, strict=True)):
            at = tuple(names[key] for key, names in zip(keys, index, strict=True))
            dice[at], hd95[at], scored[at] = s.dice, s.hd95, True
    dice = np.concatenate([dice, _nanmean(dice, axis=1)[:, None]], axis=1)
    hd95 = np.concatenate([hd95, _nanmean(hd95, axis=1)[:, None]], axis=1)
    scored = np.concatenate([scored, scored.any(axis=1, keepdims=True)], axis=1)
    dice, hd95, scored = _nanmean(dice, axis=-1), _nanmean(hd95, axis=-1), scored.any(axis=-1)
    keys = [(v, c) for v in plan.variants for c in plan.classes_with_mean]
    at = [(i, j) for i in range(len(plan.variants)) for j in range(len(plan.classes) + 1)]
    return SplitScores(split=split, cases=cases, seeds=plan.seeds,
                       dice={k: dice[ij] for k, ij in zip(keys, at, strict=True)},
                       hd95={k: hd95[ij] for k, ij in zip(keys, at, strict=True)},
                       scored={k: scored[ij] for k, ij in zip(keys, at, strict=True)})

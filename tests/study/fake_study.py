"""Small fake study folders for the tests of the study report."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

REFERENCE, LOWER, COPY = "all_skips", "no_skips", "copy"  # copy: the reference's values exactly
VARIANTS = [REFERENCE, LOWER, COPY]
SEEDS = [0, 1]
FOLDS = [0, 1]
CLASSES = ["liver", "tumour"]
CASES = [f"case_{i:02d}" for i in range(16)]  # the validation fold of case i is i % 2
TO_DO = (COPY, 1, 1)  # not trained yet: no results
PARTIAL = (LOWER, 0, 1)  # interrupted: wrote junk results that must be left out
RESULTS_HEADER = ["variant", "seed", "fold", "split", "case", "class", "dice", "hd95"]
RUNS_HEADER = ["variant", "seed", "fold", "state", "params", "flops_per_patch",
               "train_seconds", "peak_memory_mb", "device", "error"]

# Two families: b and c against a, d against c. Dice offsets from a, per variant.
FAMILY_REFERENCES = {"b": "a", "c": "a", "d": "c"}
FAMILY_OFFSETS = {"a": 0.0, "b": -0.1, "c": 0.05, "d": 0.03}  # so d − c = −0.02, d − a = +0.03


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _state(run: tuple[str, int, int], failed: frozenset[tuple[str, int, int]]) -> str:
    if run in failed:
        return "failed"
    return {TO_DO: "to do", PARTIAL: "partial"}.get(run, "done")


def _dice(variant: str, seed: int, noise: dict[tuple[str, int], np.ndarray],
          base: np.ndarray) -> np.ndarray:
    """Dice of shape (cases, classes): the copy equals the reference, LOWER is 0.1 lower."""
    if variant == LOWER:
        return base + noise[(LOWER, seed)] - 0.1
    return base + noise[(REFERENCE, seed)]


def write_study(root: Path, *, results: bool = True,
                failed: frozenset[tuple[str, int, int]] = frozenset()) -> Path:
    """3 variants × 2 seeds × 2 folds, 16 cases, 2 classes, a validation curve per run.

    ``study.json`` has no ``references``: every variant is compared with ``all_skips``.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({
        "name": "fake", "reference": REFERENCE, "variants": VARIANTS, "seeds": SEEDS,
        "folds": FOLDS, "classes": CLASSES}))
    rng = np.random.default_rng(0)
    base = rng.uniform(0.7, 0.9, size=(len(CASES), len(CLASSES)))
    noise = {(v, s): rng.normal(0, 0.01, size=base.shape) for v in (REFERENCE, LOWER)
             for s in SEEDS}
    rows, runs, curves = [], [], []
    for variant in VARIANTS:
        for seed in SEEDS:
            dice = _dice(variant, seed, noise, base)
            for fold in FOLDS:
                run = (variant, seed, fold)
                state = _state(run, failed)
                done = state == "done"
                runs.append([*run, state, 1_940_000 if variant != LOWER else 1_840_000,
                             12.5e9 if done else "", 3600 + 60 * seed if done else "",
                             2048 if done else "", "H200" if done else "",
                             "CUDA out of memory" if state == "failed" else ""])
                if state in ("to do", "failed"):
                    continue
                for i in range(fold, len(CASES), 2):
                    for j, cls in enumerate(CLASSES):
                        value = dice[i, j] if done else 0.0
                        rows.append([*run, "val", CASES[i], cls, f"{value:.6f}", 3.0 + i])
                if done:
                    curves += [[*run, step, 0.5 + step / 1000 + 0.01 * seed]
                               for step in (100, 200, 300)]
    # in every variant's seed-0 fold-0 run: a class absent from prediction and reference, and
    # an empty prediction (these later rows replace the earlier ones of the same run and case)
    for variant in VARIANTS:
        rows.append([variant, 0, 0, "val", "case_00", "tumour", "nan", "nan"])
        rows.append([variant, 0, 0, "val", "case_02", "liver", "0.0", "inf"])
    write_csv(root / "results.csv", RESULTS_HEADER, rows if results else [])
    write_csv(root / "runs.csv", RUNS_HEADER, runs)
    write_csv(root / "curves.csv", ["variant", "seed", "fold", "step", "val_dice"], curves)
    return root


def write_family_study(root: Path, *, references: Mapping[str, str] | None = None,
                       variants: list[str] | None = None,
                       offsets: Mapping[str, float] | None = None) -> Path:
    """Variants a, b, c, d (default references b, c → a, d → c), 2 seeds × 2 folds, 12 cases.

    Every run is done; Dice is a per-case base plus the variant's offset
    (:data:`FAMILY_OFFSETS`) plus a little noise per run. No ``runs.csv`` or ``curves.csv``.
    """
    variants = variants or list(FAMILY_OFFSETS)
    offsets = offsets or FAMILY_OFFSETS
    references = FAMILY_REFERENCES if references is None else references
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({
        "name": "families", "reference": variants[0], "references": dict(references),
        "variants": variants, "seeds": SEEDS, "folds": FOLDS, "classes": CLASSES}))
    rng = np.random.default_rng(1)
    cases = CASES[:12]
    base = rng.uniform(0.6, 0.8, size=(len(cases), len(CLASSES)))
    rows = []
    for variant in variants:
        for seed in SEEDS:
            dice = base + offsets[variant] + rng.normal(0, 0.003, size=base.shape)
            for fold in FOLDS:
                for i in range(fold, len(cases), 2):
                    for j, cls in enumerate(CLASSES):
                        rows.append([variant, seed, fold, "val", cases[i], cls,
                                     f"{dice[i, j]:.6f}", 2.0])
    write_csv(root / "results.csv", RESULTS_HEADER, rows)
    return root

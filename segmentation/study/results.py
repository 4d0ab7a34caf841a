"""Gather a study's runs into three long tables a reader can redo every number from.

From the study folder's plan.json and each run's files: ``results.csv`` (one row per run, case
and class: variant, seed, fold, split, case, class, dice, hd95), ``runs.csv`` (one row per
planned run: its state, size, training time and peak memory) and ``curves.csv`` (validation
Dice over training steps). Only runs marked done with the plan's settings contribute scores.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from segmentation.atomic import write_csv_atomic
from segmentation.study.folders import (
    DONE_JSON,
    FAILED_JSON,
    PLAN_JSON,
    SCORES_CSV,
    STUDY_JSON,
    Cell,
    cell_state,
    read_json,
)
from segmentation.study.scoring import read_scores

RESULTS_CSV, RUNS_CSV, CURVES_CSV = "results.csv", "runs.csv", "curves.csv"
RESULT_COLUMNS = ("variant", "seed", "fold", "split", "case", "class", "dice", "hd95")
RUN_COLUMNS = ("variant", "seed", "fold", "state", "params", "flops_per_patch", "train_seconds",
               "peak_memory_mb", "device", "error")
CURVE_COLUMNS = ("variant", "seed", "fold", "step", "val_dice")


def planned_cells(study_dir: Path) -> list[tuple[Cell, dict[str, Any]]]:
    """The runs of plan.json with their records (settings hash, size).

    Raises:
        ValueError: if the folder holds no study (no readable study.json and plan.json).
    """
    plan = read_json(study_dir / PLAN_JSON)
    if not plan.get("runs") or not (study_dir / STUDY_JSON).is_file():
        raise ValueError(f"{study_dir}: not a study folder (no {STUDY_JSON} and {PLAN_JSON}); "
                         "`segmentation study run STUDY.yaml` makes one")
    return [(Cell(r["variant"], int(r["seed"]), int(r["fold"]), study_dir / r["directory"]), r)
            for r in plan["runs"]]


def collect(study_dir: str | Path) -> dict[str, int]:
    """Write results.csv, runs.csv and curves.csv into the study folder.

    Returns:
        The number of runs in each state.
    """
    study_dir = Path(study_dir)
    results: list[list[Any]] = []
    runs: list[list[Any]] = []
    curves: list[list[Any]] = []
    states: dict[str, int] = {}
    for cell, record in planned_cells(study_dir):
        state = cell_state(cell, record["settings"])
        states[state] = states.get(state, 0) + 1
        key = [cell.variant, cell.seed, cell.fold]
        done = read_json(cell.directory / DONE_JSON) if state == "done" else {}
        if done:
            for row in read_scores(cell.directory / SCORES_CSV):
                results.append([*key, *(row[c] for c in RESULT_COLUMNS[3:])])
        peak = done.get("peak_gpu_mb") or done.get("peak_rss_mb")
        error = read_json(cell.directory / FAILED_JSON).get("error", "") if state == "failed" \
            else ""
        runs.append([*key, state, record.get("params"), record.get("flops_per_patch"),
                     done.get("train_seconds", ""), peak or "", done.get("device", ""), error])
        curves += [[*key, step, dice] for step, dice in validation_curve(cell.directory)]
    write_csv_atomic(study_dir / RESULTS_CSV, RESULT_COLUMNS, results)
    write_csv_atomic(study_dir / RUNS_CSV, RUN_COLUMNS, runs)
    write_csv_atomic(study_dir / CURVES_CSV, CURVE_COLUMNS, curves)
    return states


def validation_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val/dice) of every validation of a run, over all its versions (resumes)."""
    points: dict[int, float] = {}
    for metrics in sorted(run_dir.glob("version_*/metrics.csv")):
        with open(metrics, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/dice") and row.get("step"):
                    points[int(row["step"])] = float(row["val/dice"])
    return sorted(points.items())


"""The files of a study folder, and the state of a run read from them.

``runs/study/<study>/`` holds study.json (what the report needs: variants, references, seeds,
folds, classes) and plan.json (every run with its settings hash). Each run's folder
``<variant>/seed<S>-fold<F>/`` holds an ordinary fit run (``version_N/`` with config.yaml,
logs, checkpoints) plus the study's files: ``cell.json`` (what the run is and how it is
started), ``run.log``, ``attempts.json``, ``trained.json`` (the fit ended), ``scores.csv`` and
``done.json``, written last, after scoring; ``failed.json`` while the last attempt failed. A
run's state is read from these files, so a study can be stopped anywhere and resumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STUDY_JSON, PLAN_JSON = "study.json", "plan.json"
CELL_JSON, TRAINED_JSON, DONE_JSON, FAILED_JSON = ("cell.json", "trained.json", "done.json",
                                                   "failed.json")
ATTEMPTS_JSON, LOG_FILE, SCORES_CSV = "attempts.json", "run.log", "scores.csv"
STATES = ("done", "partial", "failed", "to do")


@dataclass(frozen=True)
class Cell:
    """One run of the study."""

    variant: str
    seed: int
    fold: int
    directory: Path

    @property
    def label(self) -> str:
        """How the run is named to the user."""
        return f"{self.variant} seed {self.seed} fold {self.fold}"


def cell_state(cell: Cell, settings: str | None = None) -> str:
    """"done", "failed" (the last attempt failed), "partial" (started) or "to do".

    A done.json written with other settings than ``settings`` does not count as done.
    """
    done = cell.directory / DONE_JSON
    if done.is_file() and (settings is None or read_json(done).get("settings") == settings):
        return "done"
    if (cell.directory / FAILED_JSON).is_file():
        return "failed"
    if (cell.directory / TRAINED_JSON).is_file() or any(cell.directory.glob("version_*")):
        return "partial"
    return "to do"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; an unreadable or malformed file reads as {}."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}

"""Where the outputs of ``segmentation infer`` came from: ``provenance.json``.

Every run into a folder appends its record, so the file answers "which checkpoint produced this
mask" for every output ever written there: the last run listing a file wrote it. The file is
rewritten atomically; one that cannot be read as such a record is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from segmentation.atomic import write_text_atomic

PROVENANCE_JSON = "provenance.json"


class ProvenanceError(ValueError):
    """An existing provenance.json that is not a record this command can extend."""


@dataclass
class CaseResult:
    """What happened to one scan."""

    case_id: str
    inputs: list[str]
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_record(checkpoint: Path | Sequence[Path], settings: dict[str, Any],
               results: Sequence[CaseResult], started: float) -> dict[str, Any]:
    """One run: checkpoint paths and hashes, settings, package versions, times, inputs, outputs.

    ``checkpoints`` lists every model (several for an ensemble); ``checkpoint`` and
    ``checkpoint_sha256`` name the first, as records of single models always have.
    """
    import monai

    import segmentation

    paths = [Path(checkpoint)] if isinstance(checkpoint, str | Path) else list(checkpoint)
    models = [{"path": str(p.resolve()), "sha256": sha256(p)} for p in paths]
    return {
        "checkpoint": models[0]["path"],
        "checkpoint_sha256": models[0]["sha256"],
        "checkpoints": models,
        "settings": settings,
        "versions": {"segmentation": segmentation.__version__, "torch": torch.__version__,
                     "monai": monai.__version__, "nibabel": nib.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime()),
        "seconds": round(time.time() - started, 3),
        "cases": [vars(r) for r in results],
    }


def read_runs(output_dir: Path) -> list[dict[str, Any]]:
    """The runs recorded in ``output_dir/provenance.json`` ([] without one).

    Raises:
        ProvenanceError: naming the file, if it exists but is not a provenance record.
    """
    path = output_dir / PROVENANCE_JSON
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProvenanceError(f"{path}: exists but cannot be read as a provenance record "
                              f"({error}); move it away, it is never replaced") from None
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return data["runs"]
    if isinstance(data, dict) and "checkpoint_sha256" in data:  # one run, as written before
        return [data]
    raise ProvenanceError(f"{path}: exists but is not a provenance record; move it away, it is "
                          "never replaced")


def append_run(output_dir: Path, record: dict[str, Any]) -> Path:
    """Add a run's record to ``provenance.json`` beside the outputs (atomic rewrite)."""
    runs = [*read_runs(output_dir), record]
    return write_text_atomic(json.dumps({"runs": runs}, indent=2),
                             output_dir / PROVENANCE_JSON)

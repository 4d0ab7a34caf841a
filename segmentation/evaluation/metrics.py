"""Per-case segmentation metrics as nnU-Net reports them, their means, and their CSV table.

One home for Dice: validation and ``test`` (on logits) and ``segmentation evaluate`` (on label
files) score the same way. Dice is counted per label value rather than with MONAI's
``compute_dice``, which needs a one-hot copy of both maps (K times the memory of a CT-sized
label map) and scores a class absent from both maps 1 or NaN for every case at once, where
nnU-Net's rule needs NaN only where neither map has the class.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from monai.networks.utils import one_hot

from segmentation.atomic import write_atomic

Labels = np.ndarray | torch.Tensor


def dice(prediction: Labels, reference: Labels, value: int) -> float:
    """Dice of one label value between two label maps of the same shape (numpy or torch).

    Returns:
        2·|P ∩ R| / (|P| + |R|) for the voxels P and R holding ``value``, in [0, 1]. As
        nnU-Net: NaN when the value is absent from both maps (left out of means), 0 when only
        the prediction has it (a false positive lowers the mean instead of disappearing).
    """
    p, r = prediction == value, reference == value
    total = int(p.sum()) + int(r.sum())
    return 2 * int((p & r).sum()) / total if total else math.nan


def case_metrics(logits: torch.Tensor, label: torch.Tensor, *, hd95: bool = False,
                 spacing: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Dice (and HD95) of every foreground class for every case of a batch.

    Args:
        logits: (B, K, *S).
        label: (B, 1, *S) integer labels.
        hd95: also compute the 95th-percentile Hausdorff distance (slow on large scans).
        spacing: voxel spacing for HD95 in mm.

    Returns:
        {"dice": (B, K − 1)} (and {"hd95": (B, K − 1)}, MONAI's NaN or inf where the label
        or the prediction lacks the class).
    """
    classes = logits.shape[1]
    prediction = logits.argmax(1, keepdim=True)                         # (B, 1, *S)
    values = [[dice(p, r, k) for k in range(1, classes)]
              for p, r in zip(prediction, label.long(), strict=True)]
    out = {"dice": torch.tensor(values, dtype=torch.float32).reshape(len(values), classes - 1)}
    if hd95:
        out["hd95"] = compute_hausdorff_distance(
            one_hot(prediction, classes), one_hot(label.long(), classes),
            include_background=False, percentile=95, spacing=spacing)
    return out


def mean_per_class(rows: Sequence[Mapping[str, Any]], key: str, names: Sequence[str]
                   ) -> dict[str, float]:
    """NaN-ignoring mean of ``row[key]`` (one value per class) over cases, by class name.

    ``rows`` are per-case ``{"case_id": ..., key: K − 1 values}``; ``names`` are the K − 1 class
    names in the order of the values. A class NaN in every case gets NaN; no rows give {}.
    """
    if not rows:
        return {}
    values = torch.tensor([list(row[key]) for row in rows], dtype=torch.float64)  # (cases, K−1)
    means = values.nanmean(0)
    return {name: float(m) for name, m in zip(names, means, strict=True)}


def write_case_table(path: str | Path, rows: Sequence[Mapping[str, Any]], names: Sequence[str],
                     keys: Sequence[str]) -> Path:
    """Per-case metrics as CSV, one line per case and class: case_id, class, *keys.

    ``rows`` are per-case ``{"case_id": ..., key: one value per class}``; ``names`` are the class
    names in the order of the values. Written atomically (a reader never sees half a table);
    returns ``path``.
    """
    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", "class", *keys])
            for row in rows:
                for c, name in enumerate(names):
                    writer.writerow([row["case_id"], name, *[row[k][c] for k in keys]])

    return write_atomic(path, write)


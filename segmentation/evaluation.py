"""``segmentation evaluate``: Dice of predicted label files against reference labels."""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from segmentation.data.layout import split_file_ending


def dice(prediction: np.ndarray, reference: np.ndarray, value: int) -> float:
    """Dice of one label value; NaN when the value is absent from both."""
    p, r = prediction == value, reference == value
    total = p.sum() + r.sum()
    return float(2 * np.logical_and(p, r).sum() / total) if total else math.nan


def evaluate_folder(predictions: str | Path, references: str | Path,
                    label_names: Mapping[int, str]) -> list[dict[str, object]]:
    """Per-case, per-class Dice for every reference label that has a prediction.

    Args:
        predictions: folder of predicted ``CASE.nii.gz`` label maps.
        references: folder of reference ``CASE.nii.gz`` label maps (same geometry).
        label_names: label value → name; background (0) is skipped.

    Returns:
        One row per case and foreground class: {"case_id", "class", "dice"}.

    Raises:
        ValueError: naming the file, when a prediction is missing or its shape or affine
            differs from the reference.
    """
    rows: list[dict[str, object]] = []
    for reference_path in sorted(Path(references).iterdir()):
        parts = split_file_ending(reference_path.name)
        if parts is None:
            continue
        case_id, ending = parts
        prediction_path = Path(predictions) / f"{case_id}{ending}"
        if not prediction_path.exists():
            raise ValueError(f"{prediction_path}: no prediction for reference {reference_path}")
        reference_image, prediction_image = nib.load(reference_path), nib.load(prediction_path)
        if reference_image.shape != prediction_image.shape or not np.allclose(
                reference_image.affine, prediction_image.affine, atol=1e-4):
            raise ValueError(f"{prediction_path}: shape/affine differ from {reference_path}")
        reference = np.asanyarray(reference_image.dataobj)
        prediction = np.asanyarray(prediction_image.dataobj)
        for value, name in sorted(label_names.items()):
            if value != 0:
                rows.append({"case_id": case_id, "class": name,
                             "dice": dice(prediction, reference, value)})
    return rows


def class_means(rows: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """NaN-ignoring mean Dice per class, in first-seen class order."""
    by_class: dict[str, list[float]] = {}
    for row in rows:
        by_class.setdefault(str(row["class"]), []).append(float(row["dice"]))
    return {name: float(np.nanmean(values)) if not np.isnan(values).all() else math.nan
            for name, values in by_class.items()}


def run_evaluate(args: argparse.Namespace) -> int:
    """Print per-class mean Dice and ``mean Dice``; write a CSV when asked."""
    meta = json.loads((Path(args.dataset) / "dataset.json").read_text())
    labels = meta["labels"]
    names = ({int(v): k for k, v in labels.items()} if all(isinstance(v, int)
             for v in labels.values()) else {int(k): v for k, v in labels.items()})
    try:
        rows = evaluate_folder(args.predictions, args.labels, names)
    except ValueError as err:
        print(f"error: {err}")
        return 1
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["case_id", "class", "dice"])
            writer.writeheader()
            writer.writerows(rows)
    means = class_means(rows)
    for name, value in means.items():
        print(f"Dice {name}: {value:.3f}")
    finite = [v for v in means.values() if not math.isnan(v)]
    print(f"mean Dice: {sum(finite) / len(finite):.3f}" if finite else "mean Dice: nan")
    return 0


def add_evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``segmentation evaluate``."""
    parser = subparsers.add_parser(
        "evaluate", help="Dice of predicted label files against reference labels",
        description="Compare predicted label maps with reference label maps of the same "
                    "geometry, case by case and class by class.")
    parser.add_argument("--predictions", required=True, help="folder of predicted CASE.nii.gz")
    parser.add_argument("--labels", required=True, help="folder of reference CASE.nii.gz")
    parser.add_argument("--dataset", required=True, help="dataset folder (for label names)")
    parser.add_argument("--csv", help="write per-case, per-class Dice to this CSV file")
    parser.set_defaults(func=run_evaluate)

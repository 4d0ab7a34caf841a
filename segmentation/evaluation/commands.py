"""``segmentation evaluate``: Dice of predicted label files against reference labels."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from segmentation.data.layout import (
    DATASET_JSON,
    FILE_ENDINGS,
    DatasetError,
    load_dataset_json,
    parse_labels,
    split_file_ending,
)
from segmentation.evaluation.metrics import dice, mean_per_class, write_case_table


def read_label_names(dataset: str | Path) -> dict[int, str]:
    """Label value → name, sorted by value, background included, from a folder's dataset.json.

    Either convention is read (see :func:`~segmentation.data.layout.parse_labels`).

    Raises:
        DatasetError: naming the folder or dataset.json, when the folder or file is missing,
            the file is not valid JSON, or ``labels`` is missing or malformed.
    """
    meta = load_dataset_json(dataset)
    path = Path(dataset) / DATASET_JSON
    parsed = parse_labels(meta, path)
    return {value: name for name, value in sorted(parsed.items(), key=lambda item: item[1])}


def find_prediction(predictions: Path, case_id: str, reference: Path) -> Path:
    """The prediction file of a case, under any supported file ending.

    ``segmentation infer`` writes ``CASE.nii.gz`` whatever the ending of the scans, so a
    ``CASE.nii`` reference is matched by ``CASE.nii.gz`` and vice versa. ``case_id`` is the
    ``reference`` file's name without its ending.

    Raises:
        DatasetError: naming the reference, when no prediction or more than one (e.g. both
            ``CASE.nii`` and ``CASE.nii.gz``) exists.
    """
    found = [predictions / f"{case_id}{ending}" for ending in FILE_ENDINGS
             if (predictions / f"{case_id}{ending}").is_file()]
    if not found:
        tried = " or ".join(f"{case_id}{ending}" for ending in FILE_ENDINGS)
        raise DatasetError(reference, f"no prediction for this reference ({tried} in "
                                      f"{predictions})")
    if len(found) > 1:
        raise DatasetError(reference, f"more than one prediction for this reference "
                                      f"({', '.join(str(p) for p in found)}); remove all but one")
    return found[0]


def evaluate_folder(predictions: str | Path, references: str | Path,
                    label_names: Mapping[int, str], *, case_ids: Collection[str] | None = None,
                    hd95: bool = False) -> list[dict[str, object]]:
    """Per-case, per-class Dice (and HD95) for every reference label map.

    Every reference ``CASE.nii.gz`` or ``CASE.nii`` (hidden files such as ``._CASE.nii.gz``
    are skipped) needs a prediction ``CASE.nii.gz`` or ``CASE.nii`` of the same shape and
    affine; a missing prediction is an error, not a skipped case. Background (0) in
    ``label_names`` (value → name) is not scored.

    Args:
        predictions: folder of predicted label maps.
        references: folder of reference label maps.
        label_names: label value → name, background included.
        case_ids: score only these cases (each needs a reference); default: every reference.
        hd95: also the 95th-percentile Hausdorff distance in mm (the reference's voxel
            spacing), as MONAI computes it: NaN or inf where one map lacks the class.

    Returns:
        One row per case, cases sorted by file name: {"case_id": str, "dice": one value per
        foreground class in value order (NaN where the class is in neither map)} and, with
        ``hd95``, {"hd95": one value per foreground class}.

    Raises:
        DatasetError: naming the folder or file: a folder is missing, the references folder
            holds no label files, a reference has no prediction, a file cannot be read, or a
            prediction's shape or affine differs from its reference (both are shown).
    """
    predictions, references = Path(predictions), Path(references)
    for folder, what in ((references, "labels"), (predictions, "predictions")):
        if not folder.is_dir():
            raise DatasetError(folder, f"{what} folder does not exist")
    reference_files = sorted(f for f in references.iterdir() if f.is_file()
                             and not f.name.startswith(".") and split_file_ending(f.name))
    if not reference_files:
        raise DatasetError(references, f"no label files ({', '.join(FILE_ENDINGS)}) found")
    if case_ids is not None:
        by_id = {split_file_ending(f.name)[0]: f for f in reference_files}  # type: ignore[index]
        missing = sorted(set(case_ids) - set(by_id))
        if missing:
            raise DatasetError(references, f"no reference label map for case {missing[0]}")
        reference_files = [by_id[c] for c in sorted(case_ids)]
    rows: list[dict[str, object]] = []
    for reference_path in reference_files:
        case_id = split_file_ending(reference_path.name)[0]  # type: ignore[index]
        prediction_path = find_prediction(predictions, case_id, reference_path)
        reference_image, prediction_image = _load(reference_path), _load(prediction_path)
        if reference_image.shape != prediction_image.shape:
            raise DatasetError(prediction_path, f"shape {prediction_image.shape} differs from "
                                                f"{reference_image.shape} of {reference_path}")
        if not np.allclose(reference_image.affine, prediction_image.affine, atol=1e-4):
            raise DatasetError(prediction_path, f"affine {_matrix(prediction_image.affine)} "
                                                f"differs from {_matrix(reference_image.affine)} "
                                                f"of {reference_path}")
        reference = _voxels(reference_image, reference_path)
        prediction = _voxels(prediction_image, prediction_path)
        values = foreground_values(label_names)
        row: dict[str, object] = {"case_id": case_id, "dice": [
            dice(prediction, reference, value) for value in values]}
        if hd95:
            spacing = [float(z) for z in reference_image.header.get_zooms()[:reference.ndim]]
            row["hd95"] = hausdorff95(prediction, reference, values, spacing)
        rows.append(row)
    return rows


def hausdorff95(prediction: np.ndarray, reference: np.ndarray, values: Sequence[int],
                spacing: Sequence[float]) -> list[float]:
    """MONAI's 95th-percentile Hausdorff distance (mm) of each label value between two maps.

    ``prediction`` and ``reference`` are label maps of one shape; NaN or inf (MONAI's values)
    where one of them lacks the value.
    """
    def masks(labels: np.ndarray) -> torch.Tensor:  # (1, len(values), *S) binary
        return torch.from_numpy(np.stack([labels == v for v in values])[None])

    with warnings.catch_warnings():  # MONAI warns for every class absent from a map
        warnings.simplefilter("ignore")
        distances = compute_hausdorff_distance(masks(np.asarray(prediction)),
                                               masks(np.asarray(reference)),
                                               include_background=True, percentile=95,
                                               spacing=list(spacing))
    return [float(d) for d in distances[0]]


def foreground_values(label_names: Mapping[int, str]) -> list[int]:
    """The label values scored: every value but background (0), in order."""
    return sorted(value for value in label_names if value != 0)


def _load(path: Path) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file (header only); unreadable files raise DatasetError naming them."""
    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises many kinds: ImageFileError, EOFError, ...
        raise DatasetError(path, f"cannot be read ({error or type(error).__name__})") from error


def _voxels(image: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    """Decode an opened file's voxels; truncated or corrupt data raise DatasetError naming it."""
    try:
        return np.asanyarray(image.dataobj)
    except Exception as error:  # e.g. EOFError or zlib.error for a truncated .nii.gz
        raise DatasetError(path, f"cannot be read (truncated or corrupt: "
                                 f"{error or type(error).__name__})") from error


def _matrix(affine: np.ndarray) -> str:
    """A 4×4 affine on one line, rounded to 4 decimals."""
    return str(np.round(np.asarray(affine, dtype=float), 4).tolist())


def csv_problem(path: Path, input_folders: list[Path], *, overwrite: bool) -> str | None:
    """Why the CSV must not be written to ``path`` (one line naming it), or None.

    An existing file is replaced only with ``overwrite``, and never when it is one of the
    inputs (a file in the predictions, labels or dataset folder that evaluate reads).
    """
    if path.is_dir():
        return f"{path}: is a folder; give --csv a file name"
    if not path.parent.is_dir():
        return f"{path}: its folder {path.parent} does not exist"
    if not path.exists():
        return None
    inputs = [f for folder in input_folders if folder.is_dir() for f in folder.iterdir()
              if f.is_file() and (split_file_ending(f.name) or f.name == DATASET_JSON)]
    if any(os.path.samefile(path, f) for f in inputs):
        return f"{path}: is one of the files evaluate reads; choose another --csv"
    if not overwrite:
        return f"{path}: exists; pass --overwrite to replace it"
    return None


def run_evaluate(args: argparse.Namespace) -> int:
    """``segmentation evaluate``: print per-class mean Dice and ``mean Dice``; write a CSV.

    Prints ``Dice NAME: 0.xxx`` per foreground class, then ``mean Dice: 0.xxx``, the mean over
    the classes with a Dice (classes absent from every reference and prediction are left out).

    Returns:
        0 on success; 1 after one ``error: ...`` line on stderr when a folder, dataset.json,
        a prediction or the CSV file is missing or unusable, or no class could be scored.
    """
    problem = args.csv and csv_problem(Path(args.csv), [Path(args.predictions),
                                                        Path(args.labels), Path(args.dataset)],
                                       overwrite=args.overwrite)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        names = read_label_names(args.dataset)
        rows = evaluate_folder(args.predictions, args.labels, names)
    except (DatasetError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    foreground = [names[value] for value in foreground_values(names)]
    means = mean_per_class(rows, "dice", foreground)
    finite = [v for v in means.values() if not math.isnan(v)]
    if not finite:
        print(f"error: {args.labels}: no foreground class of dataset.json appears in any "
              "reference or prediction, so there is no Dice to report", file=sys.stderr)
        return 1
    if args.csv:
        try:
            write_case_table(args.csv, rows, foreground, ["dice"])
        except OSError as err:
            print(f"error: {args.csv}: cannot write the CSV file ({err.strerror or err})",
                  file=sys.stderr)
            return 1
    for name, value in means.items():
        print(f"Dice {name}: {value:.3f}")
    print(f"mean Dice: {sum(finite) / len(finite):.3f}")
    return 0


def add_evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``segmentation evaluate``."""
    parser = subparsers.add_parser(
        "evaluate", help="Dice of predicted label files against reference labels",
        description="Compare predicted label maps with reference label maps of the same "
                    "geometry, case by case and class by class. Every reference needs a "
                    "prediction (CASE.nii.gz or CASE.nii).")
    parser.add_argument("--predictions", required=True, help="folder of predicted CASE.nii.gz")
    parser.add_argument("--labels", required=True,
                        help="folder of reference CASE.nii.gz (or CASE.nii)")
    parser.add_argument("--dataset", required=True, help="dataset folder (for label names)")
    parser.add_argument("--csv", help="write per-case, per-class Dice to this CSV file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --csv")
    parser.set_defaults(func=run_evaluate)

"""Writing NIfTI files atomically, with the exact geometry of a reference scan."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from segmentation.atomic import write_atomic
from segmentation.data.layout import Case
from segmentation.inference.outputs import output_paths


def like_reference(data: np.ndarray, reference: nib.Nifti1Image, *,
                   kind: str = "labels") -> nib.Nifti1Image:
    """A NIfTI image of ``data`` with the reference's affine, sform/qform and codes.

    Only the geometry (and the spatial unit) is the reference's: its display range, intent,
    description and time unit belong to its intensities, and copied onto a label map they would
    make viewers show labels 1, 2, 3 as near black or read the class axis as time. Values are
    never rescaled (slope 1, intercept 0).

    Args:
        data: (*S) label map or (*S, K) class probabilities, S the reference's spatial shape
            (its first three axes, or two for a 2D scan).
        reference: the scan the data belongs to.
        kind: "labels" (NIfTI intent "label") or "probabilities" (classes on the last axis).

    Raises:
        ValueError: if ``data``'s leading axes are not the reference's spatial shape.
    """
    spatial = reference.shape[: min(len(reference.shape), 3)]
    if tuple(data.shape[: len(spatial)]) != tuple(spatial):
        raise ValueError(f"prediction shape {data.shape} does not match the scan's spatial "
                         f"shape {spatial}")
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    image = nib.Nifti1Image(data, reference.affine, header)
    image.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    image.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    header = image.header
    header.set_slope_inter(1.0, 0.0)  # values are labels/probabilities, never rescaled
    header["cal_min"] = header["cal_max"] = 0  # no display range: viewers take the data's
    header["aux_file"] = b""
    header.set_xyzt_units(xyz=reference.header.get_xyzt_units()[0], t="unknown")
    if kind == "labels":
        header.set_intent("label", (), name="")
        header["descrip"] = b"segmentation labels"
    else:
        header.set_intent("none", (), name="")
        header["descrip"] = b"class probabilities, classes on the last axis"
    return image


def save_atomic(image: nib.Nifti1Image, path: str | Path) -> Path:
    """Save a NIfTI image to ``path`` (.nii or .nii.gz) atomically; see :func:`write_atomic`."""
    return write_atomic(path, lambda temporary: nib.save(image, temporary))


def write_case(probabilities: torch.Tensor, case: Case, output_dir: Path, *,
               save_probabilities: bool = False) -> list[Path]:
    """Write a case's label map (and probabilities) with its first image's exact geometry.

    The one writer of ``segmentation infer`` and ``segmentation predict``; file names are
    ``outputs.output_paths``'.

    Args:
        probabilities: (K, *S) class probabilities on the scan's own grid (see
            ``restore.probabilities_on_scan``), S the spatial shape of ``case.images[0]``.
        case: the scan's files.
        output_dir: an existing folder.
        save_probabilities: also write ``CASE_probabilities.nii.gz`` ((*S, K) float32).

    Returns:
        The written paths: ``CASE.nii.gz`` (label map, uint8, uint16 beyond 256 classes) first.

    Raises:
        ValueError: naming the scan, if the probabilities do not have its spatial shape.
    """
    reference = nib.load(str(case.images[0]))
    spatial = tuple(reference.shape[: probabilities.ndim - 1])
    if tuple(probabilities.shape[1:]) != spatial:
        raise ValueError(f"{case.images[0]}: the prediction mapped back onto the scan has "
                         f"shape {tuple(probabilities.shape[1:])}, the scan {spatial}; the "
                         "preprocessing could not be inverted exactly")
    labels_path, *probabilities_path = output_paths(case, output_dir, save_probabilities)
    dtype = np.uint8 if probabilities.shape[0] <= 256 else np.uint16
    labels = probabilities.argmax(0).numpy().astype(dtype)
    written = [save_atomic(like_reference(labels, reference), labels_path)]
    for path in probabilities_path:
        channels_last = np.moveaxis(probabilities.numpy(), 0, -1).astype(np.float32)
        written.append(save_atomic(like_reference(channels_last, reference,
                                                  kind="probabilities"), path))
    return written

"""Writing NIfTI files atomically, with the exact geometry of a reference scan."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from segmentation.atomic import write_atomic


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

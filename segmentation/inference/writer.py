"""Writing NIfTI files atomically, with the exact geometry of a reference scan."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np


def like_reference(data: np.ndarray, reference: nib.Nifti1Image, *,
                   kind: str = "labels") -> nib.Nifti1Image:
    """A NIfTI image of ``data`` with the reference's affine, sform/qform and codes.

    Only the geometry (and the spatial unit) is the reference's: its display range, intent,
    description and time unit belong to its intensities, and copied onto a label map they would
    make viewers show labels 1, 2, 3 as near black or read the class axis as time.

    Args:
        data: (*S) label map or (*S, K) class probabilities, S the reference's spatial shape
            (its first three axes, or two for a 2D scan).
        reference: the scan the data belongs to.
        kind: "labels" (NIfTI intent "label") or "probabilities" (classes on the last axis).

    Returns:
        The image, ready to save; values are never rescaled (slope 1, intercept 0).

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


def _write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary)`` on a temporary file beside ``path``, fsync it, rename it.

    The temporary file lies in the same folder (same file system, so the rename is atomic) and
    keeps the target's file ending (nibabel chooses the format by it). On any failure it is
    removed and the error is raised, so ``path`` is either absent, untouched or complete.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=suffix)
    os.close(handle)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would hide the result
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(image: nib.Nifti1Image, path: str | Path) -> Path:
    """Save a NIfTI image to ``path`` atomically, readable as any new file would be.

    Args:
        image: the image to write.
        path: the target (.nii or .nii.gz); replaced only once the new file is complete.

    Returns:
        ``path``.
    """
    return _write_atomic(path, lambda temporary: nib.save(image, temporary))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a text file atomically (as :func:`save_atomic`).

    Args:
        text: the file's contents.
        path: the target.

    Returns:
        ``path``.
    """
    return _write_atomic(path, lambda temporary: Path(temporary).write_text(text))

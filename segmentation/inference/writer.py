"""Writing NIfTI files atomically, with the exact geometry of a reference scan."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np


def like_reference(data: np.ndarray, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """A NIfTI image of ``data`` with the reference's affine, sform/qform and codes.

    Args:
        data: array whose first three (or two) axes match the reference's spatial shape.
        reference: the scan the data belongs to.
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
    image.header.set_slope_inter(1.0, 0.0)  # values are labels/probabilities, never rescaled
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
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_atomic(image: nib.Nifti1Image, path: str | Path) -> Path:
    """Save a NIfTI image to ``path`` atomically."""
    return _write_atomic(path, lambda temporary: nib.save(image, temporary))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    return _write_atomic(path, lambda temporary: Path(temporary).write_text(text))

"""Writing NIfTI files atomically, with the exact geometry of a reference scan."""

from __future__ import annotations

import os
import tempfile
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


def save_atomic(image: nib.Nifti1Image, path: str | Path) -> Path:
    """Save ``image`` to ``path`` so that ``path`` is either absent or complete.

    nibabel writes to a temporary file in the same folder (same file system, so the final
    rename is atomic), which is flushed to disk and then renamed over ``path``. On any failure
    the temporary file is removed and the error is raised.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=suffix)
    os.close(handle)
    try:
        nib.save(image, temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a text file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path

"""Atomic file writes: a reader sees the old file or the complete new one, never a part.

Used for everything the project writes beside the user's data: splits.json, the stored check
and preprocessing results, segmentations and provenance.json.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary)`` on a temporary file beside ``path``, fsync it, rename it.

    The temporary file lies in the same folder (same file system, so the rename is atomic),
    keeps the target's file ending (nibabel chooses the format by it) and gets the permissions
    any new file would get (not mkstemp's owner-only 0600). On any failure it is removed and
    the error is raised, so ``path`` is either absent, untouched or complete. Returns ``path``.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=suffix)
    os.close(handle)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a UTF-8 text file atomically (see :func:`write_atomic`); returns ``path``."""
    return write_atomic(path, lambda temporary: Path(temporary).write_text(text,
                                                                           encoding="utf-8"))


def write_csv_atomic(path: str | Path, header: Sequence[str],
                     rows: Iterable[Sequence[object]]) -> Path:
    """Write a CSV table (header, then rows, Unix line ends) atomically; returns ``path``."""
    def write(temporary: str) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    return write_atomic(path, write)


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

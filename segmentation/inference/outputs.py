"""The files ``segmentation infer`` writes, and the checks made before it writes any.

Every problem is found before the first scan is segmented: an output that is an input, two
outputs of one run with the same name, existing outputs without ``--overwrite``, and an output
folder that cannot be created or written to.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from segmentation.data.layout import Case


def output_paths(case: Case, output_dir: Path, save_probabilities: bool) -> list[Path]:
    """``CASE.nii.gz`` (labels) and, with ``save_probabilities``, ``CASE_probabilities.nii.gz``."""
    paths = [output_dir / f"{case.case_id}.nii.gz"]
    if save_probabilities:
        paths.append(output_dir / f"{case.case_id}_probabilities.nii.gz")
    return paths


def check_outputs(cases: Sequence[Case], output_dir: Path, *, save_probabilities: bool,
                  overwrite: bool) -> list[str]:
    """Problems that forbid writing, one line each, each naming the file.

    An output that is one of the inputs (also through a symbolic or hard link) is refused even
    with ``overwrite``; so are two outputs of this run with the same path (e.g. scans
    ``x.nii.gz`` and ``x_probabilities.nii.gz`` with ``save_probabilities``); an existing
    output is refused without ``overwrite``.
    """
    inputs = [p for case in cases for p in case.images]
    resolved = {p.resolve() for p in inputs}
    writers: dict[Path, str] = {}
    problems = []
    for case in cases:
        for path in output_paths(case, output_dir, save_probabilities):
            kind = "probabilities" if path.name.endswith("_probabilities.nii.gz") else "labels"
            key = path.resolve()
            if key in writers:
                problems.append(f"{path}: would be written twice, as {writers[key]} and as the "
                                f"{kind} of case {case.case_id}; rename one of the scans or "
                                "segment them into separate --output folders")
                continue
            writers[key] = f"the {kind} of case {case.case_id}"
            # resolve() sees through symbolic links, samefile() also through hard links
            if key in resolved or (path.exists() and any(
                    p.exists() and os.path.samefile(path, p) for p in inputs)):
                problems.append(f"{path}: is one of the input scans; choose another --output")
            elif path.is_dir():
                problems.append(f"{path}: is a folder; choose another --output")
            elif path.exists() and not overwrite:
                problems.append(f"{path}: exists; pass --overwrite to replace it")
    return problems


def prepare_output_dir(output_dir: Path) -> str | None:
    """Create ``output_dir`` if needed and prove it writable; the problem in one line, or None.

    A file is created and removed there, so a read-only folder, a full disk or a path through
    a file is found before any scan is segmented.
    """
    if output_dir.exists() and not output_dir.is_dir():
        return f"{output_dir}: exists and is not a folder; choose another --output"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        return f"{output_dir}: cannot write there ({error.strerror or error})"
    return None

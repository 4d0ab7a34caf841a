"""Integrity check of a dataset folder, in the spirit of nnU-Net's ``verify_dataset_integrity``.

:func:`check_dataset` reports every problem in one pass, each once, naming the file (relative to
the dataset folder). Every file is fully decoded exactly once (its header is read a second time,
unrepaired, for the raw pixdim); nothing is written. Geometry is judged by the affine that
preprocessing reads (:func:`segmentation.data.preprocessing.reader_affine`), not by nibabel's.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from segmentation.data.layout import (
    CHANNEL_SUFFIX,
    Case,
    DatasetError,
    DatasetInfo,
    read_dataset,
    split_file_ending,
)
from segmentation.data.preprocessing import oriented_spacing, reader_affine, voxel_spacing

AFFINE_ATOL = 1e-4
SPACING_RTOL = 1e-4
SUMMARY_ORIENTATION = "RAS"  # axis order of the reported median spacing (the default target)


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes:
        errors: problems that make the dataset unusable, one message per problem.
        warnings: things that work but may be unintended.
        info: a summary of the dataset.
    """

    root: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors


@dataclass
class _Volume:
    """A decoded file and its geometry."""

    path: Path
    data: np.ndarray
    geometry_ok: bool
    read_affine: np.ndarray  # the affine preprocessing uses (MONAI's reader; see reader_affine)


def check_dataset(root: str | Path) -> CheckReport:
    """Check a dataset folder in the nnU-Net v2 or MSD layout.

    Checks dataset.json (present, valid, required keys, numTraining), that every training case
    has all its channels and its label, that every file decodes, has finite values and positive
    spacing, that labels match their images in shape, spacing and affine and only hold declared
    values, that channels of a case agree with each other, and that test images decode.
    """
    root = Path(root)
    report = CheckReport(root=root)
    try:
        info = read_dataset(root)
    except DatasetError as error:
        report.errors.append(f"{_name(root, error.file)}: {error.problem}")
        return report
    _Checker(info, report).run()
    return report


def format_report(report: CheckReport) -> str:
    """The report as text, one line per finding.

    ``info: ...`` lines, then ``warning: ...`` lines, then ``error: ...`` lines, and last
    ``OK: ...`` or ``FAILED: ...`` with the error and warning counts and the dataset folder;
    lines are joined by newlines, without a trailing one.
    """
    lines = [f"info: {line}" for line in report.info]
    lines += [f"warning: {line}" for line in report.warnings]
    lines += [f"error: {line}" for line in report.errors]
    verdict = "OK" if report.ok else "FAILED"
    lines.append(f"{verdict}: {len(report.errors)} error(s), {len(report.warnings)} warning(s) "
                 f"in {report.root}")
    return "\n".join(lines)


def _name(root: Path, path: Path) -> str:
    """``path`` relative to the dataset folder, or as given when outside it (or the folder)."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        return str(path)
    return relative.as_posix() if relative.parts else str(path)


class _Checker:
    """One pass over a dataset, filling a report."""

    def __init__(self, info: DatasetInfo, report: CheckReport) -> None:
        self.info, self.report, self.root = info, report, info.root
        self.n_channels = len(info.channel_names)
        self.orientations: Counter[str] = Counter()
        self.spacings: list[tuple[float, ...]] = []
        self.label_presence: Counter[int] = Counter()
        self.labels_read = 0

    # ---------------------------------------------------------------- reporting
    def error(self, path: Path, problem: str) -> None:
        self.report.errors.append(f"{_name(self.root, path)}: {problem}")

    def warn(self, path: Path, problem: str) -> None:
        self.report.warnings.append(f"{_name(self.root, path)}: {problem}")

    # ---------------------------------------------------------------- the pass
    def run(self) -> None:
        info = self.info
        self.report.info.append(
            f"dataset {info.name!r} ({info.convention} layout): {len(info.training)} training "
            f"case(s), {len(info.test)} test case(s)")
        self.report.info.append("channels: " + ", ".join(
            f"{i}={name}" for i, name in enumerate(info.channel_names)))
        self.report.info.append("labels: " + ", ".join(
            f"{value}={name}" for value, name in info.label_names.items()))
        self.check_folders()
        where = "in imagesTr" if info.convention == "nnunet" else "listed in training"
        images_folder = (self.root / "imagesTr").is_dir() or info.convention == "msd"
        if images_folder and info.num_training != len(info.training):
            self.error(self.root / "dataset.json",
                       f"numTraining is {info.num_training} but {len(info.training)} training "
                       f"case(s) were found {where}")
        labels_folder = (self.root / "labelsTr").is_dir() or info.convention == "msd"
        for case in info.training:
            self.check_case(case, labelled=labels_folder)
        for case in info.test:
            self.check_case(case, labelled=False)
        self.summarise()

    def check_folders(self) -> None:
        """Missing folders and files the layout does not pick up."""
        info = self.info
        if not (self.root / "imagesTr").is_dir():
            self.error(self.root / "imagesTr", "folder missing")
        if info.convention == "nnunet" and not (self.root / "labelsTr").is_dir():
            self.error(self.root / "labelsTr", "folder missing")
        used = {p for c in info.training + info.test for p in c.images}
        used |= {c.label for c in info.training if c.label is not None}
        for folder in ("imagesTr", "imagesTs", "labelsTr"):
            for file in _files(self.root / folder):
                if file not in used:
                    self.check_stray(file, folder)

    def check_stray(self, file: Path, folder: str) -> None:
        """A file in a layout folder that belongs to no case."""
        ending = self.info.file_ending
        parts = split_file_ending(file.name, (ending,))
        if self.info.convention == "msd" or folder == "labelsTr":
            what = "training list" if self.info.convention == "msd" else "images in imagesTr"
            self.warn(file, f"not part of any case (no matching {what}); ignored")
        elif parts is None:
            self.warn(file, f"ignored: does not end with {ending}")
        elif (match := CHANNEL_SUFFIX.match(parts[0])) is None:
            self.error(file, f"not named CASE_XXXX{ending} (the channel suffix _0000 is "
                             "missing), so it is not part of any case")
        else:
            self.error(file, f"channel {int(match['channel'])} but dataset.json declares "
                             f"{self.n_channels} channel(s)")

    def check_case(self, case: Case, labelled: bool) -> None:
        """Read every file of a case once and cross-check them."""
        volumes: list[_Volume] = []
        for index, path in enumerate(case.images):
            what = f"channel {index} of case {case.case_id}" if len(case.images) > 1 else "image"
            volume = self.read(path, what)
            if volume is not None:
                volumes.append(volume)
        reference = volumes[0] if volumes else None
        spatial_shape = None
        if reference is not None:
            spatial_shape = self.check_channels(case, volumes)
            if reference.geometry_ok and spatial_shape is not None:
                affine, n = reference.read_affine, len(spatial_shape)
                self.orientations["".join(nib.aff2axcodes(affine))] += 1
                self.spacings.append(tuple(oriented_spacing(
                    affine, voxel_spacing(affine, n), SUMMARY_ORIENTATION[:n])))
        if case.label is None or not labelled:
            return
        label = self.read(case.label, "label file")
        if label is None:
            return
        self.check_label_values(label)
        if reference is not None and spatial_shape is not None:
            self.compare(label, reference, spatial_shape, "its image")

    def read(self, path: Path, what: str) -> _Volume | None:
        """Decode a file fully; report it when missing, unreadable, non-finite or bad geometry.

        Geometry is judged by the affine preprocessing reads (see :func:`reader_affine`): an
        error when it is not finite or not invertible (naming the sform or qform it comes
        from), warnings when the header has no sform or qform at all, when a spatial pixdim is
        0 in the file (read as 1 mm), or when the sform's spacing differs from pixdim.
        """
        if not path.is_file():
            self.error(path, f"missing {what}")
            return None
        try:
            with warnings.catch_warnings(), nib.imageglobals.LoggingOutputSuppressor():
                warnings.simplefilter("ignore")
                image = nib.load(str(path))
                data = np.asanyarray(image.dataobj)
                affine = np.asarray(image.affine, dtype=float)
                zooms = tuple(float(z) for z in image.header.get_zooms())
                read_affine = reader_affine(image)
                raw_pixdim = _raw_pixdim(path, image.header)
        except Exception as error:  # nibabel raises many kinds: ImageFileError, EOFError, ...
            reason = str(error) or type(error).__name__
            self.error(path, f"cannot be read (truncated or corrupt: {reason})")
            return None
        if np.issubdtype(data.dtype, np.inexact):
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if bad:
                self.error(path, f"{bad} voxel(s) are NaN or infinite")
        n_spatial = min(data.ndim, 3)
        spatial = zooms[:n_spatial]
        if raw_pixdim is not None and np.any(raw_pixdim[1:1 + n_spatial] == 0):
            shown = ", ".join(f"{v:g}" for v in raw_pixdim[1:1 + n_spatial])
            self.warn(path, f"the header's pixdim ({shown}) has a zero voxel spacing, which "
                            "nibabel and preprocessing silently read as 1 mm; write the real "
                            "voxel spacing into the header")
        header = image.header
        nifti = isinstance(header, nib.Nifti1Header)  # Nifti2Header derives from it
        sform_code = int(header["sform_code"]) if nifti else 1
        qform_code = int(header["qform_code"]) if nifti else 1
        geometry_ok = False
        if any(not z > 0 for z in spatial):
            self.error(path, f"spacing {spatial} is not positive")
        elif (not np.all(np.isfinite(read_affine))
              or abs(np.linalg.det(read_affine[:3, :3])) < 1e-12):
            self.error(path, f"affine is not finite or not invertible: preprocessing (MONAI's "
                             f"reader) uses the {_affine_source(header, read_affine)}")
        else:
            geometry_ok = True
            if sform_code == 0 and qform_code == 0:
                codes = "".join(nib.aff2axcodes(read_affine))
                self.warn(path, "sform_code and qform_code are both 0, so the header states no "
                                "orientation or position; preprocessing uses a default affine "
                                f"from pixdim ({codes} orientation); set the sform or qform if "
                                "the scan's geometry is known")
            sform_spacing = voxel_spacing(affine, len(spatial))
            if sform_code and not np.allclose(spatial, sform_spacing, rtol=SPACING_RTOL):
                used = ("the qform" if not np.allclose(read_affine, affine, atol=AFFINE_ATOL)
                        else "the sform")
                shown, pixdim = (", ".join(f"{v:.4g}" for v in values)
                                 for values in (sform_spacing, spatial))
                self.warn(path, f"the sform's voxel spacing ({shown}) differs from the header's "
                                f"pixdim ({pixdim}); preprocessing (MONAI's reader) uses {used}; "
                                "rewrite the header if that is not the scan's geometry")
        return _Volume(path, data, geometry_ok, read_affine)

    def check_channels(self, case: Case, volumes: list[_Volume]) -> tuple[int, ...] | None:
        """Channel count and agreement between channel files; returns the spatial shape."""
        reference = volumes[0]
        shape = reference.data.shape
        if self.info.convention == "msd":
            if self.n_channels > 1:
                if len(shape) < 3 or shape[-1] != self.n_channels:
                    self.error(reference.path,
                               f"shape {shape}: expected {self.n_channels} channels on the last "
                               f"axis (dataset.json declares {self.n_channels} modalities)")
                    return None
                return shape[:-1]
            return shape[:-1] if len(shape) == 4 and shape[-1] == 1 else shape
        if len(shape) not in (2, 3):
            self.error(reference.path, f"shape {shape}: expected a 2D or 3D image per channel")
            return None
        for other in volumes[1:]:
            self.compare(other, reference, shape, _name(self.root, reference.path))
        return shape

    def compare(self, volume: _Volume, reference: _Volume, spatial_shape: tuple[int, ...],
                what: str) -> None:
        """Shape, spacing and affine of ``volume`` against ``reference`` (one error at most).

        Spacing and affine are those preprocessing reads (``read_affine``), so two files that
        nibabel gives the same affine but preprocessing reads differently do not agree.
        """
        shape = volume.data.shape
        n = len(spatial_shape)
        if shape != spatial_shape:
            self.error(volume.path, f"shape {shape} differs from {what} {spatial_shape}")
            return
        if not (volume.geometry_ok and reference.geometry_ok):
            return
        spacing, reference_spacing = (
            tuple(round(float(v), 6) for v in voxel_spacing(v.read_affine, n))
            for v in (volume, reference))
        if not np.allclose(spacing, reference_spacing, rtol=SPACING_RTOL):
            self.error(volume.path, f"spacing {spacing} differs from {what} {reference_spacing}")
        elif not np.allclose(volume.read_affine, reference.read_affine, atol=AFFINE_ATOL):
            self.error(volume.path, f"affine differs from {what}")

    def check_label_values(self, label: _Volume) -> None:
        """Label values must be integers declared in dataset.json."""
        values = np.unique(label.data)
        if np.issubdtype(values.dtype, np.inexact):
            values = values[np.isfinite(values)]
            fractional = values[values != np.round(values)]
            if fractional.size:
                voxels = np.count_nonzero(np.isin(label.data, fractional))
                shown = ", ".join(f"{v:g}" for v in fractional[:5])
                self.error(label.path, f"{voxels} voxel(s) have non-integer label values, e.g. "
                                       f"{shown}")
                return
        integers = [int(v) for v in values]
        declared = set(self.info.labels.values())
        unexpected = [v for v in integers if v not in declared]
        if unexpected:
            self.error(label.path, f"value(s) {', '.join(map(str, unexpected))} are not in "
                                   f"dataset.json labels ({', '.join(map(str, sorted(declared)))})")
        self.labels_read += 1
        self.label_presence.update(v for v in integers if v in declared)

    def summarise(self) -> None:
        """Orientation, spacing and label-coverage notes."""
        if self.orientations:
            listing = ", ".join(f"{code} ({n} case(s))" for code, n in self.orientations.items())
            self.report.info.append(f"orientations: {listing}")
            if len(self.orientations) > 1:
                self.report.warnings.append(
                    f"cases have different orientations ({listing}); this is fine, "
                    "preprocessing reorients them")
        if self.spacings:
            lengths = {len(s) for s in self.spacings}
            if len(lengths) == 1:
                spacings = np.array(self.spacings)
                median = ", ".join(f"{v:.3g}" for v in np.median(spacings, axis=0))
                order = SUMMARY_ORIENTATION[: spacings.shape[1]]
                self.report.info.append(f"median spacing: ({median}) mm in {order} axis order, "
                                        "from the affines (as preprocessing fits it)")
        if self.labels_read:
            for value in self.info.foreground_labels:
                if not self.label_presence[value]:
                    self.report.warnings.append(
                        f"labelsTr: label {value} ({self.info.label_names[value]}) appears in no "
                        "training case")


def _raw_pixdim(path: Path, header: nib.spatialimages.SpatialHeader) -> np.ndarray | None:
    """The 8 ``pixdim`` values as stored in the file, before nibabel repairs them (0 → 1).

    ``header`` is the file's header as loaded (for its class); a non-NIfTI file gives None.
    """
    if not isinstance(header, nib.Nifti1Header):  # Nifti2Header derives from it
        return None
    with nib.openers.ImageOpener(str(path)) as fileobj:
        raw = type(header).from_fileobj(fileobj, check=False)
    return np.asarray(raw["pixdim"], dtype=float)


def _affine_source(header: nib.spatialimages.SpatialHeader, read_affine: np.ndarray) -> str:
    """Which part of the header the affine preprocessing reads comes from, for messages."""
    if not isinstance(header, nib.Nifti1Header):
        return "image's affine"
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code and np.allclose(read_affine, header.get_sform(), atol=AFFINE_ATOL,
                                  equal_nan=True):
        return f"sform (sform_code {sform_code})"
    try:
        qform = header.get_qform()
    except Exception:  # quaternion parameters nibabel cannot turn into a rotation
        return f"qform (qform_code {qform_code})" if qform_code else "header's affine"
    if np.allclose(read_affine, qform, atol=AFFINE_ATOL, equal_nan=True):
        return f"qform (qform_code {qform_code})"
    if sform_code == 0 and qform_code == 0:
        return "default affine from pixdim (sform_code and qform_code are 0)"
    return f"sform (sform_code {sform_code})"


def _files(folder: Path) -> Iterable[Path]:
    """The visible files of a folder, sorted (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))

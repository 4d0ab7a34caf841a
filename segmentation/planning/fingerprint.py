"""A dataset's fingerprint for planning: every training case's spacing and shape, read once.

nnU-Net's fingerprint (``DatasetFingerprintExtractor``) decodes every image and label to get
each case's spacing, its shape after cropping to the non-zero region and intensity statistics.
This one differs where the project already works differently:

* **axes**: spacing and shape are in the axis order preprocessing resamples in (the scan
  reoriented to RAS, as :func:`~segmentation.data.preprocessing.fit_preprocessing` reads it,
  from the affine MONAI's reader uses), not in the files' voxel order reversed (SimpleITK's);
* **what is read**: spacing and shape come from the NIfTI headers; the voxels of the image
  files (every channel, not the labels) are decoded once, for the one thing a header cannot
  tell, the bounding box of the non-zero voxels (nnU-Net fills holes in that mask first, which
  never changes its bounding box). No intensity statistics: "ct" normalisation fits its own to
  each training fold (:func:`~segmentation.data.preprocessing.fit_preprocessing`);
* **stored**: the result is kept in ``cache_dir/plan_fingerprints/NAME-KEY.json``, keyed by
  dataset.json and every image file (path, size, modification time) as the data module keys
  its stored check and preprocessing (:mod:`segmentation.data.cache_keys`), so planning again,
  e.g. for another GPU, reads no scan.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from segmentation.atomic import write_text_atomic
from segmentation.data.cache_keys import files_key
from segmentation.data.layout import DATASET_JSON, Case, DatasetInfo, read_dataset
from segmentation.data.preprocessing import oriented_spacing, reader_affine, voxel_spacing

FINGERPRINT_VERSION = 1  # raise when extraction gives another result for unchanged files
ORIENTATION = "RAS"  # preprocessing's default orientation (data.orientation)


@dataclass(frozen=True)
class CaseFingerprint:
    """One training case, axes in preprocessing's (RAS) order.

    Attributes:
        case_id: the case.
        spacing: voxel spacing in mm.
        shape: size in voxels.
        cropped_shape: size of the bounding box of the voxels non-zero in any channel (the
            whole ``shape`` when every voxel is zero).
    """

    case_id: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    cropped_shape: tuple[int, ...]

    @property
    def relative_size_after_cropping(self) -> float:
        """Voxels kept by cropping to the non-zero region, as a share of all voxels."""
        return float(np.prod(self.cropped_shape, dtype=float) / np.prod(self.shape, dtype=float))


@dataclass(frozen=True)
class Fingerprint:
    """What planning needs to know about a dataset.

    Attributes:
        name: the dataset folder's name (plans are named after it).
        channel_names: dataset.json's name of every input channel.
        num_classes: labels, background included (the network's outputs).
        cases: every training case.
    """

    name: str
    channel_names: tuple[str, ...]
    num_classes: int
    cases: tuple[CaseFingerprint, ...]

    def __post_init__(self) -> None:
        if not self.cases:
            raise ValueError(f"dataset {self.name} has no training cases to plan for")
        dims = {len(c.spacing) for c in self.cases} | {len(c.shape) for c in self.cases}
        if len(dims) != 1 or dims - {2, 3}:
            raise ValueError(f"dataset {self.name}: every training case must be 2D or every "
                             f"one 3D; found cases of {sorted(dims)} dimensions")

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.cases[0].shape)

    @property
    def median_relative_size_after_cropping(self) -> float:
        """nnU-Net's ``median_relative_size_after_cropping``."""
        return float(np.median([c.relative_size_after_cropping for c in self.cases]))

    @classmethod
    def of(cls, spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], *,
           name: str = "dataset", channel_names: Sequence[str] = ("MRI",),
           num_classes: int = 2) -> Fingerprint:
        """A fingerprint of cases with these spacings and (uncropped) shapes.

        For tests, and for what-if planning without files.
        """
        cases = tuple(CaseFingerprint(f"case_{i:03d}", tuple(float(s) for s in spacing),
                                      tuple(int(n) for n in shape), tuple(int(n) for n in shape))
                      for i, (spacing, shape) in enumerate(zip(spacings, shapes, strict=True)))
        return cls(name, tuple(channel_names), num_classes, cases)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        """Inverse of :meth:`as_dict`."""
        cases = tuple(CaseFingerprint(c["case_id"], tuple(c["spacing"]), tuple(c["shape"]),
                                      tuple(c["cropped_shape"])) for c in data["cases"])
        return cls(data["name"], tuple(data["channel_names"]), int(data["num_classes"]), cases)


def fingerprint_path(info: DatasetInfo, cache_dir: Path) -> Path:
    """Where the fingerprint of the dataset's current training images is stored.

    Raises:
        ValueError: naming a training image (or dataset.json) that does not exist.
    """
    files = [info.root / DATASET_JSON, *(p for c in info.training for p in c.images)]
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file}: missing (`segmentation data check {info.root}` lists "
                             "every problem of the dataset)")
    key = files_key(files, {"kind": "planning-fingerprint", "version": FINGERPRINT_VERSION})
    return cache_dir / "plan_fingerprints" / f"{info.root.name}-{key}.json"


def extract_fingerprint(root: str | Path, cache_dir: str | Path | None = None) -> Fingerprint:
    """The fingerprint of the dataset in ``root``, read from ``cache_dir`` when stored there.

    Args:
        root: a dataset folder in the nnU-Net or MSD layout.
        cache_dir: where fingerprints are stored (the data module's ``data.cache_dir``); None
            reads every case and stores nothing.

    Raises:
        ValueError: one line naming the dataset or file at fault (a missing folder or
            dataset.json, no training cases, an unreadable image, channels that disagree).
    """
    info = read_dataset(root)  # DatasetError (a ValueError) names dataset.json's problem
    if not info.training:
        raise ValueError(f"{info.root}: no training cases found (imagesTr/CASE_0000"
                         f"{info.file_ending} with labelsTr/CASE{info.file_ending}); "
                         "`segmentation data check` tells what is missing")
    stored = fingerprint_path(info, Path(cache_dir)) if cache_dir is not None else None
    if stored is not None and stored.is_file():
        try:
            return Fingerprint.from_dict(json.loads(stored.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: extract again and replace it
    fingerprint = Fingerprint(
        name=info.root.resolve().name, channel_names=info.channel_names,
        num_classes=len(info.labels),
        cases=tuple(case_fingerprint(case, info) for case in info.training))
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(fingerprint.as_dict(), indent=1) + "\n", stored)
    return fingerprint


def case_fingerprint(case: Case, info: DatasetInfo) -> CaseFingerprint:
    """Spacing and shape (header) and non-zero bounding box (voxels) of one case's images.

    Raises:
        ValueError: naming the file that is missing, unreadable or disagrees in shape with
            the case's first channel.
    """
    n_channels = len(info.channel_names)
    affine: np.ndarray | None = None
    spatial: tuple[int, ...] = ()
    nonzero: np.ndarray | None = None
    for path in case.images:
        image, data = _read(path, info.root)
        if info.convention == "msd" and (n_channels > 1 or (data.ndim == 4
                                                            and data.shape[-1] == 1)):
            channels_last = data  # MSD: one file, channels on the last axis
            file_spatial = data.shape[:-1]
            mask = np.any(channels_last != 0, axis=-1)
        else:
            file_spatial = data.shape
            mask = data != 0
        if len(file_spatial) not in (2, 3):
            raise ValueError(f"{path}: shape {data.shape} is not a 2D or 3D image "
                             "(`segmentation data check` explains the expected layout)")
        if affine is None:
            affine, spatial, nonzero = reader_affine(image), tuple(file_spatial), mask
        elif tuple(file_spatial) != spatial:
            raise ValueError(f"{path}: shape {tuple(file_spatial)} differs from the case's "
                             f"first channel {spatial}; `segmentation data check "
                             f"{info.root}` lists such problems")
        else:
            nonzero = nonzero | mask
    dims = len(spatial)
    orientation = ORIENTATION[:dims]
    spacing = oriented_spacing(affine, voxel_spacing(affine, dims), orientation)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"{case.images[0]}: voxel spacing {tuple(spacing)} is not positive; "
                         "write the real spacing into the header")
    shape = oriented_spacing(affine, spatial, orientation)
    cropped = oriented_spacing(affine, _bounding_box_shape(nonzero), orientation)
    return CaseFingerprint(case.case_id, tuple(round(float(s), 6) for s in spacing),
                           tuple(int(n) for n in shape), tuple(int(n) for n in cropped))


def _read(path: Path, root: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """A NIfTI file's image object and voxels; one-line ValueError when it cannot be."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (`segmentation data check {root}` lists every "
                         "problem of the dataset)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = nib.load(str(path))
            data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many kinds: ImageFileError, EOFError, ...
        reason = str(error) or type(error).__name__
        raise ValueError(f"{path}: cannot be read (truncated or corrupt: {reason})") from error
    return image, data


def _bounding_box_shape(mask: np.ndarray) -> tuple[int, ...]:
    """Extent of the True voxels along every axis; the whole shape when there are none."""
    if not mask.any():
        return tuple(mask.shape)
    extents = []
    for axis in range(mask.ndim):
        along = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        extents.append(int(along[-1] - along[0] + 1))
    return tuple(extents)

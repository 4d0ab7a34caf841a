"""Preprocessing: defined once, fitted to a dataset, reused by training, validation and inference.

A :class:`Preprocessing` holds every number that turns a scan on disk into network input
(orientation, target spacing, intensity statistics). It is fitted to the training cases once
(:func:`fit_preprocessing`, the dataset "fingerprint"), saved in checkpoints as a plain dict and
rebuilt from there by inference, so a checkpoint alone reproduces the input pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityd,
    Spacingd,
)

from segmentation.data.intensity import ClipAndNormalized
from segmentation.data.layout import Case

NORMALIZATIONS = ("ct", "zscore", "minmax", "none")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's world axes
_CT_SAMPLES_PER_CASE = 10_000  # foreground voxels sampled per case for CT statistics


@dataclass
class Preprocessing:
    """The input pipeline's settings, as stored in a checkpoint.

    Attributes:
        spatial_dims: 2 or 3, the dimensionality of the scans.
        orientation: axis codes every scan is reoriented to (e.g. "RAS").
        spacing: target voxel spacing in mm, in ``orientation`` axis order; None keeps each
            scan's own spacing.
        normalization: "ct" (clip to dataset percentiles, z-score with dataset statistics),
            "zscore" (per image and channel), "minmax" (per image to [0, 1]) or "none".
        channel_stats: for "ct": per channel {"lower", "upper", "mean", "std"}.
        crop_foreground: crop each scan to its non-zero bounding box (nnU-Net does this for
            scans with a zero background, e.g. skull-stripped MRI).
    """

    spatial_dims: int = 3
    orientation: str = "RAS"
    spacing: tuple[float, ...] | None = None
    normalization: str = "zscore"
    channel_stats: list[dict[str, float]] = field(default_factory=list)
    crop_foreground: bool = False

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r} is not supported; choose one "
                             f"of {', '.join(NORMALIZATIONS)}")
        if self.normalization == "ct" and not self.channel_stats:
            raise ValueError("normalization='ct' needs dataset statistics: build the "
                             "preprocessing with fit_preprocessing(...)")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
            if len(self.spacing) != self.spatial_dims or min(self.spacing) <= 0:
                raise ValueError(f"spacing {self.spacing} must have {self.spatial_dims} positive "
                                 "entries")
        self.orientation = self.orientation[: self.spatial_dims]

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints and YAML."""
        data = asdict(self)
        data["spacing"] = list(self.spacing) if self.spacing is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`as_dict`."""
        return cls(**data)

    def transforms(self, keys: Sequence[str] = ("image", "label")) -> Compose:
        """The MONAI chain from file names to a preprocessed, channel-first volume.

        Args:
            keys: "image" and, when labels are loaded, "label". A multi-channel case gives the
                image as a list of files (one per channel), stacked into channels.

        Returns:
            A Compose whose output holds ``image`` (C, *S) float32 and ``label`` (1, *S)
            MetaTensors in the target orientation and spacing. It is invertible (MONAI
            ``Invertd``), which inference uses to map predictions back onto the scan.
        """
        keys = list(keys)
        has_label = "label" in keys
        steps: list = [
            LoadImaged(keys, reader="NibabelReader", image_only=True),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes=self.orientation, labels=_RAS_LABELS),
        ]
        if self.spacing is not None:
            steps.append(Spacingd(keys, pixdim=self.spacing,
                                  mode=("bilinear", "nearest") if has_label else "bilinear"))
        if self.crop_foreground:
            steps.append(CropForegroundd(keys, source_key="image", select_fn=_nonzero,
                                         allow_smaller=True))
        steps.append(self._normalization())
        steps.append(EnsureTyped(keys, dtype=None))
        if has_label:
            steps.append(EnsureTyped("label", dtype=np.uint8))
        return Compose(steps)

    def _normalization(self) -> Any:
        if self.normalization == "ct":
            return ClipAndNormalized("image", self.channel_stats)
        if self.normalization == "zscore":
            return NormalizeIntensityd("image", channel_wise=True)
        if self.normalization == "minmax":
            return ScaleIntensityd("image", minv=0.0, maxv=1.0, channel_wise=True)
        return EnsureTyped("image", dtype=np.float32)


def _nonzero(x: Any) -> Any:
    return x != 0


def oriented_spacing(affine: np.ndarray, zooms: Sequence[float], orientation: str) -> np.ndarray:
    """Voxel spacing reordered to the axes of ``orientation`` (e.g. "RAS").

    Args:
        affine: the scan's 4×4 voxel-to-world affine.
        zooms: spacing along the scan's voxel axes.
        orientation: target axis codes, as many as spatial axes.
    """
    dims = len(orientation)
    ornt = nib.orientations.io_orientation(affine[: dims + 1, : dims + 1]
                                           if dims < 3 else affine)
    target = nib.orientations.axcodes2ornt(orientation)
    transform = nib.orientations.ornt_transform(ornt, target)
    spacing = np.empty(dims)
    for axis in range(dims):
        spacing[int(transform[axis, 0])] = zooms[axis]
    return spacing


def fit_preprocessing(cases: Sequence[Case], *, spatial_dims: int, normalization: str = "zscore",
                      spacing: Sequence[float] | str | None = "median", orientation: str = "RAS",
                      crop_foreground: bool = False, seed: int = 0) -> Preprocessing:
    """Fit preprocessing to training cases (the dataset fingerprint).

    Args:
        cases: the training cases (validation cases must not leak into the statistics).
        spatial_dims: 2 or 3.
        normalization: see :class:`Preprocessing`.
        spacing: "median" (the median spacing of ``cases``, as nnU-Net), explicit values, or
            None to keep each scan's spacing.
        orientation: target axis codes.
        crop_foreground: see :class:`Preprocessing`.
        seed: seed for sampling foreground voxels for CT statistics.
    """
    orientation = orientation[:spatial_dims]
    target: tuple[float, ...] | None
    if spacing == "median":
        spacings = []
        for case in cases:
            header_image = nib.load(str(case.images[0]))
            zooms = header_image.header.get_zooms()[:spatial_dims]
            spacings.append(oriented_spacing(header_image.affine, zooms, orientation))
        target = tuple(float(s) for s in np.median(np.stack(spacings), axis=0))
    elif spacing is None or isinstance(spacing, str):
        if isinstance(spacing, str):
            raise ValueError(f"spacing={spacing!r}: use 'median', a list of numbers or null")
        target = None
    else:
        target = tuple(float(s) for s in spacing)
    stats = _ct_statistics(cases, seed) if normalization == "ct" else []
    return Preprocessing(spatial_dims=spatial_dims, orientation=orientation, spacing=target,
                         normalization=normalization, channel_stats=stats,
                         crop_foreground=crop_foreground)


def _ct_statistics(cases: Sequence[Case], seed: int) -> list[dict[str, float]]:
    """Per-channel 0.5/99.5 percentiles, mean and std of foreground voxels (nnU-Net's CT scheme).

    Foreground is where the label is non-zero; up to 10,000 voxels are sampled per case.
    """
    rng = np.random.default_rng(seed)
    samples: list[list[np.ndarray]] = []
    for case in cases:
        if case.label is None:
            continue
        label = np.asanyarray(nib.load(str(case.label)).dataobj)
        mask = label > 0
        channels = [np.asanyarray(nib.load(str(p)).dataobj, dtype=np.float32)
                    for p in case.images]
        if len(channels) == 1 and channels[0].ndim == label.ndim + 1:  # MSD: channels last
            channels = list(np.moveaxis(channels[0], -1, 0))
        for c, image in enumerate(channels):
            values = image[mask]
            if values.size > _CT_SAMPLES_PER_CASE:
                values = rng.choice(values, _CT_SAMPLES_PER_CASE, replace=False)
            while len(samples) <= c:
                samples.append([])
            samples[c].append(values)
    stats = []
    for values_per_case in samples:
        values = np.concatenate(values_per_case) if values_per_case else np.zeros(1)
        if values.size < 2:
            raise ValueError("normalization='ct' needs labelled foreground to compute "
                             "intensity statistics; the training cases have none")
        lower, upper = np.percentile(values, [0.5, 99.5])
        clipped = np.clip(values, lower, upper)
        stats.append({"lower": float(lower), "upper": float(upper),
                      "mean": float(clipped.mean()), "std": float(max(clipped.std(), 1e-8))})
    return stats

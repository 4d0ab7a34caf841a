"""Preprocessing: defined once, fitted to a dataset, reused by training, validation and inference.

A :class:`Preprocessing` holds every number that turns a scan on disk into network input
(orientation, target spacing, intensity statistics). It is fitted to the training cases once
(:func:`fit_preprocessing`, the dataset "fingerprint"), saved in checkpoints as a plain dict and
rebuilt from there by inference, so a checkpoint alone reproduces the input pipeline.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityd,
    Spacingd,
)

from segmentation.data.intensity import ClipAndNormalized, ZScoreOverForegroundd
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
        zscore_nonzero: for "zscore": mean and std over the foreground only, the voxels
            non-zero in any channel, and the background stays 0 (nnU-Net's normalisation
            within the foreground mask). None (the default) follows ``crop_foreground``; see
            :meth:`from_dict` for older checkpoints.
    """

    spatial_dims: int = 3
    orientation: str = "RAS"
    spacing: tuple[float, ...] | None = None
    normalization: str = "zscore"
    channel_stats: list[dict[str, float]] = field(default_factory=list)
    crop_foreground: bool = False
    zscore_nonzero: bool | None = None

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
        if self.zscore_nonzero is None:
            self.zscore_nonzero = bool(self.crop_foreground)

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints and YAML."""
        data = asdict(self)
        data["spacing"] = list(self.spacing) if self.spacing is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`as_dict`; also reads dicts of checkpoints from before a setting.

        A dict without ``zscore_nonzero`` was fitted when "zscore" always used the whole
        image, so it gets False whatever ``crop_foreground`` says.
        """
        return cls(**{"zscore_nonzero": False, **data})

    def transforms(self, keys: Sequence[str] = ("image", "label"), max_label: int = 255
                   ) -> Compose:
        """The MONAI chain from file names to a preprocessed, channel-first volume.

        Args:
            keys: "image" and, when labels are loaded, "label". A multi-channel case gives the
                image as a list of files (one per channel), stacked into channels.
            max_label: the largest label value of the dataset (dataset.json's labels); it picks
                the label dtype (:func:`label_dtype`). A label file with values outside that
                dtype's range raises ValueError naming the file instead of wrapping around.

        Returns:
            A Compose whose output holds ``image`` (C, *S) float32 and ``label`` (1, *S) of
            that dtype, MetaTensors in the target orientation and spacing. It is invertible
            (MONAI ``Invertd``), which inference uses to map predictions back onto the scan.
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
            steps.append(CastLabeld("label", label_dtype(max_label)))
        return Compose(steps)

    def _normalization(self) -> Any:
        if self.normalization == "ct":
            return ClipAndNormalized("image", self.channel_stats)
        if self.normalization == "zscore":
            if self.zscore_nonzero:
                return ZScoreOverForegroundd("image")
            return NormalizeIntensityd("image", channel_wise=True)
        if self.normalization == "minmax":
            return ScaleIntensityd("image", minv=0.0, maxv=1.0, channel_wise=True)
        return EnsureTyped("image", dtype=np.float32)


def _nonzero(x: Any) -> Any:
    return x != 0


def label_dtype(max_label: int) -> np.dtype:
    """The smallest of uint8, int16 and int32 that holds label values 0..``max_label``.

    Raises:
        ValueError: if ``max_label`` is negative or beyond int32.
    """
    for dtype in (np.uint8, np.int16, np.int32):
        if 0 <= max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"max_label={max_label} is not supported; label values must lie in "
                     f"0..{np.iinfo(np.int32).max}")


class CastLabeld(MapTransform):
    """Cast integer label maps to ``dtype``, refusing values that the dtype cannot hold.

    Args:
        keys: keys of (1, *S) label maps (tensors; MetaTensors keep their metadata).
        dtype: an integer dtype, e.g. from :func:`label_dtype`.
    """

    def __init__(self, keys: KeysCollection, dtype: np.dtype | type) -> None:
        super().__init__(keys)
        self.dtype = np.dtype(dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Cast every key; a value outside the dtype's range raises ValueError naming the file."""
        d = dict(data)
        limits = np.iinfo(self.dtype)
        for key in self.key_iterator(d):
            label = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(d[key])
            if label.numel():
                low, high = float(label.min()), float(label.max())
                if low < limits.min or high > limits.max:
                    source = getattr(label, "meta", {}).get("filename_or_obj", key)
                    raise ValueError(
                        f"{source}: label values {low:g}..{high:g} do not fit {self.dtype.name}; "
                        "declare every label value in dataset.json (the largest one picks the "
                        "label dtype) or remove the undeclared values")
            d[key] = label.to(getattr(torch, self.dtype.name))
        return d


def reader_affine(image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """The 4×4 voxel-to-world affine of a loaded NIfTI file as the preprocessing reads it.

    MONAI's NibabelReader repairs a header whose sform disagrees with its pixdim (an sform
    rewritten without updating pixdim): it takes the qform instead (whose spacing is pixdim),
    or, when that disagrees too, keeps the sform. Orientation and Spacing then work on that
    affine, so everything fitted to the scans' geometry must read it the same way; nibabel's
    ``image.affine`` is the sform whenever one is set. ``image`` is left unchanged.

    Args:
        image: a file opened with ``nibabel.load`` (the voxel data is not read).
    """
    copy = type(image).from_image(image) if isinstance(image, nib.Nifti1Pair) else image
    return np.asarray(correct_nifti_header_if_necessary(copy).affine, dtype=float)


def voxel_spacing(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """Voxel spacing along the voxel axes: the column norms of the affine, as MONAI computes it.

    ``affine`` is 4×4 (see :func:`reader_affine`); a 2D scan uses its upper-left 2×2 block.
    """
    block = np.asarray(affine, dtype=float)[:spatial_dims, :spatial_dims]
    return np.sqrt((block ** 2).sum(0))


def oriented_spacing(affine: np.ndarray, zooms: Sequence[float], orientation: str) -> np.ndarray:
    """Voxel spacing reordered to the axes of ``orientation`` (e.g. "RAS", one per spatial axis).

    ``zooms`` is the spacing along the voxel axes of the scan with 4×4 ``affine``.
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

    ``cases`` are the training cases only: validation cases must not leak into the statistics.
    ``spacing`` is "median" (the median spacing of ``cases``, as nnU-Net, read from the affine
    that MONAI resamples by: see :func:`reader_affine`), explicit values, or None to keep each
    scan's spacing; ``seed`` seeds the sampling of foreground voxels for CT statistics. The other
    arguments are as for :class:`Preprocessing`.
    """
    orientation = orientation[:spatial_dims]
    target: tuple[float, ...] | None
    if spacing == "median":
        spacings = []
        for case in cases:
            affine = reader_affine(nib.load(str(case.images[0])))
            spacings.append(oriented_spacing(affine, voxel_spacing(affine, spatial_dims),
                                             orientation))
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
            if image.shape != label.shape:
                image_file = case.images[min(c, len(case.images) - 1)]
                raise ValueError(f"{case.label}: shape {label.shape} differs from its image "
                                 f"{image_file} {image.shape} (channel {c}); fix the files "
                                 "(segmentation data check lists such problems)")
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

"""Training patches: foreground-oversampled crops with the network's input and output shapes.

:class:`RandomPatches` draws them from preprocessed volumes through :func:`patch_transforms`.

MONAI's RandCropByPosNegLabeld fails on all-background labels and cannot pair an image window
with a smaller, center-aligned label window (what a "valid"-padding U-Net predicts), so the crop
is written here; everything after it (spatial and intensity augmentation) is MONAI's.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
)
from torch.utils.data import Dataset

from segmentation.data.augmentation_settings import (
    AugmentationSettings,
    draw_spatial,
    sample_window,
    spatial_matrices,
)

CLASS_LOCATIONS = "class_locations"
SPATIAL = "spatial"  # a window's rotation and scaling, drawn where it was cut


class ClassLocationsd(MapTransform):
    """Record where each foreground class lies, once per volume, so crops need not search.

    Finding a class's voxels is a pass over the whole volume; done for every forced patch it
    costs as much as the rest of a CT-sized patch's preparation. As nnU-Net does, the locations
    are computed once, next to the cached volume, and sampled down to ``max_per_class``.

    Args:
        label_key: key of the (1, *S) label.
        max_per_class: voxels kept per class (an even random sample, fixed by ``seed``).
        seed: seed of that sample (deterministic, so a cached volume never changes).
    """

    def __init__(self, label_key: str = "label", max_per_class: int = 10_000,
                 seed: int = 1234) -> None:
        MapTransform.__init__(self, [label_key])
        self.label_key, self.max_per_class, self.seed = label_key, max_per_class, seed

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add ``class_locations``: {label value: (V, spatial_dims) int32 voxel indices}."""
        d = dict(data)
        label = np.asarray(d[self.label_key])[0]                     # (*S)
        rng = np.random.default_rng(self.seed)
        locations = {}
        for value in present_classes(label):
            voxels = np.argwhere(label == value)                     # (V, spatial_dims)
            if len(voxels) > self.max_per_class:
                voxels = voxels[np.sort(rng.choice(len(voxels), self.max_per_class,
                                                   replace=False))]
            locations[int(value)] = voxels.astype(np.int32)
        d[CLASS_LOCATIONS] = locations
        return d


def class_locations(data: Mapping[Hashable, Any], label_key: str = "label"
                    ) -> dict[int, np.ndarray]:
    """The volume's recorded class locations (:class:`ClassLocationsd`), or found now."""
    recorded = data.get(CLASS_LOCATIONS)
    if recorded is not None:
        return recorded
    return ClassLocationsd(label_key, max_per_class=2**62)(data)[CLASS_LOCATIONS]


class ForegroundOversampledCropd(Randomizable, MapTransform):
    """Crop an image window and its label so that a fraction of patches shows foreground.

    The image and label are reflect-padded by the network's margin (half the difference between
    input and output size) so every voxel of the scan can fall inside the label window, exactly
    as overlap-tile inference mirror-pads a scan. With probability ``foreground_fraction`` the
    window is placed so that a voxel of a random foreground class lies inside the label window;
    otherwise it is placed uniformly at random. Labels without foreground fall back to uniform
    windows. Class locations recorded by :class:`ClassLocationsd` are used (and dropped from
    the output) where present; otherwise they are found in the label.

    Args:
        image_key: key of the (C, *S) image.
        label_key: key of the (1, *S) label.
        input_size: spatial size of the image window (the network's input).
        output_size: spatial size of the label window (the network's output), centered in the
            image window. The label is returned at ``input_size``; crop it afterwards
            (:func:`patch_transforms` does, after spatial augmentation).
        foreground_fraction: probability of a forced-foreground window (nnU-Net: 1/3).
    """

    def __init__(self, image_key: str, label_key: str, input_size: Sequence[int],
                 output_size: Sequence[int], foreground_fraction: float = 1 / 3) -> None:
        MapTransform.__init__(self, [image_key, label_key])
        self.image_key, self.label_key = image_key, label_key
        self.input_size = tuple(int(s) for s in input_size)
        self.output_size = tuple(int(s) for s in output_size)
        if len(self.input_size) != len(self.output_size):
            raise ValueError(f"input size {self.input_size} and output size {self.output_size} "
                             "have different dimensions")
        margins = [i - o for i, o in zip(self.input_size, self.output_size, strict=True)]
        if any(m < 0 or m % 2 for m in margins):
            raise ValueError(f"output size {self.output_size} must be ≤ input size "
                             f"{self.input_size} with an even difference on every axis")
        self.margin = tuple(m // 2 for m in margins)
        self.foreground_fraction = foreground_fraction
        self._force_foreground = False

    def randomize(self, data: Any = None) -> None:
        """Decide whether this patch is forced to show foreground."""
        self._force_foreground = self.R.rand() < self.foreground_fraction

    def _padding(self, shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """Shape of the scan mirror-padded by the margin, then up to the window; padding before.

        numpy's "reflect" (the edge voxel is not repeated) is overlap-tile's mirror padding
        at inference, so the border context a network learns is the one it is given later.
        Only the window is ever materialised (:func:`reflect_window`).
        """
        padded, before = [], []
        for n, size, margin in zip(shape, self.input_size, self.margin, strict=True):
            extra = max(size - (n + 2 * margin), 0)
            before.append(margin + extra // 2)
            padded.append(n + 2 * margin + extra)
        return padded, before

    def _window_start(self, voxels: np.ndarray, padded_shape: Sequence[int],
                      before: Sequence[int]) -> list[int]:
        """A window start whose label part contains a random one of ``voxels`` (if any)."""
        highest = [n - s for n, s in zip(padded_shape, self.input_size, strict=True)]
        if len(voxels) == 0:
            return [int(self.R.randint(0, h + 1)) for h in highest]
        voxel = voxels[self.R.randint(len(voxels))] + np.asarray(before)
        start = []
        for c, h, m, out in zip(voxel, highest, self.margin, self.output_size, strict=True):
            low, high = max(c - m - out + 1, 0), min(c - m, h)  # c inside the label window
            start.append(int(self.R.randint(low, high + 1)))
        return start

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return the data with ``image`` and ``label`` cropped to ``input_size``."""
        self.randomize()
        voxels = None
        if self._force_foreground:
            # As nnU-Net: a random foreground class first, then a random voxel of it, so small
            # structures are seen as often as large ones.
            locations = class_locations(data, self.label_key)
            if locations:
                classes = sorted(locations)
                voxels = locations[classes[self.R.randint(len(classes))]]
        return self.crop(data, voxels)

    def crop(self, data: Mapping[Hashable, Any], voxels: np.ndarray | None
             ) -> dict[Hashable, Any]:
        """Crop a window whose label part contains one of ``voxels``, or a uniform one.

        Args:
            data: ``image`` (C, *S) and ``label`` (1, *S).
            voxels: (V, spatial_dims) candidate voxel indices of the label, one of them picked
                at random; None or empty places the window uniformly.

        Returns:
            The data with ``image`` and ``label`` as (C or 1, *input_size) tensors.
        """
        d = dict(data)
        d.pop(CLASS_LOCATIONS, None)
        image = np.asarray(d[self.image_key], dtype=np.float32)
        label = np.asarray(d[self.label_key])
        origin = self.window_origin(image.shape[1:], voxels)
        d[self.image_key] = torch.from_numpy(reflect_window(image, origin, self.input_size))
        d[self.label_key] = torch.from_numpy(reflect_window(label, origin, self.input_size))
        return d

    def window_origin(self, shape: Sequence[int], voxels: np.ndarray | None) -> list[int]:
        """First voxel of a random window (see :meth:`crop`), in scan coordinates.

        Args:
            shape: the scan's spatial shape.
            voxels: (V, spatial_dims) candidate voxels for the label window, or None.
        """
        padded, before = self._padding(shape)
        empty = np.empty((0, len(shape)), dtype=np.int64)
        start = self._window_start(empty if voxels is None else voxels, padded, before)
        return [s - b for s, b in zip(start, before, strict=True)]


class AugmentationWindowCropd(ForegroundOversampledCropd):
    """Cut a patch's window for the batched device augmentation, with its rotation and scaling.

    The patch is placed as :class:`ForegroundOversampledCropd` places it (same random stream,
    same foreground forcing); then this patch's rotation and scaling are drawn
    (:func:`~segmentation.data.augmentation_settings.draw_spatial`) and the window cut around
    it is the patch itself when neither applies, else the bounding box of the rotated and
    scaled patch plus a voxel (:func:`~segmentation.data.augmentation_settings.sample_window`).
    Most patches are not moved (p 0.64 at nnU-Net's defaults), so the workers copy and the
    loader moves little more than the patches, where one worst-case window for all would be
    about 11 times their size.

    Returns ``image`` (C, *window) float32, ``label`` (1, *window) (uint8 where the values
    fit) and ``spatial``, the (2 + A + d,) row of the draw.
    """

    def __init__(self, image_key: str, label_key: str, input_size: Sequence[int],
                 output_size: Sequence[int], foreground_fraction: float,
                 settings: AugmentationSettings) -> None:
        super().__init__(image_key, label_key, input_size, output_size, foreground_fraction)
        self.settings = settings

    def crop(self, data: Mapping[Hashable, Any], voxels: np.ndarray | None
             ) -> dict[Hashable, Any]:
        """The window of a patch whose label part contains one of ``voxels`` (or uniform)."""
        d = dict(data)
        d.pop(CLASS_LOCATIONS, None)
        image = np.asarray(d[self.image_key], dtype=np.float32)
        label = np.asarray(d[self.label_key])
        origin = self.window_origin(image.shape[1:], voxels)           # of the patch
        dims = len(self.input_size)
        row = draw_spatial(self.settings, self.R, dims, 1)[0]
        moved = row[0] > 0.5 or row[1] > 0.5
        window = sample_window(spatial_matrices(row, dims)[0] if moved else None,
                               self.input_size, self.output_size)
        start = [o - (w - n) // 2 for o, w, n in zip(origin, window, self.input_size,
                                                      strict=True)]
        d[self.image_key] = torch.from_numpy(reflect_window(image, start, window))
        d[self.label_key] = compact_label(reflect_window(label, start, window))
        d[SPATIAL] = row  # numpy float64: a "true" precision's input cast leaves it alone
        return d


def compact_label(label: np.ndarray) -> torch.Tensor:
    """Labels as a uint8 tensor when every value fits (8× less to copy to the device)."""
    fits = label.size == 0 or (int(label.min()) >= 0 and int(label.max()) < 256)
    return torch.from_numpy(np.ascontiguousarray(label.astype(np.uint8 if fits else np.int64)))


def collate_windows(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch of :class:`AugmentationWindowCropd` outputs, windows of their own sizes.

    Returns:
        {"image": list of (C, *window_b), "label": list of (1, *window_b), "spatial":
        (B, 2 + A + d) numpy float64, the draws the windows were cut for}.
    """
    return {"image": [item["image"] for item in items],
            "label": [item["label"] for item in items],
            SPATIAL: np.stack([np.asarray(item[SPATIAL], dtype=np.float64) for item in items])}


def reflect_window(array: np.ndarray, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array``'s window at ``origin`` of ``size`` (spatial axes), mirrored where it leaves.

    Equal to cutting the window out of ``np.pad(array, ..., mode="reflect")`` with enough
    padding, but reads only the window's voxels: padding a whole CT scan for every patch costs
    more than the rest of the patch's preparation.

    Args:
        array: (C, *S).
        origin: the window's first voxel per spatial axis, in ``array``'s coordinates (may be
            negative or reach beyond S).
        size: the window's size per spatial axis.

    Returns:
        (C, *size), contiguous.
    """
    reads, pads, cuts = [], [], []
    for o, n, length in zip(origin, size, array.shape[1:], strict=True):
        before, after = max(0, -o), max(0, o + n - length)
        first, stop = max(o, 0), min(o + n, length)
        # mirrored voxels must come from what is read: extend the read where they lie beyond
        first = max(0, min(first, length - 1 - after)) if after else first
        stop = min(length, max(stop, before + 1)) if before else stop
        reads.append(slice(first, stop))
        pads.append((before, after))
        offset = o - (first - before)                  # the window's start in the padded read
        cuts.append(slice(offset, offset + n))
    window = array[(slice(None), *reads)]
    if any(p != (0, 0) for p in pads):
        window = np.pad(window, [(0, 0), *pads], mode="reflect")
    return np.ascontiguousarray(window[(slice(None), *cuts)])


def present_classes(label: np.ndarray) -> np.ndarray:
    """Foreground label values (> 0) present in ``label``, ascending."""
    return np.unique(label[label > 0])


def intensity_augmentation(spatial_dims: int,
                           settings: AugmentationSettings | None = None) -> list[Any]:
    """nnU-Net's intensity augmentation of ``image`` with MONAI's transforms, 2D or 3D.

    Gaussian noise, blur, brightness, contrast, simulated low resolution, gamma of the inverted
    intensities and gamma, with the
    probabilities and ranges of ``settings`` (defaults: nnU-Net's); a step with probability 0
    is left out. Shared by the 3D patches and the 2D slices (see
    :func:`~segmentation.data.slices.slice_augmentation`); the batched device path
    (:mod:`segmentation.data.batch_augmentation`) does the same steps in the same order.
    """
    s = settings or AugmentationSettings()
    sigma = {f"sigma_{axis}": s.blur_sigma for axis in "xyz"[:spatial_dims]}
    steps = [
        (s.noise_probability, lambda: RandGaussianNoised("image", prob=s.noise_probability,
                                                         std=s.noise_std)),
        (s.blur_probability, lambda: RandGaussianSmoothd("image", prob=s.blur_probability,
                                                         **sigma)),
        (s.brightness_probability, lambda: RandScaleIntensityd(
            "image", factors=_factor_range(s.brightness_range), prob=s.brightness_probability)),
        (s.contrast_probability, lambda: RandScaleIntensityFixedMeand(
            "image", factors=_factor_range(s.contrast_range), prob=s.contrast_probability,
            fixed_mean=True, preserve_range=True)),
        (s.low_resolution_probability, lambda: RandSimulateLowResolutiond(
            "image", prob=s.low_resolution_probability, zoom_range=s.low_resolution_zoom,
            downsample_mode="nearest",
            upsample_mode="bilinear" if spatial_dims == 2 else "trilinear")),
        (s.inverted_gamma_probability, lambda: RandAdjustContrastd(
            "image", prob=s.inverted_gamma_probability, gamma=s.gamma_range, invert_image=True,
            retain_stats=True)),
        (s.gamma_probability, lambda: RandAdjustContrastd(
            "image", prob=s.gamma_probability, gamma=s.gamma_range, retain_stats=True)),
    ]
    return [make() for probability, make in steps if probability > 0]


def _factor_range(bounds: tuple[float, float]) -> float | tuple[float, float]:
    """MONAI's ``factors`` (x · (1 + factor)) for a factor range: symmetric ones as one number."""
    low, high = bounds[0] - 1, bounds[1] - 1
    return round(high, 12) if abs(low + high) < 1e-12 else (low, high)


def spatial_augmentation(spatial_dims: int, settings: AugmentationSettings) -> list[Any]:
    """Rotation, scaling (MONAI's RandAffined, reflection padding) and mirroring of both keys."""
    keys, s = ["image", "label"], settings
    steps: list[Any] = []
    if s.rotation_probability > 0:
        rotate = (math.radians(s.rotation_degrees),) * (1 if spatial_dims == 2 else 3)
        steps.append(RandAffined(keys, prob=s.rotation_probability, rotate_range=rotate,
                                 mode=("bilinear", "nearest"), padding_mode="reflection"))
    if s.scaling_probability > 0:
        steps.append(RandAffined(keys, prob=s.scaling_probability,
                                 scale_range=(_factor_range(s.scaling_range),) * spatial_dims,
                                 mode=("bilinear", "nearest"), padding_mode="reflection"))
    if s.mirror_probability > 0:
        steps += [RandFlipd(keys, prob=s.mirror_probability, spatial_axis=axis)
                  for axis in range(spatial_dims)]
    return steps


def patch_transforms(spatial_dims: int, input_size: Sequence[int], output_size: Sequence[int], *,
                     foreground_fraction: float = 1 / 3, augment: bool = True,
                     settings: AugmentationSettings | None = None,
                     on_device: bool = False) -> Compose:
    """Preprocessed volume → training patch pair (see :class:`ForegroundOversampledCropd`).

    nnU-Net's augmentation with MONAI's transforms, per patch: :func:`spatial_augmentation`
    and :func:`intensity_augmentation`, with ``settings``; ``augment=False`` gives plain crops.

    With ``on_device`` the chain only cuts windows for the batched device augmentation
    (:class:`AugmentationWindowCropd`; batch them with :func:`collate_windows`).

    Returns:
        A Compose giving ``image`` (C, *input_size) float32 and ``label`` (1, *output_size)
        int64 tensors (or the windows, see above).
    """
    if on_device:
        return Compose([AugmentationWindowCropd("image", "label", input_size, output_size,
                                                foreground_fraction,
                                                settings or AugmentationSettings())])
    steps: list[Any] = [ForegroundOversampledCropd("image", "label", input_size, output_size,
                                                   foreground_fraction)]
    if augment:
        settings = settings or AugmentationSettings()
        steps += [*spatial_augmentation(spatial_dims, settings),
                  *intensity_augmentation(spatial_dims, settings)]
    steps += [
        CenterSpatialCropd("label", roi_size=output_size),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", dtype=torch.long, track_meta=False),
    ]
    return Compose(steps)


class RandomPatches(Dataset):
    """``length`` random training patches; item ``i`` is cut from volume ``i mod n``.

    The sampler's shuffling spreads cases evenly over an epoch (nnU-Net draws 250 batches per
    epoch the same way), and a DistributedSampler splits the items between DDP ranks.

    Args:
        volumes: dataset of preprocessed volumes, with their recorded ``class_locations``.
        transform: the chain of :func:`patch_transforms`.
    """

    def __init__(self, volumes: Dataset, transform: Any, length: int) -> None:
        self.volumes, self.transform, self.length = volumes, transform, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return {"image": (C, *input_size), "label": (1, *output_size)}."""
        volume = self.volumes[index % len(self.volumes)]
        # the crop reads the recorded class locations (and drops them from the patch)
        return self.transform({k: volume[k] for k in ("image", "label", CLASS_LOCATIONS)
                               if k in volume})

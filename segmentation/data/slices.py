"""2D slice mode: slices of preprocessed volumes, augmented with albumentations.

albumentations is the 2D augmentation library (its 3D transforms are crops only), so it moves
and flips the slices; intensities are augmented with the same MONAI transforms as 3D patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from torch.utils.data import Dataset

from segmentation.data.augmentation_settings import AugmentationSettings
from segmentation.data.patches import (
    SPATIAL,
    AugmentationWindowCropd,
    ForegroundOversampledCropd,
    class_locations,
    intensity_augmentation,
)
from segmentation.nets.spatial import center_crop


def slice_augmentation(settings: AugmentationSettings | None = None) -> A.Compose:
    """nnU-Net-like 2D spatial augmentation: rotation, scaling and mirroring, as ``settings``.

    albumentations scales both axes by one factor, drawn uniformly as a magnification (3D
    patches draw one region-size factor per axis). Only the geometric part: albumentations'
    noise, blur and brightness treat float images as [0, 1] and would clip normalised
    intensities, so those come from
    :func:`~segmentation.data.patches.intensity_augmentation` (MONAI's, as in 3D).
    """
    s = settings or AugmentationSettings()
    degrees = s.rotation_degrees
    return A.Compose([
        A.Affine(rotate=(-degrees, degrees), p=s.rotation_probability,
                 interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 border_mode=cv2.BORDER_REFLECT_101),
        # albumentations magnifies by its factor; the settings' factor is the size of the
        # region read (MONAI's, > 1 zooms out), hence the reciprocal range
        A.Affine(scale=(1 / s.scaling_range[1], 1 / s.scaling_range[0]),
                 p=s.scaling_probability,
                 interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 border_mode=cv2.BORDER_REFLECT_101),
        A.HorizontalFlip(p=s.mirror_probability),
        A.VerticalFlip(p=s.mirror_probability),
    ])


class RandomSlices(Randomizable, Dataset):
    """Random 2D training patches from slices of preprocessed 3D volumes.

    Item ``i`` takes volume ``i mod len(volumes)``. With probability ``foreground_fraction`` it
    is forced to show foreground, as nnU-Net does: a random foreground class of the volume, a
    random voxel of that class, its slice, and a window whose label part contains that voxel;
    otherwise a random slice and a uniform window (:class:`ForegroundOversampledCropd`). Image
    and mask are moved and flipped together with albumentations (nearest-neighbour for the
    mask), the image's intensities augmented with MONAI's transforms, and the mask
    center-cropped to the network's output size.

    One random stream drives all of it; it keeps advancing from epoch to epoch, and MONAI's
    DataLoader reseeds it per worker through :meth:`set_random_state`.

    Args:
        volumes: dataset of preprocessed {"image": (C, *S), "label": (1, *S)} volumes.
        axis: spatial axis to slice along (0, 1 or 2).
        input_size: 2D network input size.
        output_size: 2D network output size for it.
        length: number of patches per epoch.
        seed: initial seed (MONAI's DataLoader replaces it per worker).
        settings: augmentation probabilities and ranges (default: nnU-Net's).
        on_device: only cut each slice's window for the batched device augmentation
            (:class:`~segmentation.data.patches.AugmentationWindowCropd`; batch with
            :func:`~segmentation.data.patches.collate_windows`), no augmentation here.
    """

    def __init__(self, volumes: Dataset, axis: int, input_size: Sequence[int],
                 output_size: Sequence[int], length: int, *, foreground_fraction: float = 1 / 3,
                 augment: bool = True, seed: int = 0,
                 settings: AugmentationSettings | None = None, on_device: bool = False
                 ) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {axis}")
        self.volumes, self.axis, self.length = volumes, axis, length
        self.output_size = tuple(output_size)
        self.on_device = on_device
        self.crop = (AugmentationWindowCropd("image", "label", input_size, output_size,
                                             foreground_fraction,
                                             settings or AugmentationSettings())
                     if on_device else
                     ForegroundOversampledCropd("image", "label", input_size, output_size,
                                                foreground_fraction))
        self.foreground_fraction = foreground_fraction
        self.augment = augment
        self.spatial = slice_augmentation(settings)
        self.intensity = Compose(intensity_augmentation(2, settings))
        self.set_random_state(seed)

    def __len__(self) -> int:
        return self.length

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> RandomSlices:
        """Reseed slice choice, crop and augmentation (MONAI's DataLoader calls it per worker).

        Defining it also stops MONAI's recursive reseeding from reaching albumentations'
        Compose, whose ``set_random_state`` takes different arguments.
        """
        super().set_random_state(seed, state)
        self.crop.set_random_state(seed=int(self.R.randint(2**31)))
        self.spatial.set_random_seed(int(self.R.randint(2**31)))
        self.intensity.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data: Any = None) -> None:
        """Decide whether the next patch is forced to show foreground."""
        self._force_foreground = self.R.rand() < self.foreground_fraction

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return {"image": (C, H, W) float32, "label": (1, h, w) int64}.

        With ``on_device``: the slice's window {"image": (C, *window), "label": (1, *window),
        "spatial": its rotation and scaling}.
        """
        volume = self.volumes[index % len(self.volumes)]
        image = np.asarray(volume["image"], dtype=np.float32)      # (C, *S)
        label = np.asarray(volume["label"])                        # (1, *S)
        self.randomize()
        voxels = None
        if self._force_foreground:
            locations = class_locations(volume)
            if locations:
                classes = sorted(locations)
                voxels = locations[classes[self.R.randint(len(classes))]]   # (V, 3)
        if voxels is not None:
            voxel = voxels[self.R.randint(len(voxels))]
            position = int(voxel[self.axis])
            # that class's voxels in the chosen slice, as (y, x) within it
            in_slice = voxels[voxels[:, self.axis] == position]
            voxels = np.delete(in_slice, self.axis, axis=1)
        else:
            position = int(self.R.randint(label.shape[1 + self.axis]))
        image2d = np.take(image, position, axis=1 + self.axis)    # (C, H, W)
        label2d = np.take(label, position, axis=1 + self.axis)    # (1, H, W)
        window = self.crop.crop({"image": image2d, "label": label2d}, voxels)
        if self.on_device:  # the slice's window, its rotation and scaling (collate_windows)
            return {key: window[key] for key in ("image", "label", SPATIAL)}
        image2d, label2d = window["image"].numpy(), window["label"].numpy()
        if self.augment:
            out = self.spatial(image=np.ascontiguousarray(image2d.transpose(1, 2, 0)),
                               mask=np.ascontiguousarray(label2d[0]))
            image2d, label2d = out["image"].transpose(2, 0, 1), out["mask"][None]
            image2d = np.asarray(self.intensity({"image": np.ascontiguousarray(image2d)})["image"])
        label2d = center_crop(label2d, self.output_size)
        return {"image": torch.from_numpy(np.ascontiguousarray(image2d, dtype=np.float32)),
                "label": torch.from_numpy(np.ascontiguousarray(label2d)).long()}


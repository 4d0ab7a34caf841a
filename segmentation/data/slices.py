"""2D slice mode: slices of preprocessed volumes, augmented with albumentations.

albumentations is the 2D augmentation library (its 3D transforms are crops only), so it serves
this mode; the 3D patch mode uses MONAI's transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segmentation.data.patches import ForegroundOversampledCropd


def slice_augmentation() -> A.Compose:
    """nnU-Net-like 2D augmentation: rotation/scaling, mirroring, noise, blur, brightness."""
    return A.Compose([
        A.Affine(rotate=(-30, 30), p=0.2, interpolation=cv2.INTER_LINEAR,
                 mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_REFLECT_101),
        A.Affine(scale=(0.7, 1.4), p=0.2, interpolation=cv2.INTER_LINEAR,
                 mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_REFLECT_101),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.GaussNoise(std_range=(0.0, 0.1), p=0.1),
        A.GaussianBlur(sigma_limit=(0.5, 1.0), p=0.2),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.15),
    ])


class RandomSlices(Dataset):
    """Random 2D training patches from slices of preprocessed 3D volumes.

    Item ``i`` takes volume ``i mod len(volumes)``, picks a slice along ``axis`` (one that shows
    foreground with probability ``foreground_fraction`` when there is one), crops a window with
    :class:`ForegroundOversampledCropd`, augments image and mask together (nearest-neighbour for
    the mask) and center-crops the mask to the network's output size.

    Args:
        volumes: dataset of preprocessed {"image": (C, *S), "label": (1, *S)} volumes.
        axis: spatial axis to slice along (0, 1 or 2).
        input_size: 2D network input size.
        output_size: 2D network output size for it.
        length: number of patches per epoch.
        foreground_fraction: share of patches forced to show foreground.
        augment: apply albumentations augmentation.
        seed: seed of the slice choice (per worker, offset by the item index).
    """

    def __init__(self, volumes: Dataset, axis: int, input_size: Sequence[int],
                 output_size: Sequence[int], length: int, *, foreground_fraction: float = 1 / 3,
                 augment: bool = True, seed: int = 0) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {axis}")
        self.volumes, self.axis, self.length, self.seed = volumes, axis, length, seed
        self.output_size = tuple(output_size)
        self.crop = ForegroundOversampledCropd("image", "label", input_size, output_size,
                                               foreground_fraction)
        self.foreground_fraction = foreground_fraction
        self.augmentation = slice_augmentation() if augment else None

    def __len__(self) -> int:
        return self.length

    def set_random_state(self, seed: int | None = None, state: object = None) -> RandomSlices:
        """Reseed slice choice, crop and augmentation (called by MONAI's DataLoader per worker).

        Defining it also stops MONAI's recursive reseeding from reaching albumentations'
        Compose, whose ``set_random_state`` takes different arguments.
        """
        if seed is not None:
            self.seed = int(seed)
            self.crop.set_random_state(seed=self.seed)
            if self.augmentation is not None:
                self.augmentation.set_random_seed(self.seed)
        return self

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return {"image": (C, H, W) float32, "label": (1, h, w) int64}."""
        volume = self.volumes[index % len(self.volumes)]
        rng = np.random.default_rng([self.seed, index, torch.initial_seed() % 2**32])
        image = np.asarray(volume["image"], dtype=np.float32)
        label = np.asarray(volume["label"])
        shows_foreground = np.flatnonzero(np.moveaxis(label[0], self.axis, 0)
                                          .reshape(label.shape[1 + self.axis], -1).any(1))
        if len(shows_foreground) and rng.random() < self.foreground_fraction:
            position = int(rng.choice(shows_foreground))
        else:
            position = int(rng.integers(label.shape[1 + self.axis]))
        image2d = np.take(image, position, axis=1 + self.axis)         # (C, H, W)
        label2d = np.take(label, position, axis=1 + self.axis)         # (1, H, W)
        self.crop.set_random_state(seed=int(rng.integers(2**31)))
        window = self.crop({"image": image2d, "label": label2d})
        image2d, label2d = window["image"].numpy(), window["label"].numpy()
        if self.augmentation is not None:
            out = self.augmentation(image=np.ascontiguousarray(image2d.transpose(1, 2, 0)),
                                    mask=np.ascontiguousarray(label2d[0]))
            image2d, label2d = out["image"].transpose(2, 0, 1), out["mask"][None]
        label2d = _center_crop(label2d, self.output_size)
        return {"image": torch.from_numpy(np.ascontiguousarray(image2d, dtype=np.float32)),
                "label": torch.from_numpy(np.ascontiguousarray(label2d)).long()}


def _center_crop(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    starts = [(n - s) // 2 for n, s in zip(array.shape[1:], size, strict=True)]
    return array[(slice(None),) + tuple(slice(b, b + s) for b, s in zip(starts, size,
                                                                          strict=True))]

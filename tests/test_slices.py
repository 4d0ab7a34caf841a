"""2D slice mode: intensities survive augmentation, randomness advances, oversampling rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader

from segmentation.data.patches import ForegroundOversampledCropd
from segmentation.data.slices import RandomSlices
from segmentation.inference.tiling import mirror_pad


def normal_volume(shape: tuple[int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A z-scored-looking image (std 3) with a two-class label."""
    rng = np.random.default_rng(seed)
    label = np.zeros((1, *shape), dtype=np.uint8)
    label[0, :, 5:15, 5:15] = 1
    label[0, 3:6, 20:30, 20:30] = 2
    return {"image": (3 * rng.standard_normal((1, *shape))).astype(np.float32), "label": label}


def test_augmented_slices_keep_normalised_intensities():
    """Noise, blur and brightness must not clip z-scored intensities to [0, 1]."""
    slices = RandomSlices([normal_volume((12, 40, 44))], axis=0, input_size=(32, 32),
                          output_size=(32, 32), length=80, augment=True, seed=3)
    for i in range(len(slices)):
        image = slices[i]["image"]
        assert image.min() < -1 and image.max() > 1, (i, image.min(), image.max())


def test_slices_vary_from_epoch_to_epoch_and_repeat_with_the_seed():
    def epochs(seed: int) -> list[torch.Tensor]:
        slices = RandomSlices([normal_volume((12, 40, 44))], axis=0, input_size=(16, 16),
                              output_size=(16, 16), length=8, augment=False, seed=seed)
        loader = DataLoader(slices, batch_size=8, num_workers=0, shuffle=False,
                            generator=torch.Generator().manual_seed(seed))
        return [next(iter(loader))["image"] for _ in range(2)]

    first, second = epochs(0)
    assert not torch.equal(first, second)  # new slices and windows in the next epoch
    again = epochs(0)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])  # reproducible


@pytest.mark.parametrize("fraction", [1 / 3, 1.0])
def test_foreground_is_forced_at_the_configured_rate(fraction):
    """One decision per patch: a rare structure shows in about ``fraction`` of the patches."""
    label = np.zeros((1, 30, 40, 40), dtype=np.uint8)
    label[0, 14:16, 20:22, 20:22] = 1  # 8 voxels in 2 of 30 slices
    volume = {"image": np.zeros((1, 30, 40, 40), dtype=np.float32), "label": label}
    slices = RandomSlices([volume], axis=0, input_size=(12, 12), output_size=(12, 12),
                          length=900, foreground_fraction=fraction, augment=False, seed=1)
    shown = np.mean([bool(slices[i]["label"].any()) for i in range(len(slices))])
    # chance alone: 2/30 slices × (12/40)² windows ≈ 0.6 %
    assert abs(shown - fraction) < 0.06, shown


def test_training_crops_mirror_pad_as_overlap_tile_does():
    crop = ForegroundOversampledCropd("image", "label", (20, 9, 7), (4, 5, 7))
    image = np.random.default_rng(0).standard_normal((2, 3, 1, 6)).astype(np.float32)
    padded, before = crop._pad(image)
    assert before == [8, 4, 0]
    pads = [(b, s - n - b) for b, s, n in zip(before, padded.shape[1:], image.shape[1:],
                                              strict=True)]
    expected = mirror_pad(torch.from_numpy(image)[None], pads)[0].numpy()
    assert np.array_equal(padded, expected)

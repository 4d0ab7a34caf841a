"""2D slice mode: intensities survive augmentation, randomness advances, oversampling rate,
labels stay integral, forced classes come from the recorded locations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader

from segmentation import UNet
from segmentation.data.patches import ClassLocationsd
from segmentation.data.slices import RandomSlices


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


def test_slices_take_the_forced_class_from_the_record(two_class_volume):
    volume = ClassLocationsd()(two_class_volume())
    slices = RandomSlices([volume], axis=2, input_size=(6, 6), output_size=(6, 6), length=300,
                          foreground_fraction=1.0, augment=False, seed=0)
    shown = [set(np.unique(slices[i]["label"].numpy())) for i in range(len(slices))]
    assert all(s - {0} for s in shown)             # every patch shows foreground
    share_tiny = np.mean([2 in s for s in shown])  # class first: the 8-voxel class half the time
    assert 0.4 < share_tiny < 0.6, share_tiny


def test_slice_mode_keeps_labels_integral_and_pairs_shapes(striped_volume):
    volume = striped_volume((12, 40, 44))
    net = UNet(spatial_dims=2, features=(4, 8), padding="valid")
    input_size = net.valid_input_shape((30, 30))
    output_size = net.output_shape(input_size)
    slices = RandomSlices([volume], axis=0, input_size=input_size, output_size=output_size,
                          length=20, augment=True)
    values = set()
    for i in range(len(slices)):
        item = slices[i]
        assert item["image"].shape == (1, *input_size)
        assert item["label"].shape == (1, *output_size)
        assert item["label"].dtype == torch.long
        values |= set(item["label"].unique().tolist())
    assert values <= {0, 1, 2}

"""Training patches: image and label paired, foreground oversampled from class locations
recorded once per volume, small volumes padded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation import UNet
from segmentation.data.patches import (
    CLASS_LOCATIONS,
    ClassLocationsd,
    ForegroundOversampledCropd,
    RandomPatches,
    patch_transforms,
    reflect_window,
)
from segmentation.inference.tiling import mirror_pad


@pytest.mark.parametrize("augment", [False, True])
def test_valid_patches_pair_image_and_center_aligned_label(augment, striped_volume):
    net = UNet(spatial_dims=3, features=(4, 8), padding="valid")
    input_size = net.valid_input_shape((26, 26, 26))
    output_size = net.output_shape(input_size)
    margin = [(i - o) // 2 for i, o in zip(input_size, output_size, strict=True)]
    transform = patch_transforms(3, input_size, output_size, augment=augment)
    transform.set_random_state(seed=1)
    agreement = []
    for _ in range(6):
        patch = transform(striped_volume())
        assert patch["image"].shape == (1, *input_size)
        assert patch["label"].shape == (1, *output_size)
        assert patch["label"].dtype == torch.long
        center = patch["image"][(0,) + tuple(slice(m, m + o) for m, o in zip(margin, output_size,
                                                                           strict=True))]
        agreement.append((torch.round(center / 10) == patch["label"][0]).float().mean().item())
    if augment:  # interpolation blurs the image near block borders; the layout must match
        assert min(agreement) > 0.75
    else:
        assert agreement == [1.0] * 6


def test_foreground_oversampling_ratio_and_all_background_labels():
    label = np.zeros((1, 80, 80, 80), dtype=np.uint8)
    label[0, 70:72, 5:7, 40:42] = 1  # a tiny structure that random windows rarely hit
    data = {"image": torch.zeros(1, 80, 80, 80), "label": torch.from_numpy(label)}
    crop = ForegroundOversampledCropd("image", "label", (24, 24, 24), (16, 16, 16),
                                      foreground_fraction=1 / 3)
    crop.set_random_state(seed=0)
    hits = []
    for _ in range(600):
        window = crop(data)["label"][0, 4:20, 4:20, 4:20]  # the label (output) window
        hits.append(bool(window.any()))
    assert 0.28 < np.mean(hits) < 0.42
    empty = {"image": torch.zeros(1, 30, 30, 30), "label": torch.zeros(1, 30, 30, 30)}
    assert crop(empty)["image"].shape == (1, 24, 24, 24)  # no foreground: a random window


def test_patches_from_volumes_smaller_than_the_window_are_padded():
    crop = ForegroundOversampledCropd("image", "label", (32, 32), (24, 24))
    out = crop({"image": torch.ones(2, 10, 50), "label": torch.ones(1, 10, 50)})
    assert out["image"].shape == (2, 32, 32)
    assert out["label"].shape == (1, 32, 32)


def test_locations_are_sampled_per_class_deterministically(two_class_volume):
    volume = two_class_volume()
    record = ClassLocationsd(max_per_class=500)
    first, again = record(volume)[CLASS_LOCATIONS], record(volume)[CLASS_LOCATIONS]
    assert sorted(first) == [1, 2]
    assert first[1].shape == (500, 3) and first[2].shape == (8, 3)
    assert all(np.array_equal(first[c], again[c]) for c in first)  # a cached volume is stable
    label = volume["label"][0]
    for value, voxels in first.items():
        assert (label[tuple(voxels.T)] == value).all()


def test_forced_crops_use_the_recorded_locations_and_drop_them(two_class_volume):
    volume = ClassLocationsd()(two_class_volume())
    shape = volume["label"].shape[1:]
    volume["image"] = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)  # index
    # pretend the tiny class lies elsewhere: forced crops must follow the record, not the label
    volume[CLASS_LOCATIONS] = {2: np.array([[5, 30, 5]], dtype=np.int32)}
    crop = ForegroundOversampledCropd("image", "label", (8, 8, 8), (8, 8, 8),
                                      foreground_fraction=1.0)
    crop.set_random_state(seed=0)
    recorded_voxel = np.ravel_multi_index((5, 30, 5), shape)
    for _ in range(20):
        out = crop(volume)
        assert CLASS_LOCATIONS not in out
        assert (out["image"] == recorded_voxel).any()  # the window holds the recorded voxel

    patches = patch_transforms(3, (8, 8, 8), (8, 8, 8), foreground_fraction=1.0)
    patches.set_random_state(seed=0)
    out = patches(ClassLocationsd()(two_class_volume()))
    assert set(out) == {"image", "label"}  # batches collate without the record


def test_training_patches_pass_the_record_to_the_crop(monkeypatch, two_class_volume):
    from segmentation.data import patches

    volumes = [ClassLocationsd()(two_class_volume()) for _ in range(2)]
    searches = []
    record = patches.ClassLocationsd.__call__
    monkeypatch.setattr(patches.ClassLocationsd, "__call__",
                        lambda self, data: searches.append(1) or record(self, data))
    transform = patch_transforms(3, (8, 8, 8), (8, 8, 8), foreground_fraction=1.0)
    transform.set_random_state(seed=0)
    items = [RandomPatches(volumes, transform, 10)[i] for i in range(10)]
    assert searches == []  # no forced patch searched the volume again
    assert all(set(item) == {"image", "label"} and item["label"].any() for item in items)


def test_training_crops_mirror_pad_as_overlap_tile_does():
    crop = ForegroundOversampledCropd("image", "label", (20, 9, 7), (4, 5, 7))
    image = np.random.default_rng(0).standard_normal((2, 3, 1, 6)).astype(np.float32)
    shape, before = crop._padding(image.shape[1:])
    assert before == [8, 4, 0]
    padded = reflect_window(image, [-b for b in before], shape)  # the whole padded scan
    pads = [(b, s - n - b) for b, s, n in zip(before, padded.shape[1:], image.shape[1:],
                                              strict=True)]
    expected = mirror_pad(torch.from_numpy(image)[None], pads)[0].numpy()
    assert np.array_equal(padded, expected)


@pytest.mark.parametrize("length", [1, 2, 3, 7])
def test_reflect_window_equals_a_window_of_numpy_reflect_padding(length):
    rng = np.random.default_rng(length)
    array = rng.normal(size=(2, length, 5, 4))
    pad = 12
    padded = np.pad(array, [(0, 0), (pad, pad), (pad, pad), (pad, pad)], mode="reflect")
    size = (9, 4, 6)
    for _ in range(30):
        origin = [int(rng.integers(-pad, s + pad - n + 1))
                  for s, n in zip(array.shape[1:], size, strict=True)]
        window = tuple(slice(o + pad, o + pad + n) for o, n in zip(origin, size, strict=True))
        np.testing.assert_array_equal(reflect_window(array, origin, size),
                                      padded[(slice(None), *window)])

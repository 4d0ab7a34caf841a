"""Class locations recorded once per volume drive the forced-foreground crops."""

from __future__ import annotations

import numpy as np

from segmentation.data.patches import (
    CLASS_LOCATIONS,
    ClassLocationsd,
    ForegroundOversampledCropd,
    RandomPatches,
    patch_transforms,
)
from segmentation.data.slices import RandomSlices


def two_class_volume() -> dict[str, np.ndarray]:
    label = np.zeros((1, 40, 36, 30), dtype=np.uint8)
    label[0, 2:38, 2:34, 2:28] = 1        # a large class: ~30k voxels
    label[0, 30:32, 5:7, 20:22] = 2       # a tiny one: 8 voxels
    return {"image": np.zeros((1, 40, 36, 30), dtype=np.float32), "label": label}


def test_locations_are_sampled_per_class_deterministically():
    volume = two_class_volume()
    record = ClassLocationsd(max_per_class=500)
    first, again = record(volume)[CLASS_LOCATIONS], record(volume)[CLASS_LOCATIONS]
    assert sorted(first) == [1, 2]
    assert first[1].shape == (500, 3) and first[2].shape == (8, 3)
    assert all(np.array_equal(first[c], again[c]) for c in first)  # a cached volume is stable
    label = volume["label"][0]
    for value, voxels in first.items():
        assert (label[tuple(voxels.T)] == value).all()


def test_forced_crops_use_the_recorded_locations_and_drop_them():
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


def test_slices_take_the_forced_class_from_the_record():
    volume = ClassLocationsd()(two_class_volume())
    slices = RandomSlices([volume], axis=2, input_size=(6, 6), output_size=(6, 6), length=300,
                          foreground_fraction=1.0, augment=False, seed=0)
    shown = [set(np.unique(slices[i]["label"].numpy())) for i in range(len(slices))]
    assert all(s - {0} for s in shown)             # every patch shows foreground
    share_tiny = np.mean([2 in s for s in shown])  # class first: the 8-voxel class half the time
    assert 0.4 < share_tiny < 0.6, share_tiny


def test_training_patches_pass_the_record_to_the_crop(monkeypatch):
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

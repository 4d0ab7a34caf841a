"""Fixed training patches: deterministic, foreground-centred, labels cut to the output size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segmentation.data.layout import read_dataset
from segmentation.data.preprocessing import Preprocessing
from segmentation.instruments.fixed_patches import PatchSet, fixed_patches, patch_settings

PREPROCESSING = Preprocessing(spatial_dims=3, spacing=None, normalization="zscore")


@pytest.fixture(scope="module")
def cases(infer_dataset: Path):
    return list(read_dataset(infer_dataset).training)


def cut(cases, input_size=(16, 16, 12), output_size=(16, 16, 12), **kwargs):
    options = {"count": 4, "seed": 0, **kwargs}
    return fixed_patches(cases, PREPROCESSING, input_size, output_size, **options)


def test_patches_are_fixed_by_the_seed(cases):
    first, again = cut(cases), cut(list(reversed(cases)))
    assert first.images.shape == (4, 1, 16, 16, 12) and first.labels.shape == (4, 1, 16, 16, 12)
    assert first.images.dtype == torch.float32 and first.labels.dtype == torch.int64
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert first.case_ids == again.case_ids
    assert sorted(set(first.case_ids)) == sorted(c.case_id for c in cases)  # 4 patches, 3 cases
    other = cut(cases, seed=1)
    assert not torch.equal(first.images, other.images)
    assert first.settings == patch_settings(cases, PREPROCESSING, (16, 16, 12), (16, 16, 12),
                                            count=4, seed=0)


def test_every_patch_shows_foreground(cases):
    patches = cut(cases)
    assert all(int(label.max()) > 0 for label in patches.labels)


def test_a_valid_networks_label_is_the_centre_of_the_window(cases):
    whole = cut(cases, (16, 16, 12), (16, 16, 12))
    valid = cut(cases, (16, 16, 12), (8, 8, 4))
    assert valid.labels.shape == (4, 1, 8, 8, 4)
    # the same draws; only the window placement may differ where a window meets the border
    same = 0
    for image_w, label_w, image_v, label_v in zip(whole.images, whole.labels, valid.images,
                                                  valid.labels, strict=True):
        if torch.equal(image_w, image_v):
            assert torch.equal(label_w[:, 4:12, 4:12, 4:8], label_v)
            same += 1
    assert same > 0


def test_slice_patches_of_a_2d_network(cases):
    patches = cut(cases, (16, 16), (16, 16), slice_axis=2)
    assert patches.images.shape == (4, 1, 16, 16) and patches.labels.shape == (4, 1, 16, 16)


def test_patches_round_trip_and_a_foreign_file_is_refused(cases, tmp_path):
    patches = cut(cases, count=2)
    loaded = PatchSet.load(patches.save(tmp_path / "patches.pt"))
    assert torch.equal(loaded.images, patches.images)
    assert loaded.case_ids == patches.case_ids and loaded.settings == patches.settings
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a patch file"):
        PatchSet.load(tmp_path / "other.pt")


def test_no_cases_or_no_patches_is_refused(cases):
    with pytest.raises(ValueError, match="no training cases"):
        cut([])
    with pytest.raises(ValueError, match="count=0"):
        cut(cases, count=0)

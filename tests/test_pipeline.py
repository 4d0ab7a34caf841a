"""Volumes → preprocessing → patches → batches: geometry, pairing, oversampling, slice mode."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from segmentation import UNet
from segmentation.data.datamodule import SegmentationDataModule
from segmentation.data.layout import read_dataset
from segmentation.data.patches import ForegroundOversampledCropd, patch_transforms
from segmentation.data.preprocessing import Preprocessing, fit_preprocessing
from segmentation.data.slices import RandomSlices
from segmentation.data.synth import generate_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, cases=6, test_cases=1, seed=3, shape=(40, 36, 24))
    return root


def centroid_world(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    voxels = np.argwhere(label == value).mean(0)
    return affine[:3, :3] @ voxels + affine[:3, 3]


def test_orientation_and_spacing_keep_world_positions(synthetic):
    info = read_dataset(synthetic)
    prep = fit_preprocessing(info.training, spatial_dims=3, spacing=(1.0, 1.0, 1.5))
    transform = prep.transforms()
    checked_lps = False
    for case in info.training[:4]:
        original = nib.load(str(case.label))
        out = transform({"image": str(case.images[0]), "label": str(case.label)})
        assert nib.aff2axcodes(out["label"].affine.numpy()) == ("R", "A", "S")
        assert np.allclose(np.abs(np.diag(out["label"].affine.numpy()))[:3], (1.0, 1.0, 1.5),
                           atol=0.15)
        before = centroid_world(np.asarray(original.dataobj), original.affine, 1)
        after = centroid_world(out["label"][0].numpy(), out["label"].affine.numpy(), 1)
        assert np.linalg.norm(before - after) < 1.0  # mm: the structure stays where it was
        checked_lps |= nib.aff2axcodes(original.affine)[:2] == ("L", "P")
    assert checked_lps


def test_preprocessing_round_trips_through_a_dict():
    prep = Preprocessing(spatial_dims=3, spacing=(1, 1, 2), normalization="ct",
                         channel_stats=[{"lower": -100, "upper": 300, "mean": 50, "std": 80}])
    assert Preprocessing.from_dict(prep.as_dict()) == prep
    with pytest.raises(ValueError, match="normalization='ct' needs dataset statistics"):
        Preprocessing(normalization="ct")
    with pytest.raises(ValueError, match="choose one of ct, zscore, minmax, none"):
        Preprocessing(normalization="histogram")


def test_ct_normalisation_uses_dataset_statistics(synthetic):
    info = read_dataset(synthetic)
    prep = fit_preprocessing(info.training, spatial_dims=3, normalization="ct", spacing=None)
    stats = prep.channel_stats[0]
    assert stats["lower"] < stats["mean"] < stats["upper"]
    case = info.training[0]
    out = prep.transforms()({"image": str(case.images[0]), "label": str(case.label)})
    raw = np.asarray(nib.load(str(case.images[0])).dataobj, dtype=np.float32)
    expected = (np.clip(raw, stats["lower"], stats["upper"]) - stats["mean"]) / stats["std"]
    assert np.isclose(out["image"].numpy().max(), expected.max(), atol=1e-4)
    assert np.isclose(out["image"].numpy().mean(), expected.mean(), atol=1e-4)


def striped_volume(shape=(40, 44, 36)) -> dict[str, torch.Tensor]:
    """An image whose intensity encodes each voxel's label, so pairing errors show."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 3, size=[-(-n // 6) for n in shape]).astype(np.uint8)
    for axis in range(len(shape)):  # 6-voxel blocks: shifts show, interpolation barely does
        blocks = blocks.repeat(6, axis=axis)
    label = blocks[tuple(slice(0, n) for n in shape)][None]
    return {"image": torch.from_numpy(label.astype(np.float32) * 10),
            "label": torch.from_numpy(label)}


@pytest.mark.parametrize("augment", [False, True])
def test_valid_patches_pair_image_and_center_aligned_label(augment):
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


def test_slice_mode_keeps_labels_integral_and_pairs_shapes():
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


def test_datamodule_batches_have_network_shapes(synthetic, tmp_path):
    net = UNet(spatial_dims=3, features=(4, 8), padding="valid")
    patch = net.valid_input_shape((24, 24, 20))
    dm = SegmentationDataModule(str(synthetic), patch_size=patch, batch_size=2,
                                patches_per_epoch=4, num_workers=0, cache="disk",
                                cache_dir=str(tmp_path / "cache"), network=net)
    dm.prepare_data()
    dm.setup("fit")
    assert (synthetic / "splits.json").exists()
    assert not set(c.case_id for c in dm.train_cases) & set(c.case_id for c in dm.val_cases)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, *patch)
    assert batch["label"].shape == (2, 1, *net.output_shape(patch))
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[:2] == (1, 1) and val["label"].shape[2:] == val["image"].shape[2:]
    assert any((tmp_path / "cache").iterdir())  # the disk cache was written
    first_key = dm.cache_key_dir()
    other = SegmentationDataModule(str(synthetic), patch_size=patch, normalization="minmax",
                                   cache="disk", cache_dir=str(tmp_path / "cache"))
    other.setup("fit")
    assert other.cache_key_dir() != first_key  # changed transforms, fresh cache

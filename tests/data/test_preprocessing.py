"""Preprocessing: world positions kept, CT statistics, label dtypes, z-score over the
foreground, a round trip through a dict, errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmentation.data.datamodule import SegmentationDataModule
from segmentation.data.layout import read_dataset
from segmentation.data.preprocessing import Preprocessing, fit_preprocessing, label_dtype


def centroid_world(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    voxels = np.argwhere(label == value).mean(0)
    return affine[:3, :3] @ voxels + affine[:3, 3]


def test_orientation_and_spacing_keep_world_positions(synth_medium):
    info = read_dataset(synth_medium)
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


def test_ct_normalisation_uses_dataset_statistics(synth_medium):
    info = read_dataset(synth_medium)
    prep = fit_preprocessing(info.training, spatial_dims=3, normalization="ct", spacing=None)
    stats = prep.channel_stats[0]
    assert stats["lower"] < stats["mean"] < stats["upper"]
    case = info.training[0]
    out = prep.transforms()({"image": str(case.images[0]), "label": str(case.label)})
    raw = np.asarray(nib.load(str(case.images[0])).dataobj, dtype=np.float32)
    expected = (np.clip(raw, stats["lower"], stats["upper"]) - stats["mean"]) / stats["std"]
    assert np.isclose(out["image"].numpy().max(), expected.max(), atol=1e-4)
    assert np.isclose(out["image"].numpy().mean(), expected.mean(), atol=1e-4)


# ------------------------------------------------------------------ labels, normalisation


def test_label_values_beyond_255_are_kept(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds", channels=("MR",))
    meta = json.loads((root / "dataset.json").read_text())
    # 301 consecutive labels (a whole-body atlas has this many); the files use 0, 1 and 300
    meta["labels"] = {"background": 0, **{f"structure_{v}": v for v in range(1, 301)}}
    (root / "dataset.json").write_text(json.dumps(meta))
    for path in sorted((root / "labelsTr").iterdir()):
        label = nib.load(str(path))
        data = np.asanyarray(label.dataobj).astype(np.int16)
        data[data == 2] = 300
        nib.save(nib.Nifti1Image(data, label.affine), str(path))
    dm = SegmentationDataModule(str(root), n_folds=3, patch_size=(8, 8, 6), cache="none",
                                spacing=None, num_workers=0)
    dm.prepare_data()  # the integrity check accepts the declared 300
    dm.setup("fit")
    volume = dm.volumes(dm.train_cases)[0]
    case = dm.train_cases[0]
    assert volume["label"].dtype == torch.int16
    expected = np.asanyarray(nib.load(str(case.label)).dataobj)
    assert set(volume["label"].unique().tolist()) == set(np.unique(expected).tolist())
    assert 300 in volume["label"].unique().tolist()
    # a chain built for 8-bit labels refuses the file instead of wrapping 300 to 44
    with pytest.raises(RuntimeError) as raised:  # MONAI's Compose wraps the transform's error
        dm.preprocessing.transforms()({"image": str(case.images[0]), "label": str(case.label)})
    cause = raised.value.__cause__
    assert isinstance(cause, ValueError)
    assert str(cause).startswith(f"{case.label}: label values 0..300 do not fit uint8")


@pytest.mark.parametrize("max_label, dtype", [(2, np.uint8), (255, np.uint8), (256, np.int16),
                                              (40_000, np.int32)])
def test_label_dtype_holds_the_largest_label(max_label, dtype):
    assert label_dtype(max_label) == dtype


def write_sphere_case(folder: Path, rng: np.random.Generator) -> tuple[str, str]:
    """An image that is zero outside a ball (bright, noisy inside) and the ball as label."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (24, 24, 20)], indexing="ij"))
    ball = ((grid - np.array([12, 11, 10])[:, None, None, None]) ** 2).sum(0) < 8 ** 2
    image = np.where(ball, 200 + 30 * rng.standard_normal(ball.shape), 0).astype(np.float32)
    image_path, label_path = folder / "ball_0000.nii.gz", folder / "ball.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(image_path))
    nib.save(nib.Nifti1Image(ball.astype(np.uint8), np.eye(4)), str(label_path))
    return str(image_path), str(label_path)


def test_zscore_after_foreground_crop_uses_the_nonzero_voxels(tmp_path):
    image_path, label_path = write_sphere_case(tmp_path, np.random.default_rng(0))
    item = {"image": image_path, "label": label_path}
    prep = Preprocessing(spatial_dims=3, normalization="zscore", crop_foreground=True)
    assert prep.zscore_nonzero
    out = prep.transforms()(item)
    image, ball = out["image"][0], out["label"][0] > 0
    assert image.shape != (24, 24, 20) and (~ball).any()  # cropped; corners of the box remain
    assert torch.all(image[~ball] == 0)  # the background stays zero
    assert abs(image[ball].mean().item()) < 1e-3
    assert abs(image[ball].std(unbiased=False).item() - 1) < 1e-3
    # the same definition without the crop, and a checkpoint dict from before the setting:
    # whole-image statistics, so the background is no longer zero
    for whole in (Preprocessing(spatial_dims=3, normalization="zscore"),
                  Preprocessing.from_dict({k: v for k, v in prep.as_dict().items()
                                           if k != "zscore_nonzero"})):
        assert not whole.zscore_nonzero
        out = whole.transforms()(item)
        assert torch.all(out["image"][0][out["label"][0] == 0] < -0.1)
    assert Preprocessing.from_dict(prep.as_dict()) == prep


# ------------------------------------------------------------------ errors naming the file


def test_ct_statistics_refuse_a_label_of_another_shape(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds", channels=("CT",))
    info = read_dataset(root)
    case = info.training[1]
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), np.uint8), np.eye(4)), str(case.label))
    with pytest.raises(ValueError, match=rf"{case.label}: shape \(8, 8, 5\) differs from its "
                                         rf"image {case.images[0]} \(8, 8, 6\)"):
        fit_preprocessing(info.training, spatial_dims=3, normalization="ct", spacing=None)

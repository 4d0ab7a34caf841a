"""Volumes → preprocessing → patches → batches: geometry, pairing, oversampling, slice mode."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from lightning_fabric.utilities.data import _replace_dunder_methods
from monai.data import DataLoader, MetaTensor
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DistributedSampler

from segmentation import UNet
from segmentation.data.datamodule import SegmentationDataModule
from segmentation.data.intensity import ClipAndNormalized
from segmentation.data.layout import read_dataset
from segmentation.data.patches import ForegroundOversampledCropd, patch_transforms
from segmentation.data.preprocessing import Preprocessing, fit_preprocessing, label_dtype
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
    assert set(batch) == {"image", "label"}
    volume = dm.volumes(dm.train_cases[:1])[0]  # class locations recorded with the volume
    label = np.asarray(volume["label"])[0]
    assert sorted(volume["class_locations"]) == sorted(int(v) for v in np.unique(label) if v)
    for value, voxels in volume["class_locations"].items():
        assert (label[tuple(voxels.T)] == value).all()
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[:2] == (1, 1) and val["label"].shape[2:] == val["image"].shape[2:]
    assert "class_locations" not in val
    assert any((tmp_path / "cache").iterdir())  # the disk cache was written
    first_key = dm.cache_key_dir()
    other = SegmentationDataModule(str(synthetic), patch_size=patch, normalization="minmax",
                                   cache="disk", cache_dir=str(tmp_path / "cache"))
    other.setup("fit")
    assert other.cache_key_dir() != first_key  # changed transforms, fresh cache


# ------------------------------------------------------------------ DDP seeding


def first_patches(root: Path, rank: int | None, num_workers: int = 0) -> torch.Tensor:
    """The first training batch's images of a data module on ``rank`` after the same seed."""
    dm = SegmentationDataModule(str(root), patch_size=(24, 24, 16), batch_size=2,
                                patches_per_epoch=4, num_workers=num_workers, cache="memory",
                                check=False)
    dm.setup("fit")
    if rank is not None:
        dm.trainer = SimpleNamespace(global_rank=rank)  # what a DDP trainer exposes
    torch.manual_seed(123)  # what seed_everything(123) does on every rank
    return next(iter(dm.train_dataloader()))["image"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_ddp_ranks_draw_different_patches_and_each_rank_is_reproducible(synthetic, num_workers):
    rank0 = first_patches(synthetic, 0, num_workers)
    rank1 = first_patches(synthetic, 1, num_workers)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(first_patches(synthetic, 1, num_workers), rank1)
    assert torch.equal(first_patches(synthetic, None, num_workers), rank0)  # no trainer: rank 0


def test_lightning_keeps_the_rank_generator_when_adding_a_distributed_sampler(synthetic):
    dm = SegmentationDataModule(str(synthetic), patch_size=(24, 24, 16), batch_size=2,
                                patches_per_epoch=4, num_workers=0, cache="none", check=False)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(global_rank=1)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # as Lightning calls the hook
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1)
    ddp_loader = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    assert ddp_loader.sampler is sampler
    assert ddp_loader.generator is loader.generator
    assert loader.generator.initial_seed() == dm.train_generator().initial_seed()
    dm.trainer = SimpleNamespace(global_rank=0)
    assert loader.generator.initial_seed() != dm.train_generator().initial_seed()


# ------------------------------------------------------------------ labels, cache, normalisation


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


def test_disk_cache_reads_a_rewritten_image_again(synth_copy, tmp_path):
    dm = SegmentationDataModule(str(synth_copy), patch_size=(16, 16, 16), cache="disk",
                                cache_dir=str(tmp_path / "cache"), spacing=None,
                                normalization="none", num_workers=0, check=False)
    dm.setup("fit")
    case = dm.train_cases[0]
    before = dm.volumes([case])[0]["image"]
    image = nib.load(str(case.images[0]))
    rewritten = np.asanyarray(image.dataobj).astype(np.float32) * 2 + 5
    nib.save(nib.Nifti1Image(rewritten, image.affine, image.header), str(case.images[0]))
    after = dm.volumes([case])[0]["image"]  # a new dataset over the same cache folder
    assert torch.allclose(torch.as_tensor(after), torch.as_tensor(before) * 2 + 5, atol=1e-4)
    assert dm.volumes([case])[0]["image"].equal(after)  # and the new entry is reused


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_volumes_are_not_read_or_preprocessed_again(synthetic, tmp_path, cache,
                                                           monkeypatch):
    """The whole chain, class locations (its last step) included, is what the cache keeps."""
    from segmentation.data import patches

    calls = []
    record = patches.ClassLocationsd.__call__
    monkeypatch.setattr(patches.ClassLocationsd, "__call__",
                        lambda self, data: calls.append(1) or record(self, data))
    dm = SegmentationDataModule(str(synthetic), patch_size=(16, 16, 16), cache=cache,
                                cache_dir=str(tmp_path / "cache"), num_workers=0, check=False)
    dm.setup("fit")
    volumes = dm.volumes(dm.train_cases[:2])
    first = [volumes[i] for i in range(2)]  # the disk cache fills on first access
    assert len(calls) == 2
    again = [volumes[i] for i in range(2)]
    assert len(calls) == 2  # served from the cache, not preprocessed again
    assert all(a["image"].equal(f["image"]) and "class_locations" in a
               for a, f in zip(again, first, strict=True))


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


def test_ct_channel_count_error_names_the_file():
    stats = [{"lower": 0.0, "upper": 1.0, "mean": 0.5, "std": 0.2}]
    image = MetaTensor(torch.zeros(2, 4, 4, 4), meta={"filename_or_obj": "/data/x_0000.nii.gz"})
    with pytest.raises(ValueError, match=r"/data/x_0000\.nii\.gz: image has 2 channel\(s\) but "
                                         r"the CT statistics were fitted on 1"):
        ClipAndNormalized("image", stats)({"image": image})


def test_a_passed_check_and_the_fitted_preprocessing_are_reused_until_a_file_changes(
        synth_copy, tmp_path, monkeypatch):
    from segmentation.data import datamodule, fitted_preprocessing

    checks, fits = [], []
    real_check, real_fit = datamodule.check_dataset, fitted_preprocessing.fit_preprocessing
    monkeypatch.setattr(datamodule, "check_dataset",
                        lambda root: checks.append(root) or real_check(root))
    monkeypatch.setattr(fitted_preprocessing, "fit_preprocessing",
                        lambda cases, **kw: fits.append(kw) or real_fit(cases, **kw))

    def start(**settings) -> SegmentationDataModule:
        dm = SegmentationDataModule(str(synth_copy), patch_size=(16, 16, 16), num_workers=0,
                                    cache="none", cache_dir=str(tmp_path / "cache"), **settings)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    first = start(normalization="ct")
    second = start(normalization="ct")  # another process, or the next run
    assert len(checks) == 1 and len(fits) == 1
    assert second.preprocessing.as_dict() == first.preprocessing.as_dict()
    start(normalization="zscore")  # other settings: fitted again, the check still holds
    assert len(checks) == 1 and len(fits) == 2

    image = nib.load(str(first.train_cases[0].images[0]))
    changed = np.asanyarray(image.dataobj).astype(np.float32) + 100
    nib.save(nib.Nifti1Image(changed, image.affine, image.header),
             str(first.train_cases[0].images[0]))
    third = start(normalization="ct")  # a rewritten scan: checked and fitted again
    assert len(checks) == 2 and len(fits) == 3
    assert third.preprocessing.channel_stats != first.preprocessing.channel_stats
    first.train_cases[1].label.unlink()  # a missing file: the check names it, no traceback
    with pytest.raises(ValueError, match="failed its integrity check"):
        start(normalization="ct")


def test_zscore_over_the_foreground_shares_one_mask_between_channels():
    """A voxel that is 0 in one channel only is still foreground there (nnU-Net's mask)."""
    from segmentation.data.intensity import ZScoreOverForegroundd

    rng = np.random.default_rng(0)
    image = np.zeros((2, 10, 10, 10), dtype=np.float32)
    image[:, 2:8, 2:8, 2:8] = rng.normal(50, 5, (2, 6, 6, 6))
    image[0, 2:4, 2:8, 2:8] = 0  # channel 0 is zero in part of the foreground
    out = ZScoreOverForegroundd("image")({"image": torch.from_numpy(image)})["image"]
    mask = torch.from_numpy((image != 0).any(0))
    assert torch.all(out[:, ~mask] == 0)  # background stays 0
    for channel in out:
        assert abs(channel[mask].mean().item()) < 1e-4
        assert abs(channel[mask].std(correction=0).item() - 1) < 1e-4
    assert torch.all(out[0, 2:4, 2:8, 2:8] < -1)  # normalised with the channel's statistics

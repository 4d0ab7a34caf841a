"""The data module: batches of the network's shapes, per-rank random patches under DDP,
volumes cached whole."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.environments import LightningEnvironment
from pytorch_lightning.strategies import ParallelStrategy
from torch import nn
from torch.utils.data import DistributedSampler

from segmentation import UNet
from segmentation.data.datamodule import SegmentationDataModule


def test_datamodule_batches_have_network_shapes(synth_medium, tmp_path):
    net = UNet(spatial_dims=3, features=(4, 8), padding="valid")
    patch = net.valid_input_shape((24, 24, 20))
    dm = SegmentationDataModule(str(synth_medium), patch_size=patch, batch_size=2,
                                patches_per_epoch=4, num_workers=0, cache="disk",
                                cache_dir=str(tmp_path / "cache"), network=net)
    dm.prepare_data()
    dm.setup("fit")
    assert (synth_medium / "splits.json").exists()
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
    other = SegmentationDataModule(str(synth_medium), patch_size=patch, normalization="minmax",
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
def test_ddp_ranks_draw_different_patches_and_each_rank_is_reproducible(synth_medium, num_workers):
    rank0 = first_patches(synth_medium, 0, num_workers)
    rank1 = first_patches(synth_medium, 1, num_workers)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(first_patches(synth_medium, 1, num_workers), rank1)
    assert torch.equal(first_patches(synth_medium, None, num_workers), rank0)  # no trainer: rank 0


class SecondOfTwoProcesses(ParallelStrategy):
    """What a DDP strategy tells the trainer on process 1 of 2, without starting a process.

    For a distributed strategy Lightning re-creates the training loader with a
    DistributedSampler of the strategy's ``distributed_sampler_kwargs``; this one trains in the
    test's own process on the CPU, talking to nobody.
    """

    is_distributed = True  # how a strategy of one's own tells Lightning it is distributed

    def __init__(self) -> None:
        environment = LightningEnvironment()
        environment.set_world_size(2)
        environment.set_global_rank(1)
        super().__init__(parallel_devices=[torch.device("cpu")] * 2,
                         cluster_environment=environment)

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def model_to_device(self) -> None:
        self.model.to(self.root_device)

    def reduce(self, tensor, *args, **kwargs):
        return tensor

    def barrier(self, *args, **kwargs) -> None:
        pass

    def broadcast(self, obj, src: int = 0):
        return obj


class KeepsItsTrainLoader(SegmentationDataModule):
    """The data module, keeping the training loader it gives Lightning."""

    def train_dataloader(self):
        self.given = super().train_dataloader()
        return self.given


class OneParameter(pl.LightningModule):
    """A model that only draws batches: the loader is under test, not the network."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TrainLoader(pl.Callback):
    """The training loader Lightning iterates, with its sampler."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.loader = trainer.train_dataloader


def test_lightning_keeps_the_rank_generator_when_adding_a_distributed_sampler(synth_medium):
    """Under DDP Lightning re-creates the training loader with a DistributedSampler."""
    dm = KeepsItsTrainLoader(str(synth_medium), patch_size=(24, 24, 16), batch_size=2,
                             patches_per_epoch=4, num_workers=0, cache="none", check=False)
    seen = TrainLoader()
    trainer = pl.Trainer(accelerator="cpu", strategy=SecondOfTwoProcesses(), max_steps=1,
                         limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[seen])
    trainer.fit(OneParameter(), datamodule=dm)
    loader, ddp_loader = dm.given, seen.loader
    sampler = ddp_loader.sampler
    assert isinstance(sampler, DistributedSampler)
    assert (sampler.num_replicas, sampler.rank) == (2, 1)
    assert ddp_loader is not loader  # re-created by Lightning with the sampler
    assert ddp_loader.generator is loader.generator
    assert loader.generator.initial_seed() == dm.train_generator().initial_seed()
    dm.trainer = SimpleNamespace(global_rank=0)
    assert loader.generator.initial_seed() != dm.train_generator().initial_seed()


# ------------------------------------------------------------------ caching


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_volumes_are_not_read_or_preprocessed_again(synth_medium, tmp_path, cache,
                                                           monkeypatch):
    """The whole chain, class locations (its last step) included, is what the cache keeps."""
    from segmentation.data import patches

    calls = []
    record = patches.ClassLocationsd.__call__
    monkeypatch.setattr(patches.ClassLocationsd, "__call__",
                        lambda self, data: calls.append(1) or record(self, data))
    dm = SegmentationDataModule(str(synth_medium), patch_size=(16, 16, 16), cache=cache,
                                cache_dir=str(tmp_path / "cache"), num_workers=0, check=False)
    dm.setup("fit")
    volumes = dm.volumes(dm.train_cases[:2])
    first = [volumes[i] for i in range(2)]  # the disk cache fills on first access
    assert len(calls) == 2
    again = [volumes[i] for i in range(2)]
    assert len(calls) == 2  # served from the cache, not preprocessed again
    assert all(a["image"].equal(f["image"]) and "class_locations" in a
               for a, f in zip(again, first, strict=True))


# ------------------------------------------------------------------ where augmentation runs


def fake_trainer(device: str, training: bool = True, precision: str = "32-true"
                 ) -> SimpleNamespace:
    from pytorch_lightning.plugins.precision import HalfPrecision, Precision

    plugin = HalfPrecision(precision) if precision.endswith("-true") and precision != "32-true" \
        else Precision()
    return SimpleNamespace(training=training, global_rank=0, precision_plugin=plugin,
                           strategy=SimpleNamespace(root_device=torch.device(device)))


def test_device_augmentation_cuts_windows_and_augments_after_transfer(synth_medium):
    net = UNet(spatial_dims=3, features=(4, 8), padding="valid")
    patch = net.valid_input_shape((24, 24, 20))
    output = net.output_shape(patch)
    dm = SegmentationDataModule(str(synth_medium), patch_size=patch, batch_size=3,
                                patches_per_epoch=6, num_workers=0, cache="memory", check=False,
                                network=net, augment_on="device",
                                augmentation={"rotation_probability": 1.0})
    dm.setup("fit")
    dm.trainer = fake_trainer("cpu")
    assert dm.augments_on_device()  # "device" on a CPU-only trainer: runs on the CPU
    windows = next(iter(dm.train_dataloader()))
    assert set(windows) == {"image", "label", "spatial"} and windows["spatial"].shape[0] == 3
    for image, label in zip(windows["image"], windows["label"], strict=True):
        # every patch is rotated: its window holds the rotated patch, label windows alike
        assert image.shape[0] == 1 and image.shape[1:] == label.shape[1:]
        assert all(w > p for w, p in zip(image.shape[1:], patch, strict=True))
        assert label.dtype == torch.uint8
    before = dm.on_before_batch_transfer(windows, 0)
    assert "spatial" not in before  # kept on the host
    batch = dm.on_after_batch_transfer(before, 0)
    assert batch["image"].shape == (3, 1, *patch) and batch["label"].shape == (3, 1, *output)
    assert batch["label"].dtype == torch.long
    first = windows["image"][0]
    centre = tuple(slice((w - p) // 2, (w - p) // 2 + p) for w, p in zip(first.shape[1:], patch,
                                                                         strict=True))
    assert not torch.allclose(batch["image"][0], first[(slice(None), *centre)])  # rotated
    dm.trainer = fake_trainer("cpu", training=False)  # validation batches pass unchanged
    assert dm.on_after_batch_transfer(before, 0) is before


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16),
                                                  ("16-true", torch.float16)])
def test_device_augmentation_under_a_true_precision(synth_medium, precision, dtype):
    """Lightning casts a batch's floats to a "true" precision before the transfer: the draws
    travel as numpy (untouched, exact), and the augmented image comes out in that dtype."""
    dm = SegmentationDataModule(str(synth_medium), patch_size=(16, 16, 12), batch_size=2,
                                patches_per_epoch=4, num_workers=0, cache="memory", check=False,
                                augment_on="device", augmentation={"rotation_probability": 1.0})
    dm.setup("fit")
    dm.trainer = fake_trainer("cpu", precision=precision)
    windows = next(iter(dm.train_dataloader()))
    rows = windows["spatial"].copy()
    cast = dm.trainer.precision_plugin.convert_input(windows)        # as Lightning does first
    assert cast["image"][0].dtype == dtype and cast["spatial"].dtype == np.float64
    before = dm.on_before_batch_transfer(cast, 0)
    assert np.array_equal(dm._host_spatial, rows)
    batch = dm.on_after_batch_transfer(before, 0)
    assert batch["image"].dtype == dtype and batch["image"].shape == (2, 1, 16, 16, 12)
    assert batch["label"].dtype == torch.long


@pytest.mark.parametrize(("augment_on", "device", "expected"), [
    ("auto", "cpu", False), ("auto", "cuda", True), ("cpu", "cuda", False),
    ("device", "cpu", True)])
def test_augment_on_auto_picks_the_device_only_when_training_on_a_gpu(synth_medium, augment_on,
                                                                        device, expected):
    dm = SegmentationDataModule(str(synth_medium), augment_on=augment_on, check=False)
    dm.trainer = fake_trainer(device)
    assert dm.augments_on_device() is expected
    dm.augment = False
    assert not dm.augments_on_device()


def test_augmentation_choices_are_refused_with_the_key(synth_medium):
    with pytest.raises(ValueError, match=r"data\.augment_on='gpu' is not supported; choose one "
                                         r"of auto, cpu, device"):
        SegmentationDataModule(str(synth_medium), augment_on="gpu")
    with pytest.raises(ValueError, match=r"data\.augmentation\.blur_probability=-0\.1"):
        SegmentationDataModule(str(synth_medium), augmentation={"blur_probability": -0.1})


def test_device_augmentation_draws_differ_between_ranks_and_repeat_per_seed(synth_medium):
    def first_draw(rank: int) -> np.ndarray:
        dm = SegmentationDataModule(str(synth_medium), patch_size=(16, 16, 16), batch_size=2,
                                    patches_per_epoch=2, num_workers=0, check=False,
                                    augment_on="device")
        dm.setup("fit")
        dm.trainer = SimpleNamespace(**{**vars(fake_trainer("cpu")), "global_rank": rank})
        torch.manual_seed(123)  # what seed_everything(123) does on every rank
        dm.train_dataloader()
        return dm.batch_augmentation.rng.random(8)

    assert not np.array_equal(first_draw(0), first_draw(1))
    np.testing.assert_array_equal(first_draw(1), first_draw(1))


def test_slice_mode_on_the_device_cuts_slice_windows(synth_medium):
    dm = SegmentationDataModule(str(synth_medium), patch_size=(24, 24), batch_size=4,
                                patches_per_epoch=8, num_workers=0, check=False, slice_axis=2,
                                augment_on="device", augmentation={"scaling_probability": 1.0})
    dm.setup("fit")
    dm.trainer = fake_trainer("cpu")
    windows = next(iter(dm.train_dataloader()))
    assert windows["spatial"].shape == (4, 2 + 1 + 2)  # do_rotate, do_scale, 1 angle, 2 scales
    assert all(image.ndim == 3 and image.shape[1:] == label.shape[1:]
               for image, label in zip(windows["image"], windows["label"], strict=True))
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(windows, 0), 0)
    assert batch["image"].shape == (4, 1, 24, 24) and batch["label"].shape == (4, 1, 24, 24)

"""Fixtures shared by several test files: tiny NIfTI files, datasets, volumes and networks.

Datasets that take a while to make, and the trained checkpoint, are built once per session;
copy a dataset before changing it (data modules write their ``splits.json`` into it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmentation import UNet
from segmentation.data.synth import generate_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on two cores: one thread each (and for the commands
    # the tests start), instead of two threads each fighting over the cores.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A small synthetic dataset: enough cases to plant one problem per case.
SYNTH_CASES = 9
SYNTH_SHAPE = (20, 20, 16)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(data)
    if array.dtype == np.int64:  # nibabel refuses int64 without an explicit dtype
        array = array.astype(np.int16)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _make_nnunet(root: Path, case_ids: Sequence[str] = ("case_b", "case_a", "case_c"),
                 channels: Sequence[str] = ("T1", "T2"), shape: Sequence[int] = (8, 8, 6),
                 test_ids: Sequence[str] = ("new_a",)) -> Path:
    """An nnU-Net v2 dataset with one file per channel and labels {background, liver, tumour}."""
    rng = np.random.default_rng(0)
    for case_id in list(case_ids) + list(test_ids):
        folder = "imagesTr" if case_id in case_ids else "imagesTs"
        for c in range(len(channels)):
            _write_nifti(root / folder / f"{case_id}_{c:04d}.nii.gz",
                         rng.random(shape).astype(np.float32))
        if case_id in case_ids:
            _write_nifti(root / "labelsTr" / f"{case_id}.nii.gz",
                         rng.integers(0, 3, shape).astype(np.uint8))
    meta = {"name": "Tiny", "channel_names": {str(i): n for i, n in enumerate(channels)},
            "labels": {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": len(case_ids), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _make_msd(root: Path, case_ids: Sequence[str] = ("brain_2", "brain_1"),
              modalities: Sequence[str] = ("FLAIR", "T1w"), shape: Sequence[int] = (8, 8, 6),
              test_ids: Sequence[str] = ("brain_9",)) -> Path:
    """An MSD dataset: one 4D image per case (channels last) and value → name labels."""
    rng = np.random.default_rng(1)
    for case_id in list(case_ids) + list(test_ids):
        folder = "imagesTr" if case_id in case_ids else "imagesTs"
        _write_nifti(root / folder / f"{case_id}.nii.gz",
                     rng.random((*shape, len(modalities))).astype(np.float32))
        if case_id in case_ids:
            _write_nifti(root / "labelsTr" / f"{case_id}.nii.gz",
                         rng.integers(0, 3, shape).astype(np.uint8))
    meta = {"name": "Brain", "modality": {str(i): n for i, n in enumerate(modalities)},
            "labels": {"0": "background", "1": "edema", "2": "tumour"},
            "numTraining": len(case_ids), "numTest": len(test_ids),
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                         for c in case_ids],
            "test": [f"./imagesTs/{c}.nii.gz" for c in test_ids]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def write_nifti() -> Callable[..., Path]:
    """``write_nifti(path, data, affine=None)`` saves an array as NIfTI (identity affine)."""
    return _write_nifti


@pytest.fixture
def make_nnunet() -> Callable[..., Path]:
    """``make_nnunet(root, case_ids=..., channels=..., shape=..., test_ids=...)``."""
    return _make_nnunet


@pytest.fixture
def make_msd() -> Callable[..., Path]:
    """``make_msd(root, case_ids=..., modalities=..., shape=..., test_ids=...)``."""
    return _make_msd


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset, generated once per session; copy it before changing it."""
    root = tmp_path_factory.mktemp("synthetic") / "dataset"
    generate_dataset(root, cases=SYNTH_CASES, seed=3, shape=SYNTH_SHAPE, test_cases=1)
    return root


@pytest.fixture
def synth_copy(synth_source: Path, tmp_path: Path) -> Path:
    """A private copy of the small synthetic dataset, free to break."""
    return Path(shutil.copytree(synth_source, tmp_path / "dataset"))


@pytest.fixture(scope="session")
def synth_medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 training cases of 40 × 36 × 24 voxels and 1 test case: room for real resampling and
    24³ patches (the preprocessing and data-module tests)."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, cases=6, test_cases=1, seed=3, shape=(40, 36, 24))
    return root


@pytest.fixture(scope="session")
def tiny3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training cases of 32 × 32 × 20 voxels and 1 test case (the training tests)."""
    root = tmp_path_factory.mktemp("tiny3d")
    generate_dataset(root, cases=4, test_cases=1, seed=1, shape=(32, 32, 20))
    return root


@pytest.fixture(autouse=True)
def _rank_zero_after_each_test():
    """Lightning's cluster environments set the process-wide rank (``rank_zero_only.rank``); a
    test posing as a second DDP process must not leave the next test in this process rank 1.

    Ctrl-C handling is restored too: Lightning ignores SIGINT after a KeyboardInterrupt in
    ``fit`` (so a second Ctrl-C cannot break its shutdown) and does not undo it; a later test in
    the same process would then see Ctrl-C do nothing, also in the commands it starts.
    """
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if "pytorch_lightning" in sys.modules:
        from lightning_fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero
        from pytorch_lightning.utilities.rank_zero import rank_zero_only as rank_zero

        rank_zero.rank = fabric_rank_zero.rank = 0


# ------------------------------------------------------------------ volumes and networks


def _striped_volume(shape=(40, 44, 36)) -> dict[str, torch.Tensor]:
    """An image whose intensity encodes each voxel's label, so pairing errors show."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 3, size=[-(-n // 6) for n in shape]).astype(np.uint8)
    for axis in range(len(shape)):  # 6-voxel blocks: shifts show, interpolation barely does
        blocks = blocks.repeat(6, axis=axis)
    label = blocks[tuple(slice(0, n) for n in shape)][None]
    return {"image": torch.from_numpy(label.astype(np.float32) * 10),
            "label": torch.from_numpy(label)}


def _two_class_volume() -> dict[str, np.ndarray]:
    label = np.zeros((1, 40, 36, 30), dtype=np.uint8)
    label[0, 2:38, 2:34, 2:28] = 1        # a large class: ~30k voxels
    label[0, 30:32, 5:7, 20:22] = 2       # a tiny one: 8 voxels
    return {"image": np.zeros((1, 40, 36, 30), dtype=np.float32), "label": label}


@pytest.fixture
def striped_volume() -> Callable[..., dict[str, torch.Tensor]]:
    """``striped_volume(shape=(40, 44, 36))``: labels 0, 1 and 2 in 6-voxel blocks, and an
    image of 10 × the label."""
    return _striped_volume


@pytest.fixture
def two_class_volume() -> Callable[[], dict[str, np.ndarray]]:
    """``two_class_volume()``: a (1, 40, 36, 30) label with a large class 1 and an 8-voxel class
    2, and a zero image."""
    return _two_class_volume


SMALL_NET_FEATURES = (4, 8, 16)  # depth 2: small enough for 3D on a CPU


def _small_net(dims: int, padding: str, skips: object, block: str, **kwargs: object) -> UNet:
    return UNet(spatial_dims=dims, in_channels=2, out_channels=3, features=SMALL_NET_FEATURES,
                padding=padding, long_skips=skips, encoder_block=block,
                blocks_per_level=[1, 2, 1], **kwargs)


@pytest.fixture
def small_net() -> Callable[..., UNet]:
    """``small_net(dims, padding, skips, block, **kwargs)``: a U-Net with 2 input channels,
    3 classes, features ``small_net_features`` and blocks_per_level [1, 2, 1]."""
    return _small_net


@pytest.fixture
def small_net_features() -> tuple[int, ...]:
    """The channels of every level of ``small_net``, top first."""
    return SMALL_NET_FEATURES


# ------------------------------------------------------------------ a trained checkpoint


def _train_checkpoint(root: Path, path: Path, *, in_channels: int = 1, padding: str = "same",
                      normalization: str = "zscore") -> Path:
    """One training step on a tiny dataset, saved as a self-describing checkpoint."""
    import pytorch_lightning as pl  # only where a checkpoint is trained

    from segmentation.data.datamodule import SegmentationDataModule
    from segmentation.training.module import SegmentationModule

    net = UNet(spatial_dims=3, in_channels=in_channels, out_channels=4, features=(4, 8),
               padding=padding, norm="batch" if padding == "valid" else "instance")
    patch = net.valid_input_shape((32, 32, 32)) if padding == "valid" else (16, 16, 16)
    dm = SegmentationDataModule(str(root), n_folds=2, patch_size=patch, batch_size=1,
                                patches_per_epoch=1, num_workers=0, cache="none", network=net,
                                spacing=(1.0, 1.0, 1.5), normalization=normalization)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(SegmentationModule(net, patch_size=patch), datamodule=dm)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def train_checkpoint() -> Callable[..., Path]:
    """``train_checkpoint(root, path, *, in_channels=1, padding="same", normalization="zscore")``:
    one training step of a tiny 3D U-Net on the dataset ``root``, saved to ``path``."""
    return _train_checkpoint


@pytest.fixture(scope="session")
def infer_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 training cases (what the checkpoints learn from) and 3 test scans (what infer reads)."""
    root = tmp_path_factory.mktemp("infer_data")
    generate_dataset(root, cases=3, test_cases=3, seed=5, shape=(40, 36, 20))
    return root


@pytest.fixture(scope="session")
def trained_checkpoint(infer_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained for one step on ``infer_dataset``, 4 classes."""
    return _train_checkpoint(infer_dataset, tmp_path_factory.mktemp("ckpt") / "model.ckpt")

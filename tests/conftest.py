"""Shared fixtures for the data tests: tiny NIfTI files and datasets written in tmp_path."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmentation.data.synth import generate_dataset

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

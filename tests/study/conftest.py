"""A micro study: tiny synthetic data and a study YAML of tiny, few-step runs."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from segmentation.data.synth import generate_dataset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Runs of a few seconds: a 4..16-channel U-Net, two epochs of two steps on 16³ patches.
MICRO_OVERRIDES = {
    "data.n_folds": 2, "data.patch_size": [16, 16, 16], "data.batch_size": 2,
    "data.patches_per_epoch": 4, "data.num_workers": 0, "data.cache": "none",
    "trainer.max_epochs": 2, "trainer.check_val_every_n_epoch": 1,
    "trainer.enable_progress_bar": False, "model.net.init_args.features": [4, 8, 16],
    "model.sw_batch_size": 2,
}


@pytest.fixture(scope="session")
def micro_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 training cases of 24 × 24 × 16 voxels and 1 labelled test case."""
    root = tmp_path_factory.mktemp("micro") / "data"
    generate_dataset(root, cases=6, test_cases=1, seed=2, shape=(24, 24, 16))
    return root


@pytest.fixture
def micro_data(micro_source: Path, tmp_path: Path) -> Path:
    """A private copy of the micro dataset (a study writes its splits.json)."""
    return Path(shutil.copytree(micro_source, tmp_path / "data"))


@pytest.fixture
def write_study(micro_data: Path, tmp_path: Path) -> Callable[..., Path]:
    """``write_study(**keys)``: a micro study YAML in tmp_path; keys replace the defaults."""
    def write(name: str = "micro", **keys: Any) -> Path:
        study = {"name": name, "configs": [str(CONFIGS / "quickstart.yaml")],
                 "runs_dir": str(tmp_path / "runs"),
                 "overrides": {"data.root": str(micro_data), **MICRO_OVERRIDES},
                 "variants": {"all": {}, "none": {"model.net.init_args.long_skips": False}},
                 "reference": "all", "seeds": [0, 1], "folds": [0], **keys}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(study, sort_keys=False))
        return path

    return write

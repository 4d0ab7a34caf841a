"""Checkpoints segmenting as one: averaged probabilities, fold runs found, mismatches refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segmentation.cli import main
from segmentation.data.layout import find_case_files
from segmentation.inference.checkpoint import CheckpointError
from segmentation.inference.ensemble import resolve_checkpoints
from segmentation.inference.provenance import sha256
from segmentation.inference.segmenter import Segmenter


@pytest.fixture(scope="module")
def two_models(infer_dataset, tmp_path_factory) -> tuple[Path, Path]:
    from tests.conftest import _train_checkpoint

    folder = tmp_path_factory.mktemp("ensemble")
    torch.manual_seed(1)
    first = _train_checkpoint(infer_dataset, folder / "fold0.ckpt")
    torch.manual_seed(2)
    second = _train_checkpoint(infer_dataset, folder / "fold1.ckpt")
    return first, second


def test_an_ensemble_is_the_mean_of_its_models_probabilities(infer_dataset, two_models):
    case = find_case_files([infer_dataset / "imagesTs"], n_channels=1)[0]
    first, second = (Segmenter(path, device="cpu").probabilities(case) for path in two_models)
    assert not torch.allclose(first, second, atol=1e-3)  # two different models
    both = Segmenter(list(two_models), device="cpu").probabilities(case)
    torch.testing.assert_close(both, (first + second) / 2, atol=1e-5, rtol=1e-5)


def test_infer_with_two_checkpoints_records_both(infer_dataset, two_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", *map(str, two_models), "--input",
                 str(infer_dataset / "imagesTs"), "--output", str(out)]) == 0
    assert "ensemble of 2 checkpoints" in capsys.readouterr().err
    record = json.loads((out / "provenance.json").read_text())["runs"][0]
    assert [m["sha256"] for m in record["checkpoints"]] == [sha256(p) for p in two_models]
    assert len(list(out.glob("*.nii.gz"))) == 3


def test_checkpoints_of_other_preprocessing_are_refused_before_anything(
        infer_dataset, two_models, tmp_path, capsys):
    from tests.conftest import _train_checkpoint

    other = _train_checkpoint(infer_dataset, tmp_path / "minmax.ckpt", normalization="minmax")
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(two_models[0]), str(other), "--input",
                 str(infer_dataset / "imagesTs"), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(two_models[0]) in err[0] and str(other) in err[0]
    assert "disagree on their preprocessing (normalization: 'zscore' vs 'minmax')" in err[0]
    assert not out.exists()


def _version(run: Path, number: int, fold: str | None, files: tuple[str, ...]) -> Path:
    version = run / f"version_{number}"
    (version / "checkpoints").mkdir(parents=True)
    if fold is not None:
        (version / "config.yaml").write_text(f"data:\n  fold: {fold}\n")
    for name in files:
        (version / "checkpoints" / name).write_bytes(b"")
    return version


def test_a_run_folder_means_the_best_checkpoint_of_each_fold(tmp_path):
    run = tmp_path / "runs" / "prostate"
    _version(run, 0, "0", ("best-009.ckpt", "last.ckpt"))
    v1 = _version(run, 1, "1", ("best-099.ckpt", "best-100.ckpt", "last.ckpt"))
    v2 = _version(run, 2, "all", ("last.ckpt",))       # fold "all" keeps no best
    v10 = _version(run, 10, "0", ("best-049.ckpt",))   # fold 0 again: the newer wins
    _version(run, 11, "1", ())                         # e.g. a predict run: no checkpoint
    notes: list[str] = []
    found = resolve_checkpoints([run], note=notes.append)
    assert found == [v10 / "checkpoints" / "best-049.ckpt",
                     v1 / "checkpoints" / "best-100.ckpt", v2 / "checkpoints" / "last.ckpt"]
    assert notes == [f"{run}: version_0 and version_10 both trained fold 0; using the newer, "
                     "version_10"]
    assert resolve_checkpoints([v1]) == [v1 / "checkpoints" / "best-100.ckpt"]
    with pytest.raises(CheckpointError, match="named twice"):
        resolve_checkpoints([v1, v1 / "checkpoints" / "best-100.ckpt"])
    with pytest.raises(CheckpointError, match="no such checkpoint file or run folder"):
        resolve_checkpoints([tmp_path / "missing"])
    with pytest.raises(CheckpointError, match="no run under it holds a checkpoint"):
        resolve_checkpoints([tmp_path / "runs"])

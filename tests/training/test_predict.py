"""`segmentation predict` writes one segmentation per scan, as `infer` does; it loses no file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmentation.cli import main
from segmentation.data.synth import generate_dataset
from segmentation.training.cli import SegmentationCLI
from tests.training.test_cli import fit_args


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A dataset with 3 test scans and a run trained on it for 2 steps: (data, runs, ckpt)."""
    tmp = tmp_path_factory.mktemp("predict")
    root, runs = tmp / "data", tmp / "runs"
    generate_dataset(root, cases=4, test_cases=3, seed=4, shape=(28, 24, 18))
    SegmentationCLI(args=fit_args(root, runs, 3, "same", "--trainer.max_steps", "2",
                                  "--trainer.limit_val_batches", "0",
                                  "--trainer.enable_progress_bar", "false"))
    return root, runs, runs / "test" / "version_0" / "checkpoints" / "last.ckpt"


def predict_args(root: Path, runs: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["predict", *fit_args(root, runs, 3, "same")[1:], "--ckpt_path", str(checkpoint),
            "--trainer.enable_progress_bar", "false", *extra]


def test_predict_writes_each_test_scan_with_its_geometry_like_infer(trained_run, tmp_path):
    root, runs, checkpoint = trained_run
    assert main(predict_args(root, runs, checkpoint, "--prediction.save_probabilities",
                             "true")) == 0
    folder = runs / "test" / "version_1" / "predictions"  # inside the predict run's folder
    scans = sorted((root / "imagesTs").glob("*_0000.nii.gz"))
    ids = [p.name.removesuffix("_0000.nii.gz") for p in scans]
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == sorted(
        [f"{i}.nii.gz" for i in ids] + [f"{i}_probabilities.nii.gz" for i in ids])
    for scan, case_id in zip(scans, ids, strict=True):
        image = nib.load(scan)
        labels = nib.load(folder / f"{case_id}.nii.gz")
        assert labels.shape == image.shape
        np.testing.assert_allclose(labels.affine, image.affine, atol=1e-6)
        assert labels.get_data_dtype() == np.uint8
        probabilities = nib.load(folder / f"{case_id}_probabilities.nii.gz").get_fdata()
        assert probabilities.shape == (*image.shape, 4)
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-4)
    runs_recorded = json.loads((folder / "provenance.json").read_text())["runs"]
    assert len(runs_recorded) == 1 and runs_recorded[0]["command"] == "predict"
    assert sorted(c["case_id"] for c in runs_recorded[0]["cases"]) == ids
    assert runs_recorded[0]["checkpoint"] == str(checkpoint.resolve())

    # one code path: infer with the same checkpoint writes the same label maps
    inferred = tmp_path / "inferred"
    assert main(["infer", "--checkpoint", str(checkpoint), "--input", str(root / "imagesTs"),
                 "--output", str(inferred)]) == 0
    for case_id in ids:
        np.testing.assert_array_equal(nib.load(inferred / f"{case_id}.nii.gz").get_fdata(),
                                      nib.load(folder / f"{case_id}.nii.gz").get_fdata())


def test_predict_into_a_used_folder_refuses_without_overwrite(trained_run, tmp_path, capsys):
    root, runs, checkpoint = trained_run
    out = tmp_path / "out"
    first = predict_args(root, runs, checkpoint, "--prediction.output_dir", str(out),
                         "--runs_dir", str(tmp_path / "runs"))
    assert main(first) == 0
    written = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(first) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --prediction.overwrite true" in err[0]
    assert "(and 2 more problem(s))" in err[0]
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == written  # nothing touched
    assert sorted(p.name for p in (tmp_path / "runs" / "test").iterdir()) == ["version_0"]
    assert main([*first, "--prediction.overwrite", "true"]) == 0
    records = json.loads((out / "provenance.json").read_text())["runs"]
    assert len(records) == 2 and records[1]["settings"]["overwrite"] is True


def test_predict_without_a_checkpoint_refuses_in_one_line(trained_run, tmp_path, capsys):
    root, _, _ = trained_run
    args = ["predict", *fit_args(root, tmp_path / "runs", 3, "same")[1:]]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predict needs --ckpt_path" in err[0]
    assert not (tmp_path / "runs").exists()

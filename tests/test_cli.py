"""The `segmentation` command: help, summary, evaluate; learning-curve plots."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from segmentation.cli import main
from segmentation.plots import plot_learning_curves

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "data", "summary", "evaluate"):
        assert f"    {command}" in out


def test_summary_shows_levels_parameters_and_shapes(capsys):
    config = str(CONFIGS / "model" / "unet2d_ronneberger.yaml")
    assert main(["summary", config, "--input-shape", "572", "572"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 31,030,658" in out
    assert "input (572, 572) -> output (388, 388)" in out
    assert main(["summary", config, "--input-shape", "190", "190"]) == 1
    assert "nearest valid sizes are 188 and 204" in capsys.readouterr().out


def write_label(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4) if affine is None else affine),
             str(path))


def test_evaluate_reports_dice_per_class_and_the_mean(tmp_path, capsys):
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "organ": 1, "lesion": 2}}))
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    refs.mkdir()
    preds.mkdir()
    reference = np.zeros((10, 10, 10))
    reference[2:6, 2:6, 2:6] = 1
    reference[7:9, 7:9, 7:9] = 2
    prediction = reference.copy()
    prediction[2:4, 2:6, 2:6] = 0  # half the organ missed: Dice 2*32/(64+32) = 2/3
    write_label(refs / "a.nii.gz", reference)
    write_label(preds / "a.nii.gz", prediction)
    csv_path = tmp_path / "dice.csv"
    assert main(["evaluate", "--predictions", str(preds), "--labels", str(refs), "--dataset",
                 str(tmp_path), "--csv", str(csv_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["Dice organ: 0.667", "Dice lesion: 1.000", "mean Dice: 0.833"]
    assert csv_path.read_text().splitlines()[0] == "case_id,class,dice"
    write_label(preds / "a.nii.gz", prediction, affine=np.diag([2, 1, 1, 1]))
    assert main(["evaluate", "--predictions", str(preds), "--labels", str(refs), "--dataset",
                 str(tmp_path)]) == 1
    assert "a.nii.gz: shape/affine differ" in capsys.readouterr().out


def test_learning_curves_are_drawn_from_the_csv_log(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,lr-SGD,step,train/loss_epoch,val/dice,val/dice_organ,val/loss\n"
                       ",0.01,0,,,,\n0,,9,1.5,,,\n0,,9,,0.4,0.5,1.2\n1,,19,1.1,,,\n"
                       "1,,19,,0.6,0.7,0.9\n")
    out = plot_learning_curves(metrics, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_data_commands_answer_with_help_or_one_error_line(capsys):
    assert main(["data"]) == 2  # no data command: its help, as a usage error
    assert "synth" in capsys.readouterr().out
    assert main(["data", "check", "/nonexistent/dataset"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("error: ") and "/nonexistent/dataset" in out and "Traceback" not in out


@pytest.mark.parametrize("name", ["unet2d", "unet3d", "unet3d_resenc", "unet3d_valid"])
def test_gpu_configs_share_one_trainer_file_and_single_keys_override_it(name, tmp_path):
    from segmentation.training.cli import SegmentationCLI

    shared = yaml.safe_load((CONFIGS / "trainer" / "gpu.yaml").read_text())
    assert yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["trainer"] == "trainer/gpu.yaml"
    cpu = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    cli = SegmentationCLI(args=["--config", str(CONFIGS / f"{name}.yaml"), *cpu,
                                "--trainer.check_val_every_n_epoch", "7",
                                "--runs_dir", str(tmp_path)], run=False)
    assert cli.trainer.max_epochs == shared["max_epochs"] == 1000
    assert cli.trainer.gradient_clip_val == shared["gradient_clip_val"] == 12
    assert cli.trainer.check_val_every_n_epoch == 7  # the command line still wins

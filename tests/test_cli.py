"""The `segmentation` command: help, summary, evaluate; learning-curve plots."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from segmentation.cli import main
from segmentation.nets.unet import UNet
from segmentation.plots import plot_learning_curves
from segmentation.summary import level_sizes

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
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: --input-shape 190 190: input 190 (axis 0) is not valid")
    assert "nearest valid sizes are 188 and 204" in captured.err
    assert captured.err.count("\n") == 1


def test_summary_of_a_same_network_shows_the_padded_sizes_for_any_input_shape(capsys):
    config = str(CONFIGS / "model" / "unet3d_plain.yaml")  # same padding, depth 5
    assert main(["summary", config, "--input-shape", "63", "64", "40"]) == 0
    out = capsys.readouterr().out
    assert "input (63, 64, 40) -> output (63, 64, 40)" in out
    assert "zero-padded to (64, 64, 64)" in " ".join(out.split())
    assert "(64, 64, 64)" in out and "(2, 2, 2)" in out  # levels 0 and 5 of the padded input


@pytest.mark.parametrize("padding, shape", [("same", (13, 16, 10)), ("same", (9, 7, 4)),
                                            ("valid", (44, 44, 44))])
def test_level_sizes_are_the_feature_map_sizes_of_the_forward_pass(padding, shape):
    net = UNet(spatial_dims=3, features=(2, 4, 8), padding=padding, norm=None).eval()
    seen: dict[str, list[tuple[int, ...]]] = {}
    net.encoder.register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("encoder", [tuple(f.shape[2:]) for f in out]))
    net.decoder.register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("decoder", [tuple(f.shape[2:]) for f in out]))
    with torch.no_grad():
        net(torch.zeros(1, 1, *shape))
    assert level_sizes(net, shape) == (seen["encoder"], seen["decoder"])


def test_summary_errors_are_one_line_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["summary", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {missing}: No such file or directory\n"
    assert captured.out == ""
    config = str(CONFIGS / "model" / "unet3d_plain.yaml")
    assert main(["summary", config, "--input-shape", "64", "64"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --input-shape 64 64: expected a 3D spatial shape, got (64, 64)\n"


def write_label(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4) if affine is None else affine),
             str(path))


@pytest.fixture
def evaluation(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A dataset folder with dataset.json, a reference and a prediction folder (one case)."""
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "organ": 1, "lesion": 2}}))
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    refs.mkdir()
    preds.mkdir()
    return tmp_path, refs, preds


def organ_and_lesion() -> tuple[np.ndarray, np.ndarray]:
    """A reference with an organ and a lesion, and a prediction missing half the organ."""
    reference = np.zeros((10, 10, 10))
    reference[2:6, 2:6, 2:6] = 1
    reference[7:9, 7:9, 7:9] = 2
    prediction = reference.copy()
    prediction[2:4, 2:6, 2:6] = 0  # half the organ missed: Dice 2*32/(64+32) = 2/3
    return reference, prediction


def evaluate(dataset: Path, refs: Path, preds: Path, *extra: str) -> int:
    return main(["evaluate", "--predictions", str(preds), "--labels", str(refs), "--dataset",
                 str(dataset), *extra])


def test_evaluate_reports_dice_per_class_and_the_mean(evaluation, capsys):
    dataset, refs, preds = evaluation
    reference, prediction = organ_and_lesion()
    write_label(refs / "a.nii.gz", reference)
    write_label(preds / "a.nii.gz", prediction)
    (refs / "._a.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata: skipped
    csv_path = dataset / "dice.csv"
    assert evaluate(dataset, refs, preds, "--csv", str(csv_path)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["Dice organ: 0.667", "Dice lesion: 1.000", "mean Dice: 0.833"]
    assert csv_path.read_text().splitlines()[0] == "case_id,class,dice"


def test_evaluate_finds_nii_gz_predictions_of_nii_references(evaluation, capsys):
    dataset, refs, preds = evaluation
    reference, prediction = organ_and_lesion()
    write_label(refs / "a.nii", reference)  # a .nii dataset; infer writes CASE.nii.gz
    write_label(preds / "a.nii.gz", prediction)
    assert evaluate(dataset, refs, preds) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "mean Dice: 0.833"
    write_label(preds / "a.nii", prediction)  # two candidates: refuse to guess
    assert evaluate(dataset, refs, preds) == 1
    assert "more than one prediction" in capsys.readouterr().err


def test_evaluate_reads_msd_labels_and_names_dataset_json_when_they_are_bad(evaluation, capsys):
    dataset, refs, preds = evaluation
    reference, prediction = organ_and_lesion()
    write_label(refs / "a.nii.gz", reference)
    write_label(preds / "a.nii.gz", prediction)
    (dataset / "dataset.json").write_text(json.dumps(
        {"labels": {"0": "background", "1": "liver", "2": "tumour"}}))
    assert evaluate(dataset, refs, preds) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["Dice liver: 0.667", "Dice tumour: 1.000"]
    (dataset / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 2}}))
    assert evaluate(dataset, refs, preds) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {dataset / 'dataset.json'}: label values must be consecutive")
    assert err.count("\n") == 1


def geometry_error(dataset: Path, refs: Path, preds: Path, capsys) -> str:
    assert evaluate(dataset, refs, preds) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    return captured.err


def test_evaluate_shows_both_shapes_or_affines_when_they_differ(evaluation, capsys):
    dataset, refs, preds = evaluation
    reference, prediction = organ_and_lesion()
    write_label(refs / "a.nii.gz", reference)
    write_label(preds / "a.nii.gz", prediction[:, :, :8])
    assert geometry_error(dataset, refs, preds, capsys) == (
        f"error: {preds / 'a.nii.gz'}: shape (10, 10, 8) differs from (10, 10, 10) of "
        f"{refs / 'a.nii.gz'}\n")
    write_label(preds / "a.nii.gz", prediction, affine=np.diag([2, 1, 1, 1]))
    err = geometry_error(dataset, refs, preds, capsys)
    assert err.startswith(f"error: {preds / 'a.nii.gz'}: affine [[2.0, 0.0, 0.0, 0.0], ")
    assert "differs from [[1.0, 0.0, 0.0, 0.0], " in err and str(refs / "a.nii.gz") in err


def test_evaluate_refuses_missing_or_empty_inputs_with_one_error_line(evaluation, capsys):
    dataset, refs, preds = evaluation
    reference, prediction = organ_and_lesion()

    def error() -> str:
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured
        assert captured.err.startswith("error: ") and "Traceback" not in captured.err
        return captured.err

    (refs / "._a.nii.gz").write_bytes(b"\x00")  # hidden files are no label files
    assert evaluate(dataset, refs, preds) == 1
    assert error() == f"error: {refs}: no label files (.nii.gz, .nii) found\n"
    assert evaluate(dataset, dataset / "nowhere", preds) == 1
    assert error() == f"error: {dataset / 'nowhere'}: labels folder does not exist\n"
    write_label(refs / "a.nii.gz", reference)
    assert evaluate(dataset, refs, preds) == 1
    assert error().startswith(f"error: {refs / 'a.nii.gz'}: no prediction for this reference")
    write_label(preds / "a.nii.gz", prediction)
    (dataset / "dataset.json").unlink()
    assert evaluate(dataset, refs, preds) == 1
    assert error() == (f"error: {dataset / 'dataset.json'}: missing (every dataset folder "
                       "needs a dataset.json)\n")
    assert evaluate(dataset / "nowhere", refs, preds) == 1
    assert error() == f"error: {dataset / 'nowhere'}: dataset folder does not exist\n"


def test_evaluate_refuses_to_report_a_mean_dice_of_nothing(evaluation, capsys):
    dataset, refs, preds = evaluation
    background = np.zeros((6, 6, 6))
    write_label(refs / "a.nii.gz", background)
    write_label(preds / "a.nii.gz", background)
    assert evaluate(dataset, refs, preds) == 1
    captured = capsys.readouterr()
    assert "nan" not in captured.out and captured.out == ""
    assert captured.err.startswith(f"error: {refs}: no foreground class of dataset.json")


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
    assert main(["data", "synth", "--out", "/nonexistent/dataset", "--seed", "-1"]) == 1
    assert capsys.readouterr().err == "error: --seed -1: must be an integer >= 0\n"


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

"""`segmentation evaluate`: Dice per class and its mean, finding predictions, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmentation.cli import main


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


def test_evaluate_folder_scores_chosen_cases_with_hd95_in_millimetres(evaluation):
    from segmentation.data.layout import DatasetError
    from segmentation.evaluation.commands import evaluate_folder

    _, refs, preds = evaluation
    reference = np.zeros((12, 12, 12))
    reference[2:6, 2:6, 2:6] = 1
    prediction = reference.copy()
    prediction[6:8, 2:6, 2:6] = 1  # the organ 2 voxels too long along the first axis
    spacing = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm along that axis
    for case in ("a", "b"):
        write_label(refs / f"{case}.nii.gz", reference, spacing)
        write_label(preds / f"{case}.nii.gz", prediction, spacing)
    names = {0: "background", 1: "organ", 2: "lesion"}
    rows = evaluate_folder(preds, refs, names, case_ids=["b"], hd95=True)
    assert [row["case_id"] for row in rows] == ["b"]
    organ, lesion = rows[0]["hd95"]
    assert organ == pytest.approx(4.0)  # 2 voxels × 2 mm
    assert np.isnan(lesion)  # in neither map
    assert np.isnan(rows[0]["dice"][1])
    with pytest.raises(DatasetError, match="no reference label map for case c"):
        evaluate_folder(preds, refs, names, case_ids=["c"])

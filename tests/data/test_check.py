"""The integrity check: a clean dataset passes; every planted problem is reported once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmentation.data.check import check_dataset, format_report
from segmentation.data.commands import main
from segmentation.data.layout import read_dataset
from segmentation.data.preprocessing import Preprocessing, fit_preprocessing, reader_affine

# problem → (case it is planted in, file it must be reported on, words of the message)
PROBLEMS = {
    "empty_file": ("synth_000", "imagesTr/synth_000_0000.nii.gz", "cannot be read"),
    "random_bytes": ("synth_001", "imagesTr/synth_001_0000.nii.gz", "cannot be read"),
    "truncated": ("synth_002", "imagesTr/synth_002_0000.nii.gz", "cannot be read (truncated"),
    "nan_voxels": ("synth_003", "imagesTr/synth_003_0000.nii.gz", "5 voxel(s) are NaN"),
    "label_shape": ("synth_004", "labelsTr/synth_004.nii.gz", "differs from its image"),
    "label_affine": ("synth_005", "labelsTr/synth_005.nii.gz", "affine differs from its image"),
    "label_value": ("synth_006", "labelsTr/synth_006.nii.gz",
                    "value(s) 7 are not in dataset.json labels"),
    "missing_label": ("synth_007", "labelsTr/synth_007.nii.gz", "missing label file"),
}


def resave(path, data, like):
    """Save ``data`` with the geometry (affine and header) of the image ``like``."""
    nib.save(nib.Nifti1Image(data, like.affine, like.header), str(path))


def plant(root, problem):
    case_id = PROBLEMS[problem][0]
    image_path = root / "imagesTr" / f"{case_id}_0000.nii.gz"
    label_path = root / "labelsTr" / f"{case_id}.nii.gz"
    image, label = nib.load(str(image_path)), nib.load(str(label_path))
    if problem == "empty_file":
        image_path.write_bytes(b"")
    elif problem == "random_bytes":
        image_path.write_bytes(np.random.default_rng(0).bytes(3000))
    elif problem == "truncated":
        content = image_path.read_bytes()
        image_path.write_bytes(content[: len(content) // 2])
    elif problem == "nan_voxels":
        data = np.asanyarray(image.dataobj).copy()
        data.flat[[3, 50, 400, 900, 1500]] = np.nan
        resave(image_path, data, image)
    elif problem == "label_shape":
        resave(label_path, np.asanyarray(label.dataobj)[:, :, :-2], label)
    elif problem == "label_affine":
        affine = label.affine.copy()
        affine[:3, 3] += 3.0  # shifted 3 mm
        nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj), affine), str(label_path))
    elif problem == "label_value":
        data = np.asanyarray(label.dataobj).copy()
        data[0, 0, :3] = 7
        resave(label_path, data, label)
    elif problem == "missing_label":
        label_path.unlink()


def snapshot(root):
    """Every path under root with its size and modification time."""
    return {path: (os.stat(path).st_size, os.stat(path).st_mtime_ns)
            for path in [root, *root.rglob("*")]}


def test_clean_synthetic_dataset_passes(synth_copy, capsys):
    report = check_dataset(synth_copy)
    assert report.ok and report.errors == []
    assert any("orientations: RAS" in line and "LPS" in line for line in report.info)
    assert any("different orientations" in line for line in report.warnings)
    assert main(["data", "check", str(synth_copy)]) == 0
    out = capsys.readouterr().out
    assert "error:" not in out and "OK: 0 error(s)" in out


def test_every_planted_problem_is_reported_once_in_one_pass(synth_copy, capsys):
    for problem in PROBLEMS:
        plant(synth_copy, problem)
    report = check_dataset(synth_copy)
    assert not report.ok
    for problem, (_, file, words) in PROBLEMS.items():
        hits = [e for e in report.errors if e.startswith(f"{file}: ")]
        assert len(hits) == 1, (problem, report.errors)
        assert words in hits[0], (problem, hits)
    assert len(report.errors) == len(PROBLEMS), report.errors  # nothing reported twice or extra

    assert main(["data", "check", str(synth_copy)]) == 1
    lines = capsys.readouterr().out.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == len(PROBLEMS)
    assert "error: labelsTr/synth_007.nii.gz: missing label file" in errors
    assert lines[-1].startswith(f"FAILED: {len(PROBLEMS)} error(s)")


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_each_problem_alone(synth_copy, problem):
    plant(synth_copy, problem)
    _, file, words = PROBLEMS[problem]
    errors = check_dataset(synth_copy).errors
    assert len(errors) == 1 and errors[0].startswith(f"{file}: ") and words in errors[0], errors


def test_check_writes_nothing(synth_copy):
    plant(synth_copy, "truncated")
    before = snapshot(synth_copy)
    check_dataset(synth_copy)
    main(["data", "check", str(synth_copy)])
    assert snapshot(synth_copy) == before


def test_dataset_json_problems(synth_copy, capsys):
    path = synth_copy / "dataset.json"
    meta = json.loads(path.read_text())
    meta["numTraining"] = 10
    path.write_text(json.dumps(meta))
    assert check_dataset(synth_copy).errors == [
        "dataset.json: numTraining is 10 but 9 training case(s) were found in imagesTr"]
    del meta["labels"], meta["file_ending"]
    path.write_text(json.dumps(meta))
    errors = check_dataset(synth_copy).errors
    assert len(errors) == 1 and errors[0].startswith(
        "dataset.json: missing required key(s) labels, file_ending")
    path.write_text("{")
    assert [e.split(":")[:2] for e in check_dataset(synth_copy).errors] == [
        ["dataset.json", " invalid JSON"]]
    path.unlink()
    assert check_dataset(synth_copy).errors[0].startswith("dataset.json: missing")
    assert main(["data", "check", str(synth_copy / "nowhere")]) == 1
    out = capsys.readouterr().out
    assert "error: " in out and "dataset folder does not exist" in out
    assert "Traceback" not in out


def test_test_images_and_stray_files(synth_copy):
    (synth_copy / "imagesTs" / "synth_009_0000.nii.gz").write_bytes(b"garbage")
    (synth_copy / "imagesTr" / "synth_000_0001.nii.gz").write_bytes(b"")
    (synth_copy / "imagesTr" / "forgot_suffix.nii.gz").write_bytes(b"")
    errors = check_dataset(synth_copy).errors
    assert sorted(e.split(":")[0] for e in errors) == [
        "imagesTr/forgot_suffix.nii.gz", "imagesTr/synth_000_0001.nii.gz",
        "imagesTs/synth_009_0000.nii.gz"]
    assert any("channel 1 but dataset.json declares 1 channel(s)" in e for e in errors)


def test_multichannel_nnunet_channels_must_agree(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds")
    assert check_dataset(root).ok
    (root / "imagesTr" / "case_a_0001.nii.gz").unlink()
    moved = np.eye(4)
    moved[0, 3] = 5.0
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.float32), moved),
             str(root / "imagesTr" / "case_b_0001.nii.gz"))
    label = np.asanyarray(nib.load(str(root / "labelsTr" / "case_c.nii.gz")).dataobj)
    nib.save(nib.Nifti1Image(label.astype(np.float32) + 0.5, np.eye(4)),
             str(root / "labelsTr" / "case_c.nii.gz"))
    errors = sorted(check_dataset(root).errors)
    assert len(errors) == 3, errors
    assert errors[0] == "imagesTr/case_a_0001.nii.gz: missing channel 1 of case case_a"
    assert errors[1] == ("imagesTr/case_b_0001.nii.gz: affine differs from "
                         "imagesTr/case_b_0000.nii.gz")
    assert errors[2].startswith("labelsTr/case_c.nii.gz: 384 voxel(s) have non-integer "
                                "label values")


def test_msd_dataset_checks_channels_on_last_axis(tmp_path, make_msd):
    root = make_msd(tmp_path / "ds")
    report = check_dataset(root)
    assert report.ok, report.errors
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6, 3), np.float32), np.eye(4)),
             str(root / "imagesTr" / "brain_1.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])),
             str(root / "labelsTr" / "brain_2.nii.gz"))
    errors = check_dataset(root).errors
    assert len(errors) == 2
    assert errors[0].startswith("imagesTr/brain_1.nii.gz: shape (8, 8, 6, 3): expected 2 "
                                "channels on the last axis")
    assert errors[1].startswith("labelsTr/brain_2.nii.gz: spacing (1.0, 1.0, 2.0) differs")
    assert "error: imagesTr/brain_1.nii.gz" in format_report(check_dataset(root))


# voxel axes (i, j, k) of every file below: pixdim and qform say 3, 2, 1 mm along R, A, S
QFORM = np.diag([3.0, 2.0, 1.0, 1.0])


def rewrite_geometry(root: Path, sform: np.ndarray) -> None:
    """Give every training file the qform QFORM (pixdim 3, 2, 1) and the sform ``sform``."""
    for path in sorted((root / "imagesTr").iterdir()) + sorted((root / "labelsTr").iterdir()):
        image = nib.Nifti1Image(np.asanyarray(nib.load(str(path)).dataobj), QFORM)
        image.set_sform(sform, code=2)
        image.set_qform(QFORM, code=1)
        nib.save(image, str(path))


@pytest.mark.parametrize("sform, expected, uses", [
    # axes permuted (i → S, j → A, k → R), spacing consistent with pixdim: the sform is used
    (np.array([[0, 0, 1, 0], [0, 2, 0, 0], [3, 0, 0, 0], [0, 0, 0, 1]], float), (1, 2, 3), None),
    # a stale sform whose spacing disagrees with pixdim: MONAI's reader takes the qform
    (np.array([[0, 0, 1, 0], [0, 2, 0, 0], [3.5, 0, 0, 0], [0, 0, 0, 1]], float), (3, 2, 1),
     "the qform"),
])
def test_spacing_is_read_as_preprocessing_resamples(tmp_path, make_nnunet, sform, expected,
                                                    uses):
    root = make_nnunet(tmp_path / "ds", channels=("MR",))
    rewrite_geometry(root, sform)
    info = read_dataset(root)
    prep = fit_preprocessing(info.training, spatial_dims=3)
    assert prep.spacing == expected  # in RAS order
    case = info.training[0]
    item = {"image": str(case.images[0]), "label": str(case.label)}
    loaded = Preprocessing(spatial_dims=3).transforms()(item)["image"]  # MONAI, no resampling
    assert tuple(loaded.pixdim.tolist()) == expected
    assert prep.transforms()(item)["image"].shape == loaded.shape  # already at the target

    report = check_dataset(root)
    assert report.ok, report.errors
    shown = ", ".join(str(v) for v in expected)
    assert f"median spacing: ({shown}) mm in RAS axis order, from the affines (as preprocessing " \
           "fits it)" in report.info
    warned = [w for w in report.warnings if "differs from the header's pixdim" in w]
    if uses is None:
        assert warned == []
    else:  # one warning per file, naming it and what preprocessing reads
        assert len(warned) == 2 * len(info.training)
        assert warned[0].startswith(
            f"imagesTr/{case.case_id}_0000.nii.gz: the sform's voxel spacing (3.5, 2, 1) differs "
            f"from the header's pixdim (3, 2, 1); preprocessing (MONAI's reader) uses {uses}")


def save_geometry(path: Path, *, sform: np.ndarray | None, sform_code: int,
                  qform: np.ndarray | None, qform_code: int) -> None:
    """Rewrite ``path`` (same voxels) with the given sform and qform and their codes."""
    data = np.asanyarray(nib.load(str(path)).dataobj)
    image = nib.Nifti1Image(data, None)
    if qform is not None:
        image.set_qform(qform, code=qform_code)
    if sform is not None:
        image.set_sform(sform, code=sform_code)
    image.header["sform_code"], image.header["qform_code"] = sform_code, qform_code
    nib.save(image, str(path))


def one_case(root: Path) -> tuple[Path, Path]:
    """The image and label file of the first training case."""
    case = read_dataset(root).training[0]
    return case.images[0], case.label


def test_zero_sform_with_a_valid_qform_is_read_from_the_qform(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds", channels=("MR",))
    image, label = one_case(root)
    save_geometry(image, sform=np.zeros((4, 4)), sform_code=1, qform=QFORM, qform_code=1)
    save_geometry(label, sform=QFORM, sform_code=1, qform=QFORM, qform_code=1)
    loaded = nib.load(str(image))
    assert not np.any(loaded.affine[:3, :3])  # nibabel gives the (all-zero) sform
    assert np.allclose(reader_affine(loaded), QFORM)  # preprocessing reads the qform
    report = check_dataset(root)
    assert report.ok, report.errors  # neither "not invertible" nor "affine differs"
    assert not any("not finite or not invertible" in e for e in report.errors)


def test_image_and_label_are_compared_by_the_affine_preprocessing_reads(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds", channels=("MR",))
    image, label = one_case(root)
    stale = np.diag([3.5, 2.0, 1.0, 1.0])  # spacing disagrees with pixdim: the qform is read
    shifted = QFORM.copy()
    shifted[0, 3] = 4.0
    save_geometry(image, sform=stale, sform_code=2, qform=QFORM, qform_code=1)
    save_geometry(label, sform=stale, sform_code=2, qform=shifted, qform_code=1)
    assert np.allclose(nib.load(str(image)).affine, nib.load(str(label)).affine)
    errors = check_dataset(root).errors
    assert errors == [f"labelsTr/{label.name}: affine differs from its image"], errors


def test_unusable_affine_names_the_sform_or_qform_preprocessing_reads(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds", channels=("MR",))
    image, label = one_case(root)
    # column norms 3, 2, 1 agree with pixdim, so the reader keeps this singular sform
    singular = np.array([[3, 2, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    save_geometry(image, sform=singular, sform_code=2, qform=QFORM, qform_code=1)
    errors = check_dataset(root).errors
    assert errors == [f"imagesTr/{image.name}: affine is not finite or not invertible: "
                      "preprocessing (MONAI's reader) uses the sform (sform_code 2)"], errors

    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 6))
    header.set_data_dtype(np.float32)
    header.set_qform(QFORM, code=1)
    header["qoffset_x"] = np.nan  # a qform that is not finite, no sform
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.float32), None, header), str(image))
    errors = check_dataset(root).errors
    assert errors == [f"imagesTr/{image.name}: affine is not finite or not invertible: "
                      "preprocessing (MONAI's reader) uses the qform (qform_code 1)"], errors


def test_header_without_sform_and_qform_is_warned_about(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds", channels=("MR",))
    image, label = one_case(root)
    for path in (image, label):
        save_geometry(path, sform=None, sform_code=0, qform=None, qform_code=0)
    report = check_dataset(root)
    assert report.ok, report.errors
    for path in (f"imagesTr/{image.name}", f"labelsTr/{label.name}"):
        warned = [w for w in report.warnings if w.startswith(f"{path}: ")]
        assert len(warned) == 1 and "sform_code and qform_code are both 0" in warned[0], warned
    per_file = [w for w in report.warnings if not w.startswith("cases have different")]
    assert len(per_file) == 2, report.warnings


def test_zero_pixdim_in_the_file_is_warned_about(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds", channels=("MR",))
    image, _ = one_case(root)
    data = np.asanyarray(nib.load(str(image)).dataobj)
    geometry = np.diag([1.0, 2.0, 1.0, 1.0])  # pixdim 1, 2, 1 once nibabel repairs the 0
    written = nib.Nifti1Image(data, geometry)
    written.set_qform(geometry, code=1)
    written.header["pixdim"][1] = 0.0
    nib.save(written, str(image))
    assert nib.load(str(image)).header.get_zooms()[0] == 1.0  # repaired silently on load
    report = check_dataset(root)
    assert report.warnings == [
        f"imagesTr/{image.name}: the header's pixdim (0, 2, 1) has a zero voxel spacing, which "
        "nibabel and preprocessing silently read as 1 mm; write the real voxel spacing into the "
        "header"], report.warnings
    assert not report.ok  # the label (pixdim 1, 1, 1) no longer matches its image
    assert check_dataset(root).errors[0].startswith("labelsTr/")

"""`segmentation infer` and `evaluate` against hostile inputs: nothing lost, nothing executed.

Every refusal is one line naming the file and the problem, with exit code 1 and no traceback,
and no file a user had is changed.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmentation import UNet
from segmentation.cli import main
from segmentation.data.preprocessing import Preprocessing
from segmentation.inference.checkpoint import (
    CheckpointError,
    CheckpointRecord,
    read_checkpoint,
    write_network_checkpoint,
)

LABELS = {0: "background", 1: "organ"}


def scan(path: Path, shape=(12, 10, 8), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained network with a record: what `infer` reads (no training needed)."""
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, features=(2, 4))
    return write_network_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "model.ckpt", net,
        CheckpointRecord(net=net.config, preprocessing=Preprocessing(spacing=None),
                         label_names=LABELS, patch_size=(8, 8, 8)))


def run(*args: str) -> int:
    return main(list(args))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------- checkpoints (item 4)
class Payload:
    """Unpickling this runs a command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "crafted.ckpt"
    torch.save({"segmentation": {"net": Payload(marker)}, "state_dict": {}}, path)
    return path


def bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    files = {
        "empty": (b"", "is empty"),
        "text": (b"not a checkpoint\n", "not a PyTorch checkpoint"),
        "truncated": (data[: len(data) // 2], "not a PyTorch checkpoint"),
        "gzip": (b"\x1f\x8b\x08\x00" + data[:200], "not a PyTorch checkpoint"),
    }
    out = {}
    for name, (content, message) in files.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(content)
        out[name] = (path, message)
    torch.save({"a": 1}, tmp_path / "foreign.ckpt")
    out["foreign"] = (tmp_path / "foreign.ckpt", "not a segmentation checkpoint")
    torch.save([1, 2], tmp_path / "list.ckpt")
    out["list"] = (tmp_path / "list.ckpt", "not a segmentation checkpoint")
    out["missing"] = (tmp_path / "missing.ckpt", "no such checkpoint file")
    out["folder"] = (tmp_path, "no run under it holds a checkpoint")
    return out


def test_a_crafted_checkpoint_is_refused_without_running_its_payload(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    path = crafted(tmp_path, marker)
    with pytest.raises(pickle.UnpicklingError):  # what plain torch.load(weights_only) does
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match=r"refused: .*posix.system.*could run code"):
        read_checkpoint(path)
    assert run("infer", "--checkpoint", str(path), "--input", str(scan(tmp_path / "x.nii.gz")),
               "--output", str(tmp_path / "out")) == 1
    assert str(path) in one_error_line(capsys)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "gzip", "foreign", "list",
                                  "missing", "folder"])
def test_unusable_checkpoints_give_one_line_naming_the_file(kind, checkpoint, tmp_path, capsys):
    path, message = bad_checkpoints(tmp_path, checkpoint)[kind]
    image = scan(tmp_path / "in" / "x.nii.gz")
    assert run("infer", "--checkpoint", str(path), "--input", str(image), "--output",
               str(tmp_path / "out")) == 1
    line = one_error_line(capsys)
    assert str(path) in line and message in line
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_weights_of_another_network_are_refused(tmp_path, capsys):
    small = UNet(spatial_dims=3, in_channels=1, out_channels=2, features=(2, 4))
    other = UNet(spatial_dims=3, in_channels=1, out_channels=2, features=(2, 6))
    path = write_network_checkpoint(tmp_path / "mixed.ckpt", other, CheckpointRecord(
        net=small.config, preprocessing=Preprocessing(), label_names=LABELS,
        patch_size=(8, 8, 8)))
    assert run("infer", "--checkpoint", str(path), "--input", str(scan(tmp_path / "x.nii.gz")),
               "--output", str(tmp_path / "out")) == 1
    assert "the weights do not fit the network it describes" in one_error_line(capsys)


def test_checkpoints_are_zip_archives_of_plain_data(checkpoint):
    """What makes weights_only loading possible: no pickled classes of ours or Lightning's."""
    with zipfile.ZipFile(checkpoint) as archive:
        pickled = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        text = archive.read(pickled)
    assert b"segmentation" in text and b"pytorch_lightning" not in text


# ---------------------------------------------------------------- outputs (items 2, 3, 5)
def test_outputs_of_one_run_that_collide_are_found_before_anything_runs(checkpoint, tmp_path,
                                                                        capsys):
    inputs = tmp_path / "in"
    scan(inputs / "x.nii.gz")
    scan(inputs / "x_probabilities.nii.gz", seed=1)
    out = tmp_path / "out"
    assert run("infer", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output",
               str(out), "--save-probabilities") == 1
    line = one_error_line(capsys)
    assert f"{out / 'x_probabilities.nii.gz'}: would be written twice" in line
    assert list(out.iterdir()) == []  # nothing segmented, nothing written


def test_provenance_keeps_every_run(checkpoint, tmp_path):
    out = tmp_path / "out"
    first, second = scan(tmp_path / "a" / "one.nii.gz"), scan(tmp_path / "b" / "two.nii.gz")
    assert run("infer", "--checkpoint", str(checkpoint), "--input", str(first), "--output",
               str(out)) == 0
    assert run("infer", "--checkpoint", str(checkpoint), "--input", str(second), "--output",
               str(out)) == 0
    runs = json.loads((out / "provenance.json").read_text())["runs"]
    assert [[c["case_id"] for c in r["cases"]] for r in runs] == [["one"], ["two"]]
    assert runs[0]["cases"][0]["outputs"] == [str(out / "one.nii.gz")]


def test_an_unreadable_provenance_file_is_never_replaced(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "provenance.json").write_text("my notes, not JSON")
    assert run("infer", "--checkpoint", str(checkpoint), "--input",
               str(scan(tmp_path / "x.nii.gz")), "--output", str(out)) == 1
    assert "provenance.json: exists but cannot be read" in one_error_line(capsys)
    assert snapshot(out) == {"provenance.json": b"my notes, not JSON"}


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_first_scan(
        checkpoint, tmp_path, capsys, monkeypatch):
    """As a read-only folder or a full disk look to the writability probe (also as root)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    out = tmp_path / "out"
    assert run("infer", "--checkpoint", str(checkpoint), "--input",
               str(scan(tmp_path / "x.nii.gz")), "--output", str(out)) == 1
    assert f"{out}: cannot write there (Permission denied)" in one_error_line(capsys)
    assert list(out.iterdir()) == []


def test_an_output_path_that_is_a_file_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "predictions"
    out.write_text("a file of the user's")
    assert run("infer", "--checkpoint", str(checkpoint), "--input",
               str(scan(tmp_path / "x.nii.gz")), "--output", str(out)) == 1
    assert f"{out}: exists and is not a folder" in one_error_line(capsys)
    assert out.read_text() == "a file of the user's"


def test_an_output_name_taken_by_a_folder_is_refused_even_with_overwrite(checkpoint, tmp_path,
                                                                         capsys):
    out = tmp_path / "out"
    (out / "x.nii.gz").mkdir(parents=True)
    assert run("infer", "--checkpoint", str(checkpoint), "--input",
               str(scan(tmp_path / "x.nii.gz")), "--output", str(out), "--overwrite") == 1
    assert f"{out / 'x.nii.gz'}: is a folder" in one_error_line(capsys)


SIGTERM_MID_WRITE = """
import os, signal, sys
import nibabel as nib
real_save = nib.save
def save_then_sigterm(image, filename):
    real_save(image, filename)
    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, mid-write
nib.save = save_then_sigterm
from segmentation.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_mid_write_leaves_no_partial_file_and_exits_143(checkpoint, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SIGTERM_MID_WRITE, "infer", "--checkpoint",
                           str(checkpoint), "--input", str(scan(tmp_path / "x.nii.gz")),
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "terminated"
    assert "Traceback" not in done.stderr
    assert list(out.iterdir()) == []  # no mask, no temporary file, no provenance of nothing


# ---------------------------------------------------------------- evaluate --csv (item 1)
@pytest.fixture
def evaluation(tmp_path) -> tuple[Path, Path, Path]:
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1},
         "numTraining": 0, "file_ending": ".nii.gz"}))
    label = np.zeros((6, 6, 4), np.uint8)
    label[1:4, 1:4] = 1
    for folder in ("labelsTs", "predictions"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / folder / "case.nii.gz"))
    return dataset, tmp_path / "labelsTs", tmp_path / "predictions"


def evaluate(evaluation, csv: Path, *extra: str) -> int:
    dataset, labels, predictions = evaluation
    return run("evaluate", "--predictions", str(predictions), "--labels", str(labels),
               "--dataset", str(dataset), "--csv", str(csv), *extra)


@pytest.mark.parametrize("target", ["label", "prediction", "dataset.json"])
def test_evaluate_never_writes_its_csv_over_an_input(evaluation, target, capsys):
    dataset, labels, predictions = evaluation
    path = {"label": labels / "case.nii.gz", "prediction": predictions / "case.nii.gz",
            "dataset.json": dataset / "dataset.json"}[target]
    before = path.read_bytes()
    for extra in ((), ("--overwrite",)):
        assert evaluate(evaluation, path, *extra) == 1
        line = one_error_line(capsys)
        assert str(path) in line and ("one of the files evaluate reads" in line
                                      or "exists" in line)
        assert path.read_bytes() == before


def test_evaluate_replaces_an_existing_csv_only_with_overwrite(evaluation, tmp_path, capsys):
    csv = tmp_path / "dice.csv"
    csv.write_text("results of another day\n")
    assert evaluate(evaluation, csv) == 1
    assert f"{csv}: exists; pass --overwrite to replace it" in one_error_line(capsys)
    assert csv.read_text() == "results of another day\n"
    assert evaluate(evaluation, csv, "--overwrite") == 0
    assert csv.read_text().splitlines() == ["case_id,class,dice", "case,organ,1.0"]


def test_evaluate_csv_into_a_missing_folder_or_a_folder_is_one_line(evaluation, tmp_path,
                                                                    capsys):
    assert evaluate(evaluation, tmp_path / "nowhere" / "dice.csv") == 1
    assert "does not exist" in one_error_line(capsys)
    assert evaluate(evaluation, tmp_path) == 1
    assert "is a folder" in one_error_line(capsys)


# ---------------------------------------------------------------- odd scans
RNG = np.random.default_rng(0)
FLOAT = RNG.random((12, 10, 8)).astype(np.float32)
UNUSUAL_BUT_FINE = {  # segmented, with the scan's own shape and affine
    "float64": (FLOAT.astype(np.float64), None),
    "int8": (RNG.integers(-5, 5, (12, 10, 8)).astype(np.int8), None),
    "uint16": (RNG.integers(0, 60000, (12, 10, 8)).astype(np.uint16), None),
    "constant": (np.zeros((12, 10, 8), np.float32), None),
    "one_voxel": (np.ones((1, 1, 1), np.float32), None),
    "sheared": (FLOAT, np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1.0]])),
    "lps": (FLOAT, np.diag([-0.8, -0.8, 2.5, 1.0])),
}
REFUSED = {  # reported in one line naming the file; the other scans are still written
    "flat2d": (FLOAT[..., 0], "a 2D image of shape (12, 10); this model segments 3D scans"),
    "fivedim": (FLOAT[..., None, None], "a 5D image"),
    "two_channels": (np.stack([FLOAT, FLOAT], -1), "2 channel(s), but the model expects 1"),
    "nan": (np.full((12, 10, 8), np.nan, np.float32), "non-finite logits"),
    "inf": (np.full((12, 10, 8), np.inf, np.float32), "non-finite logits"),
    "empty": (b"", "Empty file"),
    "text": (b"hello", "not a gzip file"),
    "truncated": ("half", "Compressed file ended"),
}


@pytest.mark.parametrize("name", list(UNUSUAL_BUT_FINE))
def test_unusual_scans_are_segmented_on_their_own_grid(name, checkpoint, tmp_path):
    data, affine = UNUSUAL_BUT_FINE[name]
    affine = np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine
    path = tmp_path / "in" / f"{name}.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(path))
    assert run("infer", "--checkpoint", str(checkpoint), "--input", str(path), "--output",
               str(tmp_path / "out")) == 0
    mask = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
    assert mask.shape == data.shape and np.allclose(mask.affine, affine, atol=1e-5)


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_scan_that_cannot_be_segmented_is_one_line_and_the_others_are_written(
        name, checkpoint, tmp_path, capsys):
    content, message = REFUSED[name]
    inputs = tmp_path / "in"
    good = scan(inputs / "good.nii.gz")
    path = inputs / f"{name}.nii.gz"
    if isinstance(content, np.ndarray):
        nib.save(nib.Nifti1Image(content, np.eye(4)), str(path))
    else:
        whole = good.read_bytes()
        path.write_bytes(whole[: len(whole) // 2] if content == "half" else content)
    assert run("infer", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output",
               str(tmp_path / "out")) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: {path}: ") and message in line, line
    assert "ValueError" not in line  # our own refusals read as sentences, not exceptions
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "good.nii.gz", "provenance.json"]

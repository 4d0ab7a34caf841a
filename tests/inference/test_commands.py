"""`segmentation infer`: geometry restored, safety, failures, provenance, channels."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmentation.cli import main
from segmentation.inference import devices, segmenter
from segmentation.inference.checkpoint import read_record
from segmentation.inference.provenance import sha256
from segmentation.inference.segmenter import Segmenter


def infer(*args: str) -> int:
    return main(["infer", *args])




class LabelOracle:
    """Stands in for the predictor: returns the *preprocessed label* of the scan it is given.

    Why this oracle: it makes the expected output known exactly, independent of training
    quality and of intensity statistics. Each test scan's label is run through the same
    preprocessing as its image (orientation, spacing with nearest neighbours); the oracle
    recognises a scan by its preprocessed image and answers with one-hot logits of that label.
    Inverting those and writing them must then reproduce the original label file on the
    original grid: a flipped, permuted or shifted axis, or a wrong affine, would give Dice ~0.
    """

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], classes: int) -> None:
        self.pairs, self.classes = pairs, classes

    def __call__(self, image: torch.Tensor, progress=None) -> torch.Tensor:
        for preprocessed, label in self.pairs:  # (C, *S'), (1, *S')
            if preprocessed.shape == image.shape[1:] and torch.allclose(preprocessed, image[0]):
                one_hot = torch.nn.functional.one_hot(label[0].long(), self.classes)
                return 10.0 * one_hot.movedim(-1, 0)[None].float()  # (1, K, *S')
        raise AssertionError("the oracle was given a scan it does not know")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_outputs_keep_each_scans_geometry_and_structures_stay_in_place(infer_dataset,
                                                                       trained_checkpoint,
                                                                       tmp_path, monkeypatch):
    transform = read_record(trained_checkpoint).preprocessing.transforms(("image", "label"))
    scans = sorted((infer_dataset / "imagesTs").glob("*.nii.gz"))
    labels = [infer_dataset / "labelsTs" / scan.name.replace("_0000", "") for scan in scans]
    pairs = []
    for scan, label in zip(scans, labels, strict=True):
        data = transform({"image": str(scan), "label": str(label)})
        pairs.append((data["image"].as_tensor(), data["label"].as_tensor()))
    monkeypatch.setattr(segmenter, "Predictor", lambda *args, **kwargs: LabelOracle(pairs, 4))

    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(trained_checkpoint), "--input",
                 str(infer_dataset / "imagesTs"), "--output", str(out)]) == 0
    orientations = set()
    for scan, label in zip(scans, labels, strict=True):
        source, result = nib.load(scan), nib.load(out / label.name)
        assert result.shape == source.shape
        assert np.allclose(result.affine, source.affine, atol=1e-6)
        assert np.allclose(result.get_sform(), source.get_sform(), atol=1e-6)
        assert np.allclose(result.get_qform(), source.get_qform(), atol=1e-5)
        assert int(result.header["sform_code"]) == int(source.header["sform_code"])
        assert int(result.header["qform_code"]) == int(source.header["qform_code"])
        assert result.get_data_dtype() == np.uint8
        truth, predicted = np.asanyarray(nib.load(label).dataobj), np.asanyarray(result.dataobj)
        assert dice(truth > 0, predicted > 0) > 0.95, scan.name
        assert dice(truth == 1, predicted == 1) > 0.95, scan.name  # the organ, in place
        orientations.add(nib.aff2axcodes(source.affine))
    assert len(orientations) > 1  # RAS- and LPS-like (and rotated) scans all came back in place


def test_refuses_to_overwrite_outputs_or_inputs_unless_told(infer_dataset, trained_checkpoint,
                                                            tmp_path, capsys):
    scans = tmp_path / "scans"
    shutil.copytree(infer_dataset / "imagesTs", scans)
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "synth_003.nii.gz"
    existing.write_bytes(b"keep me")
    assert infer("--checkpoint", str(trained_checkpoint), "--input", str(scans), "--output",
                 str(out)) == 1
    assert "synth_003.nii.gz: exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    assert not (out / "synth_004.nii.gz").exists()  # refused before anything was written

    # an output that would land on an input scan is refused even with --overwrite
    single = scans / "synth_005.nii.gz"
    shutil.copy(scans / "synth_005_0000.nii.gz", single)
    before = single.read_bytes()
    assert infer("--checkpoint", str(trained_checkpoint), "--input", str(single), "--output",
                 str(scans), "--overwrite") == 1
    assert "is one of the input scans" in capsys.readouterr().err
    assert single.read_bytes() == before

    assert infer("--checkpoint", str(trained_checkpoint), "--input",
                 str(scans / "synth_003_0000.nii.gz"), "--output", str(out), "--overwrite") == 0
    assert nib.load(existing).shape == nib.load(scans / "synth_003_0000.nii.gz").shape


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_leaves_no_partial_file(infer_dataset, trained_checkpoint, tmp_path,
                                                     monkeypatch, capsys, failure):
    real_save = nib.save

    def failing_save(image, filename):
        real_save(image, filename)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half written, then
        raise failure("disk full")  # the run is interrupted, or the write fails

    monkeypatch.setattr(nib, "save", failing_save)
    out = tmp_path / "out"
    args = ("--checkpoint", str(trained_checkpoint), "--input",
            str(infer_dataset / "imagesTs" / "synth_003_0000.nii.gz"), "--output", str(out))
    if failure is KeyboardInterrupt:  # stops the whole run
        assert infer(*args) == 130  # "interrupted", no traceback
        assert capsys.readouterr().err.strip().endswith("interrupted")
        assert list(out.iterdir()) == []  # neither the mask nor a temporary file
    else:  # fails this scan: reported, recorded, and nothing of it left behind
        assert infer(*args) == 1
        assert "synth_003_0000.nii.gz: OSError: disk full" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == ["provenance.json"]


def test_a_corrupt_scan_is_reported_and_the_others_are_written(infer_dataset, trained_checkpoint,
                                                               tmp_path, capsys):
    scans = tmp_path / "scans"
    shutil.copytree(infer_dataset / "imagesTs", scans)
    (scans / "broken_0000.nii.gz").write_bytes(np.random.default_rng(0).bytes(500))
    whole = (scans / "synth_004_0000.nii.gz").read_bytes()  # a header that reads, data that not
    (scans / "truncated_0000.nii.gz").write_bytes(whole[:len(whole) // 2])
    out = tmp_path / "out"
    assert infer("--checkpoint", str(trained_checkpoint), "--input", str(scans), "--output",
                 str(out), "--save-probabilities") == 1
    err = capsys.readouterr().err
    assert "broken_0000.nii.gz" in err and "Traceback" not in err
    assert "truncated_0000.nii.gz: EOFError: Compressed file ended" in err  # the reason itself,
    assert "applying transform" not in err  # not MONAI's wrapper around it
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == [f"synth_00{i}{s}.nii.gz" for i in (3, 4, 5)
                       for s in ("", "_probabilities")]
    probabilities = nib.load(out / "synth_003_probabilities.nii.gz")
    assert probabilities.shape == (*nib.load(scans / "synth_003_0000.nii.gz").shape, 4)
    assert np.allclose(np.asanyarray(probabilities.dataobj).sum(-1), 1.0, atol=1e-3)

    [record] = json.loads((out / "provenance.json").read_text())["runs"]
    assert record["checkpoint_sha256"] == sha256(trained_checkpoint)
    assert record["versions"]["torch"] == torch.__version__
    assert record["settings"]["precision"] == "fp32"  # "auto" on the CPU
    failed = [c for c in record["cases"] if c["error"]]
    assert [c["case_id"] for c in failed] == ["broken", "truncated"]


def test_multichannel_cases_and_valid_networks(infer_dataset, tmp_path, train_checkpoint):
    two = tmp_path / "two_channels"
    shutil.copytree(infer_dataset, two)
    meta = json.loads((two / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T2"}
    (two / "dataset.json").write_text(json.dumps(meta))
    for folder in ("imagesTr", "imagesTs"):
        for first in (two / folder).glob("*_0000.nii.gz"):
            shutil.copy(first, first.with_name(first.name.replace("_0000", "_0001")))
    checkpoint = train_checkpoint(two, tmp_path / "two.ckpt", in_channels=2)
    out = tmp_path / "out"
    assert infer("--checkpoint", str(checkpoint), "--input", str(two / "imagesTs"),
                 "--output", str(out)) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "synth_003.nii.gz", "synth_004.nii.gz", "synth_005.nii.gz"]

    valid = train_checkpoint(infer_dataset, tmp_path / "valid.ckpt", padding="valid")
    scan = infer_dataset / "imagesTs" / "synth_004_0000.nii.gz"
    assert infer("--checkpoint", str(valid), "--input", str(scan), "--output",
                 str(tmp_path / "valid_out"), "--tta") == 0
    assert nib.load(tmp_path / "valid_out" / "synth_004.nii.gz").shape == nib.load(scan).shape


def test_a_missing_gpu_or_bad_checkpoint_is_one_error_line(infer_dataset, tmp_path, capsys):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"nope")
    assert infer("--checkpoint", str(bogus), "--input", str(infer_dataset / "imagesTs"), "--output",
                 str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU is available"):
            devices.resolve_device("cuda")
    assert infer("--checkpoint", str(bogus), "--input", str(infer_dataset / "imagesTs"), "--output",
                 str(tmp_path / "out"), "--device", "gpu0") == 1
    assert capsys.readouterr().err.strip() == (
        "error: --device gpu0: choose auto, cpu, cuda or cuda:N")


def test_non_finite_logits_fail_the_scan_with_advice(infer_dataset, trained_checkpoint, tmp_path,
                                                     monkeypatch, capsys):
    monkeypatch.setattr(segmenter, "Predictor", lambda *args, **kwargs:
                        lambda image, progress=None: torch.full((1, 4, *image.shape[2:]),
                                                                float("nan")))
    assert infer("--checkpoint", str(trained_checkpoint), "--input",
                 str(infer_dataset / "imagesTs" / "synth_003_0000.nii.gz"), "--output",
                 str(tmp_path / "out")) == 1
    assert ("the network gave non-finite logits; check the scan's intensities"
            in capsys.readouterr().err)


def test_compiled_network_gives_the_same_masks(infer_dataset, trained_checkpoint, tmp_path):
    """--compile runs torch.compile'd kernels (inductor, C++ on the CPU) with the same result."""
    scan = infer_dataset / "imagesTs" / "synth_003_0000.nii.gz"
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert infer("--checkpoint", str(trained_checkpoint), "--input", str(scan), "--output",
                 str(eager), "--save-probabilities") == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert infer("--checkpoint", str(trained_checkpoint), "--input", str(scan), "--output",
                 str(compiled), "--save-probabilities", "--compile", "--batch-size", "5") == 0
    # it compiled, once: full batches only (a short last batch would compile again)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    [record] = json.loads((compiled / "provenance.json").read_text())["runs"]
    assert record["settings"]["compile"] is True and not record["cases"][0]["error"]
    probabilities = [np.asarray(nib.load(folder / "synth_003_probabilities.nii.gz").dataobj)
                     for folder in (eager, compiled)]
    assert np.abs(probabilities[0] - probabilities[1]).max() < 1e-4
    masks = [np.asarray(nib.load(folder / "synth_003.nii.gz").dataobj)
             for folder in (eager, compiled)]
    assert (masks[0] == masks[1]).mean() > 0.999  # argmax ties may flip within 1e-4

    model = Segmenter(trained_checkpoint, device="cpu", compile=True)
    compiled_net = model.predictor.net  # compiled once, shared by every scan
    assert compiled_net is not model.net and compiled_net._orig_mod is model.net


def test_outputs_are_readable_labels_not_copies_of_the_scans_header(infer_dataset,
                                                                    trained_checkpoint, tmp_path):
    """Geometry from the scan; display range, intent, description and time unit not."""
    source = nib.load(infer_dataset / "imagesTs" / "synth_003_0000.nii.gz")
    header = source.header.copy()
    header["cal_min"], header["cal_max"] = 0, 1000
    header["descrip"] = b"T1 scan"
    header.set_intent("t test", (12.0,))
    header.set_xyzt_units("mm", "sec")
    scan = tmp_path / "scan_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine, header), scan)
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert infer("--checkpoint", str(trained_checkpoint), "--input", str(scan), "--output",
                     str(out), "--save-probabilities") == 0
    finally:
        os.umask(previous)
    labels = nib.load(out / "scan.nii.gz").header
    probabilities = nib.load(out / "scan_probabilities.nii.gz").header
    assert labels.get_intent()[0] == "label" and probabilities.get_intent()[0] == "none"
    for written in (labels, probabilities):
        assert (float(written["cal_min"]), float(written["cal_max"])) == (0.0, 0.0)
        assert written.get_xyzt_units() == ("mm", "unknown")
        assert b"T1" not in written["descrip"].item()
        assert np.array_equal(written.get_sform(), source.get_sform())
    for path in out.iterdir():  # as any new file: not mkstemp's owner-only 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


BLOCK_LIGHTNING = """
import importlib.abc, sys

class NoLightning(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytorch_lightning", "lightning", "lightning_fabric"):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, NoLightning())
from segmentation.cli import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in ("pytorch_lightning", "lightning_fabric")]
sys.exit(code)
"""


def test_infer_runs_where_lightning_cannot_be_imported(infer_dataset, trained_checkpoint, tmp_path):
    """Inference needs the checkpoint and the network, never the training code."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", BLOCK_LIGHTNING, "infer", "--checkpoint",
                           str(trained_checkpoint), "--input",
                           str(infer_dataset / "imagesTs" / "synth_003_0000.nii.gz"), "--output",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "synth_003.nii.gz").is_file()
    blocked = subprocess.run([sys.executable, "-c", BLOCK_LIGHTNING, "fit", "--help"],
                             capture_output=True, text=True, timeout=300)
    assert "blocked: pytorch_lightning" in blocked.stderr  # the block works: training needs it

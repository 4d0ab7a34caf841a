"""Every command against bad or unusual inputs: one line, the right exit code, nothing lost.

The contract: nothing a user had is lost or overwritten without --overwrite (or, for `data
synth`, --force on a dataset it wrote), nothing from an input file is executed, and every
refusal is one `error: ...` line naming the file or option and the problem, exit code 1 (2 for
usage errors), no traceback; no run folder is left behind by a refused `fit`/`test`.
`tests/test_hostile_infer.py` holds the sweep of `infer` and `evaluate`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmentation import UNet
from segmentation.cli import main
from segmentation.data.preprocessing import Preprocessing
from segmentation.data.synth import generate_dataset
from segmentation.inference.checkpoint import CheckpointRecord, write_network_checkpoint
from segmentation.training.module import SegmentationModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny dataset, a one-case dataset, checkpoints good and bad, a file of the user's."""
    root = tmp_path_factory.mktemp("hostile")
    generate_dataset(root / "ds", cases=4, test_cases=1, seed=3, shape=(20, 20, 16))
    generate_dataset(root / "one", cases=1, test_cases=1, seed=4, shape=(20, 20, 16))
    for name, features in (("small.ckpt", (2, 4)), ("inference.ckpt", (4, 8))):
        net = UNet(spatial_dims=3, in_channels=1, out_channels=4, features=features)
        write_network_checkpoint(root / name, net, CheckpointRecord(
            net=net.config, preprocessing=Preprocessing(spacing=None),
            label_names={0: "background", 1: "organ", 2: "vessel", 3: "lesion"},
            patch_size=(16, 16, 16)))
    # as a run of another network would have written it: with Lightning's keys
    other = torch.load(root / "small.ckpt", weights_only=True)
    torch.save({**other, "pytorch-lightning_version": "2.6.6"}, root / "other-run.ckpt")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'payload-ran'}",))

    torch.save({"state_dict": {}, "segmentation": {"net": Payload()}}, root / "crafted.ckpt")
    (root / "text.ckpt").write_text("hello")
    (root / "notes.txt").write_text("a file of the user's")
    real = root / "real"
    generate_dataset(real, cases=2, test_cases=0, seed=5, shape=(16, 16, 16))
    meta = json.loads((real / "dataset.json").read_text())
    (real / "dataset.json").write_text(json.dumps({**meta, "name": "Dataset001_Liver"}))
    bad = root / "badlabels"
    generate_dataset(bad, cases=2, test_cases=0, seed=6, shape=(16, 16, 16))
    label = next((bad / "labelsTr").iterdir())
    image = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.full(image.shape, 9, np.uint8), image.affine), str(label))
    broken = root / "brokenjson"
    generate_dataset(broken, cases=2, test_cases=0, seed=7, shape=(16, 16, 16))
    (broken / "dataset.json").write_text("{not json")
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "runs" not in p.parts and ".cache" not in p.parts}


def fit_args(w: Path, *extra: str, command: str = "fit", root: str = "ds") -> list[str]:
    return [command, "--config", str(CONFIGS / "quickstart.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--runs_dir", str(w / "runs"), "--name", "hostile",
            "--model.net.init_args.features", "[4, 8]",
            "--model.net.init_args.deep_supervision", "false",
            "--data.root", str(w / root), "--data.n_folds", "2", "--data.num_workers", "0",
            "--data.cache", "none", "--data.patch_size", "[16, 16, 16]",
            "--data.cache_dir", str(w / ".cache"), *extra]


# name → (argv from the workspace, exit code, what the one error line says)
SWEEP: dict[str, tuple[Callable[[Path], list[str]], int, str]] = {
    # data synth
    "synth into a dataset without --force": (
        lambda w: ["data", "synth", "--out", str(w / "ds")], 1, "is not empty; use --force"),
    "synth --force over a real dataset": (
        lambda w: ["data", "synth", "--out", str(w / "real"), "--force"], 1,
        "did not write"),
    "synth onto a file": (
        lambda w: ["data", "synth", "--out", str(w / "notes.txt")], 1,
        "exists and is not a folder"),
    "synth zero cases": (
        lambda w: ["data", "synth", "--out", str(w / "new0"), "--cases", "0"], 1, "--cases 0"),
    "synth shape of the wrong dimensionality": (
        lambda w: ["data", "synth", "--out", str(w / "new1"), "--shape", "32", "32"], 1,
        "--shape 32 32"),
    "synth 4D": (
        lambda w: ["data", "synth", "--out", str(w / "new2"), "--dims", "4"], 2, "--dims"),
    "synth negative seed": (
        lambda w: ["data", "synth", "--out", str(w / "new3"), "--seed", "-1"], 1, "--seed"),
    # data check
    "check a missing folder": (
        lambda w: ["data", "check", str(w / "missing")], 1, "does not exist"),
    "check a file instead of a folder": (
        lambda w: ["data", "check", str(w / "notes.txt")], 1, "notes.txt"),
    "check labels outside dataset.json": (
        lambda w: ["data", "check", str(w / "badlabels")], 1, "9"),
    "check a malformed dataset.json": (
        lambda w: ["data", "check", str(w / "brokenjson")], 1, "dataset.json"),
    # summary
    "summary of a missing config": (
        lambda w: ["summary", str(w / "missing.yaml"), "--input-shape", "64", "64", "64"], 1,
        "missing.yaml"),
    "summary of an invalid size": (
        lambda w: ["summary", str(CONFIGS / "model" / "unet2d_ronneberger.yaml"),
                   "--input-shape", "190", "190"], 1, "nearest valid sizes are 188 and 204"),
    "summary of a text file": (
        lambda w: ["summary", str(w / "notes.txt"), "--input-shape", "64", "64", "64"], 1,
        "notes.txt"),
    # fit
    "fit on a missing data root": (
        lambda w: fit_args(w, root="missing"), 1, "dataset folder does not exist"),
    "fit with a malformed dataset.json": (
        lambda w: fit_args(w, root="brokenjson"), 1, "dataset.json: invalid JSON"),
    "fit with label values not in dataset.json": (
        lambda w: fit_args(w, root="badlabels"), 1, "failed its integrity check"),
    "fit with batch_size 0": (
        lambda w: fit_args(w, "--data.batch_size", "0"), 1, "data.batch_size=0"),
    "fit with patches_per_epoch 0": (
        lambda w: fit_args(w, "--data.patches_per_epoch", "0"), 1,
        "data.patches_per_epoch=0"),
    "fit with fold 9 of 2": (
        lambda w: fit_args(w, "--data.fold", "9"), 1, "fold=9 is out of range"),
    "fit a one-case dataset in 5 folds": (
        lambda w: fit_args(w, "--data.n_folds", "5", root="one"), 1,
        "fold 'all' to train on every case"),
    "fit --ckpt_path last without a run": (
        lambda w: fit_args(w, "--ckpt_path", "last", "--name", "never"), 1,
        "no last.ckpt under"),
    "fit resuming from a crafted checkpoint": (
        lambda w: fit_args(w, "--ckpt_path", str(w / "crafted.ckpt")), 1,
        "refused: it holds a Python object"),
    "fit resuming from a text file": (
        lambda w: fit_args(w, "--ckpt_path", str(w / "text.ckpt")), 1,
        "not a PyTorch checkpoint"),
    "fit with an unknown option": (
        lambda w: fit_args(w, "--data.bogus", "1"), 2, "bogus"),
    # validate, test, predict
    "test with a checkpoint of another architecture": (
        lambda w: fit_args(w, "--ckpt_path", str(w / "other-run.ckpt"), command="test"), 1,
        "written for another network"),
    "test an inference-only checkpoint": (
        lambda w: fit_args(w, "--ckpt_path", str(w / "inference.ckpt"), command="test"), 1,
        "no training state"),
    "validate a missing checkpoint": (
        lambda w: fit_args(w, "--ckpt_path", str(w / "missing.ckpt"), command="validate"), 1,
        "no such checkpoint file"),
    "test fold all": (
        lambda w: fit_args(w, "--data.fold", "all", command="test"), 1,
        "nothing to test"),
    "predict with a crafted checkpoint": (
        lambda w: fit_args(w, "--ckpt_path", str(w / "crafted.ckpt"), command="predict"), 1,
        "refused"),
}


@pytest.mark.parametrize("case", list(SWEEP))
def test_refusal_is_one_line_and_loses_nothing(case, workspace, capsys):
    make_args, code, message = SWEEP[case]
    before = snapshot(workspace)
    assert exit_code(make_args(workspace)) == code
    captured = capsys.readouterr()
    # `data check` reports on stdout, one line per problem; everything else on stderr
    err = captured.out + captured.err if make_args(workspace)[:2] == ["data", "check"] \
        else captured.err
    assert "Traceback" not in err
    # ours: "error: ..."; a usage error: argparse's "segmentation ...: error: ..." after usage
    lines = [line for line in err.splitlines()
             if line.startswith("error: ") or (code == 2 and ": error: " in line)]
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert snapshot(workspace) == before  # nothing a user had changed
    assert not (workspace / "runs").exists()  # a refused run leaves no folder
    assert not (workspace / "payload-ran").exists()  # nothing from an input was executed


def exit_code(argv: list[str]) -> int:
    """``main``'s exit code, also where a parser exits (usage errors: SystemExit(2))."""
    try:
        return main(argv)
    except SystemExit as exited:
        return int(exited.code or 0)


def test_a_one_case_dataset_trains_on_fold_all(workspace, capsys):
    """nnU-Net's fold "all": every case trains, none validates, last.ckpt is written."""
    runs = workspace / "runs-all"
    args = fit_args(workspace, "--data.fold", "all", "--data.patches_per_epoch", "2",
                    "--runs_dir", str(runs), root="one")
    assert main(args) == 0
    assert [p.name for p in (runs / "hostile" / "version_0" / "checkpoints").iterdir()] == [
        "last.ckpt"]
    assert not (workspace / "one" / "splits.json").exists()  # no split of one case is made


@pytest.mark.parametrize(("interrupt", "code", "line"), [
    ("sigint", 130, "interrupted"), ("sigterm", 143, "terminated")])
def test_fit_interrupted_exits_with_the_signals_code_and_one_line(workspace, tmp_path,
                                                                  monkeypatch, capsys,
                                                                  interrupt, code, line):
    """Ctrl-C (KeyboardInterrupt) and SIGTERM mid-training: Lightning stops the run itself."""
    real_step = SegmentationModule.training_step

    def step_then_interrupt(self, batch, batch_idx):
        loss = real_step(self, batch, batch_idx)
        if interrupt == "sigint":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops at the next batch
        return loss

    monkeypatch.setattr(SegmentationModule, "training_step", step_then_interrupt)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert main(fit_args(workspace, "--runs_dir", str(tmp_path / "runs"),
                             "--data.patches_per_epoch", "4", "--data.batch_size", "1")) == code
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    leftovers = [p for p in (tmp_path / "runs").rglob("*") if p.name.startswith(".")
                 or p.suffix in (".tmp", ".part")]
    assert leftovers == []


SIGNAL_MID_SYNTH = """
import os, signal, sys
import nibabel as nib
real_save = nib.save
def save_then_signal(image, filename):
    real_save(image, filename)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
nib.save = save_then_signal
from segmentation.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("name", "code", "line"), [("SIGINT", 130, "interrupted"),
                                                    ("SIGTERM", 143, "terminated")])
def test_synth_interrupted_leaves_no_partial_dataset_and_keeps_the_old_one(
        tmp_path, name, code, line):
    old = tmp_path / "synthetic"
    generate_dataset(old, cases=2, test_cases=0, seed=1, shape=(16, 16, 16))
    before = snapshot(old)
    for out, extra in ((tmp_path / "new", []), (old, ["--force"])):
        done = subprocess.run([sys.executable, "-c", SIGNAL_MID_SYNTH, name, "data", "synth",
                               "--out", str(out), "--cases", "2", "--shape", "16", "16", "16",
                               *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == code, done.stderr
        assert done.stderr.strip().splitlines()[-1] == line
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "new").exists()  # no partial dataset
    assert snapshot(old) == before  # --force replaces only once the new one is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no staging folder

"""``segmentation landscape`` end to end on a checkpoint trained for one step."""

from __future__ import annotations

import argparse
import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import segmentation.instruments.landscape as landscape_module
from segmentation import cli
from segmentation.inference.checkpoint import (
    CheckpointError,
    CheckpointRecord,
    load_trained_network,
    write_network_checkpoint,
)
from segmentation.instruments.fixed_patches import PatchSet
from segmentation.instruments.landscape import Landscape, evaluate_loss
from segmentation.instruments.landscape_command import add_landscape_command
from segmentation.training.losses import SegmentationLoss

COMMAND = Path(__file__).parents[2] / "segmentation" / "instruments" / "landscape_command.py"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_landscape_command(parser.add_subparsers())
    args = parser.parse_args(["landscape", *argv])
    return args.func(args)


@pytest.fixture
def small(trained_checkpoint: Path, infer_dataset: Path) -> list[str]:
    """The trained checkpoint on its dataset, 1 patch, 3 points per axis, on the CPU."""
    return ["--checkpoint", str(trained_checkpoint), "--data", str(infer_dataset),
            "--patches", "1", "--steps", "3", "--device", "cpu"]


def loss_on_stored_patches(checkpoint: Path, out: Path) -> float:
    """The checkpoint's training loss on the patches the command measured on."""
    net, _ = load_trained_network(checkpoint)
    return evaluate_loss(net, PatchSet.load(out / "patches.pt"), SegmentationLoss())


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_centre_is_the_checkpoints_loss(trained_checkpoint, infer_dataset, tmp_path,
                                            capsys):
    checkpoint = Path(shutil.copy(trained_checkpoint, tmp_path / "model.ckpt"))
    assert run("--checkpoint", str(checkpoint), "--data", str(infer_dataset), "--patches", "2",
               "--steps", "3", "--dims", "2", "--device", "cpu") == 0
    out = tmp_path / "landscape"  # the default: beside the checkpoint
    assert {"landscape.npz", "patches.pt", "landscape_contour.png", "landscape_surface.png",
            "landscape_summary.json"} <= set(files_of(out))
    landscape = Landscape.load(out / "landscape.npz")
    assert landscape.losses.shape == (3, 3) and landscape.complete and landscape.seed == 0
    assert landscape.losses[1, 1] == loss_on_stored_patches(checkpoint, out)
    summary = json.loads((out / "landscape_summary.json").read_text())
    assert summary["summary"]["centre_loss"] == landscape.losses[1, 1]
    assert summary["summary"]["curvature_ratio"] is None or summary["summary"][
        "curvature_ratio"] >= 1
    settings = landscape.settings
    assert "assumed" in settings["loss"] and "eval mode" in settings["evaluation"]
    assert settings["range"] == 1.0 and settings["patches"] == 2
    printed = capsys.readouterr().out
    assert "centre loss" in printed and "curvature ratio" in printed


def test_a_rerun_continues_an_interrupted_grid(small, tmp_path, monkeypatch):
    grid = [*small, "--steps", "5"]
    run(*grid, "--output", str(tmp_path / "full"))
    full = Landscape.load(tmp_path / "full" / "landscape.npz")
    calls = []
    evaluate = landscape_module.evaluate_loss

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(landscape_module, "evaluate_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(*grid, "--output", str(tmp_path / "part"))
    partial = Landscape.load(tmp_path / "part" / "landscape.npz")
    assert partial.computed.tolist() == [True, True, False, False, False]
    calls.clear()
    monkeypatch.setattr(landscape_module, "evaluate_loss",
                        lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    run(*grid, "--output", str(tmp_path / "part"))
    assert len(calls) == 5 - 2
    np.testing.assert_array_equal(Landscape.load(tmp_path / "part" / "landscape.npz").losses,
                                  full.losses)
    calls.clear()
    run(*grid, "--output", str(tmp_path / "part"))  # complete: nothing to compute
    assert not calls


def test_other_settings_are_refused_unless_overwrite(small, tmp_path):
    out = tmp_path / "out"
    run(*small, "--output", str(out))
    before = files_of(out)
    with pytest.raises(ValueError, match=r"other settings \(steps: 3 there, 5 now\).*--overwrite"):
        run(*small, "--output", str(out), "--steps", "5")
    assert files_of(out) == before
    run(*small, "--output", str(out), "--steps", "5", "--overwrite")
    assert Landscape.load(out / "landscape.npz").losses.shape == (5,)


@pytest.mark.parametrize(("options", "message"), [
    (["--range", "0"], "--range 0: choose a positive range"),
    (["--range", "-1"], "--range -1: choose a positive range"),
    (["--steps", "2"], "--steps 2: choose at least 3"),
    (["--patches", "0"], "--patches 0: choose at least 1"),
    (["--dims", "3"], "--dims 3: choose 1 or 2"),
    (["--margin", "0.5"], "--margin applies to --to only"),
    (["--to", "b.ckpt", "--dims", "2"], "--dims does not apply to --to"),
    (["--device", "tpu"], "--device tpu"),
])
def test_bad_options_are_one_line_and_write_nothing(small, tmp_path, options, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message) as error:
        run(*small, "--output", str(out), *options)
    assert "\n" not in str(error.value)
    assert not out.exists()


def test_unusable_inputs_are_one_line_and_write_nothing(trained_checkpoint, infer_dataset,
                                                        tmp_path):
    out = tmp_path / "out"
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="bogus.ckpt: not a PyTorch checkpoint"):
        run("--checkpoint", str(bogus), "--data", str(infer_dataset), "--output", str(out))
    with pytest.raises(ValueError, match="records no dataset.*pass --data DIR"):
        run("--checkpoint", str(trained_checkpoint), "--output", str(out))
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    shutil.copy(infer_dataset / "dataset.json", empty / "dataset.json")
    with pytest.raises(ValueError, match="empty: the dataset has no training cases"):
        run("--checkpoint", str(trained_checkpoint), "--data", str(empty), "--output", str(out))
    net, record = load_trained_network(trained_checkpoint)
    wider = type(net)(**{**net.config["init_args"], "features": [4, 16]})
    other = write_network_checkpoint(tmp_path / "other.ckpt", wider,
                                     CheckpointRecord(net=wider.config, **_rest(record)))
    with pytest.raises(ValueError) as error:
        run("--checkpoint", str(trained_checkpoint), "--data", str(infer_dataset),
            "--to", str(other), "--output", str(out))
    assert f"{other} is not the architecture of {trained_checkpoint}" in str(error.value)
    assert "\n" not in str(error.value)
    assert not out.exists()


def _rest(record: CheckpointRecord) -> dict:
    return {"preprocessing": record.preprocessing, "label_names": record.label_names,
            "patch_size": record.patch_size, "output_patch_size": record.output_patch_size}


def test_a_path_between_two_checkpoints_ends_at_both(small, trained_checkpoint, tmp_path):
    net, record = load_trained_network(trained_checkpoint)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(1.1)
    other = write_network_checkpoint(tmp_path / "b.ckpt", net,
                                     CheckpointRecord(net=net.config, **_rest(record)))
    out = tmp_path / "path"
    run(*small, "--to", str(other), "--margin", "0.5", "--output", str(out))
    path = Landscape.load(out / "landscape.npz")
    assert path.alphas.tolist() == [-0.5, 0.0, 0.5, 1.0, 1.5] and path.seed is None
    assert path.losses[1] == loss_on_stored_patches(trained_checkpoint, out)
    assert path.losses[3] == loss_on_stored_patches(other, out)
    assert (out / "landscape_1d.png").is_file()
    summary = json.loads((out / "landscape_summary.json").read_text())["summary"]
    assert summary["loss_b"] == path.losses[3] and summary["barrier"] >= 0


def test_a_network_other_than_unet(trained_checkpoint, infer_dataset, tmp_path):
    from monai.networks.nets import BasicUNet

    _, record = load_trained_network(trained_checkpoint)
    init_args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4,
                 "features": [2, 2, 4, 4, 8, 2]}
    spec = {"class_path": "monai.networks.nets.BasicUNet", "init_args": init_args}
    rest = {**_rest(record), "patch_size": (32, 32, 32), "output_patch_size": None}
    checkpoint = write_network_checkpoint(tmp_path / "basic.ckpt", BasicUNet(**init_args),
                                          CheckpointRecord(net=spec, **rest))
    out = tmp_path / "out"
    run("--checkpoint", str(checkpoint), "--data", str(infer_dataset), "--patches", "1",
        "--steps", "3", "--output", str(out))
    landscape = Landscape.load(out / "landscape.npz")
    assert landscape.complete
    assert landscape.losses[1] == loss_on_stored_patches(checkpoint, out)


def test_the_cli_prints_one_error_line(small, tmp_path, monkeypatch, capsys):
    build = cli.build_parser

    def with_landscape() -> argparse.ArgumentParser:
        parser = build()
        subparsers = next(a for a in parser._actions
                          if isinstance(a, argparse._SubParsersAction))
        if "landscape" not in subparsers.choices:
            add_landscape_command(subparsers)
        return parser

    monkeypatch.setattr(cli, "build_parser", with_landscape)
    out = tmp_path / "out"
    assert cli.main(["landscape", *small, "--range", "0", "--output", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: --range 0: choose a positive range (e.g. 1.0)"]
    assert not out.exists()


def test_the_command_module_imports_no_torch_at_start_up():
    heavy = ("torch", "monai", "pytorch_lightning", "lightning", "matplotlib")
    tree = ast.parse(COMMAND.read_text())
    top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    names = [alias.name for node in top_level if isinstance(node, ast.Import)
             for alias in node.names]
    names += [node.module for node in top_level if isinstance(node, ast.ImportFrom)]
    assert not [n for n in names if n and n.split(".")[0] in heavy]
    assert not [n for n in names if n and n.startswith("segmentation.")]


def test_the_runs_config_gives_the_dataset_fold_and_loss(trained_checkpoint, infer_dataset,
                                                         tmp_path):
    from segmentation.instruments.training_run import training_inputs

    run_dir = tmp_path / "runs" / "x" / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint = Path(shutil.copy(trained_checkpoint, run_dir / "checkpoints" / "last.ckpt"))
    loss = {"class_path": "monai.losses.DiceLoss",
            "init_args": {"to_onehot_y": True, "softmax": True}}
    config = {"model": {"loss": loss}, "data": {"root": str(infer_dataset), "fold": 0,
                                                "n_folds": 2}}
    (run_dir / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    inputs = training_inputs(checkpoint)
    assert inputs.data_root == infer_dataset
    assert "monai.losses.DiceLoss" in inputs.loss_name and "config.yaml" in inputs.loss_name
    assert type(inputs.loss_fn.loss).__name__ == "DiceLoss"
    splits = json.loads((infer_dataset / "splits.json").read_text())
    assert [c.case_id for c in inputs.cases] == splits[0]["train"]
    assert "fold 0" in inputs.cases_source
    config["data"]["root"] = str(tmp_path / "moved")
    (run_dir / "config.yaml").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="moved: the dataset .* does not exist; pass --data"):
        training_inputs(checkpoint)
    config["model"]["loss"] = {"class_path": "monai.losses.NoSuchLoss"}
    (run_dir / "config.yaml").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.yaml: model.loss cannot be built"):
        training_inputs(checkpoint, data=infer_dataset)

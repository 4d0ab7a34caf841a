"""Training through LightningCLI: configs, fast_dev_run, channels, checkpoints, resume, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from segmentation import UNet
from segmentation.data.synth import generate_dataset
from segmentation.inference.checkpoint import read_record
from segmentation.training.cli import SegmentationCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]


@pytest.fixture(scope="module")
def tiny2d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny2d")
    generate_dataset(root, cases=4, test_cases=1, seed=1, dims=2, shape=(48, 40))
    return root


def tiny_net_args(dims: int, padding: str) -> list[str]:
    return ["--model.net", "segmentation.UNet", "--model.net.init_args.spatial_dims", str(dims),
            "--model.net.init_args.out_channels", "4",
            "--model.net.init_args.features", "[4, 8, 16]",
            "--model.net.init_args.padding", padding,
            "--model.net.init_args.norm", "batch" if padding == "valid" else "instance"]


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "ddp.yaml"),
                         ids=lambda p: p.name)
def test_every_training_config_instantiates_with_linked_shapes(path, tmp_path):
    cli = SegmentationCLI(args=["--config", str(path), *CPU, "--runs_dir", str(tmp_path)],
                          run=False)
    net, data = cli.model.net, cli.datamodule
    assert isinstance(net, UNet)
    assert cli.model.hparams.patch_size == list(data.input_size)
    assert data.output_size == net.output_shape(data.input_size)  # linked, not repeated
    assert cli.model.net_config["class_path"] == "segmentation.UNet"


def test_ddp_config_combines_with_a_training_config(tmp_path):
    from pytorch_lightning.strategies import DDPStrategy

    cli = SegmentationCLI(args=["--config", str(CONFIGS / "unet3d.yaml"), "--config",
                                str(CONFIGS / "ddp.yaml"), "--trainer.accelerator", "cpu",
                                "--trainer.devices", "2", "--trainer.precision", "32-true",
                                "--runs_dir", str(tmp_path)], run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.trainer.num_devices == 2
    assert cli.datamodule.cache == "disk"  # one shared cache, not a copy per process


def fit_args(root: Path, runs: Path, dims: int, padding: str, *extra: str) -> list[str]:
    features = "[4, 8, 16]" if padding == "same" else "[4, 8]"
    net = UNet(spatial_dims=dims, features=(4, 8) if padding == "valid" else (4, 8, 16),
               padding=padding)
    patch = net.valid_input_shape((28,) * dims) if padding == "valid" else (16,) * dims
    return ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *CPU,
            "--runs_dir", str(runs), "--name", "test",
            *tiny_net_args(dims, padding), "--model.net.init_args.features", features,
            "--data.root", str(root), "--data.n_folds", "2", "--data.num_workers", "0",
            "--data.patch_size", str(list(patch)), "--data.batch_size", "2",
            "--data.cache", "none", *extra]


def test_a_first_fit_prints_real_flops_and_no_adverts(tiny3d, tmp_path, capsys):
    SegmentationCLI(args=fit_args(tiny3d, tmp_path, 3, "same", "--trainer.fast_dev_run", "true"))
    out = capsys.readouterr()
    flops = re.search(r"Total FLOPs: (\S+)", out.out)
    assert flops and flops.group(1) != "0"  # one training patch through the network
    assert "💡" not in out.out + out.err and "LeafSpec" not in out.out + out.err


@pytest.mark.parametrize(("dims", "padding", "slice_axis"), [
    (3, "same", None), (3, "valid", None), (2, "same", None), (2, "valid", None),
    (2, "same", 2),  # slice mode: a 2D network on slices of 3D volumes
])
def test_fast_dev_run_fit(dims, padding, slice_axis, tiny2d, tiny3d, tmp_path):
    root = tiny3d if dims == 3 or slice_axis is not None else tiny2d
    extra = ["--trainer.fast_dev_run", "true"]
    if slice_axis is not None:
        extra += ["--data.slice_axis", str(slice_axis)]
    cli = SegmentationCLI(args=fit_args(root, tmp_path, dims, padding, *extra))
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert 0.0 <= float(metrics["val/dice"]) <= 1.0  # whole-volume validation ran


@pytest.mark.parametrize(("dims", "padding", "slice_axis"), [
    (3, "valid", None), (2, "same", None), (2, "valid", 2)])
def test_fit_with_device_augmentation_on_a_cpu_trainer(dims, padding, slice_axis, tiny2d,
                                                       tiny3d, tmp_path):
    """``data.augment_on device`` without a GPU: batched augmentation runs on the CPU."""
    root = tiny3d if dims == 3 or slice_axis is not None else tiny2d
    slices = ["--data.slice_axis", str(slice_axis)] if slice_axis is not None else []
    cli = SegmentationCLI(args=fit_args(
        root, tmp_path, dims, padding, *slices, "--trainer.fast_dev_run", "true",
        "--data.augment", "true",
        "--data.augment_on", "device",
        "--data.augmentation", "{rotation_probability: 1.0, scaling_probability: 1.0}"))
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    augmentation = cli.datamodule.batch_augmentation
    assert augmentation is not None and augmentation.settings.rotation_probability == 1.0
    assert all(w > i for w, i in zip(augmentation.window_size, augmentation.input_size,
                                     strict=True))
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def test_device_augmentation_trains_under_a_true_precision(tiny3d, tmp_path):
    """bf16-true: the draws survive Lightning's input cast and the augmented batch (and the
    model summary's example input) reach the bfloat16 network as bfloat16."""
    cli = SegmentationCLI(args=fit_args(
        tiny3d, tmp_path, 3, "same", "--trainer.fast_dev_run", "true",
        "--trainer.precision", "bf16-true", "--data.augment", "true",
        "--data.augment_on", "device", "--data.augmentation", "{rotation_probability: 1.0}"))
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert next(cli.model.net.parameters()).dtype == torch.bfloat16
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize(("option", "message"), [
    (["--data.augment_on", "gpu"],
     "error: data.augment_on='gpu' is not supported; choose one of auto, cpu, device"),
    (["--data.augmentation", "{gamma_range: [1.5, 0.7]}"],
     "error: data.augmentation.gamma_range=[1.5, 0.7]: low 1.5 is above high 0.7"),
    (["--data.augmentation", "{mirror_probabilty: 0.5}"],
     "error: data.augmentation.mirror_probabilty is not a setting; choose from "),
])
def test_bad_augmentation_options_are_refused_in_one_line(tiny3d, tmp_path, capsys, option,
                                                          message):
    from segmentation.cli import main

    assert main(fit_args(tiny3d, tmp_path, 3, "same", *option)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message)
    assert not (tmp_path / "test").exists()  # refused before any run folder


def test_dataset_failing_its_check_stops_training_before_any_epoch(tiny3d, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny3d, broken)
    label = next((broken / "labelsTr").glob("*.nii.gz"))
    label.write_bytes(b"not a nifti file")
    expected = f"(?s)failed its integrity check.*{label.name}: cannot be read"
    with pytest.raises(ValueError, match=expected):
        SegmentationCLI(args=fit_args(broken, tmp_path, 3, "same", "--trainer.max_epochs", "1"))
    assert not list(tmp_path.glob("test/version_*/checkpoints/*.ckpt"))


def test_network_channels_come_from_the_dataset(tiny3d, tmp_path, capsys):
    """A network YAML's in/out channels are placeholders: the dataset decides them."""
    args = fit_args(tiny3d, tmp_path, 3, "same", "--trainer.max_steps", "1",
                    "--trainer.limit_val_batches", "0", "--model.net.init_args.out_channels", "3")
    cli = SegmentationCLI(args=args)
    assert "model.net.init_args.out_channels: 3 → 4, the labels of" in capsys.readouterr().err
    assert cli.model.net.out_channels == 4 and cli.model.net.in_channels == 1
    saved = yaml.safe_load((tmp_path / "test" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["net"]["init_args"]["out_channels"] == 4  # the run's config says so
    record = read_record(tmp_path / "test" / "version_0" / "checkpoints" / "last.ckpt")
    assert record.net["init_args"]["out_channels"] == 4  # and so does its checkpoint


class LastCheckpointSteps(pl.Callback):
    """The global step stored in the run's last.ckpt at the start of every epoch after the first."""

    def __init__(self, last: Path) -> None:
        self.last = last
        self.steps: dict[int, int | None] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= 1:
            self.steps[trainer.current_epoch] = global_step(self.last) if self.last.exists() \
                else None


def test_last_checkpoint_written_every_epoch_and_found_by_validate(tiny3d, tmp_path):
    last = tmp_path / "test" / "version_0" / "checkpoints" / "last.ckpt"
    seen = LastCheckpointSteps(last)
    args = fit_args(tiny3d, tmp_path, 3, "same", "--trainer.max_epochs", "3",
                    "--data.patches_per_epoch", "2", "--trainer.check_val_every_n_epoch", "100")
    SegmentationCLI(args=args, trainer_defaults={"callbacks": [seen]})  # one step per epoch
    assert seen.steps == {1: 1, 2: 2}  # a run killed in epoch 2 resumes from step 2

    # validate --ckpt_path last: the fitted weights, not the new version folder's nothing
    validated = SegmentationCLI(args=["validate", *args[1:], "--ckpt_path", "last"])
    assert validated.trainer.ckpt_path == str(last)
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in validated.model.state_dict().items())
    with pytest.raises(ValueError, match="no last.ckpt under"):
        SegmentationCLI(args=["test", *args[1:], "--ckpt_path", "last", "--name", "other"])


def test_fit_without_a_logger_or_progress_bar_adds_neither_monitor_nor_bar(tiny3d, tmp_path):
    from pytorch_lightning.callbacks import LearningRateMonitor, RichProgressBar

    cli = SegmentationCLI(args=fit_args(tiny3d, tmp_path, 3, "same", "--trainer.logger", "false",
                                        "--trainer.enable_progress_bar", "false",
                                        "--trainer.max_steps", "1",
                                        "--trainer.limit_val_batches", "0"))
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert not any(isinstance(c, LearningRateMonitor | RichProgressBar)
                   for c in cli.trainer.callbacks)
    assert not (tmp_path / "test" / "version_0").exists()
    with_logger = SegmentationCLI(args=fit_args(tiny3d, tmp_path, 3, "same")[1:], run=False)
    assert any(isinstance(c, LearningRateMonitor) for c in with_logger.trainer.callbacks)
    assert any(isinstance(c, RichProgressBar) for c in with_logger.trainer.callbacks)


def test_a_configured_progress_bar_replaces_ours(tiny3d, tmp_path):
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
    from pytorch_lightning.callbacks.progress import ProgressBar

    ours = SegmentationCLI(args=fit_args(tiny3d, tmp_path, 3, "same")[1:], run=False)
    assert [type(c) for c in ours.trainer.callbacks if isinstance(c, ProgressBar)] == [
        RichProgressBar]
    theirs = SegmentationCLI(args=[*fit_args(tiny3d, tmp_path, 3, "same")[1:],
                                   "--trainer.callbacks+=TQDMProgressBar"], run=False)
    assert [type(c) for c in theirs.trainer.callbacks if isinstance(c, ProgressBar)] == [
        TQDMProgressBar]


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segmentation.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def global_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # being written right now
        return None


def test_resume_after_sigkill_ends_at_the_same_total_steps(tiny3d, tmp_path):
    total = 4 * 8  # epochs x (16 patches / batch 2)
    args = fit_args(tiny3d, tmp_path, 3, "same", "--trainer.max_epochs", "4",
                    "--data.patches_per_epoch", "16", "--data.patch_size", "[24, 24, 16]",
                    "--trainer.check_val_every_n_epoch", "100", "--checkpoint_every_n_steps", "3")
    process = subprocess.Popen([sys.executable, "-m", "segmentation.cli", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "test" / "version_0" / "checkpoints" / "last.ckpt"
    killed_at = None
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        step = global_step(last) if last.exists() else None
        if step is not None and step >= 10:
            process.send_signal(signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.05)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert killed_at is not None and killed_at % 8 != 0 and killed_at < total  # mid-epoch
    first_config = (tmp_path / "test" / "version_0" / "config.yaml").read_text()

    resumed = run_cli(*args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = tmp_path / "test" / "version_1" / "checkpoints" / "last.ckpt"
    assert global_step(final) == total  # as many steps as an uninterrupted run
    assert (tmp_path / "test" / "version_0" / "config.yaml").read_text() == first_config


def test_ddp_two_processes_validate_like_one_and_only_rank_zero_writes(tmp_path):
    root = tmp_path / "data"
    generate_dataset(root, cases=6, test_cases=3, seed=2, shape=(24, 24, 16))
    runs = tmp_path / "runs"
    base = fit_args(root, runs, 3, "same")[1:]  # without the subcommand
    # trained by 2 processes, with deep supervision whose lowest output has weight 0: every
    # parameter must still take part in each step, or DDP stops at the second one
    fitted = run_cli("fit", *base, "--trainer.max_steps", "3", "--data.patches_per_epoch", "8",
                     "--trainer.check_val_every_n_epoch", "1",  # a validation after 2 steps
                     "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert "sync_dist" not in fitted.stdout + fitted.stderr  # epoch values reduced as they should
    checkpoint = runs / "test" / "version_0" / "checkpoints" / "last.ckpt"
    single = run_cli("validate", *base, "--ckpt_path", str(checkpoint))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli("validate", *base, "--ckpt_path", str(checkpoint), "--trainer.strategy", "ddp",
                  "--trainer.devices", "2")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "sync_dist" not in ddp.stdout + ddp.stderr
    assert "dirpath" not in ddp.stdout + ddp.stderr  # nothing about the fit's checkpoint folder
    versions = sorted((runs / "test").glob("version_*"))
    assert [v.name for v in versions] == ["version_0", "version_1", "version_2"]  # one per run

    def val_dice(version: Path) -> float:
        rows = list(csv.DictReader((version / "metrics.csv").open()))
        return float(next(r["val/dice"] for r in rows if r.get("val/dice")))

    # 3 validation cases over 2 processes: the sampler repeats one, the metric must not
    assert val_dice(versions[2]) == pytest.approx(val_dice(versions[1]), abs=1e-6)

    tested = run_cli("test", *base, "--ckpt_path", str(checkpoint), "--trainer.strategy", "ddp",
                     "--trainer.devices", "2", "--model.test_hd95", "false")
    assert tested.returncode == 0, tested.stderr[-3000:]
    rows = list(csv.DictReader((runs / "test" / "version_3" / "test_metrics.csv").open()))
    pairs = [(r["case_id"], r["class"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 3 * 3  # 3 held-out cases x 3 classes, each once
    assert "sync_dist" not in tested.stdout + tested.stderr

    # 3 test scans over 2 processes: each written once, by the process that segmented it
    predicted = run_cli("predict", *base, "--ckpt_path", str(checkpoint), "--trainer.strategy",
                        "ddp", "--trainer.devices", "2")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    folder = runs / "test" / "version_4" / "predictions"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{p.name.removesuffix('_0000.nii.gz')}.nii.gz" for p in (root / "imagesTs").iterdir()]
        + ["provenance.json"])
    record = json.loads((folder / "provenance.json").read_text())["runs"]
    assert len(record) == 1 and record[0]["processes"] == 2
    assert len({c["case_id"] for c in record[0]["cases"]}) == len(record[0]["cases"]) == 3
    assert sorted(p.name for p in (runs / "test").iterdir())[-1] == "version_4"  # one folder


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

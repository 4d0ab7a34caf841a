"""Training through LightningCLI: configs, fast_dev_run, learning, checkpoints, NaN handling."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

from segmentation import UNet
from segmentation.data.datamodule import SegmentationDataModule
from segmentation.data.synth import generate_dataset
from segmentation.inference.checkpoint import load_trained_network, read_record
from segmentation.training.cli import SegmentationCLI
from segmentation.training.module import SegmentationModule
from segmentation.training.nonfinite import NonFiniteLossError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]


@pytest.fixture(scope="module")
def tiny3d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny3d")
    generate_dataset(root, cases=4, test_cases=1, seed=1, shape=(32, 32, 20))
    return root


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


def test_a_network_not_matching_the_dataset_is_refused(tiny3d):
    """The safety net for networks whose channel arguments have other names."""
    dm = SegmentationDataModule(str(tiny3d), patch_size=(16, 16, 16), n_folds=2, num_workers=0)
    dm.setup("fit")
    module = SegmentationModule(UNet(spatial_dims=3, out_channels=3, features=(4, 8)),
                                patch_size=(16, 16, 16))
    with pytest.raises(ValueError, match="set model.net.init_args.out_channels: 4"):
        module._check_matches_dataset(dm)


class NaNNet(nn.Module):
    """Outputs NaN logits on the calls numbered in ``nan_calls``: a diverging network."""

    def __init__(self, nan_calls: set[int] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 1)
        self.nan_calls = nan_calls
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nan = self.nan_calls is None or self.calls in self.nan_calls
        self.calls += 1
        return self.conv(x) * float("nan") if nan else self.conv(x)


class WeightsAfterEachStep(pl.Callback):
    """Copies of the network's parameters after every training batch."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append([p.detach().clone() for p in pl_module.parameters()])


def fit_on_random_patches(module: SegmentationModule, steps: int,
                          *callbacks: pl.Callback) -> pl.Trainer:
    patches = [{"image": torch.randn(1, 8, 8, 8), "label": torch.randint(0, 4, (1, 8, 8, 8))}
               for _ in range(steps)]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         gradient_clip_val=1.0, callbacks=list(callbacks))
    trainer.fit(module, torch.utils.data.DataLoader(patches, batch_size=1))
    return trainer


def test_nonfinite_loss_stops_naming_step_epoch_and_batch():
    module = SegmentationModule(NaNNet(nan_calls={1}), patch_size=(8, 8, 8))
    where = r"non-finite loss \(nan\) at global step 1 \(epoch 0, batch 1\); training stopped"
    with pytest.raises(NonFiniteLossError, match=where):
        fit_on_random_patches(module, 3)
    with pytest.raises(ValueError, match="nonfinite_loss='ignore'"):
        SegmentationModule(NaNNet(), nonfinite_loss="ignore")


def test_nonfinite_loss_skip_leaves_weights_and_momentum_untouched_then_trains_on():
    torch.manual_seed(0)
    module = SegmentationModule(NaNNet(nan_calls={0}), patch_size=(8, 8, 8),
                                nonfinite_loss="skip")  # default SGD: momentum, weight decay
    initial = [p.detach().clone() for p in module.parameters()]
    seen = WeightsAfterEachStep()
    with pytest.warns(RuntimeWarning, match=r"at global step 0 \(epoch 0, batch 0\); batch "
                                            "skipped"):
        trainer = fit_on_random_patches(module, 2, seen)
    assert trainer.global_step == 2  # the skipped batch still counts as a step
    assert all(torch.equal(a, b) for a, b in zip(seen.weights[0], initial, strict=True))
    after = seen.weights[1]
    assert all(torch.isfinite(p).all() for p in after)
    assert not all(torch.equal(a, b) for a, b in zip(after, initial, strict=True))


class NaNBeforeBatchNorm(nn.Module):
    """Batch norm sees a NaN on the first call: its running statistics would be poisoned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv3d(1, 4, 1), nn.BatchNorm3d(4), nn.Conv3d(4, 4, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        if self.calls == 0:
            features = features.clone()
            features[0, 0, 0, 0, 0] = float("nan")
        self.calls += 1
        return self.head(self.norm(features))


def test_nonfinite_loss_skip_restores_batch_norm_statistics():
    torch.manual_seed(0)
    net = NaNBeforeBatchNorm()
    module = SegmentationModule(net, patch_size=(8, 8, 8), nonfinite_loss="skip")
    statistics = WeightsAfterEachStep()
    statistics.on_train_batch_end = lambda trainer, pl_module, *args: statistics.weights.append(
        [net.norm.running_mean.clone(), net.norm.num_batches_tracked.clone()])
    with pytest.warns(RuntimeWarning, match="batch skipped"):
        fit_on_random_patches(module, 2, statistics)
    (mean_after_skip, tracked_after_skip), (mean_after_step, tracked_after_step) = (
        statistics.weights)
    assert torch.equal(mean_after_skip, torch.zeros(4)) and tracked_after_skip == 0  # restored
    assert torch.isfinite(mean_after_step).all() and tracked_after_step == 1  # then trains on


DDP_NONFINITE = """
import json, os, warnings
import pytorch_lightning as pl
import torch
import yaml
from torch import nn
from segmentation.training.module import SegmentationModule
from segmentation.training.nonfinite import NonFiniteLossError

warnings.simplefilter("ignore")


class RankOneNaN(nn.Module):  # a diverged network on process 1 only
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return self.conv(x) * (float("nan") if torch.distributed.get_rank() == 1 else 1.0)


def fit(mode):
    torch.manual_seed(0)
    module = SegmentationModule(RankOneNaN(), patch_size=(4, 4, 4), nonfinite_loss=mode)
    initial = [p.detach().clone() for p in module.parameters()]
    patches = [{"image": torch.randn(1, 4, 4, 4), "label": torch.ones(1, 4, 4, 4).long()}] * 2
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    try:
        trainer.fit(module, torch.utils.data.DataLoader(patches, batch_size=1))
    except NonFiniteLossError as error:
        return str(error)
    return all(torch.equal(a, b) for a, b in zip(initial, module.parameters()))


print(json.dumps({"rank": int(os.environ["LOCAL_RANK"]), "skip": fit("skip"),
                  "stop": fit("stop")}), flush=True)
torch.distributed.destroy_process_group()  # gloo threads left running can abort the exit
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_nonfinite_loss_on_one_process_is_handled_by_all_without_hanging(tmp_path):
    script = tmp_path / "ddp_nonfinite.py"
    script.write_text(DDP_NONFINITE)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "NODE_RANK": "0", "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, str(script)], env={**env, "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:  # a process waiting forever in an all-reduce
                p.kill()
                p.wait()
    results = {}
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        result = json.loads(stdout.strip().splitlines()[-1])
        results[result["rank"]] = result
    # skip: both processes skip the step; the NaN gradients reach neither's weights
    assert results[0]["skip"] is True and results[1]["skip"] is True
    # stop: both raise at the same step, naming where the loss went non-finite
    assert results[0]["stop"].startswith("non-finite loss on another process at global step 0")
    assert results[1]["stop"].startswith("non-finite loss (nan) at global step 0 (epoch 0, "
                                         "batch 0)")


def test_short_fit_improves_dice_and_checkpoint_rebuilds_identical_module(tiny3d, tmp_path):
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, out_channels=4, features=(8, 16, 32), deep_supervision=True)
    dm = SegmentationDataModule(str(tiny3d), n_folds=2, patch_size=(24, 24, 16), batch_size=2,
                                patches_per_epoch=16, num_workers=0, cache="memory",
                                augment=False, network=net)
    module = SegmentationModule(net, patch_size=(24, 24, 16),
                                optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=100)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/dice"]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/dice"]
    assert after > before + 0.2, (before, after)
    predictions = trainer.predict(module, datamodule=dm)  # the dataset's imagesTs
    assert len(predictions) == 1 and predictions[0]["case_id"] == ["synth_004"]
    assert predictions[0]["label"].dtype == torch.uint8
    assert predictions[0]["label"].max() > 0

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    state = checkpoint["state_dict"]
    assert state and all(key.startswith("net.") for key in state)  # the network, once
    meta = checkpoint["segmentation"]
    assert meta["output_patch_size"] == list(dm.output_size)
    rebuilt = SegmentationModule.load_from_checkpoint(path, net=copy.deepcopy(module.net))
    resaved: dict = {}
    rebuilt.on_save_checkpoint(resaved)  # what saving the loaded module again writes
    assert resaved["segmentation"] == meta
    assert rebuilt.preprocessing == dm.preprocessing
    assert rebuilt.label_names == {0: "background", 1: "organ", 2: "vessel", 3: "lesion"}
    assert list(rebuilt.hparams.patch_size) == [24, 24, 16]
    net, record = load_trained_network(path)  # what infer rebuilds: no Lightning involved
    assert record.preprocessing == dm.preprocessing and record.patch_size == (24, 24, 16)
    x = torch.randn(1, 1, 24, 24, 16)
    with torch.no_grad():
        assert torch.equal(net(x), module.eval().net(x))


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
    generate_dataset(root, cases=6, test_cases=0, seed=2, shape=(24, 24, 16))
    runs = tmp_path / "runs"
    base = fit_args(root, runs, 3, "same")[1:]  # without the subcommand
    # trained by 2 processes, with deep supervision whose lowest output has weight 0: every
    # parameter must still take part in each step, or DDP stops at the second one
    fitted = run_cli("fit", *base, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                     "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    checkpoint = runs / "test" / "version_0" / "checkpoints" / "last.ckpt"
    single = run_cli("validate", *base, "--ckpt_path", str(checkpoint))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli("validate", *base, "--ckpt_path", str(checkpoint), "--trainer.strategy", "ddp",
                  "--trainer.devices", "2")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
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


def test_compiled_network_matches_eager_and_keeps_the_state_dict_plain():
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, features=(4, 8), out_channels=3)
    module = SegmentationModule(net, patch_size=(16, 16, 16), compile=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), net(x), atol=1e-5)
    assert all(key.startswith("net.") for key in module.state_dict())

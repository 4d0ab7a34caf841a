"""GradientFlow: per-layer gradient norms and relative updates over training, and their record."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segmentation import UNet
from segmentation.cli import main
from segmentation.training.gradient_flow import (
    RECORD_FILE,
    SUMMARY_FILE,
    GradientFlow,
    conv_layers,
    read_gradient_flow,
    record_interval,
    summarise_gradient_flow,
)
from segmentation.training.gradient_flow_summary import GradientFlowRecord, write_gradient_flow
from segmentation.training.module import SegmentationModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PLAIN_NAMES = ["enc0.conv1", "enc0.conv2", "enc1.conv1", "enc1.conv2", "bottleneck.conv1",
               "bottleneck.conv2", "dec1.up", "dec1.conv1", "dec1.conv2", "dec0.up",
               "dec0.conv1", "dec0.conv2", "head"]


class Patches(Dataset):
    """``count`` random 2D patches: image (1, 16, 16) and label (1, 16, 16) in {0, 1, 2}."""

    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 1, 16, 16, generator=generator)
        self.labels = torch.randint(0, 3, (count, 1, 16, 16), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


def tiny_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims=2, in_channels=1, out_channels=3, features=(4, 8, 16), **kwargs)


def fit(net: nn.Module, root: Path, callback: GradientFlow, *, patches: int = 8,
        optimizer=None, **trainer_kwargs) -> pl.Trainer:
    """Train ``net`` on random patches (batch 2) with CSV logs in ``root/run/version_N``."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(root, name="run"),
                         callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=root, **trainer_kwargs)
    module = SegmentationModule(net, optimizer=optimizer)
    trainer.fit(module, train_dataloaders=DataLoader(Patches(patches), batch_size=2))
    return trainer


def make_record(steps, grad_norm, rel_update=None, parts=("encoder", "decoder", "head"),
                clip_val=math.nan) -> GradientFlowRecord:
    grad_norm = np.asarray(grad_norm, dtype=np.float32)
    return GradientFlowRecord(
        layers=tuple(f"layer{i}" for i in range(len(parts))), levels=np.zeros(len(parts)),
        parts=parts, steps=np.asarray(steps), grad_norm=grad_norm,
        weight_norm=np.ones_like(grad_norm),
        rel_update=np.full_like(grad_norm, 1e-2) if rel_update is None else rel_update,
        total_grad_norm=grad_norm.sum(axis=1), clip_val=clip_val)


# ------------------------------------------------------------------ layers in U order


def test_every_conv_weight_of_a_plain_unet_in_u_order():
    net = tiny_unet()
    layers = conv_layers(net)
    assert [layer.name for layer in layers] == PLAIN_NAMES
    assert [layer.level for layer in layers] == [0, 0, 1, 1, 2, 2, 1, 1, 1, 0, 0, 0, 0]
    assert [layer.part for layer in layers] == ["encoder"] * 4 + ["bottleneck"] * 2 + \
        ["decoder"] * 6 + ["head"]
    convs = {id(m.weight) for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
             and m.weight.requires_grad}
    assert {id(layer.weight) for layer in layers} == convs  # every one, once


def test_residual_unet_layers_include_stem_and_projection_shortcuts(small_net):
    layers = conv_layers(small_net(2, "same", True, "residual"))
    assert [layer.name for layer in layers] == [
        "enc0.stem", "enc0.block1.conv1", "enc0.block1.conv2",
        "enc1.block1.conv1", "enc1.block1.conv2", "enc1.block1.proj",
        "enc1.block2.conv1", "enc1.block2.conv2",
        "bottleneck.block1.conv1", "bottleneck.block1.conv2", "bottleneck.block1.proj",
        *PLAIN_NAMES[6:]]
    strided = conv_layers(small_net(2, "same", True, "residual", downsample="conv"))
    assert "enc1.block1.down_conv1" in [layer.name for layer in strided]
    assert "enc1.block1.down_proj" in [layer.name for layer in strided]


def test_auxiliary_heads_are_recorded_when_they_train():
    assert "aux1" not in [layer.name for layer in conv_layers(tiny_unet())]  # frozen: no grads
    supervised = conv_layers(tiny_unet(deep_supervision=True, upsample="interpolate"))
    assert [layer.name for layer in supervised][-2:] == ["head", "aux1"]
    assert supervised[-1].level == 1
    assert "dec1.up" in [layer.name for layer in supervised]  # the 1×1 conv after resizing


def test_other_networks_in_registration_order():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.second = nn.Conv2d(1, 4, 3)  # registered first, named second
            self.norm = nn.BatchNorm2d(4)
            self.first = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(4, 2, 2))

    layers = conv_layers(Net())
    assert [(layer.name, layer.level, layer.part) for layer in layers] == [
        ("second", -1, "network"), ("first.1", -1, "network")]


def test_default_interval_takes_about_samples_records():
    assert record_interval(250_000, 200) == 1250  # an nnU-Net run: every 1250 steps
    assert record_interval(1000, 200) == 5        # the quickstart run
    assert record_interval(40, 200) == 1
    with pytest.raises(ValueError, match="set every_n_steps"):
        record_interval(math.inf, 200)


# ------------------------------------------------------------------ a run with accumulation


@pytest.fixture(scope="module")
def accumulated_run(tmp_path_factory) -> tuple[Path, GradientFlow, pl.Trainer]:
    """6 optimizer steps of 2 accumulated batches; every_n_steps derived from samples=3."""
    root = tmp_path_factory.mktemp("gradient_flow")
    callback = GradientFlow(samples=3)
    trainer = fit(tiny_unet(), root, callback, max_steps=6, accumulate_grad_batches=2,
                  log_every_n_steps=1)
    return root / "run" / "version_0", callback, trainer


def test_records_every_n_optimizer_steps_not_batches(accumulated_run):
    _, callback, trainer = accumulated_run
    assert trainer.global_step == 6 and callback.interval == 2  # 6 steps // 3 samples
    assert callback.record().steps.tolist() == [0, 2, 4]


def test_the_record_is_written_in_the_log_dir_with_one_row_per_conv(accumulated_run):
    version, callback, _ = accumulated_run
    record = read_gradient_flow(version)
    assert record.layers == tuple(PLAIN_NAMES)
    assert record.parts[0] == "encoder" and record.levels.tolist()[4] == 2
    assert record.steps.tolist() == [0, 2, 4]
    for name in ("grad_norm", "weight_norm", "rel_update"):
        values = getattr(record, name)
        assert values.shape == (3, len(PLAIN_NAMES)) and values.dtype == np.float32
        assert np.isfinite(values).all() and (values > 0).all()
    assert np.isfinite(record.total_grad_norm).all() and math.isnan(record.clip_val)
    np.testing.assert_array_equal(record.grad_norm, callback.record().grad_norm)


def test_summary_numbers_are_written_at_train_end(accumulated_run):
    version, _, _ = accumulated_run
    summary = json.loads((version / SUMMARY_FILE).read_text())
    record = read_gradient_flow(version)
    assert summary == json.loads(json.dumps(summarise_gradient_flow(record)))
    assert summary["first_layer"] == "enc0.conv1" and summary["last_layer"] == "dec0.conv2"
    ratios = record.grad_norm[:, 0] / record.grad_norm[:, PLAIN_NAMES.index("dec0.conv2")]
    for third, ratio in zip(("early", "mid", "late"), ratios, strict=True):  # a record each
        assert summary["first_last_grad_ratio"][third] == pytest.approx(float(ratio), rel=1e-6)
    assert 0.0 <= summary["frozen_share"] <= 1.0 and summary["records"] == 3


def test_scalar_summaries_go_to_the_loggers_at_each_record(accumulated_run):
    version, _, _ = accumulated_run
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    logged = {int(r["step"]): float(r["grad_flow/first_last_ratio"]) for r in rows
              if r.get("grad_flow/first_last_ratio")}
    assert sorted(logged) == [0, 2, 4]
    assert all(math.isfinite(v) and v > 0 for v in logged.values())
    assert any(r.get("grad_flow/frozen_share") for r in rows)


def test_plotting_reads_and_never_changes_the_records(accumulated_run, tmp_path):
    from segmentation.instruments.gradient_flow_figures import (
        plot_gradient_flow,
        plot_level_updates,
    )

    version, _, _ = accumulated_run
    before = read_gradient_flow(version)
    copies = {name: getattr(before, name).copy() for name in ("grad_norm", "rel_update")}
    summary = summarise_gradient_flow(before)
    plot_gradient_flow([("run", before)], tmp_path / "flow.png")
    plot_level_updates([("run", before)], tmp_path / "levels.png")
    after = read_gradient_flow(version)
    for name, values in copies.items():
        np.testing.assert_array_equal(getattr(before, name), values)
        np.testing.assert_array_equal(getattr(after, name), values)
    assert summarise_gradient_flow(before) == summary
    assert not before.rel_update.flags.writeable  # a reader cannot change a record


# ------------------------------------------------------------------ one SGD step, clipped


@pytest.fixture(scope="module")
def sgd_step(tmp_path_factory) -> tuple[GradientFlowRecord, list[torch.Tensor], UNet]:
    """One plain SGD step (lr 0.5) with gradients clipped to a norm of 1e-3."""
    net = tiny_unet()
    before = [layer.weight.detach().clone() for layer in conv_layers(net)]
    callback = GradientFlow(every_n_steps=1)
    fit(net, tmp_path_factory.mktemp("sgd"), callback, max_steps=1, gradient_clip_val=1e-3,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    return callback.record(), before, net


def test_relative_update_is_the_weight_change_over_the_weight(sgd_step):
    record, before, net = sgd_step
    after = [layer.weight.detach() for layer in conv_layers(net)]
    change = [float(torch.linalg.vector_norm(a - b)) for a, b in zip(after, before, strict=True)]
    norms = [float(torch.linalg.vector_norm(b)) for b in before]
    np.testing.assert_allclose(record.weight_norm[0], norms, rtol=1e-5)
    np.testing.assert_allclose(record.rel_update[0], np.divide(change, norms), rtol=1e-4)


def test_gradient_norms_are_measured_before_clipping(sgd_step):
    record, _, _ = sgd_step
    assert record.clip_val == pytest.approx(1e-3)
    total = float(record.total_grad_norm[0])
    assert total > 100 * record.clip_val and (record.grad_norm[0] > 0).all()
    # the step used the clipped gradient: Δw = lr · (clip / total) · g for every layer
    clipped = 0.5 * record.clip_val / total * record.grad_norm[0]
    np.testing.assert_allclose(record.rel_update[0] * record.weight_norm[0], clipped, rtol=1e-3)


# ------------------------------------------------------------------ the reader


def test_read_joins_the_versions_of_a_resumed_run(tmp_path):
    run = tmp_path / "run"
    for version, steps, value in ((0, [0, 2, 4], 1.0), (1, [4, 6], 2.0), (10, [8], 3.0)):
        (run / f"version_{version}").mkdir(parents=True)
        write_gradient_flow(run / f"version_{version}" / RECORD_FILE,
                            make_record(steps, np.full((len(steps), 3), value)))
    (run / "version_2").mkdir()  # a version without records (e.g. a validate run)
    joined = read_gradient_flow(run)
    assert joined.steps.tolist() == [0, 2, 4, 6, 8]  # version_10 after version_1, not before
    # step 4 was redone by the resumed run: its record replaces the first one's
    assert joined.grad_norm[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0]
    assert read_gradient_flow(run / "version_1").steps.tolist() == [4, 6]


def test_a_folder_without_records_is_refused_in_one_line(tmp_path):
    (tmp_path / "run" / "version_0").mkdir(parents=True)
    for folder in (tmp_path / "run", tmp_path / "run" / "version_0"):
        with pytest.raises(ValueError) as error:
            read_gradient_flow(folder)
        assert str(error.value) == (
            f"{folder}: no gradient_flow.npz; train with "
            "--trainer.callbacks+=segmentation.training.gradient_flow.GradientFlow")
    with pytest.raises(ValueError, match=r"^\S*missing: no such folder$"):
        read_gradient_flow(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / RECORD_FILE).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="gradient_flow.npz: not a readable gradient-flow"):
        read_gradient_flow(tmp_path / "broken")


def test_summary_of_a_known_record():
    # 6 records: the first encoder conv's gradient falls from 4× to 1× the last decoder conv's
    grad = [[4, 1, 1], [4, 1, 1], [2, 1, 1], [2, 1, 1], [1, 1, 1], [1, 2, 1]]
    rel_update = np.full((6, 3), 1e-2, dtype=np.float32)
    rel_update[:, 1] = 1e-5  # the decoder layer barely moves
    summary = summarise_gradient_flow(make_record(range(0, 60, 10), grad, rel_update,
                                                  clip_val=5.0))
    assert summary["first_last_grad_ratio"] == {"early": 4.0, "mid": 2.0, "late": 0.75}
    assert summary["frozen_share"] == pytest.approx(1 / 3)
    assert summary["frozen_layers"] == ["layer1"]
    assert summary["clip_val"] == 5.0 and summary["clipped_share"] == pytest.approx(2 / 6)
    assert (summary["first_step"], summary["last_step"], summary["records"]) == (0, 50, 6)


# ------------------------------------------------------------------ the config switch


def test_fit_switches_it_on_from_the_command_line(tiny3d, tmp_path):
    code = main([
        "fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--runs_dir", str(tmp_path), "--name", "flow",
        "--model.net.init_args.features", "[4, 8]", "--data.root", str(tiny3d),
        "--data.n_folds", "2", "--data.num_workers", "0", "--data.cache", "none",
        "--data.patch_size", "[16, 16, 16]", "--data.batch_size", "1",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=segmentation.training.gradient_flow.GradientFlow",
        "--trainer.callbacks.every_n_steps=1"])
    assert code == 0
    version = tmp_path / "flow" / "version_0"
    record = read_gradient_flow(tmp_path / "flow")
    assert record.steps.tolist() == [0, 1]
    assert record.layers[0] == "enc0.conv1" and record.layers[-2:] == ("dec0.conv2", "head")
    assert record.clip_val == 12  # the quickstart config's gradient_clip_val
    assert (version / SUMMARY_FILE).is_file()

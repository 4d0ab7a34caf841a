"""A non-finite loss: training stops naming where, or the batch is skipped without a trace,
on every DDP process alike."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from segmentation.training.module import SegmentationModule
from segmentation.training.nonfinite import NonFiniteLossError


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


def test_an_accumulated_step_with_one_bad_batch_is_dropped_whole_and_logs_finite_losses():
    torch.manual_seed(0)
    module = SegmentationModule(NaNNet(nan_calls={3}), patch_size=(8, 8, 8),
                                nonfinite_loss="skip")
    patches = [{"image": torch.randn(1, 8, 8, 8), "label": torch.randint(0, 4, (1, 8, 8, 8))}
               for _ in range(4)]
    seen, counted = WeightsAfterEachStep(), []
    counting = pl.Callback()
    counting.on_train_batch_end = lambda trainer, pl_module, *args: counted.append(
        int(pl_module.train_loss_mean.weight))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                         callbacks=[seen, counting],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         accumulate_grad_batches=2)
    with pytest.warns(RuntimeWarning, match=r"at global step 1 \(epoch 0, batch 3\); batch "
                                            "skipped"):
        trainer.fit(module, torch.utils.data.DataLoader(patches, batch_size=1))
    assert trainer.global_step == 2
    # batches 2 (finite) and 3 (NaN) made the second step: neither moved the weights
    assert all(torch.equal(a, b) for a, b in zip(seen.weights[1], seen.weights[3], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen.weights[0], seen.weights[1],
                                                      strict=True))
    # the epoch's mean is over the three finite losses, not NaN (counted at each step)
    assert counted == [0, 2, 2, 3]
    assert math.isfinite(float(trainer.callback_metrics["train/loss_epoch"]))


@pytest.mark.parametrize("optimizer", [
    functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    functools.partial(torch.optim.AdamW, lr=0.01),
    functools.partial(torch.optim.AdamW, lr=0.01, fused=True),
], ids=["sgd", "adamw", "adamw-fused"])
def test_skip_under_a_float16_gradient_scaler_leaves_weights_untouched(optimizer):
    """With "16-mixed" a fused optimizer lets the scaler look for infinities itself: the
    skipped step must leave it some (dropped gradients would make it refuse to update)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    module = SegmentationModule(NaNNet(nan_calls={0}), patch_size=(8, 8, 8),
                                nonfinite_loss="skip", optimizer=optimizer)
    initial = [p.detach().clone() for p in module.parameters()]
    seen = WeightsAfterEachStep()
    patches = [{"image": torch.randn(1, 8, 8, 8), "label": torch.randint(0, 4, (1, 8, 8, 8))}
               for _ in range(2)]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[seen],
                         plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="batch skipped"):
        trainer.fit(module, torch.utils.data.DataLoader(patches, batch_size=1))
    assert all(torch.equal(a, b) for a, b in zip(seen.weights[0], initial, strict=True))
    assert all(torch.isfinite(p).all() for p in seen.weights[1])
    assert not all(torch.equal(a, b) for a, b in zip(seen.weights[1], initial, strict=True))


def _fit_one_step(optimizer, scaler: bool, enabled: bool = True) -> None:
    """One step, under "16-mixed" with its gradient scaler (forced on the CPU) or "32-true"."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    module = SegmentationModule(NaNNet(nan_calls=set()), patch_size=(8, 8, 8),
                                optimizer=optimizer)
    patches = [{"image": torch.randn(1, 8, 8, 8), "label": torch.randint(0, 4, (1, 8, 8, 8))}]
    plugins = ([MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", enabled=enabled))]
               if scaler else [])
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, plugins=plugins,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(patches, batch_size=1))


def test_fused_sgd_with_momentum_is_refused_under_a_float16_gradient_scaler():
    """PyTorch's fused SGD leaves its momentum uninitialised when the scaler skips the first
    step (the weights then jump by whatever that memory held): such a run must not start."""
    fused_sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, fused=True)
    with pytest.raises(ValueError, match="fused: false"):
        _fit_one_step(fused_sgd, scaler=True)
    # without a scaler, or without momentum, fused SGD is fine
    _fit_one_step(fused_sgd, scaler=False)
    _fit_one_step(fused_sgd, scaler=True, enabled=False)  # a disabled scaler skips nothing
    _fit_one_step(functools.partial(torch.optim.SGD, lr=0.01, fused=True), scaler=True)


def test_pytorch_fused_sgd_still_keeps_momentum_from_a_skipped_first_step():
    """The reason for the refusal above, checked against the installed PyTorch: a first step
    the scaler skips leaves fused SGD a momentum buffer it never wrote (unfused SGD has none).
    Once this fails, PyTorch has fixed it and the refusal can go."""
    for fused in (False, True):
        weights = torch.nn.Parameter(torch.ones(16))
        optimizer = torch.optim.SGD([weights], lr=0.01, momentum=0.9, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
        scaler.scale((weights * float("inf")).sum()).backward()
        scaler.step(optimizer)
        assert ("momentum_buffer" in optimizer.state[weights]) == fused
        assert torch.equal(weights.detach(), torch.ones(16))


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

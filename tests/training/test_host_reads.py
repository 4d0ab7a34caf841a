"""A training step never makes the host wait for the device.

On a GPU, reading a device value on the host (``.item()``, ``bool(t)``, a blocking copy to
the host) makes the host wait until every kernel queued so far has run, and the device then
idles while the host queues the next ones. ``torch.cuda.set_sync_debug_mode`` finds such
reads on a GPU (``scripts/benchmark.py train --sync-debug``); this test finds them on the CPU
by following which tensors would live on the training device: those derived from the batch,
from the network's parameters and buffers, or made with an explicit ``device=``. A host read
of one of them inside the hooks of a training step is recorded with where it happened.
"""

from __future__ import annotations

import functools
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from segmentation.data.datamodule import SegmentationDataModule
from segmentation.training.callbacks import ThrottledProgressBar
from segmentation.training.cli import SegmentationCLI
from segmentation.training.module import SegmentationModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Functions that hand a tensor's value to the host: on a GPU each waits for the device.
READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy",
         "__array__", "nonzero", "argwhere", "masked_select", "unique", "cpu"}


class DeviceReads(TorchFunctionMode):
    """Records host reads of would-be device tensors while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.on_device: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.reads: list[tuple[str, str, str]] = []  # (function, hook, where)
        self.hook: str | None = None

    def mark(self, tree: object) -> None:
        for leaf in pytree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                self.on_device[leaf] = True

    def _device(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, torch.nn.Parameter) or tensor in self.on_device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_device = any(self._device(t) for t in tensors)
        boolean_index = name == "__getitem__" and any(t.dtype == torch.bool for t in tensors[1:])
        if self.hook and from_device and (name in READS or boolean_index):
            if not (name == "cpu" and kwargs.get("non_blocking")):
                self.reads.append((name, self.hook, _caller()))
        out = func(*args, **kwargs)
        made_on_device = kwargs.get("device") not in (None, "cpu")
        if name == "copy_":  # the destination decides where the result lives
            pass
        elif name != "cpu" and (from_device or made_on_device):
            self.mark(out)
        return out


def _caller() -> str:
    """The innermost frame outside torch itself, as file:line function."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and Path(frame.filename).name != Path(__file__).name:
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "?"


def watch(audit: DeviceReads, owner: type, name: str, monkeypatch: pytest.MonkeyPatch,
          seed_batch: bool = False) -> None:
    """Record reads while ``owner.name`` runs (and mark the batch it receives as on the device)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def hook(self, *args, **kwargs):
        if seed_batch:
            audit.mark(args[0])
            audit.mark(list(self.trainer.lightning_module.parameters()))
            audit.mark(list(self.trainer.lightning_module.buffers()))
        previous, audit.hook = audit.hook, f"{owner.__name__}.{name}"
        try:
            return original(self, *args, **kwargs)
        finally:
            audit.hook = previous

    monkeypatch.setattr(owner, name, hook)


def fit(root: Path, runs: Path, *extra: str) -> SegmentationCLI:
    return SegmentationCLI(args=[
        "fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.precision", "32-true", "--runs_dir", str(runs),
        "--name", "reads", "--model.net.init_args.features", "[4, 8, 16]",
        "--data.root", str(root), "--data.n_folds", "2", "--data.num_workers", "0",
        "--data.patch_size", "[16, 16, 16]", "--data.batch_size", "2", "--data.cache", "none",
        "--data.patches_per_epoch", "6", "--trainer.max_steps", "6",
        "--trainer.limit_val_batches", "0", *extra])


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_a_training_step_reads_nothing_back_from_the_device(tiny3d, tmp_path, monkeypatch,
                                                            nonfinite):
    """Augmentation on the device, forward, loss, the NaN check, logging and the optimizer
    step hook: none reads a device value on the host (the NaN check is read once the backward
    pass is queued, from a copy made without waiting)."""
    audit = DeviceReads()
    watch(audit, SegmentationDataModule, "on_after_batch_transfer", monkeypatch,
          seed_batch=True)
    watch(audit, SegmentationModule, "training_step", monkeypatch)
    watch(audit, SegmentationModule, "on_before_optimizer_step", monkeypatch)
    watch(audit, ThrottledProgressBar, "on_train_batch_end", monkeypatch)
    started = time.monotonic()
    with audit:
        cli = fit(tiny3d, tmp_path, "--data.augment", "true", "--data.augment_on", "device",
                  "--data.augmentation", "{rotation_probability: 0.5, scaling_probability: 0.5, "
                  "noise_probability: 1, blur_probability: 1, brightness_probability: 1, "
                  "contrast_probability: 1, low_resolution_probability: 1, gamma_probability: 1, "
                  "inverted_gamma_probability: 1}",
                  "--model.nonfinite_loss", nonfinite)
    seconds = time.monotonic() - started
    assert cli.trainer.global_step == 6 and cli.datamodule.batch_augmentation is not None
    assert audit.on_device  # the emulation followed the batch
    in_step = [r for r in audit.reads if r[1] != "ThrottledProgressBar.on_train_batch_end"]
    assert in_step == []
    # the progress bar shows the loss, read at most once a second
    from_bar = [r for r in audit.reads if r[1] == "ThrottledProgressBar.on_train_batch_end"]
    assert 1 <= len(from_bar) <= 1 + seconds


def test_the_audit_sees_a_read_of_the_loss(tiny3d, tmp_path, monkeypatch):
    """The emulation would catch ``bool(torch.isfinite(loss))`` in the training step."""
    audit = DeviceReads()
    watch(audit, SegmentationDataModule, "on_after_batch_transfer", monkeypatch,
          seed_batch=True)
    original = SegmentationModule.training_step

    def reading_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        assert bool(torch.isfinite(loss))
        return loss

    monkeypatch.setattr(SegmentationModule, "training_step", reading_step)
    watch(audit, SegmentationModule, "training_step", monkeypatch)
    with audit:
        fit(tiny3d, tmp_path, "--trainer.enable_progress_bar", "false")
    assert [r[:2] for r in audit.reads] == [("__bool__", "SegmentationModule.training_step")] * 6


def test_the_progress_bar_reads_logged_values_once_per_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    reads = []
    trainer = SimpleNamespace(training=True, progress_bar_metrics={"train/loss": 1.0},
                              loggers=[])
    monkeypatch.setattr("pytorch_lightning.callbacks.progress.progress_bar.ProgressBar"
                        ".get_metrics", lambda self, trainer, module: reads.append(clock[0])
                        or {"read": clock[0]})
    bar = ThrottledProgressBar(metrics_every=2.0)
    shown = []
    for now in (100.0, 100.5, 101.9, 102.0, 103.0, 104.5):
        clock[0] = now
        shown.append(bar.get_metrics(trainer, None)["read"])
    assert reads == [100.0, 102.0, 104.5]
    assert shown == [100.0, 100.0, 100.0, 102.0, 102.0, 104.5]
    trainer.training = False  # validation, testing: always the current values
    clock[0] = 104.6
    assert bar.get_metrics(trainer, None)["read"] == 104.6

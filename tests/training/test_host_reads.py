"""A training step never makes the host wait for the device.

On a GPU, reading a device value on the host (``.item()``, ``bool(t)``, a blocking copy to
the host) makes the host wait until every kernel queued so far has run, and the device then
idles while the host queues the next ones; so does making a device tensor from host data
(``torch.tensor(3.0, device="cuda")``, a copy from pageable memory). ``torch.cuda.
set_sync_debug_mode`` finds such waits on a GPU (``scripts/benchmark.py train --sync-debug``);
this test finds them on the CPU by following which tensors would live on the training device:
those derived from the batch, from the network's parameters and buffers, or made with an
explicit ``device=`` in our hooks. The loader runs in a worker process, outside the audit.
"""

from __future__ import annotations

import functools
import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from segmentation.data.datamodule import SegmentationDataModule
from segmentation.training.cli import SegmentationCLI
from segmentation.training.module import SegmentationModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Functions that hand a tensor's value to the host: on a GPU each waits for the device.
READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy",
         "__array__", "nonzero", "argwhere", "masked_select", "unique", "cpu"}
# Functions that make a device tensor from host data.
UPLOADS = {"tensor", "as_tensor", "scalar_tensor"}


class DeviceWaits(TorchFunctionMode):
    """Records what would make the host wait for the device, once a batch reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.on_device: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.waits: list[tuple[str, str, str]] = []  # (function, our hook or "-", where)
        self.hook: str | None = None      # one of ours, running now
        self.started = False              # a batch reached the device
        self.batches: list[tuple[int, int]] = []  # (epoch, waits so far) as each batch arrived

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
        # outside our hooks an explicit device= may mean the host; uploads always go to it
        made_on_device = kwargs.get("device") not in (None, "cpu") and (
            self.hook is not None or name in UPLOADS)
        if self.started:
            boolean_index = name == "__getitem__" and any(
                t.dtype == torch.bool for t in tensors[1:])
            read = from_device and (name in READS or boolean_index) and not (
                name == "cpu" and kwargs.get("non_blocking"))
            upload = name in UPLOADS and made_on_device and not from_device
            if read or upload:
                self.waits.append((name, self.hook or "-", _caller()))
        out = func(*args, **kwargs)
        # copy_ returns its destination, which stays where it was; cpu() lands on the host
        if name not in ("copy_", "cpu") and (from_device or made_on_device):
            self.mark(out)
        return out


def _caller() -> str:
    """The innermost frame outside torch itself, as file:line function."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and Path(frame.filename).name != Path(__file__).name:
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "?"


def watch(audit: DeviceWaits, owner: type, name: str, monkeypatch: pytest.MonkeyPatch,
          seed_batch: bool = False) -> None:
    """Name ``owner.name`` while it runs (and mark the batch it receives as on the device)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def hook(self, *args, **kwargs):
        if seed_batch:
            audit.batches.append((self.trainer.current_epoch, len(audit.waits)))
            audit.mark(args[0])
            audit.mark(list(self.trainer.lightning_module.parameters()))
            audit.mark(list(self.trainer.lightning_module.buffers()))
            audit.started = True
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
        "--name", "waits", "--model.net.init_args.features", "[4, 8, 16]",
        "--data.root", str(root), "--data.n_folds", "2", "--data.num_workers", "1",
        "--data.patch_size", "[16, 16, 16]", "--data.batch_size", "2", "--data.cache", "none",
        "--data.patches_per_epoch", "6", "--trainer.max_steps", "6",
        "--trainer.limit_val_batches", "0", *extra])


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_training_steps_wait_for_nothing_on_the_device(tiny3d, tmp_path, monkeypatch,
                                                       nonfinite):
    """Augmentation on the device, forward, loss, the NaN check, logging (progress bar
    included), the optimizer step and Lightning's loop around them: nothing waits for the
    device at any step; the epoch's mean loss is read at each epoch's end. (The NaN check is
    read once the backward pass is queued, from a copy made without waiting.)"""
    audit = DeviceWaits()
    watch(audit, SegmentationDataModule, "on_after_batch_transfer", monkeypatch,
          seed_batch=True)
    watch(audit, SegmentationModule, "training_step", monkeypatch)
    watch(audit, SegmentationModule, "on_before_optimizer_step", monkeypatch)
    epoch_ends: list[tuple[int, int]] = []  # (epoch, waits so far)
    count = pl.Callback()
    count.on_train_epoch_end = lambda trainer, module: epoch_ends.append(
        (trainer.current_epoch, len(audit.waits)))
    monkeypatch.setattr(SegmentationCLI, "instantiate_trainer", _with_callback(count))
    with audit:
        cli = fit(tiny3d, tmp_path, "--data.augment", "true", "--data.augment_on", "device",
                  "--data.augmentation", "{rotation_probability: 0.5, scaling_probability: 0.5, "
                  "noise_probability: 1, blur_probability: 1, brightness_probability: 1, "
                  "contrast_probability: 1, low_resolution_probability: 1, gamma_probability: 1, "
                  "inverted_gamma_probability: 1}",
                  "--model.nonfinite_loss", nonfinite, "--trainer.log_every_n_steps", "100")
    assert cli.trainer.global_step == 6 and cli.datamodule.batch_augmentation is not None
    assert audit.on_device  # the emulation followed the batches
    assert [w for w in audit.waits if w[1] != "-"] == []      # none in our hooks
    # none from one batch's arrival to the next, nor to the epoch's end ...
    assert len(epoch_ends) == 2 and len(audit.batches) >= 6
    for epoch, waits in epoch_ends:
        assert {n for e, n in audit.batches if e == epoch} == {waits}, audit.waits
    # ... only after each epoch's end: the epoch's mean loss, once
    assert epoch_ends[1][1] - epoch_ends[0][1] == 1, audit.waits[:epoch_ends[1][1]]


def _with_callback(callback: pl.Callback):
    original = SegmentationCLI.instantiate_trainer

    def instantiate_trainer(self, **kwargs):
        trainer = original(self, **kwargs)
        trainer.callbacks.append(callback)
        return trainer

    return instantiate_trainer


def test_the_audit_sees_a_read_of_the_loss_and_an_upload(tiny3d, tmp_path, monkeypatch):
    """The emulation catches ``bool(torch.isfinite(loss))`` and ``torch.tensor(x, device=)``
    in the training step."""
    audit = DeviceWaits()
    watch(audit, SegmentationDataModule, "on_after_batch_transfer", monkeypatch,
          seed_batch=True)
    original = SegmentationModule.training_step

    def waiting_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        assert bool(torch.isfinite(loss))
        return loss * torch.tensor(1.0, device=loss.device)

    monkeypatch.setattr(SegmentationModule, "training_step", waiting_step)
    watch(audit, SegmentationModule, "training_step", monkeypatch)
    with audit:
        fit(tiny3d, tmp_path, "--trainer.enable_progress_bar", "false")
    assert [w[:2] for w in audit.waits if w[1] != "-"] == [
        ("__bool__", "SegmentationModule.training_step"),
        ("tensor", "SegmentationModule.training_step")] * 6

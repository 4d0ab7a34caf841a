"""Callbacks added to every run: resumable checkpoints, peak GPU memory, a progress bar."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` at the end of every training epoch and, optionally, every N steps.

    A ModelCheckpoint that keeps no top-k checkpoints only writes "last" after a top-k save,
    that is, at the end of training; a run killed before then would leave nothing to resume
    from. This one writes last.ckpt at every training-epoch end (whatever the validation
    schedule) unless it was already written at that global step.

    Args:
        every_n_train_steps: also save every this many steps, so a killed run loses at most
            N − 1 steps; None saves at epoch ends only.
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        super().__init__(save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         save_on_train_epoch_end=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save last.ckpt unless it was already saved at this global step."""
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):  # also: saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class PeakMemory(pl.Callback):
    """Logs ``memory/peak_gib``, the most GPU memory allocated so far, at every epoch end.

    Nothing is logged on the CPU (the host's peak is the process's maximum resident size).
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the peak allocation of this process's GPU."""
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("memory/peak_gib", peak, reduce_fx="max", sync_dist=True)


class ThrottledProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading the logged values at most once a second in training.

    Reading them copies the loss from the device. Lightning's bar does so after every batch,
    so the host waits for each step to end before it queues the next one, and the GPU idles
    in between; here the bar moves at every batch, the numbers beside it at most every
    ``metrics_every`` seconds (and at every epoch's end).

    Args:
        metrics_every: seconds between two reads of the logged values while training.
        **kwargs: RichProgressBar's.
    """

    def __init__(self, metrics_every: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_every = metrics_every
        self._shown: dict[str, Any] = {}
        self._read_at = -float("inf")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The logged values, read afresh outside training or once ``metrics_every`` passed."""
        now = time.monotonic()
        if trainer.training and now - self._read_at < self.metrics_every:
            return self._shown
        self._shown, self._read_at = super().get_metrics(trainer, pl_module), now
        return self._shown

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Show the epoch's final values."""
        self._read_at = -float("inf")
        super().on_train_epoch_end(trainer, pl_module)

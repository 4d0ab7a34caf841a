"""Callbacks added to every run: resumable checkpoints, peak GPU memory."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint


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

"""Checkpoint callback for resumable runs."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` at the end of every training epoch and, optionally, every N steps.

    Lightning's ModelCheckpoint saves either every N steps or at epoch ends, so a run that
    checkpoints every N steps would end with a last.ckpt up to N − 1 steps old. This adds the
    epoch-end save (through ModelCheckpoint's own last-checkpoint routine). Epoch ends are
    training-epoch ends whatever the validation schedule.

    Args:
        every_n_train_steps: save every this many steps; None saves at epoch ends only.
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        super().__init__(save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         save_on_train_epoch_end=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save last.ckpt at the epoch end too when saving every N steps."""
        super().on_train_epoch_end(trainer, pl_module)
        if self._every_n_train_steps and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

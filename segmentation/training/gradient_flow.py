"""Gradient flow per layer over training: how much each convolution learns, step by step.

Drozdzal et al. 2016 ("The Importance of Skip Connections in Biomedical Image Segmentation")
plot the update magnitude of every layer over training and find that, with long skips only,
the layers near the centre of the U barely learn. :class:`GradientFlow` records what such a
plot needs for any run: every few optimizer steps, for every convolution weight of the
network in U order, the gradient norm, the weight norm and the relative update of the step.
The record, its reader and its summary numbers live in
:mod:`segmentation.training.gradient_flow_summary` (plain NumPy); the figures are drawn by
``segmentation plot gradient-flow``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from segmentation.nets.blocks import ConvUnit, ResidualBlock, ResidualStage
from segmentation.nets.unet import UNet
from segmentation.training.gradient_flow_summary import (
    CALLBACK_PATH,
    FROZEN_THRESHOLD,
    RECORD_FILE,
    SUMMARY_FILE,
    GradientFlowRecord,
    grad_ratio,
    read_gradient_flow,
    summarise_gradient_flow,
    write_gradient_flow,
    write_summary,
)

__all__ = ["CALLBACK_PATH", "RECORD_FILE", "SUMMARY_FILE", "ConvLayer", "GradientFlow",
           "GradientFlowRecord", "conv_layers", "read_gradient_flow", "record_interval",
           "summarise_gradient_flow"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d)


@dataclass(frozen=True, eq=False)  # layers are compared by identity, not by their tensors
class ConvLayer:
    """One recorded convolution weight.

    Attributes:
        name: readable name, e.g. ``enc0.conv1``, ``enc2.block1.proj``, ``dec1.up``, ``head``.
        level: its U level (0 at full resolution), −1 outside a U-Net.
        part: "encoder", "bottleneck", "decoder" or "head"; "network" for a network that is
            not a :class:`~segmentation.nets.unet.UNet`, "other" for a convolution a UNet
            subclass adds outside the U.
        weight: the weight parameter, (C_out, C_in, *K) (transposed: (C_in, C_out, *K)).
    """

    name: str
    level: int
    part: str
    weight: nn.Parameter


def _convs(module: nn.Module) -> list[nn.Module]:
    """The convolutions inside ``module`` (itself included), in registration order."""
    return [m for m in module.modules() if isinstance(m, CONV_TYPES)]


def _downsampling(name: str, conv: nn.Module) -> str:
    """``conv1`` → ``down_conv1`` for a strided convolution (``downsample: conv``)."""
    if max(conv.stride) == 1:
        return name
    head, _, last = name.rpartition(".")
    return f"{head}.down_{last}" if head else f"down_{last}"


def _stage_convs(stage: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name within the level, conv) of an encoder level: a plain block or a residual stage.

    Plain: ``conv1``, ``conv2``, …; residual: ``stem`` (level 0), then per block
    ``blockB.conv1``, ``blockB.conv2`` and, where channels or stride change, its 1×1
    projection shortcut ``blockB.proj``.
    """
    blocks = 0
    for index, child in enumerate(stage.children(), 1):
        if isinstance(child, ResidualBlock):
            blocks += 1
            for number, conv in enumerate(_convs(child.branch), 1):
                yield _downsampling(f"block{blocks}.conv{number}", conv), conv
            for conv in _convs(child.shortcut):
                yield _downsampling(f"block{blocks}.proj", conv), conv
        elif isinstance(child, ConvUnit) and isinstance(stage, ResidualStage):
            for conv in _convs(child):
                yield "stem", conv
        else:
            for conv in _convs(child):
                yield _downsampling(f"conv{index}", conv), conv


def _unet_layers(net: UNet) -> list[ConvLayer]:
    """The U-Net's convolutions in U order: encoder down, bottleneck, decoder up, heads."""
    found = []
    for level, stage in enumerate(net.encoder.levels):
        bottom = level == net.depth
        prefix, part = ("bottleneck", "bottleneck") if bottom else (f"enc{level}", "encoder")
        found += [ConvLayer(f"{prefix}.{name}", level, part, conv.weight)
                  for name, conv in _stage_convs(stage)]
    for level in reversed(range(net.depth)):
        found += [ConvLayer(f"dec{level}.up", level, "decoder", conv.weight)
                  for conv in _convs(net.decoder.upsamples[level])]
        found += [ConvLayer(f"dec{level}.conv{number}", level, "decoder", conv.weight)
                  for number, conv in enumerate(_convs(net.decoder.blocks[level]), 1)]
    found += [ConvLayer("head", 0, "head", conv.weight) for conv in _convs(net.head)]
    found += [ConvLayer(f"aux{level}", level, "head", conv.weight)
              for level, head in enumerate(net.aux_heads, 1) for conv in _convs(head)]
    return found


def conv_layers(net: nn.Module) -> list[ConvLayer]:
    """Every trainable convolution weight of a network, named, in U order.

    For a :class:`~segmentation.nets.unet.UNet`: encoder level 0 … the bottleneck, the decoder
    from the level above the bottleneck up to level 0 (each level's up-convolution first),
    then the head and the auxiliary heads. Any other network: registration order
    (``named_modules``), named by module path. Weights that do not train (the auxiliary heads
    without deep supervision) are left out: they have no gradient to record.
    """
    found = _unet_layers(net) if isinstance(net, UNet) else []
    seen = {id(layer.weight) for layer in found}
    outside = "other" if isinstance(net, UNet) else "network"
    for path, module in net.named_modules():
        if isinstance(module, CONV_TYPES) and id(module.weight) not in seen:
            found.append(ConvLayer(path or type(module).__name__, -1, outside, module.weight))
            seen.add(id(module.weight))
    return [layer for layer in found if layer.weight.requires_grad]


def record_interval(total_steps: float, samples: int) -> int:
    """Steps between records so that a run of ``total_steps`` optimizer steps gets ~samples.

    Raises:
        ValueError: if the run has no fixed length (``total_steps`` is infinite).
    """
    if not math.isfinite(total_steps):
        raise ValueError("GradientFlow: the run has no fixed length (max_steps and max_epochs "
                         "are unset), so every_n_steps cannot be derived; set "
                         "every_n_steps")
    return max(1, int(total_steps) // samples)


def _norms(tensors: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """(len(tensors),) float32 L2 norms; a missing gradient (None) counts as zero."""
    return torch.stack([torch.zeros((), device=device) if t is None
                        else torch.linalg.vector_norm(t.detach(), dtype=torch.float32)
                        for t in tensors])


@dataclass
class _PendingRecord:
    """What is measured before an optimizer step, completed after it."""

    step: int
    grad_norm: torch.Tensor        # (L,)
    weight_norm: torch.Tensor      # (L,)
    total_grad_norm: torch.Tensor  # ()
    weights_before: list[torch.Tensor]


class GradientFlow(pl.Callback):
    r"""Records per-layer gradient norms, weight norms and relative updates while training.

    Every ``every_n_steps`` optimizer steps (counted by ``trainer.global_step``, so gradient
    accumulation's intermediate batches do not count; records fall on steps 0, N, 2N, …) it
    takes, for every convolution weight in U order (see :func:`conv_layers`), the gradient L2
    norm before clipping, the weight L2 norm before the step and the relative update
    ‖w_after − w_before‖/‖w_before‖ of the step; and the gradient norm over all parameters
    before clipping, with the run's ``gradient_clip_val``. Only global rank 0 records and
    writes; under DDP its gradients are already all-reduced when the hook runs.

    The record goes to ``gradient_flow.npz`` in the run folder (``trainer.log_dir``, i.e.
    ``runs/NAME/version_N/``), rewritten atomically at every training-epoch end, on an
    exception and at the end of training, so a killed run keeps what it had; at the end,
    ``gradient_flow_summary.json`` (see :func:`summarise_gradient_flow`) is written beside it.
    At each record ``grad_flow/first_last_ratio`` (first encoder over last decoder conv
    gradient norm), ``grad_flow/frozen_share`` (share of layers whose update is below 1e-4 of
    their weight) and ``grad_flow/total_grad_norm`` go to the run's loggers.

    Switch it on from the command line (``+=`` appends to the configured callbacks; the
    following ``--trainer.callbacks.*`` keys set the appended callback's arguments)::

        segmentation fit --config configs/quickstart.yaml \
            --trainer.callbacks+=segmentation.training.gradient_flow.GradientFlow
        segmentation fit --config configs/quickstart.yaml \
            --trainer.callbacks+=segmentation.training.gradient_flow.GradientFlow \
            --trainer.callbacks.every_n_steps=5

    or in a config file::

        trainer:
          callbacks:
            - class_path: segmentation.training.gradient_flow.GradientFlow
              init_args: {every_n_steps: 5}

    Args:
        every_n_steps: record every this many optimizer steps; None derives it from the run's
            length (``trainer.estimated_stepping_batches``) so that about ``samples`` records
            are taken: ``max(1, total_steps // samples)``.
        samples: records wanted over the run when ``every_n_steps`` is None.
    """

    def __init__(self, every_n_steps: int | None = None, samples: int = 200) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"GradientFlow: every_n_steps must be ≥ 1 or None, got "
                             f"{every_n_steps}")
        if samples < 1:
            raise ValueError(f"GradientFlow: samples must be ≥ 1, got {samples}")
        self.every_n_steps = every_n_steps
        self.samples = samples
        self.interval: int | None = None  # resolved when training starts
        self.log_dir: Path | None = None
        self._layers: list[ConvLayer] = []
        self._parameters: list[nn.Parameter] = []
        self._clip_val = math.nan
        self._rows: list[dict[str, np.ndarray]] = []
        self._pending: _PendingRecord | None = None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the layers and the record interval; forget any earlier fit's records."""
        log_dir = trainer.log_dir  # a broadcast under DDP: every process must ask
        self.interval = self.every_n_steps or record_interval(
            trainer.estimated_stepping_batches, self.samples)
        self._rows, self._pending = [], None
        if not trainer.is_global_zero:
            return
        self.log_dir = Path(log_dir) if log_dir else None
        net = getattr(pl_module, "net", None)
        self._layers = conv_layers(net if isinstance(net, nn.Module) else pl_module)
        self._parameters = [p for p in pl_module.parameters() if p.requires_grad]
        clip = trainer.gradient_clip_val
        self._clip_val = float(clip) if clip else math.nan

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Measure gradients and weights, and keep the weights to compare after the step.

        In Lightning 2.6 (``Precision._after_closure`` in pytorch_lightning/plugins/
        precision/precision.py) this hook runs once per optimizer step, after the closure's
        backward and, with fp16 AMP, after ``scaler.unscale_`` (``MixedPrecision.
        optimizer_step`` unscales before calling ``_after_closure``), and *before*
        ``_clip_gradients`` and the optimizer's update: the gradients are the true, unclipped
        ones and the parameters are those before the step. Callback hooks run before the
        LightningModule's, so a step the module later skips (``nonfinite_loss: skip``) is
        still measured, with an update of zero.
        """
        if (not trainer.is_global_zero or self.interval is None
                or trainer.global_step % self.interval):
            return
        device = pl_module.device
        with torch.no_grad():
            weights = [layer.weight.detach() for layer in self._layers]
            parameter_norms = _norms([p.grad for p in self._parameters], device)
            self._pending = _PendingRecord(
                step=trainer.global_step,
                grad_norm=_norms([layer.weight.grad for layer in self._layers], device),
                weight_norm=_norms(weights, device),
                total_grad_norm=torch.linalg.vector_norm(parameter_norms),
                weights_before=[w.clone() for w in weights])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Complete a record with the step's relative updates and log its summary."""
        pending, self._pending = self._pending, None
        if pending is None:  # no record this batch (or an accumulation-only batch)
            return
        with torch.no_grad():
            change = _norms([layer.weight.detach() - before for layer, before
                             in zip(self._layers, pending.weights_before, strict=True)],
                            pl_module.device)
            # a zero weight (never at He initialisation) has no relative update
            rel_update = torch.where(pending.weight_norm > 0, change / pending.weight_norm,
                                     torch.full_like(change, math.nan))
            values = torch.cat([pending.grad_norm, pending.weight_norm, rel_update,
                                pending.total_grad_norm[None]]).cpu().numpy()  # one sync
        count = len(self._layers)
        row = {"steps": np.int64(pending.step),
               "grad_norm": values[:count], "weight_norm": values[count:2 * count],
               "rel_update": values[2 * count:3 * count],
               "total_grad_norm": values[3 * count]}
        self._rows.append(row)
        self._log(trainer, row)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write what has been recorded so far."""
        self._write()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Keep the records of an interrupted or failed run."""
        self._write()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the record and its summary numbers."""
        self._write(summary=True)

    # ------------------------------------------------------------------ record
    def record(self) -> GradientFlowRecord:
        """What this process has recorded so far (nothing on ranks other than 0)."""
        count = len(self._layers)

        def stacked(name: str, shape: tuple[int, ...]) -> np.ndarray:
            rows = [row[name] for row in self._rows]
            return np.stack(rows) if rows else np.zeros(shape)

        return GradientFlowRecord(
            layers=tuple(layer.name for layer in self._layers),
            levels=np.array([layer.level for layer in self._layers], dtype=np.int64),
            parts=tuple(layer.part for layer in self._layers),
            steps=stacked("steps", (0,)), grad_norm=stacked("grad_norm", (0, count)),
            weight_norm=stacked("weight_norm", (0, count)),
            rel_update=stacked("rel_update", (0, count)),
            total_grad_norm=stacked("total_grad_norm", (0,)), clip_val=self._clip_val)

    def _write(self, summary: bool = False) -> None:
        """Rewrite the run's ``gradient_flow.npz`` (and the summary) on rank 0."""
        if self.log_dir is None or not self._rows:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        record = self.record()
        write_gradient_flow(self.log_dir / RECORD_FILE, record)
        if summary:
            write_summary(self.log_dir / SUMMARY_FILE, summarise_gradient_flow(record))

    def _log(self, trainer: pl.Trainer, row: dict[str, np.ndarray]) -> None:
        """Scalar summaries of one record, to every logger (rank 0 only, at the record step).

        Straight to the loggers rather than through ``LightningModule.log``, whose
        ``log_every_n_steps`` would drop records that do not fall on its steps.
        """
        if not trainer.loggers:
            return
        parts = [layer.part for layer in self._layers]
        metrics = {"grad_flow/first_last_ratio": float(grad_ratio(row["grad_norm"], parts)),
                   "grad_flow/frozen_share": float(np.mean(row["rel_update"]
                                                           < FROZEN_THRESHOLD)),
                   "grad_flow/total_grad_norm": float(row["total_grad_norm"])}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(row["steps"]))

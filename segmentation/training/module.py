"""SegmentationModule: trains any segmentation network, validates on whole scans."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from monai.data import decollate_batch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric

from segmentation.data.preprocessing import Preprocessing
from segmentation.evaluation.metrics import case_metrics, mean_per_class, write_case_table
from segmentation.inference.checkpoint import RECORD_KEY, CheckpointRecord
from segmentation.inference.predictor import Predictor
from segmentation.inference.restore import check_finite, probabilities_on_scan, softmax_
from segmentation.training.gather import gather_cases
from segmentation.training.losses import SegmentationLoss
from segmentation.training.nonfinite import (
    NonFiniteLossPolicy,
    refuse_optimizers_that_skipped_steps_corrupt,
)


class SegmentationModule(pl.LightningModule):
    """Wraps a network (any ``nn.Module`` mapping (B, C, *S) to (B, K, *S')) for training.

    Args:
        net: the network; configs name it with class_path/init_args.
        loss: loss on logits and integer labels (default: Dice + cross-entropy); deep-supervision
            outputs are weighted as nnU-Net does around it (see SegmentationLoss).
        optimizer: optimizer factory (default: SGD, Nesterov momentum 0.99, lr 1e-2, weight
            decay 3e-5, as nnU-Net).
        lr_scheduler: scheduler factory (default: poly decay ``(1 − step/total)^0.9`` per step).
        patch_size: training patch size; validation windows have this size (linked from the
            data module by the CLI).
        slice_axis: for a 2D network trained on slices of 3D scans, the slice axis (linked).
        overlap: sliding-window overlap for "same" networks.
        sw_batch_size: windows per forward pass in validation.
        mirror_tta: mirror test-time augmentation in validation and test.
        compile: run the network through ``torch.compile``.
        channels_last: train and validate in channels-last memory format (the network's
            weights and every batch): oneDNN's 3D convolutions on the CPU run about 15 % faster
            so (measured for the quickstart network); on GPUs leave it off, it made every
            peer network slower there.
        nonfinite_loss: what a NaN or infinite loss on any process does: "stop" or "skip"
            (see :class:`NonFiniteLossPolicy`).
        test_hd95: compute HD95 in ``test``.
        net_config: class_path/init_args of ``net`` (filled in by the CLI; our UNet records its
            own), stored so a checkpoint alone rebuilds the network.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        patch_size: Sequence[int] | None = None,
        slice_axis: int | None = None,
        overlap: float = 0.5,
        sw_batch_size: int = 2,
        mirror_tta: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        nonfinite_loss: str = "stop",
        test_hd95: bool = True,
        net_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.nonfinite = NonFiniteLossPolicy(nonfinite_loss, net)
        self.net = net
        self.loss_fn = SegmentationLoss(loss, getattr(net, "level_strides", None))
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.net_config = net_config or getattr(net, "config", None)
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "lr_scheduler"])
        self.hparams["net_config"] = self.net_config
        # A compiled *function*, not a module attribute, so the state dict keeps only "net.*";
        # uncompiled, the network's __call__, so module hooks (the model summary's sizes and
        # FLOPs per layer) see the call.
        self._forward = torch.compile(net.forward) if compile else net.__call__
        # Filled from the data module at fit/validate/test time, or from a checkpoint.
        self.preprocessing: Preprocessing | None = None
        self.label_names: dict[int, str] = {}
        self.output_patch_size: tuple[int, ...] | None = None
        self._val_rows: list[dict] = []
        self._test_rows: list[dict] = []
        # The epoch's mean training loss, reduced over DDP processes once per epoch (a Metric
        # syncs when computed) instead of an all-reduce at every step. Only finite losses
        # reach it, so its NaN check (a read of the device at every update) is off.
        self.train_loss_mean = MeanMetric(nan_strategy="disable")

    # ------------------------------------------------------------------ plumbing
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, C, *S) → (B, K, *S') logits (a list with deep supervision while training)."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=_channels_last(x.ndim))
        return self._forward(x)

    def setup(self, stage: str) -> None:
        """Take label names and the fitted preprocessing from the data module."""
        if self.hparams.channels_last and self.hparams.patch_size is not None:
            self.net.to(memory_format=_channels_last(len(self.hparams.patch_size) + 2))
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and getattr(datamodule, "preprocessing", None) is None:
            datamodule.setup(stage)
        if datamodule is not None:
            self.preprocessing = datamodule.preprocessing
            self.label_names = dict(datamodule.label_names)
            self.output_patch_size = tuple(datamodule.output_size)
            self._check_matches_dataset(datamodule)
            if self.hparams.patch_size is not None:
                # one training patch: the model summary shows its output shape and real FLOPs
                channels = getattr(self.net, "in_channels", None) or len(
                    datamodule.info.channel_names)
                # in the dtype the trainer gives inputs ("bf16-true": bfloat16)
                self.example_input_array = self.trainer.precision_plugin.convert_input(
                    torch.zeros(1, channels, *self.hparams.patch_size))

    def _check_matches_dataset(self, datamodule: Any) -> None:
        """The network's input and output channels must fit the dataset's channels and labels."""
        info = datamodule.info
        for name, want in info.network_channels().items():
            have = getattr(self.net, name, None)
            if have is not None and have != want:
                raise ValueError(f"the network has {name}={have} but dataset {info.root} has "
                                 f"{want} ({'channels' if name == 'in_channels' else 'labels'}); "
                                 f"set model.net.init_args.{name}: {want}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint describe itself: network, preprocessing, labels, patch shapes."""
        checkpoint[RECORD_KEY] = CheckpointRecord(
            net=self.net_config, preprocessing=self.preprocessing, label_names=self.label_names,
            patch_size=self.hparams.patch_size, output_patch_size=self.output_patch_size,
            slice_axis=self.hparams.slice_axis, overlap=self.hparams.overlap,
            batch_size=self.hparams.sw_batch_size).as_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` stored.

        The checkpoint's preprocessing also becomes the data module's, so validate, test and
        predict read scans exactly as the checkpoint's network was trained on them. Outside
        ``fit`` the checkpoint's callback states (the best-checkpoint paths of the run that
        wrote it) are dropped: they restore nothing there and only led to a warning about a
        changed checkpoint folder.
        """
        if self._trainer is not None and self.trainer.state.fn != TrainerFn.FITTING:
            checkpoint.pop("callbacks", None)
        if checkpoint.get(RECORD_KEY, {}).get("net") is None:
            return
        record = CheckpointRecord.from_checkpoint(checkpoint)
        self.preprocessing = record.preprocessing
        self.label_names = dict(record.label_names or {})
        self.output_patch_size = record.output_patch_size
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and record.preprocessing is not None:
            datamodule.preprocessing = record.preprocessing

    @property
    def foreground_names(self) -> list[str]:
        """Names of the foreground classes, in channel order."""
        classes = getattr(self.net, "out_channels", None) or len(self.label_names)
        return [self.label_names.get(k, f"class_{k}") for k in range(1, classes)]

    def make_predictor(self) -> Predictor:
        """A whole-scan predictor of the network, as ``segmentation infer`` uses it."""
        if self.hparams.patch_size is None:
            raise ValueError("patch_size is not set; the CLI links it from data.patch_size")
        return Predictor(self.net, self.hparams.patch_size, overlap=self.hparams.overlap,
                         batch_size=self.hparams.sw_batch_size, mirror=self.hparams.mirror_tta,
                         slice_axis=self.hparams.slice_axis,
                         channels_last=self.hparams.channels_last)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One step on a batch of patches, image (B, C, *in) and label (B, 1, *out).

        Its loss is checked for NaN and infinity without waiting for the device; the decision
        comes before the optimizer step (:mod:`segmentation.training.nonfinite`).
        """
        # the forward pass updates batch norm statistics before the loss shows a bad batch
        buffers = self.nonfinite.snapshot()
        outputs = self(batch["image"])
        loss = self.loss_fn(outputs, batch["label"])
        self.nonfinite.check(loss, f"global step {self.global_step} (epoch "
                             f"{self.current_epoch}, batch {batch_idx})",
                             batch["image"].shape[0], buffers)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Decide on the step's losses now that its backward pass is queued, then log them.

        A step that saw a non-finite loss on any process stops the run or is dropped
        (``nonfinite_loss``); only finite losses reach the log and the epoch's mean.

        Raises:
            NonFiniteLossError: with ``nonfinite_loss: stop``, if the loss was NaN or infinite
                on any process.
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        for loss, value, batch_size in self.nonfinite.settle(
                optimizer, scaler_reads_gradients=scaler is not None and fused):
            # The host's copy: Lightning turns progress-bar values into numbers after every
            # batch, which for a device tensor means waiting for the step to finish.
            self.log("train/loss", torch.tensor(value), prog_bar=True, on_step=True,
                     on_epoch=False)
            # each sample counts once; a weight argument would be copied from the host
            self.train_loss_mean.update(loss.expand(batch_size))
        self.log("train/loss_epoch", self.train_loss_mean, on_step=False, on_epoch=True)

    def on_train_epoch_start(self) -> None:
        """Start the epoch with no loss checks left from an interrupted optimizer step."""
        self.nonfinite.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        """Optimizer and scheduler: nnU-Net's SGD and poly decay unless configured.

        Raises:
            ValueError: for fused SGD with momentum under a float16 gradient scaler, whose
                skipped steps corrupt it.
        """
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(self.parameters())
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.99, nesterov=True,
                                        weight_decay=3e-5)
        refuse_optimizers_that_skipped_steps_corrupt(
            optimizer, getattr(self.trainer.precision_plugin, "scaler", None))
        if self.scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        poly = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(1 - step / total, 0.0) ** 0.9)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": poly, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], hd95: bool) -> tuple[torch.Tensor, list[dict]]:
        image, label = batch["image"], batch["label"]
        logits = self.make_predictor()(torch.as_tensor(image))      # (B, K, *S)
        label = torch.as_tensor(label).long()
        loss = self.loss_fn.loss(logits, label)
        spacing = self.preprocessing.spacing if self.preprocessing else None
        metrics = case_metrics(logits, label, hd95=hd95, spacing=spacing)
        ids = batch.get("case_id") or [f"case_{i}" for i in range(image.shape[0])]
        rows = [{"case_id": case_id, **{k: v[i].tolist() for k, v in metrics.items()}}
                for i, case_id in enumerate(ids)]
        return loss, rows

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Whole-scan validation: sliding window or overlap-tile, then loss and Dice."""
        loss, rows = self._evaluate(batch, hd95=False)
        self._val_rows += rows
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(rows))

    def on_validation_epoch_end(self) -> None:
        """Log mean foreground Dice and Dice per class, over unique cases."""
        rows, self._val_rows = gather_cases(self._val_rows), []
        per_class = mean_per_class(rows, "dice", self.foreground_names)
        # The rows are every process's cases (gather_cases), so each process logs the same
        # values; sync_dist averages identical numbers, which leaves them as they are.
        for name, value in per_class.items():
            self.log(f"val/dice_{name}", value, sync_dist=True)
        if per_class:
            mean = [v for v in per_class.values() if not math.isnan(v)]
            self.log("val/dice", sum(mean) / len(mean) if mean else float("nan"), prog_bar=True,
                     sync_dist=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Per-case Dice and HD95 of the held-out cases."""
        _, rows = self._evaluate(batch, hd95=self.hparams.test_hd95)
        self._test_rows += rows

    def on_test_epoch_end(self) -> None:
        """Write per-case, per-class metrics to ``test_metrics.csv`` and log their means."""
        rows, self._test_rows = gather_cases(self._test_rows), []
        names = self.foreground_names
        keys = ["dice"] + (["hd95"] if self.hparams.test_hd95 else [])
        for key in keys:
            means = mean_per_class(rows, key, names)
            for name, value in means.items():  # identical on every process, as in validation
                self.log(f"test/{key}_{name}", value, sync_dist=True)
            finite = [v for v in means.values() if not math.isnan(v)]
            if finite:
                self.log(f"test/{key}", sum(finite) / len(finite), sync_dist=True)
        log_dir = self.trainer.log_dir  # a collective under DDP: every process asks
        if self.trainer.is_global_zero and log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            write_case_table(Path(log_dir) / "test_metrics.csv", rows, names, keys)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Each scan's class probabilities, mapped back onto the scan's own grid.

        The restoration is ``segmentation infer``'s (``restore.probabilities_on_scan``), with
        the preprocessing the checkpoint was trained with; ``PredictionWriter`` writes them.

        Args:
            batch: preprocessed scans from the data module's predict loader: ``image``
                (B, C, *S') with each scan's metadata, and ``case_id``.
            batch_idx: the batch's index (unused).

        Returns:
            One {"case_id": str, "probabilities": (K, *S) float32 on the CPU} per scan, S the
            spatial shape of the scan's file.
        """
        logits = self.make_predictor()(torch.as_tensor(batch["image"]))  # (B, K, *S')
        datamodule = getattr(self.trainer, "datamodule", None)
        transform = getattr(datamodule, "predict_transform", None)  # the chain that was applied
        if transform is None:
            transform = self.preprocessing.transforms(("image",))
        results = []
        for case_id, image, case_logits in zip(batch["case_id"], decollate_batch(batch["image"]),
                                               logits, strict=True):
            check_finite(case_logits, image.meta.get("filename_or_obj", case_id))
            results.append({"case_id": case_id, "probabilities": probabilities_on_scan(
                softmax_(case_logits.float()), image, transform)})    # (K, *S)
        return results


def _channels_last(ndim: int) -> torch.memory_format:
    """The channels-last memory format of a (B, C, *S) tensor of ``ndim`` axes."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last

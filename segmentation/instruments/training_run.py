"""What a checkpoint's training run used: its dataset, training cases, loss and output size.

A checkpoint records its network, preprocessing and patch size (:mod:`segmentation.inference.
checkpoint`) but neither the dataset folder nor the loss; the run's ``config.yaml``, beside the
``checkpoints/`` folder, does. Used by ``segmentation landscape`` and usable by any instrument
that measures a checkpoint on its own training data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from torch import nn

    from segmentation.data.layout import Case
    from segmentation.inference.checkpoint import CheckpointRecord
    from segmentation.instruments.fixed_patches import PatchSet

DEFAULT_LOSS = ("default_loss(): MONAI DiceCELoss (soft Dice over the foreground classes as "
                "batch Dice + cross-entropy)")


@dataclass
class TrainingInputs:
    """A trained network with the data and loss it was trained on.

    Attributes:
        checkpoint: the checkpoint file.
        net: the network in eval mode on the CPU, with the trained weights.
        record: the checkpoint's record (preprocessing, patch size, labels).
        data_root: the dataset folder.
        cases: the training cases; ``cases_source`` says which (a fold's, or all).
        max_label: the dataset's largest label value.
        output_size: the network's output size for the checkpoint's patch size.
        loss_fn: the training loss as training applies it (``SegmentationLoss``).
        loss_name: what the loss is and where that is known from.
    """

    checkpoint: Path
    net: nn.Module
    record: CheckpointRecord
    data_root: Path
    cases: list[Case]
    cases_source: str
    max_label: int
    output_size: tuple[int, ...]
    loss_fn: nn.Module
    loss_name: str

    def patch_settings(self, count: int, seed: int) -> dict[str, Any]:
        """What fixes :meth:`patches` (see :func:`~.fixed_patches.patch_settings`)."""
        from segmentation.instruments.fixed_patches import patch_settings

        return patch_settings(self.cases, self.record.preprocessing, self.record.patch_size,
                              self.output_size, count=count, seed=seed,
                              slice_axis=self.record.slice_axis)

    def patches(self, count: int, seed: int) -> PatchSet:
        """``count`` fixed training patches preprocessed as this checkpoint preprocesses.

        Checkpoints of one dataset, fold and patch size get the same patches from the same
        seed (see :mod:`segmentation.instruments.fixed_patches`).
        """
        from segmentation.instruments.fixed_patches import fixed_patches

        return fixed_patches(self.cases, self.record.preprocessing, self.record.patch_size,
                             self.output_size, count=count, seed=seed,
                             max_label=self.max_label, slice_axis=self.record.slice_axis)


def training_inputs(checkpoint: str | Path, data: str | Path | None = None) -> TrainingInputs:
    """The network of ``checkpoint`` with its training data and loss, checked to fit.

    Args:
        checkpoint: a checkpoint written by ``segmentation fit`` (or ``write_network_checkpoint``).
        data: the dataset folder; default: the ``data.root`` the checkpoint's run recorded.

    Raises:
        ValueError: one line naming the file at fault (``CheckpointError`` for the checkpoint):
            an unusable checkpoint or one without patch size or preprocessing, no known
            dataset, a dataset without training cases or with other channels, a loss that
            cannot be built.
    """
    from segmentation.data.layout import read_dataset
    from segmentation.inference.checkpoint import (
        CheckpointError,
        load_trained_network,
        read_checkpoint,
    )

    path = Path(checkpoint)
    net, record = load_trained_network(path)
    if record.patch_size is None or record.preprocessing is None:
        raise CheckpointError(f"{path}: records no patch size or preprocessing; use a "
                              "checkpoint written by `segmentation fit`")
    config, config_path = run_config(path)
    recorded = read_checkpoint(path) if data is None else {}
    root = training_data_root(path, recorded, config, None if data is None else str(data))
    del recorded
    cases, source = training_cases(root, config)
    info = read_dataset(root)
    channels = len(info.channel_names)
    if getattr(net, "in_channels", channels) != channels:
        raise ValueError(f"{root}: has {channels} channel(s) but {path} reads "
                         f"{net.in_channels}; pass --data DIR, the dataset it was trained on")
    loss_fn, loss_name = training_loss(config, config_path)
    return TrainingInputs(path, net, record, root, cases, source, max(info.labels.values()),
                          output_shape(net, record), loss_fn, loss_name)


def run_config(checkpoint: Path) -> tuple[dict[str, Any], Path | None]:
    """The config.yaml of the run that wrote ``checkpoint`` (``version_N/checkpoints/x.ckpt``).

    Returns its plain data (empty when there is none or it cannot be read) and its path.
    """
    path = checkpoint.resolve().parent.parent / "config.yaml"
    if checkpoint.resolve().parent.name != "checkpoints" or not path.is_file():
        return {}, None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}, None
    return (config, path) if isinstance(config, dict) else ({}, None)


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """``config[name]``, with its ``init_args`` merged in (both layouts LightningCLI writes)."""
    section = config.get(name) or {}
    if not isinstance(section, dict):
        return {}
    return {**section, **(section.get("init_args") or {})}


def training_data_root(checkpoint_path: Path, checkpoint: dict[str, Any],
                       config: dict[str, Any], given: str | None) -> Path:
    """``--data``, else the ``data.root`` the checkpoint or its run's config.yaml records.

    Raises:
        ValueError: when none is recorded, or the recorded folder does not exist.
    """
    if given is not None:
        return Path(given)
    recorded = (checkpoint.get("datamodule_hyper_parameters") or {}).get("root")
    recorded = recorded or _section(config, "data").get("root")
    if not recorded:
        raise ValueError(f"{checkpoint_path}: records no dataset (no data.root in the checkpoint "
                         "or in its run's config.yaml); pass --data DIR, the dataset it was "
                         "trained on")
    if not Path(recorded).is_dir():
        raise ValueError(f"{recorded}: the dataset {checkpoint_path} was trained on (its "
                         "recorded data.root, read from the current folder) does not exist; "
                         "pass --data DIR")
    return Path(recorded)


def training_cases(root: Path, config: dict[str, Any]) -> tuple[list[Case], str]:
    """The cases a checkpoint's run trained on, and a description of which they are.

    The fold's training cases when the run's config names a fold of ``root/splits.json`` (an
    existing split is only read), else every training case of the dataset.

    Raises:
        ValueError: naming the dataset, if it cannot be read or has no training cases.
    """
    from segmentation.data.layout import DatasetError, read_dataset
    from segmentation.data.splits import SPLITS_JSON, load_or_create_splits

    info = read_dataset(root)
    cases, source = list(info.training), f"every training case of {root.resolve()}"
    data = _section(config, "data")
    fold = data.get("fold", 0)
    if data and isinstance(fold, int) and (root / SPLITS_JSON).is_file():
        try:  # an existing splits.json is only read, never written
            splits = load_or_create_splits(root, [c.case_id for c in cases],
                                           int(data.get("n_folds", 5)))
            train = set(splits[fold]["train"])
            cases = [c for c in cases if c.case_id in train]
            source = f"the training cases of fold {fold} in {(root / SPLITS_JSON).resolve()}"
        except (DatasetError, IndexError, ValueError):
            pass
    if not cases:
        raise ValueError(f"{root}: the dataset has no training cases (imagesTr/labelsTr); "
                         "landscapes are measured on training patches: pass --data DIR")
    return cases, source


def training_loss(config: dict[str, Any], config_path: Path | None) -> tuple[nn.Module, str]:
    """The run's loss wrapped as training wraps it, and where it comes from.

    Checkpoints do not record the loss; the run's config.yaml does (``model.loss``, null for
    the default). Without a config.yaml the default is assumed, and the description says so.

    Raises:
        ValueError: naming config.yaml, if its loss cannot be built.
    """
    from segmentation.config import build_network
    from segmentation.training.losses import SegmentationLoss

    if config_path is None:
        return SegmentationLoss(), (f"{DEFAULT_LOSS}, assumed: the checkpoint does not record "
                                    "its loss and its run's config.yaml was not found")
    spec = _section(config, "model").get("loss")
    if spec is None:
        return SegmentationLoss(), f"{DEFAULT_LOSS}, as {config_path} says (model.loss: null)"
    try:
        return SegmentationLoss(build_network(spec)), f"{json.dumps(spec)} from {config_path}"
    except ValueError as error:
        raise ValueError(f"{config_path}: model.loss cannot be built ({error})") from None


def output_shape(net: nn.Module, record: CheckpointRecord) -> tuple[int, ...]:
    """The network's output size for the checkpoint's patch size (valid networks: smaller)."""
    if hasattr(net, "output_shape"):
        return tuple(net.output_shape(record.patch_size))
    return tuple(record.output_patch_size or record.patch_size)

"""The checkpoint format: a self-describing record beside the weights, read without Lightning.

``segmentation fit`` writes Lightning checkpoints; next to Lightning's keys each holds
``checkpoint["segmentation"]``, a record of plain data (the network's class_path/init_args, the
fitted preprocessing, label names, patch sizes), so that the checkpoint alone rebuilds a
network ready to segment. This module owns that record: the training module writes it through
:meth:`CheckpointRecord.as_dict`, and ``segmentation infer`` reads it with
:func:`load_trained_network` into a plain ``nn.Module``, without importing Lightning.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain data only, so a
crafted file cannot run code while it is being read.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segmentation.atomic import write_atomic
from segmentation.config import build_network
from segmentation.data.preprocessing import Preprocessing

RECORD_KEY = "segmentation"
NET_PREFIX = "net."  # the training module holds the network as ``self.net``


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint says about its model, beside the weights.

    Args:
        net: class_path/init_args of the network.
        preprocessing: the preprocessing fitted at training time.
        label_names: label value → name, background included.
        patch_size: the training patch (network input) size; validation windows have it.
        output_patch_size: the network's output size for ``patch_size``.
        slice_axis: for a 2D network trained on slices of 3D scans, the slice axis.
        overlap: sliding-window overlap used in validation.
        batch_size: windows per forward pass used in validation.
    """

    net: dict[str, Any]
    preprocessing: Preprocessing | None = None
    label_names: Mapping[int, str] | None = None
    patch_size: tuple[int, ...] | None = None
    output_patch_size: tuple[int, ...] | None = None
    slice_axis: int | None = None
    overlap: float = 0.5
    batch_size: int = 2

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``checkpoint["segmentation"]`` (loadable with weights_only=True)."""
        return {
            "net": self.net,
            "preprocessing": self.preprocessing.as_dict() if self.preprocessing else None,
            "label_names": {int(k): str(v) for k, v in (self.label_names or {}).items()},
            "patch_size": _list(self.patch_size),
            "output_patch_size": _list(self.output_patch_size),
            "slice_axis": self.slice_axis,
            "overlap": float(self.overlap),
            "batch_size": int(self.batch_size),
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], source: str | Path = "checkpoint"
                        ) -> CheckpointRecord:
        """The record of a loaded checkpoint.

        Checkpoints written before ``overlap`` and ``batch_size`` joined the record keep them
        in Lightning's hyperparameters, where they are read from.

        Raises:
            CheckpointError: naming ``source``, if the checkpoint holds no network description.
        """
        record = checkpoint.get(RECORD_KEY) if isinstance(checkpoint, Mapping) else None
        if not isinstance(record, Mapping) or not isinstance(record.get("net"), Mapping):
            raise CheckpointError(f"{source}: not a segmentation checkpoint (no network "
                                  "description); use a checkpoint written by `segmentation fit`")
        hparams = checkpoint.get("hyper_parameters") or {}
        preprocessing = record.get("preprocessing")
        return cls(
            net=dict(record["net"]),
            preprocessing=Preprocessing.from_dict(preprocessing) if preprocessing else None,
            label_names={int(k): v for k, v in (record.get("label_names") or {}).items()},
            patch_size=_ints(record.get("patch_size")),
            output_patch_size=_ints(record.get("output_patch_size")),
            slice_axis=record.get("slice_axis"),
            overlap=float(record.get("overlap", hparams.get("overlap", 0.5))),
            batch_size=int(record.get("batch_size", hparams.get("sw_batch_size", 2))),
        )


def _ints(values: Any) -> tuple[int, ...] | None:
    return tuple(int(v) for v in values) if values else None


def _list(values: Any) -> list[int] | None:
    return [int(v) for v in values] if values else None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Load a checkpoint file as a dict of tensors and plain data (``weights_only=True``).

    Raises:
        CheckpointError: one line naming the file, if it is missing, empty, truncated, not a
            checkpoint, or holds objects other than tensors and plain data (which would need
            unpickling that can run code; such files are refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip "
                              "archive; this file is not one, or it is truncated)")
    try:
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused: it holds a Python object{what} other than "
                              "tensors and plain data, and loading it could run code") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        reason = str(error).split("\n")[0] or type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                              f"{reason})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a segmentation checkpoint (holds a "
                              f"{type(checkpoint).__name__}, not a checkpoint dict)")
    return checkpoint


def read_record(path: str | Path) -> CheckpointRecord:
    """The self-description of the checkpoint at ``path`` (see :class:`CheckpointRecord`)."""
    return CheckpointRecord.from_checkpoint(read_checkpoint(path), path)


def network_weights(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The network's own state dict out of the training module's ("net.*" keys)."""
    state = checkpoint.get("state_dict") or {}
    return {key[len(NET_PREFIX):]: value for key, value in state.items()
            if key.startswith(NET_PREFIX)}


def load_trained_network(path: str | Path, map_location: str | torch.device = "cpu"
                         ) -> tuple[nn.Module, CheckpointRecord]:
    """Rebuild the trained network of a checkpoint, reading the file once.

    Returns the network in eval mode on ``map_location`` with the trained weights, and the
    checkpoint's record.

    Raises:
        CheckpointError: naming the file, if it cannot be read (see :func:`read_checkpoint`),
            describes no network, or its weights do not fit the network it describes.
    """
    checkpoint = read_checkpoint(path, map_location)
    record = CheckpointRecord.from_checkpoint(checkpoint, path)
    try:
        net = build_network(record.net)
    except ValueError as error:
        raise CheckpointError(f"{path}: its network description cannot be built: {error}"
                              ) from None
    try:
        net.load_state_dict(network_weights(checkpoint))
    except RuntimeError as error:
        first = str(error).split("\n")[0]
        raise CheckpointError(f"{path}: the weights do not fit the network it describes "
                              f"({first})") from None
    return net.to(map_location).eval(), record


def write_network_checkpoint(path: str | Path, net: nn.Module, record: CheckpointRecord) -> Path:
    """A checkpoint of a network and its record alone, readable by ``segmentation infer``.

    Training writes full checkpoints (optimizer, loops) through Lightning; this writes what
    inference reads, e.g. for a network trained elsewhere or a benchmark. Written atomically;
    returns ``path``.
    """
    checkpoint = {"state_dict": {NET_PREFIX + key: value.detach().cpu()
                                 for key, value in net.state_dict().items()},
                  RECORD_KEY: record.as_dict()}
    return write_atomic(path, lambda temporary: torch.save(checkpoint, temporary))


def last_checkpoint_of_run(run_dir: Path) -> Path:
    """What ``--ckpt_path last`` means: the newest ``last.ckpt`` of any version of a run.

    Lightning would look for it only in this run's new, empty version folder (and, outside
    ``fit``, go on with untrained weights); the run's earlier versions hold it.

    Raises:
        ValueError: if no version of the run has a last.ckpt.
    """
    candidates = sorted(run_dir.glob("version_*/checkpoints/last*.ckpt"),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ValueError(f"--ckpt_path last: no last.ckpt under {run_dir}/version_*/checkpoints; "
                         "train first or pass a checkpoint file as --ckpt_path")
    return candidates[-1]

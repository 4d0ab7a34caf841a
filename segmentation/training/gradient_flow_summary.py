"""The gradient-flow record of a run: its file, its reader and its summary numbers.

:class:`~segmentation.training.gradient_flow.GradientFlow` writes the record while training;
everything here is plain NumPy, so reading, summarising and plotting a record needs neither
torch nor Lightning.

The file, ``gradient_flow.npz`` in a run's version folder, holds:

=================== ============== =====================================================
``layers``          (L,) str       layer names in U order (``enc0.conv1`` … ``head``)
``levels``          (L,) int       U level of each layer (−1: not a U-Net)
``parts``           (L,) str       "encoder", "bottleneck", "decoder", "head" (or
                                   "network"/"other" for layers outside the U)
``steps``           (R,) int       global step of each record (0: the first step)
``grad_norm``       (R, L) float32 gradient L2 norm, before clipping
``weight_norm``     (R, L) float32 weight L2 norm before the step
``rel_update``      (R, L) float32 ‖w_after − w_before‖ / ‖w_before‖ of the step
``total_grad_norm`` (R,) float32   gradient L2 norm over all parameters, before clipping
``clip_val``        () float64     ``trainer.gradient_clip_val``; NaN when not clipping
=================== ============== =====================================================
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segmentation.atomic import write_atomic, write_text_atomic

RECORD_FILE = "gradient_flow.npz"
SUMMARY_FILE = "gradient_flow_summary.json"
CALLBACK_PATH = "segmentation.training.gradient_flow.GradientFlow"
# A layer whose median relative update stays below this barely learns ("frozen").
FROZEN_THRESHOLD = 1e-4
# Per-record quantities, each (records, layers).
LAYER_QUANTITIES = ("grad_norm", "weight_norm", "rel_update")
_DTYPES = {"levels": np.int64, "steps": np.int64, "grad_norm": np.float32,
           "weight_norm": np.float32, "rel_update": np.float32, "total_grad_norm": np.float32}


@dataclass(frozen=True)
class GradientFlowRecord:
    """Per-layer gradient and update magnitudes of one run, record by record.

    Attributes:
        layers: (L,) layer names in U order.
        levels: (L,) int U level of each layer, −1 for a network that is not a U-Net.
        parts: (L,) "encoder", "bottleneck", "decoder", "head", or "network"/"other".
        steps: (R,) int64 global step of each record.
        grad_norm: (R, L) float32 gradient L2 norm of each layer's weight, before clipping.
        weight_norm: (R, L) float32 weight L2 norm before the step.
        rel_update: (R, L) float32 relative update ‖Δw‖/‖w‖ of the step.
        total_grad_norm: (R,) float32 gradient norm over all parameters, before clipping.
        clip_val: the run's gradient clipping value, NaN when it did not clip.
    """

    layers: tuple[str, ...]
    levels: np.ndarray
    parts: tuple[str, ...]
    steps: np.ndarray
    grad_norm: np.ndarray
    weight_norm: np.ndarray
    rel_update: np.ndarray
    total_grad_norm: np.ndarray
    clip_val: float = math.nan

    def __post_init__(self) -> None:
        """Take read-only copies of the arrays and check that their shapes agree."""
        for name, dtype in _DTYPES.items():
            # a copy: the caller's array stays writable, and nobody can change this one
            array = np.array(getattr(self, name), dtype=dtype)
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        object.__setattr__(self, "layers", tuple(str(name) for name in self.layers))
        object.__setattr__(self, "parts", tuple(str(part) for part in self.parts))
        shape = (len(self.steps), len(self.layers))
        if len(self.levels) != len(self.layers) or len(self.parts) != len(self.layers):
            raise ValueError(f"{len(self.layers)} layers but {len(self.levels)} levels and "
                             f"{len(self.parts)} parts")
        for name in LAYER_QUANTITIES:
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected "
                                 f"{shape} (records, layers)")
        if self.total_grad_norm.shape != shape[:1]:
            raise ValueError(f"total_grad_norm has shape {self.total_grad_norm.shape}, "
                             f"expected {shape[:1]}")

    @property
    def clipping(self) -> bool:
        """Whether the run clipped gradients."""
        return math.isfinite(self.clip_val) and self.clip_val > 0

    def as_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the ``.npz`` file (see the module docstring)."""
        return {"layers": np.array(self.layers, dtype=str),
                "parts": np.array(self.parts, dtype=str),
                **{name: getattr(self, name) for name in _DTYPES},
                "clip_val": np.float64(self.clip_val)}


def write_gradient_flow(path: str | Path, record: GradientFlowRecord) -> Path:
    """Write a record as ``.npz`` atomically: a reader sees the old file or the new one."""
    arrays = record.as_arrays()
    return write_atomic(path, lambda temporary: np.savez(temporary, **arrays))


def load_gradient_flow(path: str | Path) -> GradientFlowRecord:
    """Read one ``gradient_flow.npz``.

    Raises:
        ValueError: one line naming the file, if it cannot be read or is not such a record.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return GradientFlowRecord(
                layers=tuple(str(name) for name in data["layers"]),
                parts=tuple(str(part) for part in data["parts"]),
                **{name: data[name] for name in _DTYPES},
                clip_val=float(data["clip_val"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable gradient-flow record ({error})") from error


def version_folders(run_dir: Path) -> list[Path]:
    """The ``version_N`` folders of a run folder, in order of N."""
    numbered = [(int(p.name.split("_", 1)[1]), p) for p in run_dir.glob("version_*")
                if p.is_dir() and p.name.split("_", 1)[1].isdigit()]
    return [path for _, path in sorted(numbered)]


def read_gradient_flow(run_dir: str | Path) -> GradientFlowRecord:
    """The gradient-flow record of a version folder, or of every version of a run folder.

    A resumed run writes one record per version folder; a run folder's records are joined in
    version order. Where a later version starts at or before a step an earlier one recorded
    (it resumed from a checkpoint older than that record), the later version's records replace
    the earlier ones from that step on.

    Args:
        run_dir: ``runs/NAME/version_N`` (holding ``gradient_flow.npz``) or ``runs/NAME``.

    Raises:
        ValueError: one line naming the folder, if it does not exist or holds no record, or
            naming the file, if a record cannot be read or the versions' layers differ.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    if (folder / RECORD_FILE).is_file():
        return load_gradient_flow(folder / RECORD_FILE)
    files = [version / RECORD_FILE for version in version_folders(folder)
             if (version / RECORD_FILE).is_file()]
    if not files:
        raise ValueError(f"{folder}: no {RECORD_FILE}; train with "
                         f"--trainer.callbacks+={CALLBACK_PATH}")
    records = [load_gradient_flow(path) for path in files]
    for path, record in zip(files[1:], records[1:], strict=True):
        if record.layers != records[0].layers:
            raise ValueError(f"{path}: its layers differ from those of {files[0]} (another "
                             "network); pass the version folders separately")
    return concatenate_records(records)


def concatenate_records(records: Sequence[GradientFlowRecord]) -> GradientFlowRecord:
    """Join records of the same network in training order (see :func:`read_gradient_flow`)."""
    kept: list[np.ndarray] = []
    for index, record in enumerate(records):
        later = [r.steps[0] for r in records[index + 1:] if len(r.steps)]
        until = min(later) if later else None  # a later version redid these steps
        kept.append(np.arange(len(record.steps)) if until is None
                    else np.flatnonzero(record.steps < until))
    last = records[-1]

    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(r, name)[rows] for r, rows in zip(records, kept,
                                                                          strict=True)])

    return GradientFlowRecord(
        layers=last.layers, levels=last.levels, parts=last.parts,
        steps=joined("steps"), grad_norm=joined("grad_norm"),
        weight_norm=joined("weight_norm"), rel_update=joined("rel_update"),
        total_grad_norm=joined("total_grad_norm"), clip_val=last.clip_val)


# ------------------------------------------------------------------ summary numbers


def first_encoder_layer(parts: Sequence[str]) -> int:
    """Index of the first encoder convolution (the first layer of a network that is no U).

    ``parts`` is a record's ``parts``, one per layer.
    """
    return next((i for i, part in enumerate(parts) if part == "encoder"), 0)


def last_decoder_layer(parts: Sequence[str]) -> int:
    """Index of the last decoder convolution, the last one before the head.

    For a network that is not a U-Net, the last layer that is not a head. ``parts`` is a
    record's ``parts``, one per layer.
    """
    for wanted in (("decoder",), ("encoder", "bottleneck", "network", "other")):
        found = [i for i, part in enumerate(parts) if part in wanted]
        if found:
            return found[-1]
    return len(parts) - 1


def grad_ratio(grad_norm: np.ndarray, parts: Sequence[str]) -> np.ndarray:
    """Gradient norm of the first encoder conv over that of the last decoder conv.

    Args:
        grad_norm: (..., L) gradient norms.
        parts: (L,) the layers' parts.

    Returns:
        (...) float64 ratios; NaN where the last decoder convolution had no gradient.
    """
    grad_norm = np.asarray(grad_norm, dtype=np.float64)
    first = grad_norm[..., first_encoder_layer(parts)]
    last = grad_norm[..., last_decoder_layer(parts)]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(last > 0, first / last, np.nan)


def frozen_layers(record: GradientFlowRecord, threshold: float = FROZEN_THRESHOLD
                  ) -> np.ndarray:
    """(L,) bool: layers whose median relative update over the records is below threshold."""
    if not len(record.steps):
        return np.zeros(len(record.layers), dtype=bool)
    return nan_median(record.rel_update, axis=0) < threshold


def nan_median(values: np.ndarray, axis: int) -> np.ndarray:
    """Median along ``axis`` ignoring NaNs; NaN (without a warning) where all are NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice encountered"
        return np.nanmedian(np.asarray(values, dtype=np.float64), axis=axis)


def _finite_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def summarise_gradient_flow(record: GradientFlowRecord) -> dict[str, Any]:
    """The summary numbers of a run's gradient flow.

    Returns:
        A JSON-ready dict: ``records``, ``layers``, ``first_step``/``last_step``;
        ``first_layer``/``last_layer`` (the first encoder and last decoder convolution) and
        ``first_last_grad_ratio`` ({"early", "mid", "late"}: their gradient-norm ratio, mean
        over the first, middle and last third of the records; null where a third is empty);
        ``frozen_threshold``, ``frozen_share`` (share of layers whose median relative update
        is below it) and ``frozen_layers``; ``clip_val`` (null without clipping) and
        ``clipped_share`` (share of records whose total gradient norm exceeded it).
    """
    count = len(record.steps)
    ratio = grad_ratio(record.grad_norm, record.parts)
    thirds = np.array_split(np.arange(count), 3)
    frozen = frozen_layers(record)
    clipped = (float(np.mean(record.total_grad_norm > record.clip_val))
               if record.clipping and count else None)
    return {
        "records": count,
        "layers": len(record.layers),
        "first_step": int(record.steps[0]) if count else None,
        "last_step": int(record.steps[-1]) if count else None,
        "first_layer": record.layers[first_encoder_layer(record.parts)] if record.layers
        else None,
        "last_layer": record.layers[last_decoder_layer(record.parts)] if record.layers else None,
        "first_last_grad_ratio": {name: _finite_mean(ratio[rows])
                                  for name, rows in zip(("early", "mid", "late"), thirds,
                                                        strict=True)},
        "frozen_threshold": FROZEN_THRESHOLD,
        "frozen_share": float(frozen.mean()) if count and record.layers else None,
        "frozen_layers": [name for name, is_frozen in zip(record.layers, frozen, strict=True)
                          if is_frozen],
        "clip_val": record.clip_val if record.clipping else None,
        "clipped_share": clipped,
    }


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    """Write :func:`summarise_gradient_flow`'s dict as JSON, atomically."""
    return write_text_atomic(json.dumps(summary, indent=2) + "\n", path)

"""Per-case segmentation metrics and their exact aggregation across DDP processes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot


def case_metrics(logits: torch.Tensor, label: torch.Tensor, *, hd95: bool = False,
                 spacing: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Dice (and HD95) of every foreground class for every case of a batch.

    Dice follows nnU-Net: a class absent from both the label and the prediction is NaN (left
    out of the means), a class absent from the label but predicted scores 0, so false positives
    in such cases lower the mean instead of disappearing.

    Args:
        logits: (B, K, *S).
        label: (B, 1, *S) integer labels.
        hd95: also compute the 95th-percentile Hausdorff distance (slow on large scans).
        spacing: voxel spacing for HD95 in mm.

    Returns:
        {"dice": (B, K − 1)} (and {"hd95": (B, K − 1)}, MONAI's NaN or inf where the label
        or the prediction lacks the class).
    """
    classes = logits.shape[1]
    prediction = one_hot(logits.argmax(1, keepdim=True), classes)   # (B, K, *S)
    target = one_hot(label.long(), classes)                         # (B, K, *S)
    # ignore_empty=False: 0 where only the prediction has the class (1 where neither has it)
    dice = compute_dice(prediction, target, include_background=False, ignore_empty=False)
    spatial = tuple(range(2, prediction.ndim))
    neither = (prediction[:, 1:].sum(spatial) == 0) & (target[:, 1:].sum(spatial) == 0)
    out = {"dice": dice.masked_fill(neither.to(dice.device), float("nan"))}  # (B, K − 1)
    if hd95:
        out["hd95"] = compute_hausdorff_distance(prediction, target, include_background=False,
                                                 percentile=95, spacing=spacing)
    return out


def gather_cases(rows: list[dict]) -> list[dict]:
    """All processes' per-case rows, each case once, in case-id order.

    A DistributedSampler pads the last batches with repeated cases so every process gets the
    same number; averaging those would weight some cases twice. Rows are therefore gathered as
    objects and deduplicated by ``case_id``. Under DDP every process must call this (it is a
    collective); in a single process it only sorts and deduplicates.

    Args:
        rows: this process's rows, each a dict with a ``case_id`` and per-class values.

    Returns:
        The rows of all processes, one per ``case_id`` (the last seen wins), sorted by it.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    unique = {row["case_id"]: row for row in rows}
    return [unique[key] for key in sorted(unique)]


def mean_per_class(rows: list[dict], key: str, names: Sequence[str]) -> dict[str, float]:
    """NaN-ignoring mean of ``row[key]`` (one value per class) over cases, by class name.

    Args:
        rows: per-case rows (see :func:`gather_cases`); ``row[key]`` holds K − 1 values.
        key: the metric, e.g. "dice".
        names: the K − 1 class names, in the order of the values.

    Returns:
        {name: mean over the cases where the value is not NaN}; NaN for a class that is NaN
        in every case, and {} without rows.
    """
    if not rows:
        return {}
    values = torch.tensor([row[key] for row in rows], dtype=torch.float64)  # (cases, classes)
    means = values.nanmean(0)
    return {name: float(m) for name, m in zip(names, means, strict=True)}

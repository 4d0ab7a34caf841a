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

    Args:
        logits: (B, K, *S).
        label: (B, 1, *S) integer labels.
        hd95: also compute the 95th-percentile Hausdorff distance (slow on large scans).
        spacing: voxel spacing for HD95 in mm.

    Returns:
        {"dice": (B, K − 1)} (and {"hd95": (B, K − 1)}); NaN where a class is absent from the
        label (nnU-Net ignores such cases in the mean).
    """
    classes = logits.shape[1]
    prediction = one_hot(logits.argmax(1, keepdim=True), classes)
    target = one_hot(label.long(), classes)
    out = {"dice": compute_dice(prediction, target, include_background=False, ignore_empty=True)}
    if hd95:
        out["hd95"] = compute_hausdorff_distance(prediction, target, include_background=False,
                                                 percentile=95, spacing=spacing)
    return out


def gather_cases(rows: list[dict]) -> list[dict]:
    """All processes' per-case rows, each case once, in case-id order.

    A DistributedSampler pads the last batches with repeated cases so every process gets the
    same number; averaging those would weight some cases twice. Rows are therefore gathered as
    objects and deduplicated by ``case_id``.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    unique = {row["case_id"]: row for row in rows}
    return [unique[key] for key in sorted(unique)]


def mean_per_class(rows: list[dict], key: str, names: Sequence[str]) -> dict[str, float]:
    """NaN-ignoring mean of ``row[key]`` (one value per class) over cases, by class name."""
    if not rows:
        return {}
    values = torch.tensor([row[key] for row in rows], dtype=torch.float64)  # (cases, classes)
    means = values.nanmean(0)
    return {name: float(m) for name, m in zip(names, means, strict=True)}

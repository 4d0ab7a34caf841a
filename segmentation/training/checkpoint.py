"""Checkpoints that describe themselves: network, preprocessing, labels and patch shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segmentation.config import build_network
from segmentation.training.module import SegmentationModule


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The self-description a checkpoint carries (see SegmentationModule.on_save_checkpoint).

    Args:
        path: a checkpoint written by a SegmentationModule run.

    Returns:
        {"net": class_path/init_args, "preprocessing", "label_names", "patch_size",
        "output_patch_size", "slice_axis"}.

    Raises:
        ValueError: if the checkpoint has no network description (not written by a
            SegmentationModule, or by a network whose configuration was not recorded).
    """
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=False)
    meta = checkpoint.get("segmentation")
    if not meta or not meta.get("net"):
        raise ValueError(f"{path}: not a segmentation checkpoint (no network description)")
    return meta


def load_module(path: str | Path, map_location: str | torch.device = "cpu"
                ) -> SegmentationModule:
    """Rebuild a trained SegmentationModule from its checkpoint alone.

    Args:
        path: a checkpoint written by a SegmentationModule run.
        map_location: device for the weights.

    Returns:
        The module in eval mode, with ``preprocessing``, ``label_names`` and the patch size
        restored, ready for ``module.predictor()``.

    Raises:
        ValueError: if the checkpoint does not describe its network (see
            :func:`read_checkpoint_meta`).
    """
    meta = read_checkpoint_meta(path)
    net = build_network(meta["net"])
    module = SegmentationModule.load_from_checkpoint(str(path), net=net,
                                                     map_location=map_location,
                                                     weights_only=False)
    return module.eval()

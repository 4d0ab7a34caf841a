"""Checkpoints that describe themselves: network, preprocessing, labels and patch shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segmentation.config import build_network
from segmentation.training.module import SegmentationModule


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The self-description a checkpoint carries (see SegmentationModule.on_save_checkpoint)."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=False)
    meta = checkpoint.get("segmentation")
    if not meta or not meta.get("net"):
        raise ValueError(f"{path}: not a segmentation checkpoint (no network description)")
    return meta


def load_module(path: str | Path, map_location: str | torch.device = "cpu"
                ) -> SegmentationModule:
    """Rebuild a trained SegmentationModule from its checkpoint alone.

    Returns:
        The module in eval mode, with ``preprocessing``, ``label_names`` and the patch size
        restored, ready for ``module.predictor()``.
    """
    meta = read_checkpoint_meta(path)
    net = build_network(meta["net"])
    module = SegmentationModule.load_from_checkpoint(str(path), net=net,
                                                     map_location=map_location,
                                                     weights_only=False)
    return module.eval()

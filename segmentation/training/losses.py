"""Training loss: MONAI's Dice + cross-entropy, with deep supervision weighted by resolution."""

from __future__ import annotations

import math

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

from segmentation.nets.blocks import center_crop


def default_loss() -> nn.Module:
    """nnU-Net's loss: soft Dice over foreground classes (batch Dice) + cross-entropy."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                      smooth_nr=1e-5, smooth_dr=1e-5)


class SegmentationLoss(nn.Module):
    """A loss on logits, applied to every deep-supervision output with weights 1, 1/2, 1/4.

    MONAI's DeepSupervisionLoss resizes the label to each output (nearest) and weights the
    terms exponentially. A "valid" network's lower decoder levels see a larger region than its
    output, so each auxiliary output is first center-cropped to the region of the main output
    (``size / 2**level``), keeping every term aligned with its label.

    Args:
        loss: loss on (B, K, *S) logits and (B, 1, *S) integer labels.
    """

    def __init__(self, loss: nn.Module | None = None) -> None:
        super().__init__()
        self.loss = loss if loss is not None else default_loss()
        self.deep = DeepSupervisionLoss(self.loss, weight_mode="exp")

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], label: torch.Tensor
                ) -> torch.Tensor:
        """Loss of logits (or [main, aux_1, …] logits) against a (B, 1, *S) label."""
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, label)
        main_size = outputs[0].shape[2:]
        aligned = [outputs[0]]
        for level, aux in enumerate(outputs[1:], start=1):
            region = [min(max(1, math.ceil(s / 2 ** level)), a)
                      for s, a in zip(main_size, aux.shape[2:], strict=True)]
            region = [r + (a - r) % 2 for r, a in zip(region, aux.shape[2:], strict=True)]
            aligned.append(center_crop(aux, region))
        return self.deep(aligned, label.float())  # nearest resizing needs a float label

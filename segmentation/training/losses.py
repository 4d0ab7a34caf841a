"""Training loss: MONAI's Dice + cross-entropy, with nnU-Net's deep-supervision weighting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss
from torch import nn


def default_loss() -> nn.Module:
    """nnU-Net's loss: soft Dice over foreground classes (batch Dice) + cross-entropy."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                      smooth_nr=1e-5, smooth_dr=1e-5)


def deep_supervision_weights(outputs: int) -> list[float]:
    """nnU-Net's deep-supervision weights for ``outputs`` outputs (main included), finest first.

    Output ``l`` (``2**l`` times coarser than the main output) gets ``1 / 2**l``, the
    lowest-resolution output gets 0, and the weights are normalised to sum to 1; for 5 outputs:
    8/15, 4/15, 2/15, 1/15, 0. A single output gets weight 1.

    Raises:
        ValueError: if ``outputs`` is less than 1.
    """
    if outputs < 1:
        raise ValueError(f"outputs={outputs}; deep supervision needs at least the main output")
    weights = [0.5 ** level for level in range(outputs)]
    if outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def deep_supervision_pair(output: torch.Tensor, label: torch.Tensor, level: int,
                          strides: Sequence[int] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """An auxiliary output and the label on its grid, voxel for voxel.

    Voxel ``i`` of decoder level ``l`` stands for the ``2**l`` main-output voxels
    ``[b + i·2**l, b + (i + 1)·2**l)`` along each axis, where the level's grid of ``T·2**l``
    main-output voxels (``T`` auxiliary voxels) overhangs the ``S`` output voxels by
    ``⌊(T·2**l − S) / 2⌋`` before (``b`` is minus that) and the rest after. In "valid" mode a
    lower level sees more than the output and, every layer being symmetric about the centre,
    the overhang is the same on both sides; in "same" mode the grid covers the input padded
    to a multiple of ``2**depth``, ``⌊padding / 2⌋`` of it before. Only auxiliary voxels whose
    whole block lies inside the labelled output are kept, and each gets the label of voxel
    ``2**(l−1)`` of its block (the voxel ``nearest-exact`` resizing samples), so the target is
    an exact downsampling of the label rather than a label resized onto a misaligned region.

    Args:
        output: (B, K, *T) logits of decoder level ``level``.
        label: (B, 1, *S) integer label of the main output.
        level: decoder level, 1 for half resolution.
        strides: the level's factor per axis for networks that downsample axes differently
            (``UNet.level_strides[level]``, e.g. (1, 4, 4)); default ``2**level`` on every
            axis. The description above holds per axis with its own factor.

    Returns:
        The cropped output (B, K, *T') and its (B, 1, *T') label, of the label's dtype.

    Raises:
        ValueError: if ``level`` is not positive, the dimensions differ, or no whole block of
            this level fits inside the output along some axis (enlarge ``data.patch_size``).
    """
    if level < 1:
        raise ValueError(f"level={level}; auxiliary outputs start at level 1")
    if output.ndim != label.ndim:
        raise ValueError(f"output {tuple(output.shape)} and label {tuple(label.shape)} differ "
                         "in dimensions; pass (B, K, *T) logits and a (B, 1, *S) label")
    factors = tuple(strides) if strides is not None else (2 ** level,) * (label.ndim - 2)
    out_slices: list[slice] = [slice(None), slice(None)]
    label_slices: list[slice] = [slice(None), slice(None)]
    for axis, (size, aux, stride) in enumerate(zip(label.shape[2:], output.shape[2:], factors,
                                                   strict=True)):
        start = -((aux * stride - size) // 2)       # main-output index where the grid begins
        first = max(0, -(start // stride))          # first block with start + i·stride ≥ 0
        stop = min(aux, (size - start) // stride)   # blocks ending at or before ``size``
        if stop <= first:
            raise ValueError(f"deep supervision level {level}: an output of {size} voxels along "
                             f"axis {axis} holds no whole {stride}-voxel block of the level's "
                             f"grid; enlarge data.patch_size or turn deep_supervision off")
        out_slices.append(slice(first, stop))
        centre = start + stride // 2
        label_slices.append(slice(centre + first * stride, centre + (stop - 1) * stride + 1,
                                  stride))
    return output[tuple(out_slices)], label[tuple(label_slices)]


class SegmentationLoss(nn.Module):
    """A loss on logits, applied to every deep-supervision output with nnU-Net's weights.

    Weights come from :func:`deep_supervision_weights`; each auxiliary output is paired with an
    exact downsampling of the label on its own grid (:func:`deep_supervision_pair`), which holds
    for "valid" networks, whose lower levels see more than the output, and for patches that are
    not a multiple of ``2**depth``; MONAI's DeepSupervisionLoss resizes the whole label onto each
    output instead, which misaligns both. An output of weight 0 is not compared with the label
    but still gets a zero gradient (see :meth:`forward`). The wrapped loss always receives
    integer (long) labels.

    Args:
        loss: loss on (B, K, *S) logits and (B, 1, *S) integer labels.
        level_strides: per level, the factor per axis between the output grid and the level's
            (``UNet.level_strides``); None: ``2**level`` on every axis.
    """

    def __init__(self, loss: nn.Module | None = None,
                 level_strides: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        self.loss = loss if loss is not None else default_loss()
        self.level_strides = level_strides


    def forward(self, outputs: torch.Tensor | list[torch.Tensor], label: torch.Tensor
                ) -> torch.Tensor:
        """Weighted scalar loss of the main logits and any deep-supervision outputs.

        Args:
            outputs: (B, K, *S) logits, or with deep supervision ``[(B, K, *S), (B, K, *T_1),
                …, (B, K, *T_{d−1})]``: the main logits, then decoder level ``l`` = 1 … d − 1.
            label: (B, 1, *S) integer label of the main output.
        """
        label = label.long()
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, label)
        weights = deep_supervision_weights(len(outputs))
        loss = weights[0] * self.loss(outputs[0].float(), label)
        for level, (weight, output) in enumerate(zip(weights[1:], outputs[1:], strict=True),
                                                 start=1):
            if weight > 0:
                strides = self.level_strides[level] if self.level_strides else None
                output, target = deep_supervision_pair(output, label, level, strides)
                loss = loss + weight * self.loss(output.float(), target)
            else:
                # A zero gradient still reaches the output's head: DDP (without
                # find_unused_parameters) refuses a step in which a parameter took no part.
                # nan_to_num keeps an overflowing output from turning 0 × inf into NaN.
                loss = loss + 0.0 * output.float().mean().nan_to_num(0.0, 0.0, 0.0)
        return loss

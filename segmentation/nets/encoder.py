"""The contracting path: levels of convolution blocks, each below the top at half resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segmentation.nets import layers
from segmentation.nets.blocks import PlainBlock, ResidualStage
from segmentation.nets.spatial import InvalidSizeError


class Encoder(nn.Module):
    """U-Net encoder that returns the feature map of every level.

    Level 0 runs at full resolution; level ``l`` after ``l`` 2× downsamplings. The last level is
    the bottleneck. ``channels[l]`` is the width of level ``l``; the decoder reads it from here.

    Downsampling is either a 2×2 max-pool before the level ("maxpool", the original U-Net) or a
    stride of 2 in the level's first convolution or residual block ("conv", as nnU-Net and its
    residual encoders do; the block's shortcut then projects with a strided 1×1 convolution).
    A strided unpadded 3×3 convolution would shift the grid by half a voxel, so center crops could
    not align: "conv" requires "same" padding.

    Arguments as for :class:`~segmentation.nets.unet.UNet` (``block`` is its ``encoder_block``),
    with one ``convs_per_level`` and ``blocks_per_level`` entry per level; ``unit_kwargs``
    (kernel_size, padding, norm, act, dropout, bias) go to every convolution.
    """

    def __init__(self, spatial_dims: int, in_channels: int, features: Sequence[int], *,
                 block: str, convs_per_level: Sequence[int], blocks_per_level: Sequence[int],
                 downsample: str, **unit_kwargs: object) -> None:
        super().__init__()
        downsample = layers.check_choice("downsample", downsample, layers.DOWNSAMPLES)
        if downsample == "conv" and unit_kwargs.get("padding") == "valid":
            raise ValueError("downsample='conv' (strided convolutions) cannot keep the center "
                             "crops of padding='valid' aligned to the voxel; use "
                             "downsample='maxpool' with valid padding")
        self.channels = tuple(features)
        # Max-pooling has no parameters: one module serves every level.
        self.pool = layers.maxpool(spatial_dims) if downsample == "maxpool" else None
        self.levels = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(features):
            stride = 2 if level > 0 and self.pool is None else 1
            if block == "residual":
                stage: nn.Module = ResidualStage(spatial_dims, previous, width,
                                                 blocks_per_level[level], stem=level == 0,
                                                 stride=stride, **unit_kwargs)
            else:
                stage = PlainBlock(spatial_dims, previous, width, convs_per_level[level],
                                   stride=stride, **unit_kwargs)
            self.levels.append(stage)
            previous = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode (N, in_channels, *S) into one feature map per level, top first.

        ``[(N, C_0, *S_0), ..., (N, C_d, *S_d)]``: the last is the bottleneck, the others are
        the long-skip sources.
        """
        features = []
        for level, stage in enumerate(self.levels):
            if level > 0 and self.pool is not None:
                x = self.pool(x)   # (N, C_{l-1}, *S_{l-1} / 2)
            x = stage(x)           # (N, C_l, *S_l); strided first conv when downsample="conv"
            features.append(x)
        return features

    def output_sizes(self, n: int) -> list[int]:
        """Size of every level's feature map along one axis for an input of size ``n``.

        Every downsampling, pooled or strided, halves an even size; it is accounted here.

        Raises:
            InvalidSizeError: if a downsampling sees an odd size or a valid block shrinks the
                map to nothing.
        """
        sizes = []
        for level, stage in enumerate(self.levels):
            if level > 0:
                if n % 2:
                    raise InvalidSizeError(f"level {level} would downsample an odd size {n}")
                n //= 2
            n = stage.output_size(n)
            sizes.append(n)
        return sizes

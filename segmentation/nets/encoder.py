"""The contracting path: levels of convolution blocks, each below the top at a coarser grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segmentation.nets import axes, layers
from segmentation.nets.blocks import PlainBlock, ResidualStage
from segmentation.nets.spatial import InvalidSizeError


class Encoder(nn.Module):
    """U-Net encoder that returns the feature map of every level.

    Level 0 runs at full resolution; level ``l`` after ``l`` downsamplings, by ``strides[l − 1]``
    (2 or 1 per axis; by default 2 along every axis). The last level is the bottleneck.
    ``channels[l]`` is the width of level ``l``, ``kernel_sizes[l]`` its per-axis kernel and
    ``strides`` the per-axis factors; the decoder reads all three from here.

    Downsampling is either max-pooling (kernel = stride = the factor per axis) before the level
    ("maxpool", the original U-Net) or a stride of the factor in the level's first convolution
    or residual block ("conv", as nnU-Net and its residual encoders do; the block's shortcut
    then projects with a strided 1×1 convolution). A strided unpadded 3×3 convolution would
    shift the grid by half a voxel, so center crops could not align: "conv" requires "same"
    padding.

    Arguments as for :class:`~segmentation.nets.unet.UNet` (``block`` is its ``encoder_block``),
    with one ``convs_per_level`` and ``blocks_per_level`` entry per level; ``kernel_sizes`` and
    ``strides`` as for UNet (None: ``unit_kwargs["kernel_size"]``, default 3, everywhere, and 2
    along every axis); ``unit_kwargs`` (kernel_size, padding, norm, act, dropout, bias) go to
    every convolution.
    """

    def __init__(self, spatial_dims: int, in_channels: int, features: Sequence[int], *,
                 block: str, convs_per_level: Sequence[int], blocks_per_level: Sequence[int],
                 downsample: str, kernel_sizes: Sequence[int | Sequence[int]] | None = None,
                 strides: Sequence[int | Sequence[int]] | None = None,
                 **unit_kwargs: object) -> None:
        super().__init__()
        downsample = layers.check_choice("downsample", downsample, layers.DOWNSAMPLES)
        if downsample == "conv" and unit_kwargs.get("padding") == "valid":
            raise ValueError("downsample='conv' (strided convolutions) cannot keep the center "
                             "crops of padding='valid' aligned to the voxel; use "
                             "downsample='maxpool' with valid padding")
        kernel_size = unit_kwargs.pop("kernel_size", 3)
        self.spatial_dims = spatial_dims
        self.channels = tuple(features)
        self.kernel_sizes = axes.level_kernel_sizes(kernel_sizes, kernel_size,  # type: ignore[arg-type]
                                                    len(features), spatial_dims)
        self.strides = axes.level_strides(strides, len(features), spatial_dims)
        self.same_on_every_axis = axes.isotropic(self.kernel_sizes, self.strides)
        # Max-pooling has no parameters: one module serves every level when they all pool by
        # the same factor (always so for isotropic networks), else one module per level.
        self.pool: nn.Module | None = None
        self.pools: nn.ModuleList | None = None
        if downsample == "maxpool":
            if len(set(self.strides)) == 1:
                self.pool = layers.maxpool(spatial_dims, axes.compact(self.strides[0]))
            else:
                self.pools = nn.ModuleList(layers.maxpool(spatial_dims, axes.compact(factor))
                                           for factor in self.strides)
        self.levels = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(features):
            stride = (axes.compact(self.strides[level - 1])
                      if level > 0 and downsample == "conv" else 1)
            kwargs = {**unit_kwargs, "kernel_size": axes.compact(self.kernel_sizes[level])}
            if block == "residual":
                stage: nn.Module = ResidualStage(spatial_dims, previous, width,
                                                 blocks_per_level[level], stem=level == 0,
                                                 stride=stride, **kwargs)
            else:
                stage = PlainBlock(spatial_dims, previous, width, convs_per_level[level],
                                   stride=stride, **kwargs)
            self.levels.append(stage)
            previous = width

    def _pool(self, level: int) -> nn.Module | None:
        """The max-pooling before ``level`` (≥ 1), or None with strided convolutions."""
        if self.pools is not None:
            return self.pools[level - 1]
        return self.pool

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode (N, in_channels, *S) into one feature map per level, top first.

        ``[(N, C_0, *S_0), ..., (N, C_d, *S_d)]`` with ``S_l`` about ``S_{l-1} / strides[l-1]``
        per axis: the last is the bottleneck, the others are the long-skip sources.
        """
        features = []
        for level, stage in enumerate(self.levels):
            pool = self._pool(level) if level > 0 else None
            if pool is not None:
                x = pool(x)        # (N, C_{l-1}, *S_{l-1} / strides[l-1])
            x = stage(x)           # (N, C_l, *S_l); strided first conv when downsample="conv"
            features.append(x)
        return features

    def output_sizes(self, n: int, axis: int | None = None) -> list[int]:
        """Size of every level's feature map along ``axis`` for an input of size ``n``.

        Every downsampling, pooled or strided, divides a size by that axis' factor (2 or 1);
        it is accounted here. ``axis`` may be left out where every axis has the same kernels
        and strides.

        Raises:
            InvalidSizeError: if a downsampling by 2 sees an odd size or a valid block shrinks
                the map to nothing.
            ValueError: if ``axis`` is left out but the axes differ, or is out of range.
        """
        axis = axes.resolve_axis(axis, self.spatial_dims, self.same_on_every_axis)
        sizes = []
        for level, stage in enumerate(self.levels):
            if level > 0:
                factor = self.strides[level - 1][axis]
                if n % factor:
                    raise InvalidSizeError(f"level {level} would downsample an odd size {n} "
                                           f"(axis {axis})")
                n //= factor
            n = stage.output_size(n, axis)
            sizes.append(n)
        return sizes

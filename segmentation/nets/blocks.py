"""Convolution blocks of the U-Net.

Every block knows how it changes a spatial size (``output_size``), so the network's shape
arithmetic is derived from the blocks it is built of rather than from a formula kept apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segmentation.nets import axes, layers
from segmentation.nets.spatial import InvalidSizeError, center_crop


class ConvUnit(nn.Sequential):
    """conv → norm → activation (→ dropout): the post-activation unit of the plain U-Net.

    Shapes: (N, in_ch, *S) → (N, out_ch, *S') with S' = S / stride in "same" mode and
    S' = S − (kernel_size − 1) per axis in "valid" mode (where only stride 1 exists).
    ``output_size`` leaves the downsampling of a strided unit to the encoder, which accounts
    for every downsampling in one place.

    ``kernel_size`` is odd, an int for every axis or one per axis (``(1, 3, 3)`` convolves
    in-plane only); ``stride`` likewise; ``padding`` is "same" (zero padding of
    kernel_size // 2 per axis) or "valid" (none); ``norm`` and ``act`` are names (see
    :func:`layers.norm`, :func:`layers.act`); ``dropout`` is the probability after the
    activation (0: none).
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, *,
                 kernel_size: int | Sequence[int] = 3, padding: str = "same",
                 norm: str | None = "instance", act: str = "leakyrelu", dropout: float = 0.0,
                 bias: bool = True, stride: int | Sequence[int] = 1) -> None:
        kernel = axes.per_axis("kernel_size", kernel_size, spatial_dims)
        self.spatial_dims = spatial_dims
        self.shrink = tuple(0 if padding == "same" else k - 1 for k in kernel)  # per axis
        pad = axes.compact(tuple(k // 2 for k in kernel)) if padding == "same" else 0
        super().__init__(
            layers.conv(spatial_dims, in_ch, out_ch, axes.compact(kernel), stride=stride,
                        padding=pad, bias=bias),
            layers.norm(norm, spatial_dims, out_ch),
            layers.act(act),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )

    def output_size(self, n: int, axis: int | None = None) -> int:
        """Spatial size after this unit for an input of size ``n`` along ``axis``.

        ``axis`` may be left out where the kernel is the same along every axis.
        """
        axis = axes.resolve_axis(axis, self.spatial_dims, len(set(self.shrink)) == 1)
        out = n - self.shrink[axis]
        if out < 1:
            raise InvalidSizeError(f"size {n} shrinks to {out} in a valid convolution")
        return out


class PlainBlock(nn.Sequential):
    """``num_convs`` ConvUnits; the first maps ``in_ch`` to ``out_ch`` (with ``stride``).

    Shapes: (N, in_ch, *S) → (N, out_ch, *S') with S' = S − num_convs·(k − 1) per axis in
    "valid" mode. ``stride`` (int or one per axis) is the first unit's; ``unit_kwargs``
    (kernel_size, padding, norm, act, dropout, bias) go to every :class:`ConvUnit`.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, num_convs: int, *,
                 stride: int | Sequence[int] = 1, **unit_kwargs: object) -> None:
        if num_convs < 1:
            raise ValueError(f"a block needs at least one convolution, got {num_convs}")
        super().__init__(*[
            ConvUnit(spatial_dims, in_ch if i == 0 else out_ch, out_ch,
                     stride=stride if i == 0 else 1, **unit_kwargs)
            for i in range(num_convs)
        ])

    def output_size(self, n: int, axis: int | None = None) -> int:
        """Spatial size after this block for an input of size ``n`` along ``axis``.

        ``axis`` may be left out where the kernel is the same along every axis.
        """
        for unit in self:
            n = unit.output_size(n, axis)
        return n


class ResidualBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016, "Identity Mappings"), 2D or 3D.

    ``out = conv(act(norm(conv(act(norm(x)))))) + shortcut(x)``. The shortcut is the identity
    when channels and stride stay the same, and a 1×1 convolution (with the block's stride) +
    norm projection when either changes. In "valid" mode the shortcut is center-cropped to the
    branch's output, so the sum adds voxels from the same place.

    Shapes: (N, in_ch, *S) → (N, out_ch, *S') with S' = S / stride (same) or S − 2·(k − 1)
    per axis (valid, stride 1). As for ConvUnit, ``output_size`` leaves the downsampling to the
    encoder.

    Arguments as for :class:`ConvUnit` (``kernel_size`` and ``stride`` an int or one per
    axis), except that ``dropout`` acts before the second convolution and ``stride`` applies to
    the first convolution and the projection shortcut.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, *,
                 kernel_size: int | Sequence[int] = 3, padding: str = "same",
                 norm: str | None = "instance", act: str = "leakyrelu", dropout: float = 0.0,
                 bias: bool = True, stride: int | Sequence[int] = 1) -> None:
        super().__init__()
        kernel = axes.per_axis("kernel_size", kernel_size, spatial_dims)
        strides = axes.per_axis("stride", stride, spatial_dims)
        self.spatial_dims = spatial_dims
        pad = axes.compact(tuple(k // 2 for k in kernel)) if padding == "same" else 0
        self.shrink = tuple(0 if padding == "same" else 2 * (k - 1) for k in kernel)  # per axis
        self.branch = nn.Sequential(
            layers.norm(norm, spatial_dims, in_ch),
            layers.act(act),
            layers.conv(spatial_dims, in_ch, out_ch, axes.compact(kernel), stride=stride,
                        padding=pad, bias=bias),
            layers.norm(norm, spatial_dims, out_ch),
            layers.act(act),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            layers.conv(spatial_dims, out_ch, out_ch, axes.compact(kernel), padding=pad,
                        bias=bias),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_ch != out_ch or max(strides) != 1:
            self.shortcut = nn.Sequential(
                layers.conv(spatial_dims, in_ch, out_ch, 1, stride=stride, bias=bias),
                layers.norm(norm, spatial_dims, out_ch),
            )

    def output_size(self, n: int, axis: int | None = None) -> int:
        """Spatial size after this block for an input of size ``n`` along ``axis``.

        ``axis`` may be left out where the kernel is the same along every axis.
        """
        axis = axes.resolve_axis(axis, self.spatial_dims, len(set(self.shrink)) == 1)
        out = n - self.shrink[axis]
        if out < 1:
            raise InvalidSizeError(f"size {n} shrinks to {out} in a valid residual block")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_ch, *S) → (N, out_ch, *S')."""
        residual = self.branch(x)                                  # (N, out_ch, *S')
        identity = center_crop(self.shortcut(x), residual.shape[2:])  # (N, out_ch, *S')
        return residual + identity


class ResidualStage(nn.Sequential):
    """``num_blocks`` residual blocks, optionally after a plain stem convolution.

    The first encoder level starts with a ``stem`` (a :class:`ConvUnit` from ``in_ch`` to
    ``out_ch``), as pre-activation networks do, so the first residual block never normalises raw
    intensities. ``stride`` (int or one per axis) is the first residual block's;
    ``block_kwargs`` (kernel_size, padding, norm, act, dropout, bias) go to the stem and every
    block.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, num_blocks: int, *,
                 stem: bool = False, stride: int | Sequence[int] = 1,
                 **block_kwargs: object) -> None:
        if num_blocks < 1:
            raise ValueError(f"a residual stage needs at least one block, got {num_blocks}")
        modules: list[nn.Module] = []
        if stem:
            modules.append(ConvUnit(spatial_dims, in_ch, out_ch, **block_kwargs))
            in_ch = out_ch
        modules += [ResidualBlock(spatial_dims, in_ch if i == 0 else out_ch, out_ch,
                                  stride=stride if i == 0 else 1, **block_kwargs)
                    for i in range(num_blocks)]
        super().__init__(*modules)

    def output_size(self, n: int, axis: int | None = None) -> int:
        """Spatial size after this stage for an input of size ``n`` along ``axis``.

        ``axis`` may be left out where the kernel is the same along every axis.
        """
        for module in self:
            n = module.output_size(n, axis)
        return n

"""Convolution blocks of the U-Net.

Every block knows how it changes a spatial size (``output_size``), so the network's shape
arithmetic is derived from the blocks it is built of rather than from a formula kept apart.
"""

from __future__ import annotations

import torch
from torch import nn

from segmentation.nets import layers
from segmentation.nets.spatial import InvalidSizeError, center_crop


class ConvUnit(nn.Sequential):
    """conv → norm → activation (→ dropout): the post-activation unit of the plain U-Net.

    Shapes: (N, in_ch, *S) → (N, out_ch, *S') with S' = S / stride in "same" mode and
    S' = S − (kernel_size − 1) in "valid" mode (where only stride 1 exists).
    ``output_size`` leaves the halving of a strided unit to the encoder, which accounts for
    every downsampling in one place.

    Args:
        spatial_dims: 2 or 3.
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: odd kernel size.
        padding: "same" (zero padding of kernel_size // 2) or "valid" (none).
        norm: normalisation by name (see :func:`layers.norm`).
        act: activation by name (see :func:`layers.act`).
        dropout: dropout probability after the activation (0: none).
        bias: convolution bias.
        stride: convolution stride (2 downsamples, "same" mode only).
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, *, kernel_size: int = 3,
                 padding: str = "same", norm: str | None = "instance", act: str = "leakyrelu",
                 dropout: float = 0.0, bias: bool = True, stride: int = 1) -> None:
        self.shrink = 0 if padding == "same" else kernel_size - 1
        super().__init__(
            layers.conv(spatial_dims, in_ch, out_ch, kernel_size, stride=stride,
                        padding=kernel_size // 2 if padding == "same" else 0, bias=bias),
            layers.norm(norm, spatial_dims, out_ch),
            layers.act(act),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )

    def output_size(self, n: int) -> int:
        """Spatial size after this unit for an input of size ``n`` along one axis."""
        out = n - self.shrink
        if out < 1:
            raise InvalidSizeError(f"size {n} shrinks to {out} in a valid convolution")
        return out


class PlainBlock(nn.Sequential):
    """``num_convs`` ConvUnits; the first maps ``in_ch`` to ``out_ch`` (with ``stride``).

    Shapes: (N, in_ch, *S) → (N, out_ch, *S') with S' = S − num_convs·(k − 1) in "valid" mode.

    Args:
        spatial_dims: 2 or 3.
        in_ch: input channels.
        out_ch: output channels of every unit.
        num_convs: number of ConvUnits (≥ 1).
        stride: stride of the first unit.
        unit_kwargs: kernel_size, padding, norm, act, dropout, bias of every
            :class:`ConvUnit`.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, num_convs: int, *,
                 stride: int = 1, **unit_kwargs: object) -> None:
        if num_convs < 1:
            raise ValueError(f"a block needs at least one convolution, got {num_convs}")
        super().__init__(*[
            ConvUnit(spatial_dims, in_ch if i == 0 else out_ch, out_ch,
                     stride=stride if i == 0 else 1, **unit_kwargs)
            for i in range(num_convs)
        ])

    def output_size(self, n: int) -> int:
        """Spatial size after this block for an input of size ``n`` along one axis."""
        for unit in self:
            n = unit.output_size(n)
        return n


class ResidualBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016, "Identity Mappings"), 2D or 3D.

    ``out = conv(act(norm(conv(act(norm(x)))))) + shortcut(x)``. The shortcut is the identity
    when channels and stride stay the same, and a 1×1 convolution (with the block's stride) +
    norm projection when either changes. In "valid" mode the branch loses 2·(k − 1) voxels per
    axis and the shortcut is center-cropped to match, so the sum adds voxels from the same place.

    Shapes: (N, in_ch, *S) → (N, out_ch, *S') with S' = S / stride (same) or S − 2·(k − 1)
    (valid, stride 1). As for ConvUnit, ``output_size`` leaves the halving to the encoder.

    Args:
        spatial_dims, in_ch, out_ch, kernel_size, padding, norm, act, bias: as for
            :class:`ConvUnit`.
        dropout: dropout probability before the second convolution (0: none).
        stride: stride of the first convolution and of the projection shortcut.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, *, kernel_size: int = 3,
                 padding: str = "same", norm: str | None = "instance", act: str = "leakyrelu",
                 dropout: float = 0.0, bias: bool = True, stride: int = 1) -> None:
        super().__init__()
        pad = kernel_size // 2 if padding == "same" else 0
        self.shrink = 0 if padding == "same" else 2 * (kernel_size - 1)
        self.branch = nn.Sequential(
            layers.norm(norm, spatial_dims, in_ch),
            layers.act(act),
            layers.conv(spatial_dims, in_ch, out_ch, kernel_size, stride=stride, padding=pad,
                        bias=bias),
            layers.norm(norm, spatial_dims, out_ch),
            layers.act(act),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            layers.conv(spatial_dims, out_ch, out_ch, kernel_size, padding=pad, bias=bias),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_ch != out_ch or stride != 1:
            self.shortcut = nn.Sequential(
                layers.conv(spatial_dims, in_ch, out_ch, 1, stride=stride, bias=bias),
                layers.norm(norm, spatial_dims, out_ch),
            )

    def output_size(self, n: int) -> int:
        """Spatial size after this block for an input of size ``n`` along one axis."""
        out = n - self.shrink
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

    The first encoder level starts with a stem (a ConvUnit from the image channels), as
    pre-activation networks do, so the first residual block never normalises raw intensities.

    Args:
        spatial_dims: 2 or 3.
        in_ch: input channels.
        out_ch: output channels of every block.
        num_blocks: number of :class:`ResidualBlock` (≥ 1).
        stem: start with a plain :class:`ConvUnit` from ``in_ch`` to ``out_ch``.
        stride: stride of the first residual block.
        block_kwargs: kernel_size, padding, norm, act, dropout, bias of every block.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, num_blocks: int, *,
                 stem: bool = False, stride: int = 1, **block_kwargs: object) -> None:
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

    def output_size(self, n: int) -> int:
        """Spatial size after this stage for an input of size ``n`` along one axis."""
        for module in self:
            n = module.output_size(n)
        return n

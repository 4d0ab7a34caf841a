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

    ``kernel_size`` is odd; ``padding`` is "same" (zero padding of kernel_size // 2) or "valid"
    (none); ``norm`` and ``act`` are names (see :func:`layers.norm`, :func:`layers.act`);
    ``dropout`` is the probability after the activation (0: none).
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
    ``unit_kwargs`` (kernel_size, padding, norm, act, dropout, bias) go to every :class:`ConvUnit`.
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
    norm projection when either changes. In "valid" mode the shortcut is center-cropped to the
    branch's output, so the sum adds voxels from the same place.

    Shapes: (N, in_ch, *S) → (N, out_ch, *S') with S' = S / stride (same) or S − 2·(k − 1)
    (valid, stride 1). As for ConvUnit, ``output_size`` leaves the halving to the encoder.

    Arguments as for :class:`ConvUnit`, except that ``dropout`` acts before the second
    convolution and ``stride`` applies to the first convolution and the projection shortcut.
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

    The first encoder level starts with a ``stem`` (a :class:`ConvUnit` from ``in_ch`` to
    ``out_ch``), as pre-activation networks do, so the first residual block never normalises raw
    intensities. ``stride`` is the first residual block's; ``block_kwargs`` (kernel_size,
    padding, norm, act, dropout, bias) go to the stem and every block.
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

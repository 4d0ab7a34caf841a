"""The expanding path: upsampling, the long skip concatenation, convolution blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segmentation.nets import axes, layers
from segmentation.nets.blocks import PlainBlock
from segmentation.nets.encoder import Encoder
from segmentation.nets.spatial import InvalidSizeError, center_crop


class Decoder(nn.Module):
    """U-Net decoder whose channel counts, kernel sizes and factors are read from its encoder.

    At level ``l`` (bottom to top) it upsamples by the encoder's factor ``strides[l]`` (the one
    between encoder levels ``l`` and ``l + 1``, per axis) to ``D_l`` channels, concatenates the
    encoder's level-``l`` map (``C_l`` channels, center-cropped in "valid" mode) when
    ``long_skips[l]`` is on, and runs a plain block to ``D_l`` channels with the kernel of
    encoder level ``l`` (as nnU-Net). ``D_l`` is the encoder's ``C_l`` unless ``widths`` says
    otherwise. A level without its skip really has no skip input: its first convolution takes
    ``D_l`` channels instead of ``C_l + D_l``.

    ``long_skips`` has one flag per encoder level except the bottleneck, top first;
    ``convs_per_level`` is one count for every level; ``widths`` (one per decoder level, top
    first, or None) widens or narrows decoder levels, e.g. to give a network without skips the
    parameters of one with them; ``upsample`` and ``unit_kwargs`` are as for
    :class:`~segmentation.nets.unet.UNet` and :class:`Encoder` (a ``kernel_size`` among them is
    ignored: the encoder's kernels apply).
    """

    def __init__(self, encoder: Encoder, long_skips: Sequence[bool], *, convs_per_level: int,
                 upsample: str, spatial_dims: int, widths: Sequence[int] | None = None,
                 **unit_kwargs: object) -> None:
        super().__init__()
        unit_kwargs.pop("kernel_size", None)  # the encoder's per-level kernels apply
        self.spatial_dims = spatial_dims
        self.strides = encoder.strides
        self.kernel_sizes = encoder.kernel_sizes[:-1]
        self.same_on_every_axis = encoder.same_on_every_axis
        skip_channels = encoder.channels
        levels = len(skip_channels) - 1
        self.long_skips = tuple(bool(s) for s in long_skips)
        self.channels = tuple(skip_channels[:levels] if widths is None else widths)
        if len(self.channels) != levels or min(self.channels) < 1:
            raise ValueError(f"decoder_features needs {levels} widths ≥ 1 (one per decoder "
                             f"level, top first), got {list(self.channels)}")
        below = [*self.channels[1:], skip_channels[-1]]  # what reaches level l from below
        bias = bool(unit_kwargs.get("bias", True))
        # Index l of each list belongs to decoder level l (0 = top); the bottleneck has none.
        self.upsamples = nn.ModuleList(
            layers.upsample(upsample, spatial_dims, below[level], self.channels[level],
                            factor=axes.compact(self.strides[level]), bias=bias)
            for level in range(levels))
        self.blocks = nn.ModuleList(
            PlainBlock(spatial_dims,
                       self.channels[level] + (skip_channels[level] if self.long_skips[level]
                                               else 0),
                       self.channels[level], convs_per_level,
                       kernel_size=axes.compact(self.kernel_sizes[level]), **unit_kwargs)
            for level in range(levels))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decode the encoder's ``[(N, C_0, *S_0), ..., (N, C_d, *S_d)]``.

        Returns the output of every decoder level, top first: ``[(N, D_0, *T_0), ...,
        (N, D_{d-1}, *T_{d-1})]``; ``T_l = S_l`` in "same" mode, ``D_l = C_l`` by default.
        Below, ``f_l`` is ``strides[l]``, the per-axis factor between levels ``l`` and ``l + 1``.
        """
        x = features[-1]                                          # bottleneck (N, C_d, *S_d)
        outputs = []
        for level in reversed(range(len(self.blocks))):
            x = self.upsamples[level](x)                          # (N, D_l, *f_l·T_{l+1})
            if self.long_skips[level]:
                skip = center_crop(features[level], x.shape[2:])  # (N, C_l, *f_l·T_{l+1})
                x = torch.cat([skip, x], dim=1)                   # (N, C_l + D_l, *f_l·T_{l+1})
            x = self.blocks[level](x)                             # (N, D_l, *T_l)
            outputs.append(x)
        return outputs[::-1]

    def output_sizes(self, encoder_sizes: Sequence[int], axis: int | None = None) -> list[int]:
        """Size of every decoder level's output along ``axis``, top first.

        ``encoder_sizes`` is :meth:`Encoder.output_sizes` for the same input and axis. ``axis``
        may be left out where every axis has the same kernels and strides.

        Raises:
            InvalidSizeError: if a skip map cannot be center-cropped to the upsampled size.
            ValueError: if ``axis`` is left out but the axes differ, or is out of range.
        """
        axis = axes.resolve_axis(axis, self.spatial_dims, self.same_on_every_axis)
        n = encoder_sizes[-1]
        sizes = []
        for level in reversed(range(len(self.blocks))):
            n *= self.strides[level][axis]
            skip = encoder_sizes[level]
            if self.long_skips[level] and (skip < n or (skip - n) % 2):
                raise InvalidSizeError(
                    f"level {level} skip of size {skip} cannot be center-cropped to {n} "
                    f"(axis {axis})")
            n = self.blocks[level].output_size(n, axis)
            sizes.append(n)
        return sizes[::-1]

"""The expanding path: 2× upsampling, the long skip concatenation, convolution blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segmentation.nets import layers
from segmentation.nets.blocks import PlainBlock
from segmentation.nets.encoder import Encoder
from segmentation.nets.spatial import InvalidSizeError, center_crop


class Decoder(nn.Module):
    """U-Net decoder whose channel counts are read from its encoder.

    At level ``l`` (bottom to top) it upsamples to ``C_l`` channels, concatenates the encoder's
    level-``l`` map (center-cropped in "valid" mode) when ``long_skips[l]`` is on, and runs a
    plain block. A level without its skip really has no skip input: its first convolution takes
    ``C_l`` channels instead of ``2·C_l``.

    ``long_skips`` has one flag per encoder level except the bottleneck, top first;
    ``convs_per_level`` is one count for every level; ``upsample`` and ``unit_kwargs`` are as
    for :class:`~segmentation.nets.unet.UNet` and :class:`Encoder`.
    """

    def __init__(self, encoder: Encoder, long_skips: Sequence[bool], *, convs_per_level: int,
                 upsample: str, spatial_dims: int, **unit_kwargs: object) -> None:
        super().__init__()
        channels = encoder.channels
        self.long_skips = tuple(bool(s) for s in long_skips)
        bias = bool(unit_kwargs.get("bias", True))
        # Index l of each list belongs to decoder level l (0 = top); the bottleneck has none.
        self.upsamples = nn.ModuleList(
            layers.upsample(upsample, spatial_dims, channels[level + 1], channels[level],
                            bias=bias)
            for level in range(len(channels) - 1))
        self.blocks = nn.ModuleList(
            PlainBlock(spatial_dims, channels[level] * (2 if self.long_skips[level] else 1),
                       channels[level], convs_per_level, **unit_kwargs)
            for level in range(len(channels) - 1))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decode the encoder's ``[(N, C_0, *S_0), ..., (N, C_d, *S_d)]``.

        Returns the output of every decoder level, top first: ``[(N, C_0, *T_0), ...,
        (N, C_{d-1}, *T_{d-1})]``; ``T_l = S_l`` in "same" mode.
        """
        x = features[-1]                                          # bottleneck (N, C_d, *S_d)
        outputs = []
        for level in reversed(range(len(self.blocks))):
            x = self.upsamples[level](x)                          # (N, C_l, *2·T_{l+1})
            if self.long_skips[level]:
                skip = center_crop(features[level], x.shape[2:])  # (N, C_l, *2·T_{l+1})
                x = torch.cat([skip, x], dim=1)                   # (N, 2·C_l, *2·T_{l+1})
            x = self.blocks[level](x)                             # (N, C_l, *T_l)
            outputs.append(x)
        return outputs[::-1]

    def output_sizes(self, encoder_sizes: Sequence[int]) -> list[int]:
        """Size of every decoder level's output along one axis, top first.

        ``encoder_sizes`` is :meth:`Encoder.output_sizes` for the same input.

        Raises:
            InvalidSizeError: if a skip map cannot be center-cropped to the upsampled size.
        """
        n = encoder_sizes[-1]
        sizes = []
        for level in reversed(range(len(self.blocks))):
            n *= 2
            skip = encoder_sizes[level]
            if self.long_skips[level] and (skip < n or (skip - n) % 2):
                raise InvalidSizeError(
                    f"level {level} skip of size {skip} cannot be center-cropped to {n}")
            n = self.blocks[level].output_size(n)
            sizes.append(n)
        return sizes[::-1]

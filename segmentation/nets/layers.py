"""Layers chosen by name, one code path for 2D and 3D.

Configs name layers with plain strings ("instance", "leakyrelu", "maxpool"); this module turns
those names into modules for the right number of spatial dimensions. The dimension-specific
classes come from MONAI's layer factories, so there is exactly one place where "3D" becomes
``nn.Conv3d``.
"""

from __future__ import annotations

import math

from monai.networks.layers.factories import Act, Conv, Norm, Pool
from torch import nn

NORMS = ("instance", "batch", "group", "none")
ACTS = ("relu", "leakyrelu", "gelu")
DOWNSAMPLES = ("maxpool", "conv")
UPSAMPLES = ("transpose", "interpolate")
PADDINGS = ("same", "valid")
ENCODER_BLOCKS = ("plain", "residual")
LEAKY_SLOPE = 0.01


def check_choice(name: str, value: str | None, choices: tuple[str, ...]) -> str:
    """Return ``value`` lower-cased if it is one of ``choices``.

    Raises:
        ValueError: naming the argument, the bad value and the accepted ones.
    """
    normalised = "none" if value is None else str(value).lower()
    if normalised not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(choices)}")
    return normalised


def conv(spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int, *, padding: int = 0,
         stride: int = 1, bias: bool = True) -> nn.Module:
    """A ``spatial_dims``-D convolution, (N, in_ch, *S) → (N, out_ch, *S').

    ``kernel_size``, ``stride`` and ``padding`` (zeros, on each side) apply along every axis.
    """
    conv_type = Conv[Conv.CONV, spatial_dims]
    return conv_type(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias)


def transposed_conv(spatial_dims: int, in_ch: int, out_ch: int, *, bias: bool = True) -> nn.Module:
    """A 2× up-convolution (kernel 2, stride 2) as in the original U-Net.

    Shapes: (N, in_ch, *S) → (N, out_ch, *2S).
    """
    conv_type = Conv[Conv.CONVTRANS, spatial_dims]
    return conv_type(in_ch, out_ch, kernel_size=2, stride=2, bias=bias)


def norm(name: str | None, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation layer by name; ``"none"``/``None`` gives an identity.

    ``name`` is "instance", "batch", "group" or "none" (any case), for an (N, channels, *S)
    input. Group norm uses up to 8 groups, the largest count that divides ``channels``.

    Raises:
        ValueError: for another name, listing the accepted ones.
    """
    name = check_choice("norm", name, NORMS)
    if name == "none":
        return nn.Identity()
    if name == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels, affine=True)
    if name == "instance":
        return Norm[Norm.INSTANCE, spatial_dims](channels, affine=True)
    return Norm[Norm.BATCH, spatial_dims](channels)


def act(name: str) -> nn.Module:
    """Activation by name: "relu", "leakyrelu" (slope ``LEAKY_SLOPE``) or "gelu" (any case).

    Raises:
        ValueError: for another name, listing the accepted ones.
    """
    name = check_choice("act", name, ACTS)
    if name == "leakyrelu":
        return Act[Act.LEAKYRELU](negative_slope=LEAKY_SLOPE, inplace=True)
    if name == "gelu":
        return Act[Act.GELU]()
    return Act[Act.RELU](inplace=True)


def maxpool(spatial_dims: int) -> nn.Module:
    """2× max-pooling over disjoint 2×2(×2) windows."""
    return Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)


def upsample(name: str, spatial_dims: int, in_ch: int, out_ch: int, *, bias: bool = True
             ) -> nn.Module:
    """2× upsampling that also maps ``in_ch`` to ``out_ch`` channels.

    ``"transpose"`` is the 2×2 up-convolution; ``"interpolate"`` is nearest-neighbour resizing
    followed by a 1×1 convolution. Nearest (not linear) interpolation keeps every output voxel a
    function of one input voxel, so tiled inference stays identical to a whole-image pass.

    Shapes: (N, in_ch, *S) → (N, out_ch, *2S). ``name`` is matched in any case.

    Raises:
        ValueError: for another name, listing the accepted ones.
    """
    name = check_choice("upsample", name, UPSAMPLES)
    if name == "transpose":
        return transposed_conv(spatial_dims, in_ch, out_ch, bias=bias)
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        conv(spatial_dims, in_ch, out_ch, 1, bias=bias),
    )

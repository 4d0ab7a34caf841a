"""Layers chosen by name, one code path for 2D and 3D.

Configs name layers with plain strings ("instance", "leakyrelu", "maxpool"); this module turns
those names into modules for the right number of spatial dimensions. The dimension-specific
classes come from MONAI's layer factories, so there is exactly one place where "3D" becomes
``nn.Conv3d``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def conv(spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int | Sequence[int], *,
         padding: int | Sequence[int] = 0, stride: int | Sequence[int] = 1,
         bias: bool = True) -> nn.Module:
    """A ``spatial_dims``-D convolution, (N, in_ch, *S) → (N, out_ch, *S').

    ``kernel_size``, ``stride`` and ``padding`` (zeros, on each side) are an int for every axis
    or one value per axis, first axis first (e.g. kernel ``(1, 3, 3)``: in-plane only).
    """
    conv_type = Conv[Conv.CONV, spatial_dims]
    return conv_type(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias)


def transposed_conv(spatial_dims: int, in_ch: int, out_ch: int, *,
                    factor: int | Sequence[int] = 2, bias: bool = True) -> nn.Module:
    """An up-convolution with kernel = stride = ``factor`` (2: the original U-Net's 2×2).

    ``factor`` is an int for every axis or one per axis (1 keeps an axis). Shapes:
    (N, in_ch, *S) → (N, out_ch, *(S · factor)).
    """
    conv_type = Conv[Conv.CONVTRANS, spatial_dims]
    return conv_type(in_ch, out_ch, kernel_size=factor, stride=factor, bias=bias)


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


def maxpool(spatial_dims: int, factor: int | Sequence[int] = 2) -> nn.Module:
    """Max-pooling over disjoint windows of ``factor`` voxels per axis (kernel = stride).

    ``factor`` is an int for every axis (2: the U-Net's 2×2(×2) pooling) or one per axis, e.g.
    ``(1, 2, 2)`` halves a volume in-plane only. Shapes: (N, C, *S) → (N, C, *(S / factor)).
    """
    return Pool[Pool.MAX, spatial_dims](kernel_size=factor, stride=factor)


def upsample(name: str, spatial_dims: int, in_ch: int, out_ch: int, *,
             factor: int | Sequence[int] = 2, bias: bool = True) -> nn.Module:
    """Upsampling by ``factor`` (int or one per axis) that also maps ``in_ch`` to ``out_ch``.

    ``"transpose"`` is the up-convolution with kernel = stride = factor (2×2 by default);
    ``"interpolate"`` is nearest-neighbour resizing by the factor followed by a 1×1
    convolution. Nearest (not linear) interpolation keeps every output voxel a function of one
    input voxel, so tiled inference stays identical to a whole-image pass.

    Shapes: (N, in_ch, *S) → (N, out_ch, *(S · factor)). ``name`` is matched in any case.

    Raises:
        ValueError: for another name, listing the accepted ones.
    """
    name = check_choice("upsample", name, UPSAMPLES)
    if name == "transpose":
        return transposed_conv(spatial_dims, in_ch, out_ch, factor=factor, bias=bias)
    scale = factor if isinstance(factor, int) else tuple(float(f) for f in factor)
    return nn.Sequential(
        nn.Upsample(scale_factor=scale, mode="nearest"),
        conv(spatial_dims, in_ch, out_ch, 1, bias=bias),
    )

"""Per-axis network arguments: kernel sizes and downsampling factors that differ between axes.

nnU-Net plans anisotropic networks for scans whose slices are much thicker than their in-plane
spacing (prostate MRI: 3–4 mm slices, 0.6 mm pixels): the upper levels convolve in-plane only
(kernel ``[1, 3, 3]``) and downsample in-plane only (factor ``[1, 2, 2]``) until the voxels are
about isotropic. This module checks and expands those arguments; the layers take the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

PerAxis = tuple[int, ...]
"""One int per spatial axis, first axis first (D, H, W in 3D; H, W in 2D)."""

FACTORS = (1, 2)
"""The downsampling factors a level may use along an axis."""


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


def per_axis(name: str, value: int | Sequence[int], spatial_dims: int) -> PerAxis:
    """Expand an int to one value per spatial axis, or check a sequence has one per axis.

    Raises:
        ValueError: naming ``name`` if a sequence has the wrong length or holds a non-int.
    """
    if isinstance(value, Integral) and not isinstance(value, bool):
        return (int(value),) * spatial_dims
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be an int or a list of {spatial_dims} ints (one per "
                         f"spatial axis), got {value!r}")
    values = tuple(_integer(name, v) for v in value)
    if len(values) != spatial_dims:
        raise ValueError(f"{name} = {list(values)} has {len(values)} entries but the network is "
                         f"{spatial_dims}D; give one value per spatial axis ({spatial_dims} "
                         "entries) or a single int for all of them")
    return values


def _per_level(name: str, value: object, count: int, what: str) -> list[object]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list with {what}, got {value!r}")
    if len(value) != count:
        raise ValueError(f"{name} has {len(value)} entries but the network needs {count}: "
                         f"{what}")
    return list(value)


def level_kernel_sizes(kernel_sizes: Sequence[int | Sequence[int]] | None, kernel_size: int,
                       levels: int, spatial_dims: int) -> tuple[PerAxis, ...]:
    """One per-axis kernel size per level, top first.

    Args:
        kernel_sizes: one entry per level (odd int, or a list of one odd int per axis); None
            uses ``kernel_size`` everywhere.
        kernel_size: the kernel size of every level and axis when ``kernel_sizes`` is None.
        levels: number of levels (``len(features)``).
        spatial_dims: 2 or 3.

    Raises:
        ValueError: for a list of the wrong length or an even or non-positive kernel size.
    """
    if kernel_sizes is None:
        entries: list[object] = [kernel_size] * levels
    else:
        entries = _per_level("kernel_sizes", kernel_sizes, levels,
                             f"one kernel size per level ({levels} = len(features)), top first")
    result = []
    for level, entry in enumerate(entries):
        name = "kernel_size" if kernel_sizes is None else f"kernel_sizes[{level}]"
        sizes = per_axis(name, entry, spatial_dims)  # type: ignore[arg-type]
        if any(k < 1 or k % 2 == 0 for k in sizes):
            raise ValueError(f"{name} = {entry!r}: kernel sizes must be odd (1, 3, 5, …) so a "
                             "voxel stays centred; make every entry odd, e.g. 1 for an axis "
                             "that is not convolved or 3")
        result.append(sizes)
    return tuple(result)


def level_strides(strides: Sequence[int | Sequence[int]] | None, levels: int,
                  spatial_dims: int) -> tuple[PerAxis, ...]:
    """One per-axis downsampling factor per downsampling (level i → i + 1), top first.

    Args:
        strides: ``levels − 1`` entries (1 or 2, or a list of 1s and 2s, one per axis); None
            downsamples by 2 along every axis.
        levels: number of levels (``len(features)``).
        spatial_dims: 2 or 3.

    Raises:
        ValueError: for a list of the wrong length or a factor other than 1 or 2.
    """
    if strides is None:
        return ((2,) * spatial_dims,) * (levels - 1)
    entries = _per_level("strides", strides, levels - 1,
                         f"one downsampling factor per level below the top ({levels - 1} = "
                         "len(features) − 1), top first: entry i is the factor between level i "
                         "and level i + 1")
    result = []
    for level, entry in enumerate(entries):
        factors = per_axis(f"strides[{level}]", entry, spatial_dims)  # type: ignore[arg-type]
        if any(f not in FACTORS for f in factors):
            raise ValueError(f"strides[{level}] = {entry!r}: a downsampling factor must be 1 "
                             "(keep the axis) or 2 (halve it) along every axis; use only 1s "
                             "and 2s")
        result.append(factors)
    return tuple(result)


def compact(values: PerAxis) -> int | PerAxis:
    """The single value of an isotropic per-axis tuple, else the tuple itself.

    Layers built with it keep their pre-anisotropy form (``MaxPool3d(kernel_size=2)``).
    """
    return values[0] if len(set(values)) == 1 else tuple(values)


def isotropic(*per_axis_lists: Sequence[PerAxis]) -> bool:
    """Whether every per-axis tuple in the given lists has the same value along every axis."""
    return all(len(set(values)) <= 1 for group in per_axis_lists for values in group)


def resolve_axis(axis: int | None, spatial_dims: int, same_on_every_axis: bool) -> int:
    """The axis (0 … spatial_dims − 1) a per-axis size computation is for.

    ``None`` is allowed where every axis behaves the same (and means axis 0).

    Raises:
        ValueError: for ``None`` on a network whose axes differ, or an axis out of range.
    """
    if axis is None:
        if not same_on_every_axis:
            raise ValueError("this network's kernel sizes or strides differ between axes; "
                             f"pass axis=0 … {spatial_dims - 1} to say which axis the size is "
                             "along")
        return 0
    if not -spatial_dims <= axis < spatial_dims:
        raise ValueError(f"axis {axis} is out of range for a {spatial_dims}D network")
    return axis % spatial_dims

"""Network topology for a patch: where to downsample, which kernels (nnU-Net v2's rules).

This is nnU-Net v2's ``get_pool_and_conv_props`` (``experiment_planning/experiment_planners/
network_topology.py``), restated. Starting from the patch and its voxel spacing, one level is
added per step:

* an axis may be downsampled (factor 2) while its feature map stays ≥ 2 × 4 voxels (the
  bottleneck's edge is at least 4) and its current spacing is less than twice the finest
  current spacing (so thick slices are not pooled until the in-plane axes have caught up);
* when only one axis could still be downsampled, it is only if its map is ≥ 3 × 4 voxels;
* an axis gets kernel 3 once its spacing is less than twice the finest (kernel 1 before: a
  3-voxel kernel across 3.6 mm slices would mix distant tissue), and keeps it;
* the bottleneck always gets kernel 3 on every axis.

The patch is then rounded up per axis to a multiple of the product of that axis' factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_FEATURE_MAP_EDGE = 4
"""The smallest edge a feature map may reach (nnU-Net's ``UNet_featuremap_min_edge_length``)."""


@dataclass(frozen=True)
class Topology:
    """A network's shape arithmetic for one patch, axes in the order they were given.

    Attributes:
        strides: one per-axis factor per downsampling, top first (``len(kernel_sizes) − 1``
            entries; nnU-Net's ``pool_op_kernel_sizes`` without its leading ``[1, 1, 1]``).
        kernel_sizes: one per-axis kernel size per level, top first.
        patch_size: the patch rounded up to a multiple of :attr:`divisor` per axis.
        divisor: per axis, the product of its factors (what the patch must be divisible by).
    """

    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    divisor: tuple[int, ...]

    @property
    def levels(self) -> int:
        """Number of levels (resolution stages), the bottleneck included."""
        return len(self.kernel_sizes)


def topology(spacing: Sequence[float], patch_size: Sequence[float],
             min_edge: int = MIN_FEATURE_MAP_EDGE) -> Topology:
    """Downsampling factors and kernels for a patch of ``patch_size`` voxels at ``spacing``.

    See the module docstring for the rules. ``patch_size`` may hold non-integers (a median
    shape), as nnU-Net allows; the returned patch is whole.
    """
    dims = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(n) for n in patch_size]
    strides: list[tuple[int, ...]] = []
    kernel_sizes: list[tuple[int, ...]] = []
    pools_per_axis = [0] * dims
    kernel = [1] * dims
    while True:
        valid = [i for i in range(dims) if current_size[i] >= 2 * min_edge]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        for axis in range(dims):
            if kernel[axis] != 3 and current_spacing[axis] / min(current_spacing) < 2:
                kernel[axis] = 3
        factors = [1] * dims
        for axis in valid:
            factors[axis] = 2
            pools_per_axis[axis] += 1
            current_spacing[axis] *= 2
            current_size[axis] = float(np.ceil(current_size[axis] / 2))
        strides.append(tuple(factors))
        kernel_sizes.append(tuple(kernel))
    kernel_sizes.append((3,) * dims)
    divisor = tuple(2 ** n for n in pools_per_axis)
    return Topology(strides=tuple(strides), kernel_sizes=tuple(kernel_sizes),
                    patch_size=_nnunet_pad(patch_size, divisor), divisor=divisor)


def _nnunet_pad(shape: Sequence[float], divisor: Sequence[int]) -> tuple[int, ...]:
    """nnU-Net's ``pad_shape``, exactly.

    ``n + d − n mod d``, minus ``d`` where ``d`` divides ``n``, truncated to int (so 20.5 with
    divisor 4 gives 24 and 20.0 stays 20).
    """
    out = []
    for n, d in zip(shape, divisor, strict=True):
        padded = n + d - n % d
        if n % d == 0:
            padded -= d
        out.append(int(padded))
    return tuple(out)

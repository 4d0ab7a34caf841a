"""Overlap-tile prediction for "valid"-padding networks (Ronneberger et al. 2015, Fig. 2).

MONAI's and nnU-Net's sliding windows assume the output of a window has the window's size; a
valid-convolution U-Net predicts only the centre of what it reads. So this is ours: mirror-pad
the scan by the network's margin, tile the *output* grid with tiles of the network's output
size, read input tiles of its input size, and place every output tile exactly. Tile offsets are
multiples of the network's total stride along each axis (2**depth for an isotropic U-Net; the
product of that axis' downsampling factors for an anisotropic one), where the network is
translation-equivariant, so the stitched result equals one whole-scan forward pass (up to float
rounding).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from segmentation.inference.batches import box, run_regions
from segmentation.nets.spatial import pad_spatial

# Layers whose output at a voxel depends on the whole input they are given (statistics over the
# tile), so predictions depend on where the tiles fall: with them, the tile stays as trained.
TILE_DEPENDENT_LAYERS = (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
                         nn.LocalResponseNorm)


def mirror_pad(x: torch.Tensor, pads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Reflect-pad the spatial axes of ``x`` (N, C, *S), however large the padding.

    ``pads`` are (before, after) per spatial axis and may exceed S (the reflection repeats).
    """
    for axis, (before, after) in enumerate(pads):
        dim = 2 + axis
        while before > 0 or after > 0:
            size = x.shape[dim]
            if size == 1:  # nothing to reflect: repeat the single voxel
                x = torch.cat([x.narrow(dim, 0, 1)] * before + [x] +
                              [x.narrow(dim, 0, 1)] * after, dim=dim)
                break
            b, a = min(before, size - 1), min(after, size - 1)
            this_axis = [(0, 0)] * (x.ndim - 2)
            this_axis[axis] = (b, a)
            x = pad_spatial(x, this_axis, mode="reflect")  # reflects at most size − 1 voxels
            before, after = before - b, after - a
    return x


def tile_step(output_size: int, depth: int | None = None, *, grid: int | None = None) -> int:
    """Offset between neighbouring output tiles along one axis.

    ``grid`` is the network's total stride along the axis (see :func:`network_strides`);
    ``depth`` gives the isotropic U-Net's ``2**depth`` instead. The step is the largest
    multiple of the grid that fits in the output tile (tiles then overlap by the rest, and
    overlapping predictions are identical). Output tiles smaller than the grid cannot be placed
    on it without gaps; they step by their own size and the result is exact only up to that
    shift.
    """
    grid = _grid(depth, grid)
    return output_size // grid * grid if output_size >= grid else output_size


def _grid(depth: int | None, grid: int | None) -> int:
    if grid is not None:
        return int(grid)
    if depth is None:
        raise ValueError("give the network's total stride along the axis (grid=...) or its "
                         "depth (for 2**depth)")
    return 2 ** int(depth)


def network_strides(net: nn.Module, spatial_dims: int) -> tuple[int, ...]:
    """Per-axis total stride of a network: what overlap-tile offsets are multiples of.

    ``net.total_strides`` where the network has it (:class:`~segmentation.nets.unet.UNet`),
    else ``2**net.depth`` along every axis (a network that halves every axis ``depth`` times).
    """
    strides = getattr(net, "total_strides", None)
    if strides is not None:
        strides = tuple(int(s) for s in strides)
        if len(strides) != spatial_dims:
            raise ValueError(f"the network has total strides {strides} but the tiles have "
                             f"{spatial_dims} axes")
        return strides
    return (2 ** int(net.depth),) * spatial_dims


def _next_valid_size(net: nn.Module, n: int, axis: int) -> int | None:
    """The smallest valid input size ≥ ``n`` along ``axis`` (None: none found)."""
    if hasattr(net, "total_strides"):  # our UNet: valid sizes may differ between axes
        return net.nearest_valid_sizes(n, axis=axis)[1]
    return net.nearest_valid_sizes(n)[1]


def tile_independent(net: nn.Module) -> bool:
    """Whether every output voxel depends only on its receptive field, not on the tile.

    True for convolutions, pooling, activations, dropout in eval mode and batch norm with
    running statistics in eval mode; False with instance, group or layer norm, or batch norm
    that normalises with the batch's own statistics.
    """
    for module in net.modules():
        if isinstance(module, TILE_DEPENDENT_LAYERS):
            return False
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.training or module.running_mean is None):
            return False
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training:
            return False
    return True


def inference_tile(net: nn.Module, patch_size: Sequence[int], scan_shape: Sequence[int],
                   max_scale: float = 4.0, *, in_use: Sequence[tuple[int, ...]] = (),
                   reuse_within: float = 0.1) -> tuple[int, ...]:
    """The input tile for overlap-tile prediction of one scan: the cheapest that is allowed.

    A valid network spends much of each pass on the margin it crops away (Çiçek et al.'s
    132×132×116 → 44×44×28 keeps under 3 % of what it reads), so larger tiles waste less.
    Among the valid tiles at least the training patch on every axis and at most ``max_scale``
    times its voxels (activation memory grows with the tile), this returns the one that reads
    the fewest voxels over the whole scan (ties: the smaller tile). The voxels read are a
    product over axes (tiles per axis × tile length), so each axis contributes its own list of
    sizes and the search is over their combinations. Only for :func:`tile_independent`
    networks, where any tile gives the same logits; others keep the training patch.

    Every new tile shape costs a cuDNN autotuning (and with ``torch.compile`` a compilation),
    so a tile already ``in_use`` for earlier scans (valid, within the same ``max_scale``) is
    kept when it reads at most ``reuse_within`` (a fraction) more voxels than this scan's
    cheapest tile. ``net`` needs ``output_shape``, ``nearest_valid_sizes`` (with an ``axis``
    argument where it has ``total_strides``) and ``depth`` or ``total_strides``;
    ``patch_size`` must be a valid tile.
    """
    patch = tuple(int(p) for p in patch_size)
    if max_scale <= 1 or not tile_independent(net):
        return patch
    budget = max_scale * math.prod(patch)
    options = [_axis_options(net, patch, axis, int(scan), budget / math.prod(patch) * p)
               for axis, (p, scan) in enumerate(zip(patch, scan_shape, strict=True))]
    best: tuple[tuple[int, int], tuple[int, ...]] | None = None
    for choice in itertools.product(*options):  # (size, voxels read along the axis) per axis
        tile = tuple(size for size, _ in choice)
        voxels = math.prod(tile)
        if voxels > budget:
            continue
        key = (math.prod(read for _, read in choice), voxels)
        if best is None or key < best[0]:
            best = (key, tile)
    assert best is not None  # the patch itself is always a choice
    (cheapest, _), tile = best
    reusable = sorted((voxels_read(net, used, scan_shape), math.prod(used), used)
                      for used in in_use)
    if reusable and reusable[0][0] <= (1 + reuse_within) * cheapest:
        return reusable[0][2]
    return tile


def voxels_read(net: nn.Module, tile: Sequence[int], scan_shape: Sequence[int]) -> int:
    """Input voxels overlap-tile reads to cover a scan with ``tile``-sized input tiles."""
    counts = _tile_counts(scan_shape, net.output_shape(tile), network_strides(net, len(tile)))
    return math.prod(count * size for count, size in zip(counts, tile, strict=True))


def _axis_options(net: nn.Module, patch: tuple[int, ...], axis: int, scan: int,
                  largest: float) -> list[tuple[int, int]]:
    """Valid input sizes along one axis, each with the voxels read along it (tiles × size).

    From the patch's size up to ``largest``, or to the first size whose output covers the scan.
    """
    options, size = [], patch[axis]
    grid = network_strides(net, len(patch))[axis]
    while size is not None and size <= largest:
        shape = patch[:axis] + (size,) + patch[axis + 1:]
        output = net.output_shape(shape)[axis]
        count = _tile_counts([scan], [output], [grid])[0]
        options.append((size, count * size))
        if output >= scan:
            break
        size = _next_valid_size(net, size + 1, axis)
    return options


def _tile_counts(spatial: Sequence[int], output_size: Sequence[int], grids: Sequence[int]
                 ) -> list[int]:
    """Output tiles per axis that cover ``spatial`` at :func:`tile_step` offsets."""
    return [max(math.ceil((s - o) / tile_step(o, grid=g)), 0) + 1
            for s, o, g in zip(spatial, output_size, grids, strict=True)]


def overlap_tile(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    input_size: Sequence[int],
    output_size: Sequence[int],
    depth: int | None = None,
    *,
    total_strides: Sequence[int] | None = None,
    batch_size: int = 1,
    out_device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    fixed_batch: bool = False,
) -> torch.Tensor:
    """(N, K, *S) logits for a whole scan from a network that shrinks its input.

    ``net`` maps (B, C, *input_size) to (B, K, *output_size), ``input_size`` being a valid tile;
    ``image`` is (N, C, *S), any S (smaller than one tile too). Tile offsets are multiples of
    ``total_strides``, the network's per-axis total stride (``UNet.total_strides``, see
    :func:`network_strides`); without it, of ``2**depth`` along every axis, ``depth`` being
    the number of 2× downsamplings of an isotropic network. The other arguments are as for
    :func:`~segmentation.inference.sliding_window.sliding_window`, counting tiles for windows.

    Raises:
        ValueError: if neither ``depth`` nor ``total_strides`` is given, or ``total_strides``
            has another number of axes than the tiles.
    """
    spatial = tuple(image.shape[2:])
    if total_strides is None:
        grids = [_grid(depth, None)] * len(output_size)
    else:
        grids = [int(g) for g in total_strides]
        if len(grids) != len(output_size):
            raise ValueError(f"total_strides {tuple(grids)} has {len(grids)} axes but the "
                             f"tiles have {len(output_size)}")
    margins = [(i - o) // 2 for i, o in zip(input_size, output_size, strict=True)]
    steps = [tile_step(o, grid=g) for o, g in zip(output_size, grids, strict=True)]
    counts = _tile_counts(spatial, output_size, grids)
    covered = [st * (n - 1) + o for st, n, o in zip(steps, counts, output_size, strict=True)]
    padded = mirror_pad(image, [(m, m + c - s) for m, c, s in zip(margins, covered, spatial,
                                                                   strict=True)])
    offsets = list(itertools.product(*[[k * st for k in range(n)]
                                       for st, n in zip(steps, counts, strict=True)]))
    out: torch.Tensor | None = None
    out_device = image.device if out_device is None else torch.device(out_device)
    # an input tile at ``offset`` of the padded scan predicts the output tile at ``offset``
    for n, offset, tile in run_regions(net, padded, offsets, input_size, batch_size, progress,
                                         fixed_batch=fixed_batch):
        if out is None:                                           # tile: (K, *output_size)
            out = torch.empty((image.shape[0], tile.shape[0], *covered),
                              dtype=torch.promote_types(tile.dtype, torch.float32),
                              device=out_device)
        out[(n, slice(None), *box(offset, output_size))] = tile.to(out_device)
    assert out is not None
    return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]

"""Overlap-tile prediction equals one whole-scan pass; inference tiles larger than the patch."""

from __future__ import annotations

import math

import pytest
import torch

from segmentation import UNet
from segmentation.inference.predictor import Predictor
from segmentation.inference.tiling import (
    inference_tile,
    mirror_pad,
    network_strides,
    overlap_tile,
    tile_step,
    voxels_read,
)


def whole_pass(net: UNet, image: torch.Tensor, input_size, output_size) -> torch.Tensor:
    """The reference: one forward pass over the mirror-padded scan, cropped to the scan."""
    spatial = image.shape[2:]
    pads = []
    grids = network_strides(net, len(spatial))
    for n, i, o, grid in zip(spatial, input_size, output_size, grids, strict=True):
        step = tile_step(o, grid=grid)
        covered = step * max(math.ceil((n - o) / step), 0) + o
        pads.append(((i - o) // 2, (i - o) // 2 + covered - n))
    padded = mirror_pad(image, pads)
    out = net(padded)
    return out[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]


@pytest.mark.parametrize(("dims", "scan"), [
    (2, (70, 53)),      # several tiles, uneven remainder
    (2, (9, 5)),        # smaller than one tile
    (2, (40, 120)),     # one tile along one axis, many along the other
    (3, (30, 17, 25)),
    (3, (6, 7, 5)),     # smaller than one tile
])
def test_overlap_tile_equals_whole_scan_pass(dims, scan):
    torch.manual_seed(0)
    net = UNet(spatial_dims=dims, in_channels=2, out_channels=3, features=(4, 8, 16),
               padding="valid", norm="batch").eval()
    tile = net.valid_input_shape((44,) * dims if dims == 2 else (36,) * dims)
    out_tile = net.output_shape(tile)
    image = torch.randn(2, 2, *scan)
    with torch.no_grad():
        tiled = overlap_tile(net, image, tile, out_tile, net.depth, batch_size=3)
        reference = whole_pass(net, image, tile, out_tile)
    assert tiled.shape == (2, 3, *scan)
    assert (tiled - reference).abs().max().item() < 1e-4


def anisotropic_net(dims: int) -> UNet:
    """A "valid" network that convolves and pools the first axis less (thick slices)."""
    torch.manual_seed(0)
    plan = ({"features": (2, 4, 8), "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
             "strides": [[1, 2, 2], [2, 2, 2]]} if dims == 3
            else {"features": (2, 4, 4, 8), "kernel_sizes": [[1, 3], [1, 3], [3, 3], [3, 3]],
                  "strides": [[1, 2], [2, 2], [2, 2]]})
    return UNet(spatial_dims=dims, in_channels=2, out_channels=3, padding="valid",
                norm="batch", **plan).eval()


@pytest.mark.parametrize(("dims", "scan", "min_tile"), [
    (3, (19, 30, 17), (26, 56, 52)),   # several tiles along every axis, uneven remainders
    (3, (5, 7, 6), (26, 56, 52)),      # smaller than one tile
    (2, (40, 29), (44, 100)),          # total strides (4, 8): the first axis steps by 12
    (2, (9, 40), (36, 100)),           # output 4 × 12: one tile's output less than 2**depth
])
def test_overlap_tile_equals_whole_scan_pass_for_an_anisotropic_network(dims, scan, min_tile):
    net = anisotropic_net(dims)
    tile = net.valid_input_shape(min_tile)
    out_tile = net.output_shape(tile)
    grids = net.total_strides
    assert grids == ((2, 4, 4) if dims == 3 else (4, 8)) != (2 ** net.depth,) * dims
    image = torch.randn(1, 2, *scan)
    with torch.no_grad():
        tiled = overlap_tile(net, image, tile, out_tile, total_strides=grids, batch_size=3)
        reference = whole_pass(net, image, tile, out_tile)
        predicted = Predictor(net, tile, tile_scale=4.0)(image)  # its own, larger tile
    assert tiled.shape == predicted.shape == (1, 3, *scan)
    assert (tiled - reference).abs().max().item() < 1e-4
    assert (predicted - reference).abs().max().item() < 1e-4


def test_anisotropic_tiles_step_by_the_total_stride_of_each_axis():
    net = anisotropic_net(2)
    tile = net.valid_input_shape((44, 100))
    assert net.output_shape(tile) == (12, 12)
    assert network_strides(net, 2) == (4, 8)
    # the first axis may step by its whole output (12 = 3 · 4); 2**depth = 8 would step by 8
    assert [tile_step(12, grid=g) for g in net.total_strides] == [12, 8]
    assert tile_step(12, net.depth) == 8
    counts = {}
    image = torch.randn(1, 2, 36, 12)
    for name, grid in (("per axis", {"total_strides": (4, 8)}), ("2**depth", {"depth": 3})):
        calls = []
        with torch.no_grad():
            overlap_tile(net, image, tile, (12, 12), **grid,
                         progress=lambda done, total, calls=calls: calls.append(total))
        counts[name] = calls[-1]
    assert counts == {"per axis": 3, "2**depth": 4}  # 36 = 12 + 2 · 12 versus 12 + 3 · 8


def test_networks_without_total_strides_tile_on_the_2_to_the_depth_grid():
    class Foreign(torch.nn.Module):
        depth = 3

    assert network_strides(Foreign(), 3) == (8, 8, 8)
    with pytest.raises(ValueError, match=r"\(grid=\.\.\.\) or its depth"):
        tile_step(12)


def test_mirror_pad_reflects_repeatedly():
    x = torch.arange(3.0).view(1, 1, 3)
    padded = mirror_pad(x, [(5, 4)])
    assert padded.flatten().tolist() == [1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2]


def test_tile_step_is_a_multiple_of_the_downsampling_grid():
    assert tile_step(388, 4) == 384
    assert tile_step(44, 3) == 40
    assert tile_step(4, 4) == 4  # smaller than the grid: steps by itself


def test_larger_inference_tiles_give_the_same_logits_where_the_net_allows():
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, features=(4, 8, 16),
               padding="valid", norm="batch").eval()
    patch = net.valid_input_shape((36, 36, 36))  # output 4×4×4: mostly margin
    scan = (30, 41, 19)
    tile = inference_tile(net, patch, scan, max_scale=4.0)
    assert all(t >= p for t, p in zip(tile, patch, strict=True)) and tile != patch
    assert math.prod(tile) <= 4 * math.prod(patch)
    image = torch.randn(1, 1, *scan)
    with torch.no_grad():
        large = Predictor(net, patch, tile_scale=4.0)(image)
        trained = Predictor(net, patch, tile_scale=1.0)(image)
    assert (large - trained).abs().max().item() < 1e-4


def test_inference_tiles_grow_past_tiny_outputs_to_the_cheapest_tile():
    net = UNet(spatial_dims=2, features=(4, 8, 16), padding="valid", norm="batch").eval()
    patch, scan = net.valid_input_shape((44, 44)), (70, 53)
    assert net.output_shape(patch) == (4, 4)  # ×1.1 steps add no voxel at first

    def voxels_read(tile):
        steps = [tile_step(o, net.depth) for o in net.output_shape(tile)]
        counts = [max(math.ceil((s - o) / st), 0) + 1
                  for s, o, st in zip(scan, net.output_shape(tile), steps, strict=True)]
        return math.prod(counts) * math.prod(tile)

    sizes = [n for n in range(patch[0], 4 * patch[0]) if net.nearest_valid_sizes(n)[0] == n]
    allowed = [(a, b) for a in sizes for b in sizes if a * b <= 4 * math.prod(patch)]
    best = min(voxels_read(t) for t in allowed)  # any tile, anisotropic ones too
    chosen = inference_tile(net, patch, scan)
    assert voxels_read(chosen) == best < voxels_read(patch) / 8


def test_inference_tiles_stay_as_trained_where_the_tile_changes_the_output():
    patch_min = (36, 36)
    instance = UNet(spatial_dims=2, features=(4, 8), padding="valid", norm="instance").eval()
    patch = instance.valid_input_shape(patch_min)
    assert inference_tile(instance, patch, (500, 500)) == patch  # statistics over the tile
    batch = UNet(spatial_dims=2, features=(4, 8), padding="valid", norm="batch")
    assert inference_tile(batch.train(), patch, (500, 500)) == patch  # batch statistics
    assert inference_tile(batch.eval(), patch, (500, 500)) != patch
    assert inference_tile(batch, patch, (5, 5)) == patch  # the scan fits one tile already
    assert inference_tile(batch, patch, (500, 500), max_scale=1.0) == patch


def test_the_3d_valid_config_wastes_far_less_with_inference_tiles():
    net = UNet(spatial_dims=3, features=(64, 128, 256, 512), padding="valid", norm="batch").eval()
    patch = (132, 132, 116)
    tile = inference_tile(net, patch, (512, 512, 400))
    kept = math.prod(net.output_shape(tile)) / math.prod(tile)
    assert kept > 3 * math.prod(net.output_shape(patch)) / math.prod(patch)


def test_a_tile_in_use_is_kept_where_it_reads_at_most_a_tenth_more():
    """Fewer tile shapes over a data set: fewer cuDNN autotunings and compilations."""
    net = UNet(spatial_dims=3, features=(64, 128, 256, 512), padding="valid", norm="batch").eval()
    patch = (132, 132, 116)
    first = inference_tile(net, patch, (512, 512, 400))
    close, far = (512, 512, 234), (512, 512, 300)
    own = inference_tile(net, patch, close)
    assert own != first
    assert voxels_read(net, first, close) <= 1.1 * voxels_read(net, own, close)
    assert inference_tile(net, patch, close, in_use=[first]) == first
    assert inference_tile(net, patch, close, in_use=[first], reuse_within=0.0) == own
    own_far = inference_tile(net, patch, far)
    assert voxels_read(net, first, far) > 1.1 * voxels_read(net, own_far, far)
    assert inference_tile(net, patch, far, in_use=[first]) == own_far

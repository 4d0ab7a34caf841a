"""Overlap-tile prediction equals one whole-scan pass; sliding window keeps the scan's size."""

from __future__ import annotations

import math

import pytest
import torch

from segmentation import UNet
from segmentation.inference.predictor import Predictor
from segmentation.inference.tiling import mirror_pad, overlap_tile, tile_step


def whole_pass(net: UNet, image: torch.Tensor, input_size, output_size) -> torch.Tensor:
    """The reference: one forward pass over the mirror-padded scan, cropped to the scan."""
    spatial = image.shape[2:]
    pads = []
    for n, i, o in zip(spatial, input_size, output_size, strict=True):
        step = tile_step(o, net.depth)
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


def test_mirror_pad_reflects_repeatedly():
    x = torch.arange(3.0).view(1, 1, 3)
    padded = mirror_pad(x, [(5, 4)])
    assert padded.flatten().tolist() == [1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2]


def test_tile_step_is_a_multiple_of_the_downsampling_grid():
    assert tile_step(388, 4) == 384
    assert tile_step(44, 3) == 40
    assert tile_step(4, 4) == 4  # smaller than the grid: steps by itself


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_predictor_returns_logits_of_the_scan_size_and_mirror_tta_is_equivariant(padding):
    torch.manual_seed(0)
    features = (4, 8, 16) if padding == "same" else (4, 8)  # a shallow valid net keeps it fast
    net = UNet(spatial_dims=3, features=features, padding=padding, norm="batch").eval()
    patch = (16, 16, 16) if padding == "same" else net.valid_input_shape((20, 20, 20))
    image = torch.randn(1, 1, 21, 18, 23)
    with torch.no_grad():
        logits = Predictor(net, patch, batch_size=2)(image)
        assert logits.shape == (1, 2, 21, 18, 23)
        tta = Predictor(net, patch, mirror=True)(image)
        flipped = Predictor(net, patch, mirror=True)(image.flip(2)).flip(2)
    assert tta.shape == logits.shape
    assert torch.allclose(tta, flipped, atol=1e-4)  # averaging over all flips is flip-invariant


def test_predictor_runs_a_2d_network_slice_by_slice():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, features=(4, 8, 16), norm="batch").eval()
    image = torch.randn(1, 1, 5, 20, 24)
    with torch.no_grad():
        logits = Predictor(net, (16, 16), slice_axis=0)(image)
        direct = Predictor(net, (16, 16))(image[:, :, 3])
    assert logits.shape == (1, 2, 5, 20, 24)
    assert torch.allclose(logits[:, :, 3], direct, atol=1e-5)

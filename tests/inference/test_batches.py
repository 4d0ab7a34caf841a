"""Regions run a batch at a time; fixed batches fill the last pass for static-shape networks."""

from __future__ import annotations

import pytest
import torch

from segmentation import UNet
from segmentation.inference.predictor import Predictor


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_fixed_batches_fill_the_last_pass_and_keep_the_logits(padding):
    """What a network compiled with static shapes needs: one batch shape for every pass."""
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, features=(4, 8, 16), padding=padding, norm="batch").eval()
    patch = (16, 16) if padding == "same" else net.valid_input_shape((44, 44))
    image = torch.randn(2, 1, 41, 37)
    sizes: list[int] = []
    net.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        free = Predictor(net, patch, batch_size=3, tile_scale=1.0)(image)
        assert sizes[-1] < 3  # the windows do not divide into batches of 3
        sizes.clear()
        fixed = Predictor(net, patch, batch_size=3, tile_scale=1.0, fixed_batch=True)(image)
    assert set(sizes) == {3}
    assert (fixed - free).abs().max().item() < 1e-5

"""Residual blocks: projected shortcuts, pre-activation, the identity cropped in valid mode."""

from __future__ import annotations

import torch

from segmentation import UNet


def test_residual_block_projects_when_channels_or_stride_change():
    net = UNet(spatial_dims=2, features=(4, 8, 8), encoder_block="residual",
               blocks_per_level=[1, 2, 1], downsample="conv")
    level1 = list(net.encoder.levels[1])
    assert isinstance(level1[0].shortcut, torch.nn.Sequential)  # 4 -> 8 channels, stride 2
    assert level1[0].shortcut[0].stride == (2, 2)
    assert isinstance(level1[1].shortcut, torch.nn.Identity)    # same shape: identity
    level2 = list(net.encoder.levels[2])
    assert level2[0].shortcut[0].in_channels == 8               # stride alone forces projection
    # pre-activation: the branch starts with the norm, not the convolution
    assert isinstance(level1[0].branch[0], torch.nn.InstanceNorm2d)


def test_valid_residual_block_crops_identity_to_branch():
    from segmentation.nets.blocks import ResidualBlock

    block = ResidualBlock(2, 3, 3, padding="valid", norm="none")
    x = torch.randn(1, 3, 12, 14)
    with torch.no_grad():
        for p in block.branch.parameters():
            p.zero_()
    assert torch.equal(block(x), x[:, :, 2:-2, 2:-2])  # zero branch leaves the cropped identity

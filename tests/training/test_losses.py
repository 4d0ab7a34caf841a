"""Deep supervision: nnU-Net's weights and auxiliary targets exactly aligned with each level."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segmentation import UNet
from segmentation.training.losses import (
    SegmentationLoss,
    deep_supervision_pair,
    deep_supervision_weights,
)


class Recording(nn.Module):
    """A wrapped loss that records what it is given and returns the mean of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls.append((logits, label))
        return logits.mean()


def block_ids(shape: tuple[int, int], start: tuple[int, int], stride: int, columns: int
              ) -> torch.Tensor:
    """(1, 1, *shape) map giving each voxel the index ``row · columns + column`` of its block
    on a grid of ``stride``-voxel blocks that begins at ``start`` (main-output voxels)."""
    rows = torch.div(torch.arange(shape[0]) - start[0], stride, rounding_mode="floor")
    cols = torch.div(torch.arange(shape[1]) - start[1], stride, rounding_mode="floor")
    return (rows[:, None] * columns + cols[None, :])[None, None]


def own_ids(shape: tuple[int, int]) -> torch.Tensor:
    """(1, 1, *shape) auxiliary output whose voxel (i, j) holds ``i · shape[1] + j``."""
    return torch.arange(shape[0] * shape[1]).reshape(1, 1, *shape)


def test_weights_halve_per_level_drop_the_lowest_resolution_and_sum_to_one():
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0])
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0])
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError, match="outputs=0"):
        deep_supervision_weights(0)
    # and the loss applies them: output l filled with 10**l, the wrapped loss its mean
    recording = Recording()
    sizes = [16, 8, 4, 2, 1]
    outputs = [torch.full((1, 2, n, n), 10.0 ** level) for level, n in enumerate(sizes)]
    total = SegmentationLoss(recording)(outputs, torch.zeros(1, 1, 16, 16, dtype=torch.long))
    assert float(total) == pytest.approx((8 + 4 * 10 + 2 * 100 + 1000) / 15)
    assert len(recording.calls) == 4  # the lowest-resolution output is not evaluated


def test_same_network_with_odd_patch_gets_targets_on_each_levels_own_grid():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, out_channels=3, features=(2, 4, 8, 8), deep_supervision=True)
    main, aux1, aux2 = net.train()(torch.randn(1, 1, 13, 11))
    assert main.shape[2:] == (13, 11) and aux1.shape[2:] == (8, 8) and aux2.shape[2:] == (4, 4)
    # 13 and 11 are padded to 16 (1 and 2 voxels before), so the level grids begin at main
    # voxels (-1, -2); whole 2-voxel blocks of level 1: rows 1..6, columns 1..5
    label = block_ids((13, 11), start=(-1, -2), stride=2, columns=8)
    output, target = deep_supervision_pair(own_ids((8, 8)), label, level=1)
    assert target.shape[2:] == (6, 5)
    assert torch.equal(output, own_ids((8, 8))[..., 1:7, 1:6])
    assert torch.equal(target, output)  # each auxiliary voxel gets the label of its own block
    # level 2 (4-voxel blocks): rows 1..2 ([3, 11)), columns 1..2 ([2, 10))
    label = block_ids((13, 11), start=(-1, -2), stride=4, columns=4)
    output, target = deep_supervision_pair(own_ids((4, 4)), label, level=2)
    assert torch.equal(output, own_ids((4, 4))[..., 1:3, 1:3])
    assert torch.equal(target, output)


def test_valid_network_targets_match_the_larger_region_its_lower_levels_see():
    # unet3d_valid: 132 -> 44 and 116 -> 28; decoder levels 1 and 2 are 24/16 and 14/10 voxels
    net = UNet(spatial_dims=3, features=(2, 2, 2, 2), padding="valid", norm="batch", act="relu")
    sizes = [net.decoder.output_sizes(net.encoder.output_sizes(n)) for n in (132, 116)]
    assert sizes == [[44, 24, 14], [28, 16, 10]]
    # The valid network is symmetric about the centre: level 2's 14·4 = 56 voxels cover the
    # 44 output voxels and 6 more on either side. Whole blocks: 2..11 ([2, 42)) and 2..7.
    label = block_ids((44, 28), start=(-6, -6), stride=4, columns=10)
    output, target = deep_supervision_pair(own_ids((14, 10)), label, level=2)
    assert target.shape[2:] == (10, 6)
    assert torch.equal(output, own_ids((14, 10))[..., 2:12, 2:8])
    assert torch.equal(target, output)
    label = block_ids((44, 28), start=(-2, -2), stride=2, columns=16)
    output, target = deep_supervision_pair(own_ids((24, 16)), label, level=1)
    assert torch.equal(output, own_ids((24, 16))[..., 1:23, 1:15])
    assert torch.equal(target, output)


def test_valid_network_forward_pairs_level_one_with_its_blocks_and_keeps_labels_integer():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, out_channels=3, features=(2, 4, 8, 8), padding="valid",
               norm="none", deep_supervision=True).train()
    x = torch.randn(1, 1, *net.valid_input_shape((100, 110)))
    main, aux1, aux2 = net(x)
    size, aux = main.shape[2:], aux1.shape[2:]
    start = [-((a * 2 - s) // 2) for s, a in zip(size, aux, strict=True)]
    assert all((a * 2 - s) % 2 == 0 for s, a in zip(size, aux, strict=True))  # whole voxels
    recording = Recording()
    label = block_ids(tuple(size), start=tuple(start), stride=2, columns=aux[1])
    SegmentationLoss(recording)([main, own_ids(tuple(aux)).float(), aux2], label.int())
    (main_in, main_label), (aux_in, aux_label) = recording.calls  # aux2: weight 0, not run
    assert main_label.dtype == aux_label.dtype == torch.long
    assert torch.equal(main_label, label.long())
    assert torch.equal(aux_in.long(), aux_label)
    # without deep supervision the wrapped loss gets the same integer labels
    recording.calls.clear()
    SegmentationLoss(recording)(main, label.int())
    assert recording.calls[0][1].dtype == torch.long


def test_default_loss_trains_through_every_level_of_an_odd_patch():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, out_channels=3, features=(2, 4, 8, 8), deep_supervision=True)
    outputs = net.train()(torch.randn(2, 1, 13, 11))
    loss = SegmentationLoss()(outputs, torch.randint(0, 3, (2, 1, 13, 11)))
    loss.backward()
    assert torch.isfinite(loss)
    assert net.aux_heads[0].weight.grad.abs().sum() > 0   # level 1 is supervised
    assert net.aux_heads[1].weight.grad is not None       # the lowest level has weight 0 ...
    assert net.aux_heads[1].weight.grad.abs().sum() == 0  # ... so a zero gradient
    # what DDP needs (find_unused_parameters off): every trainable parameter took part
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []


def test_an_overflowing_unweighted_output_does_not_poison_the_loss():
    label = torch.randint(0, 3, (1, 1, 8, 8))
    main, level1 = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)
    lowest = torch.full((1, 3, 2, 2), float("inf"), requires_grad=True)  # weight 0
    loss = SegmentationLoss()([main, level1, lowest], label)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.equal(lowest.grad, torch.zeros_like(lowest))


def test_patch_too_small_for_a_level_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="enlarge data.patch_size"):
        deep_supervision_pair(torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 3, 3), level=2)


def test_per_axis_strides_pair_each_level_with_blocks_of_its_own_shape():
    torch.manual_seed(0)
    # level 1 halves only the second axis: its grid is (1, 2); the total strides are (4, 8)
    net = UNet(spatial_dims=2, out_channels=3, features=(2, 4, 8, 8),
               strides=[[1, 2], [2, 2], [2, 2]], deep_supervision=True)
    main, aux1, aux2 = net.train()(torch.randn(1, 1, 13, 11))
    assert main.shape[2:] == (13, 11) and aux1.shape[2:] == (16, 8)  # padded to (16, 16)
    assert net.level_strides[1] == (1, 2)
    # padding 3 and 5 puts 1 and 2 voxels before: level 1's blocks begin at (-1, -2)
    rows = torch.arange(13) + 1
    cols = torch.div(torch.arange(11) + 2, 2, rounding_mode="floor")
    label = (rows[:, None] * 8 + cols[None, :])[None, None]    # the id of each voxel's block
    output, target = deep_supervision_pair(own_ids((16, 8)), label, 1, net.level_strides[1])
    assert torch.equal(output, own_ids((16, 8))[..., 1:14, 1:6])  # whole blocks only
    assert torch.equal(target, output)
    recording = Recording()  # and the loss hands the network's strides to the pairing
    SegmentationLoss(recording, net.level_strides)([main, aux1, aux2], label)
    assert recording.calls[1][1].shape[2:] == (13, 5)

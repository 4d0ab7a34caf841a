"""Capacity matching: a U-Net without skips widened to the parameters of one with them."""

from __future__ import annotations

import pytest

from segmentation import UNet
from segmentation.nets.capacity import count_parameters, match_decoder_width

NNUNET = dict(spatial_dims=3, in_channels=1, out_channels=3, features=[32, 64, 128, 256, 320, 320],
              downsample="conv", deep_supervision=True)


@pytest.mark.parametrize("skips", [False, [True, False, False, False, False],
                                   [False, True, True, True, True]])
def test_matched_widths_come_within_two_percent(skips):
    target = count_parameters(NNUNET)
    args = {**NNUNET, "long_skips": skips}
    widths = match_decoder_width(args, target)
    matched = count_parameters({**args, "decoder_features": widths})
    assert abs(matched - target) / target <= 0.02
    flags = [skips] * 5 if isinstance(skips, bool) else skips
    for width, channels, keep in zip(widths, NNUNET["features"], flags, strict=False):
        assert width == channels if keep else width > channels  # only skip-less levels widen


def test_counting_on_the_meta_device_equals_the_real_network():
    small = dict(spatial_dims=2, in_channels=2, out_channels=3, features=[4, 8, 16],
                 long_skips=False, decoder_features=[6, 9])
    assert count_parameters(small) == UNet(**small).num_parameters()


def test_small_networks_are_nudged_level_by_level():
    tiny = dict(spatial_dims=3, in_channels=1, out_channels=4, features=[4, 8, 16])
    target = count_parameters(tiny)
    widths = match_decoder_width({**tiny, "long_skips": False}, target)
    matched = count_parameters({**tiny, "long_skips": False, "decoder_features": widths})
    assert abs(matched - target) / target <= 0.02


def test_refusals():
    with pytest.raises(ValueError, match="keeps every skip"):
        match_decoder_width(NNUNET, 10)
    with pytest.raises(ValueError, match="too small to match finely"):
        match_decoder_width({**NNUNET, "features": [2, 3], "long_skips": False},
                            count_parameters({**NNUNET, "features": [2, 3]}), tolerance=1e-6)

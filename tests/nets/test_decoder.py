"""The decoder's long skips: a level without its skip has no skip input at all."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("level", [0, 1])
def test_removing_a_skip_removes_exactly_its_input_channels(dims, level, small_net,
                                                           small_net_features):
    full = small_net(dims, "same", True, "plain")
    flags = [True, True]
    flags[level] = False
    cut = small_net(dims, "same", flags, "plain")
    channels = small_net_features[level]
    first_conv = cut.decoder.blocks[level][0][0]
    assert first_conv.in_channels == channels  # no zeros concatenated: the input is gone
    assert full.decoder.blocks[level][0][0].in_channels == 2 * channels
    assert full.num_parameters() - cut.num_parameters() == channels * channels * 3 ** dims
    assert cut.long_skips == tuple(flags)


def test_no_skips_means_decoder_never_reads_encoder_maps_above_the_bottleneck(small_net):
    torch.manual_seed(0)
    net = small_net(2, "same", False, "plain").eval()
    x = torch.randn(1, 2, 32, 32)
    features = net.encoder(x)
    reference = net.decoder(features)[0]
    tampered = [torch.randn_like(f) for f in features[:-1]] + [features[-1]]
    assert torch.equal(net.decoder(tampered)[0], reference)
    with_skips = small_net(2, "same", True, "plain").eval()
    features = with_skips.encoder(x)
    tampered = [torch.randn_like(f) for f in features[:-1]] + [features[-1]]
    assert not torch.allclose(with_skips.decoder(tampered)[0], with_skips.decoder(features)[0])


@pytest.mark.parametrize(("dims", "padding"), [(2, "same"), (3, "same"), (2, "valid")])
def test_decoder_widths_change_channels_not_shapes(dims, padding):
    from segmentation import UNet

    features = (4, 8, 16)
    plain = UNet(spatial_dims=dims, in_channels=1, out_channels=3, features=features,
                 padding=padding, deep_supervision=True)
    wide = UNet(spatial_dims=dims, in_channels=1, out_channels=3, features=features,
                padding=padding, long_skips=[True, False], decoder_features=[5, 11],
                deep_supervision=True)
    assert wide.decoder.channels == (5, 11) and plain.decoder.channels == (4, 8)
    assert wide.decoder.blocks[1][0][0].in_channels == 11  # no skip: only the upsampled map
    assert wide.decoder.blocks[0][0][0].in_channels == 4 + 5  # skip (C_0) + upsampled (D_0)
    assert wide.head.in_channels == 5 and wide.aux_heads[0].in_channels == 11
    size = plain.valid_input_shape((30,) * dims)
    x = torch.randn(2, 1, *size)
    wide.train()
    logits, aux = wide(x)
    assert logits.shape == plain.eval()(x).shape == (2, 3, *plain.output_shape(size))
    assert aux.shape[:2] == (2, 3)


def test_decoder_widths_must_match_the_levels():
    from segmentation import UNet

    with pytest.raises(ValueError, match="decoder_features needs 2 widths"):
        UNet(spatial_dims=2, features=(4, 8, 16), decoder_features=[4, 8, 16])

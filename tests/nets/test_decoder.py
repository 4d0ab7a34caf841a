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

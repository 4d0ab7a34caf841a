"""The configurable U-Net: shapes, gradients, valid sizes, errors, options, paper configs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from segmentation import UNet
from segmentation.config import load_network

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SKIPS = {"all": True, "none": False, "top_off": [False, True]}


def input_shape(net: UNet, dims: int, padding: str) -> tuple[int, ...]:
    if padding == "same":  # odd, unequal sizes: padded internally and cropped back
        return (17, 23, 13)[:dims] if dims == 3 else (37, 23)
    return net.valid_input_shape((45, 47, 44)[:dims])


MATRIX = list(itertools.product((2, 3), ("same", "valid"), SKIPS, ("plain", "residual")))


@pytest.mark.parametrize(("dims", "padding", "skips", "block"), MATRIX)
def test_forward_matches_output_shape_and_gradients_reach_first_conv(dims, padding, skips, block,
                                                                     small_net):
    torch.manual_seed(0)
    net = small_net(dims, padding, SKIPS[skips], block)
    shape = input_shape(net, dims, padding)
    x = torch.randn(2, 2, *shape)
    out = net(x)
    assert out.shape == (2, 3, *net.output_shape(shape))
    if padding == "same":
        assert tuple(out.shape[2:]) == shape
    else:
        assert all(o < i for o, i in zip(out.shape[2:], shape, strict=True))
    out.square().mean().backward()
    first_conv = next(m for m in net.encoder.levels[0].modules()
                      if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d))
    assert first_conv.weight.grad is not None
    assert torch.isfinite(first_conv.weight.grad).all()
    assert first_conv.weight.grad.abs().sum() > 0


def test_ronneberger_config_is_the_paper_network():
    net = load_network(CONFIGS / "model" / "unet2d_ronneberger.yaml")
    assert isinstance(net, UNet)
    assert net.output_shape((572, 572)) == (388, 388)
    assert net.num_parameters() == 31_030_658
    # the auxiliary deep-supervision heads exist but are not part of the paper's network
    assert net.num_parameters(include_aux_heads=True) == 31_030_658 + (128 + 256 + 512 + 3) * 2
    assert net.valid_input_shape((570, 572)) == (572, 572)
    assert net.output_shape((188, 188)) == (4, 4)


def test_valid_3d_config_gives_paper_shapes():
    net = load_network(CONFIGS / "model" / "unet3d_valid.yaml")
    assert net.output_shape((132, 132, 116)) == (44, 44, 28)


def test_invalid_size_names_nearest_valid_sizes():
    net = load_network(CONFIGS / "model" / "unet2d_ronneberger.yaml")
    with pytest.raises(ValueError, match="input 190 .*nearest valid sizes are 188 and 204"):
        net.output_shape((190, 572))
    with pytest.raises(ValueError, match="nearest valid sizes are 188 and 204"):
        net(torch.zeros(1, 1, 190, 188))
    assert net.nearest_valid_sizes(190) == (188, 204)
    assert net.valid_input_shape((190, 1)) == (204, 188)  # 188 is the smallest valid size


def test_input_shape_for_output_is_the_smallest_input_that_covers_it(small_net):
    net = load_network(CONFIGS / "model" / "unet2d_ronneberger.yaml")
    assert net.input_shape_for_output((388, 388)) == (572, 572)  # the paper's tile
    assert net.input_shape_for_output((389, 1)) == (588, 188)    # 572 gives 388 < 389
    assert net.output_shape((588, 188)) == (404, 4)
    assert load_network(CONFIGS / "model" / "unet3d_valid.yaml").input_shape_for_output(
        (44, 44, 28)) == (132, 132, 116)
    assert small_net(2, "same", True, "plain").input_shape_for_output((37, 23)) == (37, 23)
    with pytest.raises(ValueError, match="expected a 2D spatial shape"):
        net.input_shape_for_output((388,))


def test_wrong_channels_or_dims_give_clear_errors(small_net):
    net = small_net(3, "same", True, "plain")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 2, D, H, W\)"):
        net(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 2, D, H, W\)"):
        net(torch.zeros(1, 2, 16, 16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm": "layer"}, "norm='layer' is not supported; choose one of instance, batch"),
        ({"act": "swish"}, "act='swish'"),
        ({"downsample": "avg"}, "downsample='avg'"),
        ({"upsample": "bicubic"}, "upsample='bicubic'"),
        ({"padding": "full"}, "padding='full'"),
        ({"long_skips": [True]}, "long_skips has 1 flags but the network has 2"),
        ({"convs_per_level": [2, 2]}, "convs_per_level has 2 entries"),
        ({"padding": "valid", "downsample": "conv"}, "use downsample='maxpool'"),
        ({"features": [8]}, "at least 2 levels"),
        ({"features": [4, 0]}, r"features must be ≥ 1 channel at every level, got \[4, 0\]"),
        ({"in_channels": 0}, "in_channels must be ≥ 1, got 0"),
        ({"out_channels": 0}, "out_channels must be ≥ 1, got 0"),
        ({"decoder_convs_per_level": [2, 1]}, "decoder_convs_per_level must be a single int"),
    ],
)
def test_bad_arguments_say_what_to_change(kwargs, message):
    base = dict(spatial_dims=2, features=(4, 8, 16))
    with pytest.raises(ValueError, match=message):
        UNet(**{**base, **kwargs})


@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_every_trainable_parameter_gets_a_gradient(deep_supervision, padding):
    """What DDP requires: no parameter that trains may be left out of the loss."""
    net = UNet(spatial_dims=2, features=(4, 8, 16, 32), padding=padding,
               deep_supervision=deep_supervision).train()
    shape = (32, 32) if padding == "same" else net.valid_input_shape((64, 64))
    outputs = net(torch.randn(2, 1, *shape))
    loss = sum(o.square().mean() for o in outputs) if deep_supervision else outputs.square().mean()
    loss.backward()
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []
    aux_trainable = [p.requires_grad for p in net.aux_heads.parameters()]
    assert aux_trainable and all(t == deep_supervision for t in aux_trainable)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_deep_supervision_outputs_only_while_training_and_checkpoints_load_either_way(padding):
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, features=(4, 8, 16, 32), padding=padding, deep_supervision=True)
    shape = (32, 32) if padding == "same" else net.valid_input_shape((64, 64))
    outputs = net.train()(torch.randn(2, 1, *shape))
    assert isinstance(outputs, list) and len(outputs) == 3
    assert outputs[0].shape[2:] == net.output_shape(shape)
    assert outputs[1].shape[1] == 2
    for level in (1, 2):
        if padding == "same":
            expected = shape[0] // 2 ** level
        else:
            expected = net.decoder.output_sizes(net.encoder.output_sizes(shape[0]))[level]
        assert outputs[level].shape[2:] == (expected, expected)
    assert isinstance(net.eval()(torch.randn(1, 1, *shape)), torch.Tensor)
    plain = UNet(spatial_dims=2, features=(4, 8, 16, 32), padding=padding)
    plain.load_state_dict(net.state_dict())  # strict: same parameters either way
    with torch.no_grad():
        x = torch.randn(1, 1, *shape)
        assert torch.equal(plain.eval()(x), net.eval()(x))


@pytest.mark.parametrize("upsample", ["transpose", "interpolate"])
def test_valid_net_is_translation_equivariant_on_its_grid(upsample):
    """Crops of the input give the matching crops of the output (center crops line up)."""
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, features=(4, 8, 16), padding="valid", norm="batch",
               upsample=upsample).eval()
    tile = net.valid_input_shape((48, 48))
    out_tile = net.output_shape(tile)
    x = torch.randn(1, 1, tile[0] + 8, tile[1] + 12)
    with torch.no_grad():
        whole = net(x)
        for dy, dx in [(0, 0), (4, 8), (8, 12)]:  # offsets are multiples of 2**depth
            part = net(x[:, :, dy:dy + tile[0], dx:dx + tile[1]])
            expected = whole[:, :, dy:dy + out_tile[0], dx:dx + out_tile[1]]
            assert torch.allclose(part, expected, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(norm="group", act="gelu", dropout=0.1, bias=False),
    dict(norm="batch", act="relu", downsample="conv", upsample="interpolate"),
    dict(norm="none", encoder_block="residual", blocks_per_level=[1, 3, 4], downsample="conv",
         decoder_convs_per_level=1),
])
def test_layer_options_build_and_run(options):
    net = UNet(spatial_dims=3, features=(4, 8, 16), **options)
    out = net(torch.randn(2, 1, 9, 10, 11))
    assert out.shape == (2, 2, 9, 10, 11)
    if options.get("bias") is False:  # every conv and up-conv but the 1×1 output heads
        heads = {id(m) for m in (net.head, *net.aux_heads)}
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d
                                                        | torch.nn.ConvTranspose3d)]
        assert len(convs) > len(heads)
        assert all(c.bias is None for c in convs if id(c) not in heads)


def test_kaiming_initialisation():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, features=(64, 128), act="relu", norm="none")
    conv = net.encoder.levels[1][1][0]  # 128 -> 128, 3x3: fan_in = 1152
    assert conv.weight.std().item() == pytest.approx((2 / 1152) ** 0.5, rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0


def test_variants_without_skips_start_from_the_same_encoder_weights():
    """Seeded alike, networks that differ only in their skips get identical encoders (the
    study's "same initial state where the architecture allows")."""
    nets = []
    for skips in (True, False, [False, True]):
        torch.manual_seed(3)
        nets.append(UNet(spatial_dims=2, features=(4, 8, 16), long_skips=skips))
    reference = nets[0].encoder.state_dict()
    for net in nets[1:]:
        for key, tensor in net.encoder.state_dict().items():
            assert torch.equal(tensor, reference[key]), key
    # dropping the uppermost skip changes decoder level 0 only: level 1 starts alike too
    no_top, full = nets[2].decoder, nets[0].decoder
    assert torch.equal(no_top.blocks[1][0][0].weight, full.blocks[1][0][0].weight)
    assert not torch.equal(no_top.blocks[0][1][0].weight, torch.zeros_like(
        no_top.blocks[0][1][0].weight))
    assert torch.equal(no_top.blocks[0][1][0].weight, full.blocks[0][1][0].weight)  # same shape

"""Per-axis kernel sizes and downsampling factors (nnU-Net-style anisotropic networks)."""

from __future__ import annotations

import io

import pytest
import torch
import yaml

from segmentation import UNet
from segmentation.config import build_network
from segmentation.nets.capacity import count_parameters

# A prostate-like plan: in-plane only at the top two levels, then isotropic.
PROSTATE_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
PROSTATE_STRIDES = [[1, 2, 2], [1, 2, 2], [2, 2, 2]]
KERNELS_2D = [[1, 3], [3, 3], [3, 1]]
STRIDES_2D = [[1, 2], [2, 2]]

CASES = [  # (dims, padding, encoder_block, downsample, upsample)
    (3, "same", "plain", "maxpool", "transpose"),
    (3, "same", "residual", "conv", "interpolate"),
    (3, "valid", "plain", "maxpool", "interpolate"),
    (3, "valid", "residual", "maxpool", "transpose"),
    (2, "same", "plain", "conv", "transpose"),
    (2, "same", "residual", "maxpool", "interpolate"),
    (2, "valid", "plain", "maxpool", "transpose"),
    (2, "valid", "residual", "maxpool", "interpolate"),
]


def anisotropic(dims: int, padding: str = "same", encoder_block: str = "plain",
                downsample: str = "maxpool", upsample: str = "transpose", **kwargs) -> UNet:
    torch.manual_seed(0)
    plan = ({"features": [2, 4, 8, 8], "kernel_sizes": PROSTATE_KERNELS,
             "strides": PROSTATE_STRIDES} if dims == 3
            else {"features": [2, 4, 8], "kernel_sizes": KERNELS_2D, "strides": STRIDES_2D})
    return UNet(spatial_dims=dims, in_channels=1, out_channels=2, padding=padding,
                encoder_block=encoder_block, downsample=downsample, upsample=upsample,
                norm="batch", blocks_per_level=1, **{**plan, **kwargs}).eval()


def _shapes(dims: int, padding: str, net: UNet) -> list[tuple[int, ...]]:
    """Odd and even sizes; "valid" networks get the nearest valid ones."""
    wanted = ([(20, 61, 64), (19, 33, 30), (7, 9, 10)] if dims == 3
              else [(21, 40), (32, 17), (5, 9)])
    if padding == "same":
        return wanted
    return sorted({net.valid_input_shape(shape) for shape in wanted})


@pytest.mark.parametrize(("dims", "padding", "encoder_block", "downsample", "upsample"), CASES)
def test_output_shape_is_the_shape_of_the_forward_pass(dims, padding, encoder_block, downsample,
                                                       upsample):
    net = anisotropic(dims, padding, encoder_block, downsample, upsample)
    for shape in _shapes(dims, padding, net):
        with torch.no_grad():
            features = net.encoder(torch.zeros(1, 1, *net.encoder_input_shape(shape)))
            out = net(torch.zeros(1, 1, *shape))
        assert tuple(out.shape[2:]) == net.output_shape(shape), shape
        if padding == "same":
            assert tuple(out.shape[2:]) == tuple(shape)
        for axis, n in enumerate(net.encoder_input_shape(shape)):  # per-axis level sizes
            sizes = net.encoder.output_sizes(n, axis)
            assert sizes == [f.shape[2 + axis] for f in features]


def test_a_prostate_patch_keeps_its_slices_where_the_plan_does_not_downsample_them():
    net = anisotropic(3, "same")
    assert net.total_strides == (2, 8, 8)
    assert net.level_strides == ((1, 1, 1), (1, 2, 2), (1, 4, 4), (2, 8, 8))
    assert net.encoder_input_shape((20, 320, 300)) == (20, 320, 304)  # 304 = 38 · 8
    with torch.no_grad():
        features = net.encoder(torch.zeros(1, 1, 20, 32, 24))
    assert [tuple(f.shape[2:]) for f in features] == [(20, 32, 24), (20, 16, 12), (20, 8, 6),
                                                      (10, 4, 3)]
    conv = net.encoder.levels[0][0][0]
    assert conv.kernel_size == (1, 3, 3) and conv.padding == (0, 1, 1)
    assert net.decoder.blocks[0][0][0].kernel_size == (1, 3, 3)  # decoder l: encoder l's kernel
    assert net.decoder.blocks[2][0][0].kernel_size == (3, 3, 3)
    assert net.decoder.upsamples[0].kernel_size == (1, 2, 2) == net.decoder.upsamples[0].stride
    assert net.decoder.upsamples[2].stride == (2, 2, 2)


def test_strided_convolutions_and_projections_follow_the_factor_per_axis():
    net = anisotropic(3, "same", "residual", "conv")
    first = net.encoder.levels[1][0]
    assert first.branch[2].stride == (1, 2, 2)
    assert first.shortcut[0].stride == (1, 2, 2) and first.shortcut[0].kernel_size == (1, 1, 1)
    assert net.encoder.pool is None and net.encoder.pools is None
    pooled = anisotropic(3, "same", "plain", "maxpool")
    assert [p.kernel_size for p in pooled.encoder.pools] == [(1, 2, 2), (1, 2, 2), 2]


def test_deep_supervision_outputs_are_on_their_levels_grid():
    net = anisotropic(3, "same", deep_supervision=True).train()
    outputs = net(torch.zeros(2, 1, 8, 16, 16))
    assert [tuple(o.shape[2:]) for o in outputs] == [(8, 16, 16), (8, 8, 8), (8, 4, 4)]
    for output, grid in zip(outputs, net.level_strides, strict=False):
        assert tuple(n * g for n, g in zip(output.shape[2:], grid, strict=True)) == (8, 16, 16)


def test_valid_sizes_are_searched_per_axis():
    net = UNet(spatial_dims=2, features=[2, 4], padding="valid", norm=None,
               kernel_sizes=[[1, 3], [3, 3]], strides=[[1, 2]])
    # axis 0: unconvolved at the top, never pooled: any size > 4 (the bottom level's shrink)
    # axis 1: 3×3 convolutions and a 2× pooling: even sizes ≥ 18
    assert net.nearest_valid_sizes(4, axis=0) == (None, 5)
    assert net.nearest_valid_sizes(19, axis=0) == (19, 19)
    assert net.nearest_valid_sizes(19, axis=1) == (18, 20)
    assert net.output_shape((19, 20)) == (15, 4)
    assert net.valid_input_shape((1, 1)) == (5, 18)
    assert net.input_shape_for_output((15, 5)) == (19, 22)
    with pytest.raises(ValueError, match=r"input 4 \(axis 0\) is not valid; nearest valid sizes "
                                         r"are 5; input 19 \(axis 1\) is not valid; nearest "
                                         r"valid sizes are 18 and 20 .*total strides \(1, 2\)"):
        net.output_shape((4, 19))
    with pytest.raises(ValueError, match=r"input 19 \(axis 1\).* 18 and 20"):
        net(torch.zeros(1, 1, 19, 19))
    with pytest.raises(ValueError, match="differ between axes; pass axis=0 … 1"):
        net.nearest_valid_sizes(19)  # ambiguous: which axis?
    with pytest.raises(ValueError, match="differ between axes"):
        net.encoder.output_sizes(20)


def test_the_3d_prostate_valid_search_names_sizes_per_axis():
    net = anisotropic(3, "valid")
    shape = net.valid_input_shape((20, 64, 64))
    assert shape[0] != shape[1]  # the slice axis is convolved and pooled less
    message = []
    for axis, n in enumerate(s + 1 for s in shape):
        below, above = net.nearest_valid_sizes(n, axis)
        message.append(f"input {n} (axis {axis}) is not valid; nearest valid sizes are "
                       f"{below} and {above}")
    with pytest.raises(ValueError) as caught:
        net.check_input_shape(tuple(s + 1 for s in shape))
    assert str(caught.value).startswith("; ".join(message))


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kernel_sizes": [[1, 3, 3], [2, 3, 3], 3, 3]},
     r"kernel_sizes\[1\] = \[2, 3, 3\]: kernel sizes must be odd"),
    ({"kernel_sizes": [3, 3, 4, 3]}, r"kernel_sizes\[2\] = 4: kernel sizes must be odd"),
    ({"kernel_sizes": [3, 3, 3]}, r"kernel_sizes has 3 entries but the network needs 4: one "
                                  r"kernel size per level \(4 = len\(features\)\)"),
    ({"kernel_sizes": [[1, 3], 3, 3, 3]}, r"kernel_sizes\[0\] = \[1, 3\] has 2 entries but the "
                                          r"network is 3D; give one value per spatial axis"),
    ({"kernel_sizes": ["3", 3, 3, 3]}, r"kernel_sizes\[0\] must be an int or a list of 3 ints"),
    ({"strides": [[1, 2, 2], [1, 3, 3], 2]},
     r"strides\[1\] = \[1, 3, 3\]: a downsampling factor must be 1 \(keep the axis\) or 2"),
    ({"strides": [2, 4, 2]}, r"strides\[1\] = 4: a downsampling factor must be 1"),
    ({"strides": [2, 2]}, r"strides has 2 entries but the network needs 3: one downsampling "
                          r"factor per level below the top \(3 = len\(features\) − 1\)"),
    ({"strides": [[1, 2], 2, 2]}, r"strides\[0\] = \[1, 2\] has 2 entries but the network is "
                                  r"3D"),
    ({"strides": [[1, 2, 2], 2, 2], "padding": "valid", "downsample": "conv"},
     r"downsample='conv' \(strided convolutions\) cannot keep the center crops"),
])
def test_arguments_that_cannot_work_are_refused_with_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(spatial_dims=3, features=[2, 4, 8, 8], **kwargs)


# ------------------------------------------------------------------ old configs and checkpoints
@pytest.mark.parametrize(("dims", "kwargs"), [
    (3, {}),
    (2, {"encoder_block": "residual", "downsample": "conv", "upsample": "interpolate"}),
    (2, {"padding": "valid", "kernel_size": 5}),
])
def test_explicit_isotropic_plans_load_old_checkpoints_and_give_identical_outputs(dims, kwargs):
    features = [2, 4, 8]
    levels = len(features)
    kernel = kwargs.get("kernel_size", 3)
    torch.manual_seed(0)
    old = UNet(spatial_dims=dims, features=features, norm="batch", **kwargs).eval()
    saved = io.BytesIO()
    torch.save(old.state_dict(), saved)
    shape = old.valid_input_shape((30,) * dims) if kwargs.get("padding") == "valid" else (
        (13, 10, 9)[:dims])
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        reference = old(x)
    for plan in ({"kernel_sizes": [kernel] * levels, "strides": [2] * (levels - 1)},
                 {"kernel_sizes": [[kernel] * dims] * levels,
                  "strides": [[2] * dims] * (levels - 1)}):
        torch.manual_seed(1)  # other random weights until the checkpoint is loaded
        new = UNet(spatial_dims=dims, features=features, norm="batch", **kwargs, **plan).eval()
        assert repr(new) == repr(old)  # the same modules, as built before per-axis plans
        assert {k: v.shape for k, v in new.state_dict().items()} == {
            k: v.shape for k, v in old.state_dict().items()}
        saved.seek(0)
        new.load_state_dict(torch.load(saved), strict=True)
        with torch.no_grad():
            assert torch.equal(new(x), reference)
        assert new.output_shape(shape) == old.output_shape(shape)
        assert new.total_strides == (4,) * dims


def test_a_config_without_the_new_arguments_builds_the_network_it_always_did():
    torch.manual_seed(0)
    old = UNet(spatial_dims=2, features=[2, 4, 8])
    old_args = {k: v for k, v in old.config["init_args"].items()
                if k not in ("kernel_sizes", "strides")}  # a config written before them
    torch.manual_seed(0)
    rebuilt = build_network({"class_path": "segmentation.UNet", "init_args": old_args})
    assert rebuilt.config == old.config
    assert old.config["init_args"]["kernel_sizes"] is None
    for (name, a), (_, b) in zip(old.state_dict().items(), rebuilt.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_anisotropic_config_round_trips_through_yaml_and_is_counted_on_meta():
    net = UNet(spatial_dims=3, features=[2, 4, 8, 8], kernel_sizes=tuple(map(tuple,
               PROSTATE_KERNELS)), strides=PROSTATE_STRIDES)
    text = yaml.safe_dump(net.config)  # plain lists, no python tuples
    assert net.config["init_args"]["kernel_sizes"] == PROSTATE_KERNELS
    rebuilt = build_network(yaml.safe_load(text))
    assert rebuilt.kernel_sizes == net.kernel_sizes and rebuilt.strides == net.strides
    assert count_parameters(net.config["init_args"]) == net.num_parameters()
    # kernel-1 axes: fewer weights than 3×3×3 and Kaiming-initialised all the same
    weight = net.encoder.levels[0][0][0].weight
    assert weight.shape == (2, 1, 1, 3, 3) and weight.std() > 0

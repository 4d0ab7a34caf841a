"""`segmentation summary`: levels, parameters, shapes, the input for an output, errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from segmentation.cli import main
from segmentation.nets.unet import UNet
from segmentation.summary import add_summary_command, level_sizes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_summary_shows_levels_parameters_and_shapes(capsys):
    config = str(CONFIGS / "model" / "unet2d_ronneberger.yaml")
    assert main(["summary", config, "--input-shape", "572", "572"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 31,030,658" in out
    assert "input (572, 572) -> output (388, 388)" in out
    assert main(["summary", config, "--input-shape", "190", "190"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: --input-shape 190 190: input 190 (axis 0) is not valid")
    assert "nearest valid sizes are 188 and 204" in captured.err
    assert captured.err.count("\n") == 1


def test_summary_of_a_same_network_shows_the_padded_sizes_for_any_input_shape(capsys):
    config = str(CONFIGS / "model" / "unet3d_plain.yaml")  # same padding, depth 5
    assert main(["summary", config, "--input-shape", "63", "64", "40"]) == 0
    out = capsys.readouterr().out
    assert "input (63, 64, 40) -> output (63, 64, 40)" in out
    assert "zero-padded to (64, 64, 64)" in " ".join(out.split())
    assert "(64, 64, 64)" in out and "(2, 2, 2)" in out  # levels 0 and 5 of the padded input


ANISOTROPIC = {"kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
               "strides": [[1, 2, 2], [2, 2, 2]]}


@pytest.mark.parametrize("padding, shape, plan", [
    ("same", (13, 16, 10), {}), ("same", (9, 7, 4), {}), ("valid", (44, 44, 44), {}),
    ("same", (9, 7, 10), ANISOTROPIC), ("valid", (22, 44, 48), ANISOTROPIC)])
def test_level_sizes_are_the_feature_map_sizes_of_the_forward_pass(padding, shape, plan):
    net = UNet(spatial_dims=3, features=(2, 4, 8), padding=padding, norm=None, **plan).eval()
    seen: dict[str, list[tuple[int, ...]]] = {}
    net.encoder.register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("encoder", [tuple(f.shape[2:]) for f in out]))
    net.decoder.register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("decoder", [tuple(f.shape[2:]) for f in out]))
    with torch.no_grad():
        net(torch.zeros(1, 1, *shape))
    assert level_sizes(net, shape) == (seen["encoder"], seen["decoder"])


def test_summary_errors_are_one_line_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["summary", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {missing}: No such file or directory\n"
    assert captured.out == ""
    config = str(CONFIGS / "model" / "unet3d_plain.yaml")
    assert main(["summary", config, "--input-shape", "64", "64"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --input-shape 64 64: expected a 3D spatial shape, got (64, 64)\n"


def test_summary_finds_the_input_for_a_wanted_output_shape(capsys):
    parser = argparse.ArgumentParser()
    add_summary_command(parser.add_subparsers())
    config = str(CONFIGS / "model" / "unet2d_ronneberger.yaml")
    args = parser.parse_args(["summary", config, "--output-shape", "388", "388"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "smallest valid input for an output of at least (388, 388): (572, 572)" in out
    assert "input (572, 572) -> output (388, 388)" in out
    args = parser.parse_args(["summary", config, "--output-shape", "388"])
    assert args.func(args) == 1
    assert capsys.readouterr().err.startswith("error: --output-shape 388: expected a 2D")
    with pytest.raises(SystemExit):  # one shape or the other
        parser.parse_args(["summary", config, "--input-shape", "572", "572",
                           "--output-shape", "388", "388"])


def test_summary_of_an_anisotropic_network_shows_kernels_strides_and_per_axis_padding(
        tmp_path, capsys):
    config = tmp_path / "prostate.yaml"
    config.write_text(yaml.safe_dump({"class_path": "segmentation.UNet", "init_args": {
        "features": [2, 4, 8], **ANISOTROPIC}}))
    assert main(["summary", str(config), "--input-shape", "9", "30", "32"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "input (9, 30, 32) -> output (9, 30, 32)" in out
    assert "zero-padded to (10, 32, 32) (a multiple of the total strides (2, 4, 4)" in out
    assert "(1, 3, 3)" in out and "(1, 2, 2)" in out  # level 0's kernel, level 1's factor
    assert "(5, 8, 8)" in out  # the bottleneck: 10 / 2 slices, 32 / 4 pixels

"""Networks from configs: every model YAML builds, a network's config rebuilds it, bad args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segmentation import UNet
from segmentation.config import build_network, load_network

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_an_unknown_config_argument_is_a_value_error():
    with pytest.raises(ValueError, match="segmentation.UNet.*'bogus' is not accepted"):
        build_network({"class_path": "segmentation.UNet", "init_args": {"bogus": 1}})


class WiderUNet(UNet):
    """A subclass, as a user extending the network would write it."""


def test_config_rebuilds_the_same_network_class_and_arguments():
    net = WiderUNet(spatial_dims=2, features=(4, 8), act="LeakyReLU", long_skips=[False])
    assert net.config["class_path"] == f"{__name__}.WiderUNet"
    rebuilt = build_network(net.config)
    assert type(rebuilt) is WiderUNet and rebuilt.long_skips == (False,)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in net.state_dict().items()}
    assert UNet(spatial_dims=2, features=(4, 8)).config["class_path"] == "segmentation.UNet"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("model/*.yaml")), ids=lambda p: p.name)
def test_every_network_config_instantiates_with_its_own_arguments(path):
    net = load_network(path)
    assert isinstance(net, UNet)
    written = yaml.safe_load(path.read_text())["init_args"]
    assert {k: net.config["init_args"][k] for k in written} == written
    assert net.depth == len(written["features"]) - 1

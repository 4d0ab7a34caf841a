"""Building objects from the project's YAML configs (``class_path`` + ``init_args``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import ArgumentParser
from torch import nn


def load_network(config: str | Path) -> nn.Module:
    """Instantiate the network a YAML file describes.

    Args:
        config: a file holding ``class_path``/``init_args`` for an ``nn.Module`` (as in
            ``configs/model/``), or a training config whose ``model.init_args.net`` holds one.

    Returns:
        The network, with freshly initialised weights.

    Raises:
        ValueError: if the file names no network.
    """
    path = Path(config)
    spec = yaml.safe_load(path.read_text())
    if isinstance(spec, dict) and "class_path" not in spec:
        spec = (spec.get("model") or {}).get("init_args", {}).get("net")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{path}: no network found; expected class_path/init_args at the top "
                         "or under model.init_args.net")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module)
    parsed = parser.parse_object({"net": spec})
    return parser.instantiate_classes(parsed).net

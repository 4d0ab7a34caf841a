"""Building objects from the project's YAML configs (``class_path`` + ``init_args``)."""

from __future__ import annotations

from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser
from torch import nn


def build_network(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a network, freshly initialised, from ``{"class_path": ..., "init_args": {...}}``.

    Raises:
        ValueError: if ``spec`` names no class or arguments the class does not take.
    """
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"expected a network as class_path/init_args, got {spec!r}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module)
    try:
        parsed = parser.parse_object({"net": spec})
    except ArgumentError as err:  # e.g. an init_arg the class does not take
        raise ValueError(f"network {spec.get('class_path')}: {' '.join(str(err).split())}"
                         ) from err
    return parser.instantiate_classes(parsed).net


def load_network(config: str | Path) -> nn.Module:
    """Instantiate the network (freshly initialised) a YAML file describes.

    ``config`` holds ``class_path``/``init_args`` for an ``nn.Module`` (as in ``configs/model/``),
    or is a training config whose ``model.net`` holds one.

    Raises:
        ValueError: if the file names no network.
    """
    path = Path(config)
    spec = yaml.safe_load(path.read_text())
    if isinstance(spec, dict) and "class_path" not in spec:
        model = spec.get("model") or {}
        spec = model.get("net") or (model.get("init_args") or {}).get("net")
    if isinstance(spec, str):  # a training config naming a network file
        return load_network(path.parent / spec if not Path(spec).is_absolute() else spec)
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{path}: no network found; expected class_path/init_args at the top "
                         "or under model.net")
    return build_network(spec)

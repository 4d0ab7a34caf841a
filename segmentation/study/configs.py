"""Each variant's fit config, parsed as ``segmentation fit`` parses it, before any run starts.

A study refuses a bad override (an unknown key, a value of the wrong type) before the first run
rather than when that variant's turn comes hours later: every variant's argument list is parsed
by the fit command's own parser (LightningCLI, nothing instantiated), which is what
``--print_config`` does. The parsed config also gives each variant's network size and a hash of
its settings, so runs made with different settings are never mixed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from torch.utils.flop_counter import FlopCounterMode

import segmentation.config
from segmentation.nets.unet import UNet
from segmentation.training.cli import SegmentationCLI, channels_from_dataset, namespace_to_dict

# Settings that say where or how fast a run goes, not what it computes: left out of the hash,
# so a run can resume on another device. The seed and fold are hashed per run.
NOT_HASHED = ("config", "name", "runs_dir", "ckpt_path", "seed_everything", "data.fold",
              "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
              "trainer.enable_progress_bar", "data.num_workers")


class _Parsed(Exception):  # noqa: N818 (a signal, not an error)
    """Carries the parsed config out of LightningCLI before anything is instantiated."""

    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnlyCLI(SegmentationCLI):
    """The fit command's parser and links, stopped before classes are instantiated."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config[self.subcommand])


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """Dotted overrides as ``segmentation fit`` arguments: ``--key=VALUE``.

    Strings go as they are (the parser reads a string argument verbatim, quotes included);
    anything else as JSON, which the parser reads as YAML.
    """
    return [f"--{key}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in overrides.items()]


def parse_fit_config(args: Sequence[str]) -> dict[str, Any]:
    """Parse ``segmentation fit ARGS`` without running it; the resolved config as plain data.

    The network's in/out channels are set from the dataset as ``fit`` sets them, when the
    dataset exists.

    Raises:
        ValueError: the parser's one-line reason (an unknown key, a bad value, a missing
            config file), without the usage text.
    """
    quiet = logging.getLogger("lightning_fabric.utilities.seed")  # "Seed set to N"
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _ParseOnlyCLI(args=["fit", *args], parser_kwargs={"exit_on_error": False})
    except _Parsed as parsed:
        config = parsed.config
    except (argparse.ArgumentError, SystemExit) as error:
        message = " ".join(str(error).split()) if str(error) else "the arguments were refused"
        raise ValueError(message) from None
    finally:
        quiet.setLevel(level)
    with contextlib.redirect_stderr(io.StringIO()):
        channels_from_dataset(config)
    return namespace_to_dict(config)


def settings_hash(config: Mapping[str, Any]) -> str:
    """A short hash of what a run computes (``NOT_HASHED`` keys left out)."""
    kept = json.loads(json.dumps(config, default=str))
    for key in NOT_HASHED:
        *parents, last = key.split(".")
        node = kept
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(last, None)
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class NetworkSize:
    """Parameters of a network and the FLOPs of one forward pass over one patch."""

    params: int
    flops_per_patch: int


def network_size(config: Mapping[str, Any]) -> NetworkSize:
    """The size of a parsed config's ``model.net`` for one patch of ``data.patch_size``.

    Built on the meta device (no memory, no weights drawn), counted with PyTorch's
    FlopCounterMode in eval mode, batch 1 (a multiply-add counts as two FLOPs).
    """
    net = build_network(config)
    patch = list(config["data"]["patch_size"])
    params = net.num_parameters() if isinstance(net, UNet) else sum(
        p.numel() for p in net.parameters())
    channels = int(getattr(net, "in_channels", 1))
    if len(patch) == 3 and getattr(net, "spatial_dims", 3) == 2:
        patch = [n for axis, n in enumerate(patch)
                 if axis != config["data"].get("slice_axis", 2)]
    with torch.device("meta"):
        x = torch.zeros(1, channels, *patch)
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(x)
    return NetworkSize(int(params), int(counter.get_total_flops()))


def build_network(config: Mapping[str, Any], **changes: Any) -> torch.nn.Module:
    """``model.net`` of a parsed config, built on the meta device, with ``changes`` applied."""
    net = config["model"]["net"]
    spec = {"class_path": net["class_path"], "init_args": {**net.get("init_args", {}), **changes}}
    with torch.device("meta"):
        return segmentation.config.build_network(spec)


def net_init_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """``model.net.init_args`` of a parsed config (refuses networks other than UNet)."""
    if not isinstance(build_network(config), UNet):
        raise ValueError("capacity matching widens a segmentation.UNet decoder; model.net is "
                         f"{config['model']['net']['class_path']}")
    return dict(config["model"]["net"].get("init_args", {}))


def config_paths(configs: Sequence[Path]) -> list[str]:
    """``--config`` arguments for a chain of config files."""
    return [arg for path in configs for arg in ("--config", str(path))]

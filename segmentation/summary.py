"""``segmentation summary``: what a configured network does to a given input shape."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from rich.console import Console
from rich.table import Table

from segmentation.config import load_network
from segmentation.nets.unet import UNet


def level_table(net: UNet, input_shape: Sequence[int]) -> Table:
    """A table with one row per level: channels, encoder and decoder sizes, long skip."""
    sizes = [net.encoder.output_sizes(n) for n in input_shape]
    dec = [net.decoder.output_sizes(s) for s in sizes] if net.padding == "valid" else None
    table = Table(title=f"{type(net).__name__} levels for input {tuple(input_shape)}")
    for column in ("level", "channels", "encoder output", "long skip", "decoder output"):
        table.add_column(column)
    for level, channels in enumerate(net.encoder.channels):
        enc = tuple(s[level] for s in sizes)
        if net.padding == "same":
            enc = tuple(-(-n // 2 ** level) for n in input_shape)
        is_bottleneck = level == net.depth
        skip = "-" if is_bottleneck else ("on" if net.long_skips[level] else "off")
        if is_bottleneck:
            out = "-"
        elif dec is not None:
            out = str(tuple(d[level] for d in dec))
        else:
            out = str(enc)
        table.add_row(str(level), str(channels), str(enc), skip, out)
    return table


def run_summary(args: argparse.Namespace) -> int:
    """Print the network's levels, parameter count and output shape; run one forward pass."""
    console = Console()
    net = load_network(args.config)
    if not isinstance(net, UNet):
        console.print(f"{type(net).__name__}: {sum(p.numel() for p in net.parameters()):,} "
                      "parameters")
        return 0
    shape = tuple(args.input_shape) if args.input_shape else net.valid_input_shape(
        [64] * net.spatial_dims)
    try:
        out_shape = net.output_shape(shape)
    except ValueError as err:
        console.print(f"error: {err}", markup=False)
        return 1
    console.print(level_table(net, shape))
    console.print(f"parameters: {net.num_parameters():,} "
                  f"(+{net.num_parameters(True) - net.num_parameters(False):,} in deep-supervision "
                  "heads)")
    console.print(f"input {shape} -> output {out_shape}")
    if args.forward:
        net.eval()
        with torch.no_grad():
            logits = net(torch.randn(1, net.in_channels, *shape))
        console.print(f"forward pass: logits {tuple(logits.shape)}")
    return 0


def add_summary_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``segmentation summary``."""
    parser = subparsers.add_parser(
        "summary", help="show a configured network's levels, parameters and shapes",
        description="Show what a network config builds: channels and sizes per level, long "
                    "skips, parameter count and the output shape for an input shape.")
    parser.add_argument("config", help="network YAML (class_path/init_args) or a training config")
    parser.add_argument("--input-shape", type=int, nargs="+", metavar="N",
                        help="spatial input shape (default: the smallest valid one ≥ 64)")
    parser.add_argument("--forward", action="store_true",
                        help="also run one forward pass on random data")
    parser.set_defaults(func=run_summary)

"""``segmentation summary``: what a configured network does to a given input shape."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import yaml
from rich.console import Console
from rich.table import Table

from segmentation.config import load_network
from segmentation.nets.unet import UNet


def level_sizes(net: UNet, input_shape: Sequence[int]
                ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Feature-map sizes of every level for a spatial input shape, as the forward pass has them.

    Returns:
        (encoder, decoder): ``encoder[l]`` is the spatial size S_l of level l's encoder output,
        l = 0 … depth (the last is the bottleneck); ``decoder[l]`` is T_l, the size of level
        l's decoder output, l = 0 … depth − 1. For a "same" network these are the sizes of
        the input zero-padded to a multiple of the per-axis total stride (2**depth for an
        isotropic network; see :meth:`UNet.encoder_input_shape`). Each axis follows its own
        kernel sizes and strides.

    Raises:
        InvalidSizeError: (a ValueError) if the shape is not valid for a "valid" network.
    """
    padded = net.encoder_input_shape(input_shape)
    per_axis = [net.encoder.output_sizes(n, axis) for axis, n in enumerate(padded)]
    decoded = [net.decoder.output_sizes(sizes, axis) for axis, sizes in enumerate(per_axis)]
    encoder = [tuple(sizes[level] for sizes in per_axis) for level in range(net.depth + 1)]
    decoder = [tuple(sizes[level] for sizes in decoded) for level in range(net.depth)]
    return encoder, decoder


def level_table(net: UNet, input_shape: Sequence[int]) -> Table:
    """A rich table with one row per level: channels, encoder output, long skip, decoder output.

    Long skip is "on", "off" or "-" for the bottleneck; sizes are as in :func:`level_sizes`
    (which raises for an invalid shape). For a "same" network whose input is padded, the
    caption gives the padded shape. A network whose kernel sizes or strides differ between
    axes gets two more columns: each level's kernel and the factor it was downsampled by.
    """
    encoder, decoder = level_sizes(net, input_shape)
    table = Table(title=f"{type(net).__name__} levels for input {tuple(input_shape)}")
    padded = net.encoder_input_shape(input_shape)
    if padded != tuple(input_shape):
        strides = net.total_strides
        multiple = (f"2**depth = {strides[0]}" if len(set(strides)) == 1
                    else f"the total strides {strides} per axis")
        table.caption = (f"same padding: the input is zero-padded to {padded} (a multiple of "
                         f"{multiple}) and the output cropped back")
    per_axis = not net.same_on_every_axis
    columns = ["level", "channels", *(["kernel", "downsampling"] if per_axis else []),
               "encoder output", "long skip", "decoder output"]
    for column in columns:
        table.add_column(column)
    for level, channels in enumerate(net.encoder.channels):
        is_bottleneck = level == net.depth
        skip = "-" if is_bottleneck else ("on" if net.long_skips[level] else "off")
        out = "-" if is_bottleneck else str(decoder[level])
        shape_columns = ([str(net.kernel_sizes[level]),
                          "-" if level == 0 else str(net.strides[level - 1])]
                         if per_axis else [])
        table.add_row(str(level), str(channels), *shape_columns, str(encoder[level]), skip, out)
    return table


def run_summary(args: argparse.Namespace) -> int:
    """``segmentation summary``: print a network's levels, parameter count and output shape.

    For a :class:`UNet`: the table of :func:`level_table`, the parameter count and the output
    shape, and with ``--forward`` the logits' shape of one forward pass on random data. Any
    other network: its class name and parameter count. Without ``--input-shape`` or
    ``--output-shape``, the input is the smallest valid shape ≥ 64 per axis.

    Returns:
        0 on success; 1 after one ``error: ...`` line on stderr when the config file is
        missing or names no network, or the shape is not valid for the network.
    """
    try:
        net = load_network(args.config)
    except (OSError, yaml.YAMLError, ValueError) as err:
        message = (f"{args.config}: {err.strerror or 'cannot be read'}"
                   if isinstance(err, OSError) else " ".join(str(err).split()))
        print(f"error: {message}", file=sys.stderr)
        return 1
    console = Console()
    if not isinstance(net, UNet):
        console.print(f"{type(net).__name__}: {sum(p.numel() for p in net.parameters()):,} "
                      "parameters")
        return 0
    wanted = args.output_shape
    try:
        if args.input_shape:
            shape = tuple(args.input_shape)
        elif wanted:
            shape = net.input_shape_for_output(wanted)
        else:
            shape = net.valid_input_shape([64] * net.spatial_dims)
        out_shape = net.output_shape(shape)
    except ValueError as err:
        option, sizes = (("--input-shape", args.input_shape) if args.input_shape
                         else ("--output-shape", wanted))
        given = f"{option} {' '.join(map(str, sizes))}: " if sizes else ""
        print(f"error: {given}{err}", file=sys.stderr)
        return 1
    console.print(level_table(net, shape))
    console.print(f"parameters: {net.num_parameters():,} "
                  f"(+{net.num_parameters(True) - net.num_parameters(False):,} in deep-supervision "
                  "heads)")
    if wanted:
        console.print(f"smallest valid input for an output of at least {tuple(wanted)}: {shape}")
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
                    "skips, parameter count and the output shape for an input shape (or the "
                    "smallest input for a wanted output shape).")
    parser.add_argument("config", help="network YAML (class_path/init_args) or a training config")
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--input-shape", type=int, nargs="+", metavar="N",
                        help="spatial input shape (default: the smallest valid one ≥ 64)")
    shapes.add_argument("--output-shape", type=int, nargs="+", metavar="N",
                        help="wanted spatial output shape: use the smallest valid input whose "
                             "output is at least this large")
    parser.add_argument("--forward", action="store_true",
                        help="also run one forward pass on random data")
    parser.set_defaults(func=run_summary)

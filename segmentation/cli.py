"""The ``segmentation`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from segmentation import __version__
from segmentation.data.commands import add_data_commands
from segmentation.summary import add_summary_command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``segmentation`` with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="segmentation",
        description="U-Net segmentation of medical images: data, networks, training, inference.")
    parser.add_argument("--version", action="version", version=f"segmentation {__version__}")
    subparsers = parser.add_subparsers(title="subcommands", metavar="COMMAND")
    add_data_commands(subparsers)
    add_summary_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0 if not argv else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

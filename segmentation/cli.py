"""The ``segmentation`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from segmentation import __version__
from segmentation.data.commands import add_data_commands
from segmentation.evaluation import add_evaluate_command
from segmentation.inference.commands import add_infer_command
from segmentation.summary import add_summary_command

LIGHTNING_SUBCOMMANDS = {
    "fit": "train a network (LightningCLI: segmentation fit --config configs/quickstart.yaml)",
    "validate": "validate a checkpoint on the validation fold (LightningCLI)",
    "test": "per-case Dice/HD95 of a checkpoint, written to test_metrics.csv (LightningCLI)",
    "predict": "run the model's predict loop (LightningCLI)",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``segmentation`` with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="segmentation",
        description="U-Net segmentation of medical images: data, networks, training, inference.")
    parser.add_argument("--version", action="version", version=f"segmentation {__version__}")
    subparsers = parser.add_subparsers(title="subcommands", metavar="COMMAND")
    for name, help_text in LIGHTNING_SUBCOMMANDS.items():
        # Listed here for --help; the arguments are LightningCLI's (segmentation fit --help).
        subparsers.add_parser(name, help=help_text, add_help=False)
    add_data_commands(subparsers)
    add_infer_command(subparsers)
    add_evaluate_command(subparsers)
    add_summary_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from segmentation.training.cli import run_lightning

        return run_lightning(None if from_command_line else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0 if not argv else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

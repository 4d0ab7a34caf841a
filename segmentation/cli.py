"""The ``segmentation`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from segmentation import __version__
from segmentation.data.commands import add_data_commands
from segmentation.evaluation.commands import add_evaluate_command
from segmentation.inference.commands import add_infer_command, root_cause
from segmentation.instruments.landscape_command import add_landscape_command
from segmentation.instruments.plot_command import add_plot_command
from segmentation.planning.commands import add_plan_command
from segmentation.study.commands import add_study_command
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
    add_plan_command(subparsers)
    add_infer_command(subparsers)
    add_evaluate_command(subparsers)
    add_summary_command(subparsers)
    add_study_command(subparsers)
    add_landscape_command(subparsers)
    add_plot_command(subparsers)
    return parser


DEBUG_ENV = "SEGMENTATION_DEBUG"


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so half-written files are cleaned up."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    A refusal or failure prints one ``error: ...`` line (set SEGMENTATION_DEBUG=1 for the
    traceback) and exits 1; usage errors exit 2; Ctrl-C exits 130 and SIGTERM 143, after the
    file being written is removed (outputs are written to a temporary file and renamed).
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            from segmentation.training.cli import run_lightning

            return run_lightning(None if from_command_line else argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        if not hasattr(args, "func"):
            parser.print_help()
            return 0 if not argv else 2
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return int(args.func(args) or 0)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {describe(error)}", file=sys.stderr)
        return 1


def describe(error: BaseException) -> str:
    """An exception as the user should read it: the innermost reason, its type where unclear."""
    error = root_cause(error)  # e.g. not MONAI's "applying transform" around the reason
    message = str(error).strip() or type(error).__name__
    if isinstance(error, ValueError | OSError):
        return message
    return f"{type(error).__name__}: {message} (an unexpected error; {DEBUG_ENV}=1 shows where)"


if __name__ == "__main__":
    sys.exit(main())

"""``segmentation plot gradient-flow``: figures and summary numbers of recorded gradient flow.

The parser only; the plotting (matplotlib) is imported when the command runs, so the
``segmentation`` command starts without it. Nothing here needs torch or Lightning.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HEATMAP_FILE = "gradient_flow.png"
LEVELS_FILE = "gradient_flow_levels.png"


def add_plot_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``segmentation plot gradient-flow RUN_DIR [RUN_DIR ...]``."""
    plot = subparsers.add_parser(
        "plot", help="figures of what training recorded (gradient flow)",
        description="Draw the figures of a run's training instruments.")
    commands = plot.add_subparsers(title="plot commands", metavar="COMMAND")
    flow = commands.add_parser(
        "gradient-flow", help="per-layer gradient flow of runs trained with GradientFlow",
        description="Heatmaps of every convolution's relative update (or gradient norm) over "
                    f"training, one panel per run on one colour scale ({HEATMAP_FILE}), the "
                    f"median update per U level ({LEVELS_FILE}), and each run's summary "
                    "numbers. Runs must have been trained with --trainer.callbacks+="
                    "segmentation.training.gradient_flow.GradientFlow.")
    flow.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="a run's version folder (runs/NAME/version_N) or its run folder "
                           "(runs/NAME: every version in order, as a resumed run wrote them)")
    flow.add_argument("--output", default=None,
                      help="folder for the PNGs (default: the first RUN_DIR)")
    flow.add_argument("--quantity", choices=("rel_update", "grad_norm"), default="rel_update",
                      help="what the heatmap shows (default: rel_update, ‖Δw‖/‖w‖ per step)")
    flow.add_argument("--overwrite", action="store_true",
                      help="replace existing PNGs")
    flow.set_defaults(func=_gradient_flow)
    plot.set_defaults(func=lambda _: (plot.print_help(), 2)[1])


def _gradient_flow(args: argparse.Namespace) -> int:
    return plot_gradient_flow_runs(args.run_dirs, args.output, quantity=args.quantity,
                                   overwrite=args.overwrite)


def output_files(output: Path, overwrite: bool) -> tuple[Path, Path]:
    """The two PNG paths in ``output``, refused before anything is drawn.

    Raises:
        ValueError: one line, if ``output`` is not a folder or a PNG exists without
            ``overwrite``.
    """
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: not a folder (--output names the folder for the PNGs)")
    targets = (output / HEATMAP_FILE, output / LEVELS_FILE)
    for target in targets:
        if target.exists() and not overwrite:
            raise ValueError(f"{target}: exists; pass --overwrite to replace it")
    return targets


def describe_summary(label: str, summary: dict[str, Any]) -> str:
    """One line of a run's summary numbers (see ``summarise_gradient_flow``)."""

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    ratio = summary["first_last_grad_ratio"]
    share = summary["frozen_share"]
    line = (f"{label}: {summary['records']} records (steps {summary['first_step']}–"
            f"{summary['last_step']}), {summary['layers']} layers; gradient norm "
            f"{summary['first_layer']} / {summary['last_layer']}: early "
            f"{number(ratio['early'])}, mid {number(ratio['mid'])}, late "
            f"{number(ratio['late'])}; frozen (median update < {summary['frozen_threshold']:g}):"
            f" {len(summary['frozen_layers'])}/{summary['layers']} layers"
            f" ({'n/a' if share is None else f'{share:.0%}'})")
    if summary["clip_val"] is not None:
        line += (f"; total gradient norm above the clipping value {summary['clip_val']:g} in "
                 f"{summary['clipped_share']:.0%} of records")
    return line


def plot_gradient_flow_runs(run_dirs: Sequence[str | Path], output: str | Path | None = None,
                            *, quantity: str = "rel_update", overwrite: bool = False) -> int:
    """Read the runs' records, print their summaries, write the two PNGs; returns 0.

    Every run and the output are checked before anything is written.

    Raises:
        ValueError: one line naming the folder or file: a missing run folder or one without
            records, an output that is a file, or an existing PNG without ``overwrite``.
    """
    from segmentation.instruments.gradient_flow_figures import (
        plot_gradient_flow,
        plot_level_updates,
    )
    from segmentation.training.gradient_flow_summary import (
        read_gradient_flow,
        summarise_gradient_flow,
    )

    records = [(str(run_dir), read_gradient_flow(run_dir)) for run_dir in run_dirs]
    folder = Path(output if output is not None else run_dirs[0])
    heatmap, levels = output_files(folder, overwrite)
    for label, record in records:
        print(describe_summary(label, summarise_gradient_flow(record)))
    folder.mkdir(parents=True, exist_ok=True)
    for written in (plot_gradient_flow(records, heatmap, quantity=quantity),
                    plot_level_updates(records, levels)):
        print(f"wrote {written}")
    return 0

"""Why the variants differ: gradient flow and loss landscapes of a study, side by side.

Gradient flow is recorded by the runs themselves when the study's fit config switches the
``GradientFlow`` callback on (``trainer.callbacks``); every run with records is summarised, and
the first seed's first fold of every variant is drawn with one colour scale. Loss landscapes
are measured after training, for the first seed's first fold of every variant, when the study
file asks for them (``landscape: {dims: 2, steps: 9, patches: 4}``): the same patches, the
same directions' seed, the same axes and the same contour levels for every variant, so the
panels compare the solutions, not the measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segmentation.study.folders import DONE_JSON, Cell

LANDSCAPES_DIR = "landscapes"
LANDSCAPE_FILE, PATCHES_FILE = "landscape.npz", "patches.pt"
GRADIENT_FLOW_PLOT, GRADIENT_LEVELS_PLOT = "gradient_flow.png", "gradient_flow_levels.png"
LANDSCAPES_PLOT = "landscapes.png"
LANDSCAPE_DEFAULTS = {"dims": 2, "steps": 9, "range": 1.0, "patches": 4, "seed": 0}


def first_cells(directory: Path, variants: Sequence[str], seeds: Sequence[int],
                folds: Sequence[int]) -> dict[str, Cell]:
    """Each variant's run of the first seed and the first fold."""
    seed, fold = seeds[0], folds[0]
    return {v: Cell(v, seed, fold, directory / v / f"seed{seed}-fold{fold}") for v in variants}


def measure_landscapes(cells: Mapping[str, Cell], directory: Path, settings: Mapping[str, Any],
                       say: Callable[[str], None] = print, device: str = "auto") -> list[str]:
    """Measure the loss landscape of every finished cell; returns the variants measured.

    The first variant's checkpoint chooses the patches (stored in ``landscapes/patches.pt``);
    every variant is evaluated on those, with the same directions' seed and grid. A complete
    landscape is kept; a partial one is continued.
    """
    import torch

    from segmentation.inference.checkpoint import last_checkpoint_of_run
    from segmentation.inference.devices import resolve_device
    from segmentation.instruments.fixed_patches import PatchSet
    from segmentation.instruments.landscape import Landscape, compute_landscape
    from segmentation.instruments.training_run import training_inputs

    options = {**LANDSCAPE_DEFAULTS, **settings}
    root = directory / LANDSCAPES_DIR
    root.mkdir(parents=True, exist_ok=True)
    patches: PatchSet | None = None
    measured = []
    for variant, cell in cells.items():
        if not (cell.directory / DONE_JSON).is_file():
            say(f"landscape: {cell.label} is not done; skipped")
            continue
        out = root / variant / LANDSCAPE_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        previous = Landscape.load(out) if out.is_file() else None
        if previous is not None and previous.complete:
            measured.append(variant)
            continue
        inputs = training_inputs(last_checkpoint_of_run(cell.directory))
        if patches is None:
            if (root / PATCHES_FILE).is_file():
                patches = PatchSet.load(root / PATCHES_FILE)
            else:
                patches = inputs.patches(int(options["patches"]), int(options["seed"]))
                patches.save(root / PATCHES_FILE)
        say(f"landscape: {cell.label} ({options['steps']} steps per axis, "
            f"{len(patches)} patches)")
        compute_landscape(inputs.net, patches, inputs.loss_fn, dims=int(options["dims"]),
                          steps=int(options["steps"]), range_=float(options["range"]),
                          seed=int(options["seed"]), device=resolve_device(device),
                          batch_size=inputs.record.batch_size, resume_from=previous,
                          save=lambda landscape, path=out: landscape.save(path),
                          settings={"variant": variant, "run": str(cell.directory),
                                    "loss": inputs.loss_name})
        measured.append(variant)
        del inputs  # one network at a time on the device
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return measured


@dataclass
class DynamicsSection:
    """The report's training-dynamics section: Markdown lines and the files written."""

    lines: list[str]
    files: list[Path]


def dynamics_section(directory: Path, variants: Sequence[str], seeds: Sequence[int],
                     folds: Sequence[int], plots: bool = True) -> DynamicsSection:
    """Summaries and figures of whatever gradient flow and landscapes the study has."""
    cells = first_cells(directory, variants, seeds, folds)
    lines: list[str] = []
    files: list[Path] = []
    flow = _gradient_flow(directory, variants, cells, plots)
    landscapes = _landscapes(directory, variants, plots)
    for part in (flow, landscapes):
        lines += part.lines
        files += part.files
    if lines:
        lines = ["## Training dynamics", "", *lines]
    return DynamicsSection(lines, files)


def _gradient_flow(directory: Path, variants: Sequence[str], cells: Mapping[str, Cell],
                   plots: bool) -> DynamicsSection:
    """Per variant: the gradient-flow summary over its runs; heatmaps of the first runs."""
    from segmentation.training.gradient_flow_summary import (
        read_gradient_flow,
        summarise_gradient_flow,
    )

    rows, drawn = [], []
    for variant in variants:
        summaries = []
        for run in sorted((directory / variant).glob("seed*-fold*")):
            if not (run / DONE_JSON).is_file():
                continue
            try:
                record = read_gradient_flow(run)
            except ValueError:  # this run recorded none
                continue
            summaries.append(summarise_gradient_flow(record))
            if run == cells[variant].directory:
                drawn.append((variant, record))
        if summaries:
            rows.append(_flow_row(variant, summaries))
    if not rows:
        return DynamicsSection([], [])
    lines = ["### Gradient flow", "",
             "Recorded during training by the `GradientFlow` callback (every convolution "
             "weight: gradient norm before clipping and relative update ‖Δw‖/‖w‖ of the "
             "step). Ratio: the first encoder convolution's gradient norm over the last "
             "decoder convolution's, in the first, middle and last third of training; "
             "frozen: the share of convolutions whose median relative update is below 1e-4. "
             "Means over the runs with records.", "",
             "| variant | runs | ratio early | ratio mid | ratio late | frozen |",
             "|---|---|---|---|---|---|", *rows, ""]
    files: list[Path] = []
    if plots and drawn:
        from segmentation.instruments.gradient_flow_figures import (
            plot_gradient_flow,
            plot_level_updates,
        )

        files = [plot_gradient_flow(drawn, directory / GRADIENT_FLOW_PLOT),
                 plot_level_updates(drawn, directory / GRADIENT_LEVELS_PLOT)]
        lines += ["Relative update per convolution over training (first seed, first fold; "
                  "one colour scale), and the median per U level:", "",
                  f"![{GRADIENT_FLOW_PLOT}]({GRADIENT_FLOW_PLOT})", "",
                  f"![{GRADIENT_LEVELS_PLOT}]({GRADIENT_LEVELS_PLOT})", ""]
    return DynamicsSection(lines, files)


def _flow_row(variant: str, summaries: Sequence[Mapping[str, Any]]) -> str:
    """One Markdown row: the mean of each summary number over runs."""
    def mean(values: Sequence[float | None]) -> str:
        finite = [v for v in values if v is not None and np.isfinite(v)]
        return f"{np.mean(finite):.3g}" if finite else "–"

    ratios = [s.get("first_last_grad_ratio") or {} for s in summaries]
    cells = [mean([r.get(phase) for r in ratios]) for phase in ("early", "mid", "late")]
    frozen = mean([s.get("frozen_share") for s in summaries])
    return f"| {variant} | {len(summaries)} | {' | '.join(cells)} | {frozen} |"


def _landscapes(directory: Path, variants: Sequence[str], plots: bool) -> DynamicsSection:
    """Sharpness per variant and the landscapes side by side, with shared levels."""
    from segmentation.instruments.landscape import Landscape
    from segmentation.instruments.landscape_summary import sharpness_summary

    found = []
    for variant in variants:
        path = directory / LANDSCAPES_DIR / variant / LANDSCAPE_FILE
        if path.is_file():
            landscape = Landscape.load(path)
            if landscape.complete:
                found.append((variant, landscape))
    if not found:
        return DynamicsSection([], [])
    first = found[0][1].settings
    lines = ["### Loss landscapes", "",
             f"Filter-normalised random directions (Li et al. 2018; seed {first.get('seed')}, "
             f"biases and normalisation parameters fixed), the training loss on the same "
             f"{first.get('patches')} fixed training patches for every variant, networks in "
             f"eval mode, ±{first.get('range')} in {first.get('steps')} steps per axis; "
             "first seed, first fold of each variant. Loss increase at α = 0.25 and 0.5: the "
             "mean rise over both signs (and both directions in 2D); curvature ratio: the "
             "largest over the smallest absolute eigenvalue of the Hessian at the centre.", "",
             "| variant | loss at the centre | rise at 0.25 | rise at 0.5 | curvature ratio |",
             "|---|---|---|---|---|"]
    for variant, landscape in found:
        summary = sharpness_summary(landscape)
        rise = summary.get("loss_increase") or {}
        ratio = summary.get("curvature_ratio")
        lines.append(f"| {variant} | {summary['centre_loss']:.4f} | {_number(rise.get('0.25'))}"
                     f" | {_number(rise.get('0.5'))} | {_number(ratio)} |")
    lines.append("")
    files: list[Path] = []
    if plots:
        from segmentation.instruments.landscape_figures import plot_landscapes

        files = [plot_landscapes(found, directory / LANDSCAPES_PLOT)]
        lines += ["Same axes, same contour levels:", "",
                  f"![{LANDSCAPES_PLOT}]({LANDSCAPES_PLOT})", ""]
    return DynamicsSection(lines, files)


def _number(value: float | None) -> str:
    """Three significant digits, or a dash."""
    return "–" if value is None or not np.isfinite(value) else f"{value:.3g}"

"""Figures of gradient flow: per-layer heatmaps and median updates per U level over training.

Both take ``(label, record)`` pairs, one per run, and only read the records
(:class:`~segmentation.training.gradient_flow_summary.GradientFlowRecord`, whose arrays are
read-only). The ``draw_*`` functions return the figure, the ``plot_*`` ones write it as a PNG
(atomically) and close it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from segmentation.atomic import write_atomic
from segmentation.training.gradient_flow_summary import GradientFlowRecord, nan_median

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

Runs = Sequence[tuple[str, GradientFlowRecord]]
QUANTITIES = {"rel_update": "relative update ‖Δw‖ / ‖w‖",
              "grad_norm": "gradient norm ‖∇w‖ (before clipping)"}
PART_COLOURS = {"encoder": "tab:blue", "bottleneck": "black", "decoder": "tab:orange",
                "head": "tab:green"}
_MAX_X_TICKS = 6


def _positive(values: np.ndarray) -> np.ndarray:
    """Values with zeros, negatives and non-finite entries masked.

    A log scale cannot place them; masked, they take the colour map's "bad" colour (grey).
    """
    return np.ma.masked_where(~np.isfinite(values) | (values <= 0), values)


def shared_log_norm(arrays: Sequence[np.ndarray]) -> LogNorm:
    """One logarithmic colour scale spanning the positive finite values of every array."""
    positive = [a[np.isfinite(a) & (a > 0)] for a in arrays]
    values = np.concatenate([p.ravel() for p in positive]) if positive else np.array([])
    if not values.size:  # nothing to scale by: any range will do
        return LogNorm(vmin=1e-8, vmax=1.0)
    low, high = float(values.min()), float(values.max())
    return LogNorm(vmin=low, vmax=high if high > low else low * 10)


def _part_boundaries(parts: Sequence[str]) -> list[float]:
    """Row positions between layers of different parts (encoder | bottleneck | decoder …)."""
    return [i - 0.5 for i in range(1, len(parts)) if parts[i] != parts[i - 1]]


def _step_ticks(ax: plt.Axes, steps: np.ndarray) -> None:
    """Label record columns with their training steps, at most a few ticks."""
    if not len(steps):
        return
    positions = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), _MAX_X_TICKS))
                          .round().astype(int))
    ax.set_xticks(positions, [str(int(steps[p])) for p in positions])
    ax.set_xlabel("training step")


def _label_layers(ax: plt.Axes, record: GradientFlowRecord) -> None:
    """Layer names on the y axis, coloured by the part of the U they belong to."""
    size = 8 if len(record.layers) <= 40 else 6 if len(record.layers) <= 80 else 4
    ax.set_yticks(range(len(record.layers)), record.layers, fontsize=size)
    for label, part in zip(ax.get_yticklabels(), record.parts, strict=True):
        label.set_color(PART_COLOURS.get(part, "grey"))


def draw_gradient_flow(records: Runs, quantity: str = "rel_update") -> Figure:
    """Heatmaps of a per-layer quantity, layers × records, one panel per run.

    Every panel uses the same logarithmic colour scale (one ``LogNorm``, one colour bar);
    zeros and missing values are grey. Rows are the layers in U order, named and coloured by
    part, with white lines between encoder, bottleneck, decoder and heads; columns are the
    records, labelled with their training steps.

    Args:
        records: (label, record) per run.
        quantity: "rel_update" or "grad_norm".

    Raises:
        ValueError: for another quantity or no runs.
    """
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity={quantity!r}; choose one of {', '.join(QUANTITIES)}")
    if not records:
        raise ValueError("no runs to plot")
    values = [getattr(record, quantity).T for _, record in records]  # (L, R) each
    norm = shared_log_norm(values)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    same_layers = len({record.layers for _, record in records}) == 1
    rows = max(len(record.layers) for _, record in records)
    fig, axes = plt.subplots(1, len(records), squeeze=False, sharey=same_layers,
                             figsize=(1.5 + 4.5 * len(records), max(3.5, 1.5 + 0.17 * rows)),
                             layout="constrained")
    image = None
    for ax, (label, record), grid in zip(axes[0], records, values, strict=True):
        image = ax.imshow(_positive(grid), aspect="auto", interpolation="nearest", norm=norm,
                          cmap=cmap)
        for boundary in _part_boundaries(record.parts):
            ax.axhline(boundary, color="white", linewidth=1.5)
        if ax is axes[0][0] or not same_layers:
            _label_layers(ax, record)
        _step_ticks(ax, record.steps)
        ax.set_title(label, fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), label=QUANTITIES[quantity])
    return fig


def level_groups(record: GradientFlowRecord) -> list[tuple[str, str, np.ndarray]]:
    """The record's layers grouped by U level, in U order.

    Returns:
        (label, part, layer indices) per group: ``enc0`` … the bottleneck, ``dec{d-1}`` …
        ``dec0``, then ``heads``, then ``layers`` for anything outside the U.
    """
    parts, levels = np.asarray(record.parts), np.asarray(record.levels)
    groups = []
    for part, prefix, order in (("encoder", "enc", 1), ("bottleneck", "bottleneck", 1),
                                ("decoder", "dec", -1)):
        for level in sorted(set(levels[parts == part].tolist()))[::order]:
            label = prefix if part == "bottleneck" else f"{prefix}{level}"
            groups.append((label, part, np.flatnonzero((parts == part) & (levels == level))))
    if (parts == "head").any():
        groups.append(("heads", "head", np.flatnonzero(parts == "head")))
    known = np.isin(parts, list(PART_COLOURS))
    if (~known).any():
        groups.append(("layers", "other", np.flatnonzero(~known)))
    return groups


def median_update_per_level(record: GradientFlowRecord) -> list[tuple[str, str, np.ndarray]]:
    """(label, part, (R,) median relative update over the group's layers) per U level."""
    medians = []
    for label, part, indices in level_groups(record):
        medians.append((label, part, nan_median(record.rel_update[:, indices], axis=1)))
    return medians


def _level_colour(part: str, rank: int, count: int) -> tuple[float, ...] | str:
    """Blues down the encoder, oranges up the decoder (darker nearer the bottleneck)."""
    shade = 0.45 + 0.5 * (rank + 1) / max(count, 1)
    if part == "encoder":
        return plt.get_cmap("Blues")(shade)
    if part == "decoder":
        return plt.get_cmap("Oranges")(shade)
    return PART_COLOURS.get(part, "grey")


def draw_level_updates(records: Runs) -> Figure:
    """Median relative update per U level over training steps, one panel per run.

    Encoder levels in blues and decoder levels in oranges (darker nearer the bottleneck), the
    bottleneck black, the heads green; logarithmic y axis shared by the panels.

    Raises:
        ValueError: if there are no runs.
    """
    if not records:
        raise ValueError("no runs to plot")
    fig, axes = plt.subplots(1, len(records), squeeze=False, sharey=True,
                             figsize=(1.5 + 4.5 * len(records), 4), layout="constrained")
    for ax, (label, record) in zip(axes[0], records, strict=True):
        medians = median_update_per_level(record)
        for name, part, median in medians:  # in U order, so the legend reads down and up
            same_part = [m[0] for m in medians if m[1] == part]
            # darker nearer the bottleneck: enc0 … enc{d-1} get darker, dec{d-1} … dec0 lighter
            rank = (same_part.index(name) if part == "encoder"
                    else len(same_part) - 1 - same_part.index(name))
            ax.plot(record.steps, np.where(median > 0, median, np.nan),
                    color=_level_colour(part, rank, len(same_part)), label=name,
                    linestyle="--" if part == "decoder" else "-",
                    linewidth=1.5 if part in ("encoder", "decoder") else 2.0,
                    marker="o" if len(record.steps) == 1 else None)  # a lone point shows
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("median relative update ‖Δw‖ / ‖w‖")
    return fig


def _save(fig: Figure, out: str | Path) -> Path:
    """Write a figure as PNG atomically and close it."""
    try:
        return write_atomic(out, lambda temporary: fig.savefig(temporary, dpi=100))
    finally:
        plt.close(fig)


def plot_gradient_flow(records: Runs, out: str | Path, quantity: str = "rel_update") -> Path:
    """Write :func:`draw_gradient_flow`'s heatmaps to the PNG ``out``; returns its path."""
    return _save(draw_gradient_flow(records, quantity), out)


def plot_level_updates(records: Runs, out: str | Path) -> Path:
    """Write :func:`draw_level_updates`' curves to the PNG ``out``; returns its path."""
    return _save(draw_level_updates(records), out)

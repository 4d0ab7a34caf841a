"""Plots of a long-skip ablation study: per-case Dice, paired differences, validation curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

# A fixed PNG "Software" entry so the files do not depend on the matplotlib version.
_PNG_METADATA = {"Software": "segmentation study report"}

# (estimate, low, high) of one variant × class comparison, with its label.
ForestRow = tuple[str, float, float, float]

# (steps, mean, low, high) of one variant's validation curve, each of shape (steps,).
CurveBand = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _save(fig: plt.Figure, out: str | Path) -> Path:
    out = Path(out)
    fig.savefig(out, dpi=100, metadata=_PNG_METADATA)
    plt.close(fig)
    return out


def _case_offsets(n_cases: int, width: float = 0.3) -> np.ndarray:
    """Deterministic horizontal offsets of shape (n_cases,), the same case at the same offset."""
    if n_cases <= 1:
        return np.zeros(n_cases)
    return np.linspace(-width / 2, width / 2, n_cases)


def plot_dice_per_case(per_case: Mapping[tuple[str, str], np.ndarray], variants: Sequence[str],
                       references: Mapping[str, str], classes: Sequence[str],
                       out: str | Path) -> Path:
    """One panel per class: per-case Dice of every variant as a box with its points.

    Thin grey lines join the same case between each variant and its reference, so that a
    systematic shift of all cases is visible even when the boxes overlap. The points of a
    variant that is some variant's reference are orange, the others blue.

    Args:
        per_case: (variant, class) → seed-averaged Dice of shape (cases,), the same case order
            for every variant, NaN where a variant has no value for a case.
        variants: the variants in display order (the x axis).
        references: variant → the variant it is joined to (its reference); a variant that is
            absent, or whose reference is not in ``variants``, is joined to none.
        classes: one panel per class, in this order.
        out: the PNG file to write.

    Returns:
        ``out`` as a Path.

    Raises:
        OSError: if the PNG file cannot be written.
    """
    fig, axes = plt.subplots(1, len(classes), figsize=(max(4.0, 1.2 * len(variants) + 1.5)
                                                      * len(classes), 4.5), squeeze=False)
    position = {variant: x for x, variant in enumerate(variants)}
    joined = {position[variant]: position[reference] for variant, reference in references.items()
              if variant in position and reference in position and variant != reference}
    is_reference = set(joined.values())
    for ax, cls in zip(axes[0], classes, strict=True):
        columns = [np.asarray(per_case.get((variant, cls), []), dtype=float)
                   for variant in variants]
        for x, values in enumerate(columns):
            offsets = _case_offsets(values.size)
            ref_x = joined.get(x)
            reference_values = columns[ref_x] if ref_x is not None else np.array([])
            if reference_values.size == values.size and values.size:
                for case in np.flatnonzero(~np.isnan(values) & ~np.isnan(reference_values)):
                    ax.plot([ref_x + offsets[case], x + offsets[case]],
                            [reference_values[case], values[case]],
                            color="0.7", linewidth=0.5, alpha=0.6, zorder=1)
            shown = ~np.isnan(values)
            if shown.any():
                ax.boxplot(values[shown], positions=[x], widths=0.5, showfliers=False,
                           medianprops={"color": "black"}, zorder=2)
                ax.scatter(x + offsets[shown], values[shown], s=12, alpha=0.8, zorder=3,
                           color="tab:orange" if x in is_reference else "tab:blue")
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(variants) - 0.4)
        ax.set_title(cls)
        ax.set_ylabel("Dice (per case, mean over seeds)")
    fig.tight_layout()
    return _save(fig, out)


def plot_paired_differences(panels: Mapping[str, Sequence[ForestRow]], out: str | Path) -> Path:
    """Forest plot: mean paired Dice difference with its confidence interval per row.

    Args:
        panels: panel title (e.g. the split) → rows ``(label, estimate, low, high)``, top to
            bottom, each the difference of a variant to its reference; a panel without rows is
            left out.
        out: the PNG file to write.

    Returns:
        ``out`` as a Path.

    Raises:
        OSError: if the PNG file cannot be written.
    """
    shown = {title: rows for title, rows in panels.items() if rows}
    height = max(2.5, 0.35 * max((len(rows) for rows in shown.values()), default=1) + 1.5)
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(6.5 * max(1, len(shown)), height),
                             squeeze=False)
    for ax, (title, rows) in zip(axes[0], shown.items(), strict=False):
        y = np.arange(len(rows))[::-1]
        estimates = np.array([row[1] for row in rows])
        lows = np.array([row[2] for row in rows])
        highs = np.array([row[3] for row in rows])
        excludes_zero = (lows > 0) | (highs < 0)
        for colour, chosen in (("tab:red", excludes_zero), ("tab:blue", ~excludes_zero)):
            ax.errorbar(estimates[chosen], y[chosen],
                        xerr=[estimates[chosen] - lows[chosen], highs[chosen] - estimates[chosen]],
                        fmt="o", color=colour, capsize=3)
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_yticks(y)
        ax.set_yticklabels([row[0] for row in rows])
        ax.set_xlabel("Dice difference, variant − its reference (mean, 95% CI)")
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_validation_curves(bands: Mapping[str, CurveBand], out: str | Path) -> Path:
    """Validation Dice over training steps: one line per variant with a band over seeds.

    Args:
        bands: variant → (steps, mean, low, high), each of shape (steps,): the mean over seeds
            and the band's lower and upper edges at each step.
        out: the PNG file to write.

    Returns:
        ``out`` as a Path.

    Raises:
        OSError: if the PNG file cannot be written.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, (steps, mean, low, high) in bands.items():
        (line,) = ax.plot(steps, mean, label=variant, linewidth=1.5)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation mean Dice")
    ax.set_title("validation Dice (mean over seeds, band: min–max over seeds)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)

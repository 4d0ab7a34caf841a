"""Figures of loss landscapes: contours, surfaces, lines, and several landscapes side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

from segmentation.atomic import write_atomic
from segmentation.instruments.landscape import Landscape

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

# A fixed PNG "Software" entry so the files do not depend on the matplotlib version.
_PNG_METADATA = {"Software": "segmentation landscape"}
CONTOUR_LEVELS = 30


def _save(fig: plt.Figure, out: str | Path) -> Path:
    """Write the figure atomically as a PNG and close it."""
    try:
        return write_atomic(out, lambda temporary: fig.savefig(temporary, dpi=100,
                                                                metadata=_PNG_METADATA))
    finally:
        plt.close(fig)


def contour_levels(landscapes: Sequence[Landscape], count: int = CONTOUR_LEVELS) -> np.ndarray:
    """Contour levels shared by ``landscapes``, so equal colours mean equal losses.

    ``count`` values from their lowest to their highest finite loss, evenly spaced in log scale
    when every loss is positive (the loss rises by orders of magnitude away from a minimum and
    the interesting contours are near it).

    Returns:
        (count,) increasing levels (a small spread around a constant landscape's value).
    """
    values = np.concatenate([np.ravel(landscape.losses) for landscape in landscapes])
    values = values[np.isfinite(values)]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5 * abs(low) - 1e-6, high + 0.5 * abs(high) + 1e-6
    if low > 0:
        return np.geomspace(low, high, count)
    return np.linspace(low, high, count)


def _mesh(landscape: Landscape) -> tuple[np.ndarray, np.ndarray]:
    """(steps, steps) α and β of every grid point, ``[i, j]`` at (alphas[i], betas[j])."""
    return np.meshgrid(landscape.alphas, landscape.betas, indexing="ij")


def _draw_contour(ax: plt.Axes, landscape: Landscape, levels: np.ndarray,
                  title: str) -> matplotlib.contour.QuadContourSet:
    alpha, beta = _mesh(landscape)
    filled = ax.contourf(alpha, beta, landscape.losses, levels=levels, cmap="viridis",
                         extend="both")
    ax.contour(alpha, beta, landscape.losses, levels=levels, colors="white", linewidths=0.4)
    ax.plot([0], [0], marker="*", color="red", markersize=10, linestyle="none")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_aspect("equal")
    ax.set_title(title)
    return filled


def plot_contour(landscape: Landscape, out: str | Path, title: str = "loss") -> Path:
    """Filled contours of a 2D landscape, the checkpoint marked at the centre; returns ``out``."""
    fig, ax = plt.subplots(figsize=(6, 5))
    filled = _draw_contour(ax, landscape, contour_levels([landscape]), title)
    fig.colorbar(filled, ax=ax, label="loss", format="%.3g")
    fig.tight_layout()
    return _save(fig, out)


def plot_surface(landscape: Landscape, out: str | Path, title: str = "loss") -> Path:
    """The 2D landscape as a 3D surface; returns ``out``."""
    alpha, beta = _mesh(landscape)
    fig = plt.figure(figsize=(7, 5.5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(alpha, beta, landscape.losses, cmap="viridis", linewidth=0,
                    antialiased=True)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_line(landscapes: Sequence[tuple[str, Landscape]], out: str | Path) -> Path:
    """Losses of 1D landscapes or paths against α (or t), one line per named landscape.

    A path marks its two checkpoints (t = 0: A, t = 1: B); returns ``out``.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, landscape in landscapes:
        ax.plot(landscape.alphas, landscape.losses, marker=".", label=name)
    path = any(landscape.seed is None for _, landscape in landscapes)
    for t, label in ((0.0, "A"), (1.0, "B")) if path else ((0.0, None),):
        ax.axvline(t, color="grey", linewidth=0.8, linestyle="--")
        if label:
            ax.text(t, 1.0, f" {label}", transform=ax.get_xaxis_transform(), va="top")
    ax.set_xlabel("t: (1 − t)·θ_A + t·θ_B" if path else "α (filter-normalised direction)")
    ax.set_ylabel("loss")
    if len(landscapes) > 1:
        ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def plot_landscape(landscape: Landscape, out_dir: str | Path) -> list[Path]:
    """The figures of one landscape in ``out_dir``.

    ``landscape_contour.png`` and ``landscape_surface.png`` for 2D, ``landscape_1d.png`` for
    1D and for paths. Returns the files written.
    """
    out_dir = Path(out_dir)
    if landscape.dims == 2:
        return [plot_contour(landscape, out_dir / "landscape_contour.png"),
                plot_surface(landscape, out_dir / "landscape_surface.png")]
    return [plot_line([("loss", landscape)], out_dir / "landscape_1d.png")]


def plot_landscapes(landscapes: Sequence[tuple[str, Landscape]], out: str | Path) -> Path:
    """Several landscapes side by side, with the same contour levels, colours and axes.

    2D landscapes get one contour panel each and a shared colour bar; 1D landscapes (or paths)
    are drawn as lines in one panel. Meant for variants measured with the same directions'
    seed and patches, so that equal colours mean equal losses.

    Args:
        landscapes: (name, landscape) pairs, in panel order, all 1D or all 2D.
        out: the PNG file to write.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: if there are none or they mix 1D and 2D.
    """
    if not landscapes:
        raise ValueError("no landscapes to plot")
    dims = {landscape.dims for _, landscape in landscapes}
    if len(dims) > 1:
        raise ValueError("cannot draw 1D and 2D landscapes side by side; plot them separately")
    if dims == {1}:
        return plot_line(landscapes, out)
    levels = contour_levels([landscape for _, landscape in landscapes])
    count = len(landscapes)
    fig, axes = plt.subplots(1, count, figsize=(3.6 * count + 1.2, 4.0), sharex=True,
                             sharey=True, squeeze=False, layout="constrained")
    filled = None
    for ax, (name, landscape) in zip(axes[0], landscapes, strict=True):
        filled = _draw_contour(ax, landscape, levels, name)
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    fig.colorbar(filled, ax=list(axes[0]), label="loss", format="%.3g")
    return _save(fig, out)

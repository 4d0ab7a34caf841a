"""Summaries of a loss landscape: sharpness around the centre, the barrier along a path.

Written to ``landscape_summary.json`` by ``segmentation landscape`` and comparable between
checkpoints measured with the same directions' seed and patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segmentation.instruments.landscape import Landscape

SHARPNESS_OFFSETS = (0.25, 0.5)


def sharpness_summary(landscape: Landscape) -> dict[str, Any]:
    """How fast the loss rises around the centre of a directions landscape.

    ``loss_increase``: for α = 0.25 and 0.5, the mean of L(±α) − L(0) over both signs and, in
    2D, over both axes (along each axis through the centre); read off the grid by linear
    interpolation (exact where α is a grid point, as for 25 steps over ±1), None beyond the
    grid. In 2D also the finite-difference Hessian of the surface at the centre (central
    differences with the grid spacing), its eigenvalues, and the ratio of the largest to the
    smallest eigenvalue in absolute value (a negative eigenvalue means the centre is not a
    minimum along that eigenvector).
    """
    centre = landscape.centre
    centre_loss = float(landscape.losses[centre])
    lines = [landscape.losses[(slice(None),) + centre[1:]]]            # along α, β = 0
    if landscape.dims == 2:
        lines.append(landscape.losses[centre[0], :])                   # along β, α = 0
    increase = {}
    for offset in SHARPNESS_OFFSETS:
        values = [float(np.interp(sign * offset, axis, line)) - centre_loss
                  for axis, line in zip(landscape.axes, lines, strict=True)
                  for sign in (-1, 1) if offset <= axis[-1]]
        increase[str(offset)] = _number(np.mean(values)) if values else None
    summary: dict[str, Any] = {"centre_loss": centre_loss, "loss_increase": increase,
                               "loss_increase_note": "mean of L(±α) − L(0) over signs"
                               + (" and both axes" if landscape.dims == 2 else "")}
    if landscape.dims == 2:
        summary.update(_curvature(landscape))
    return summary


def _curvature(landscape: Landscape) -> dict[str, Any]:
    """The 2×2 finite-difference Hessian at the centre, its eigenvalues and their ratio."""
    i, j = landscape.centre
    loss = landscape.losses
    ha = float(landscape.alphas[i + 1] - landscape.alphas[i])
    hb = float(landscape.betas[j + 1] - landscape.betas[j])
    hessian = np.array([
        [(loss[i + 1, j] - 2 * loss[i, j] + loss[i - 1, j]) / ha**2,
         (loss[i + 1, j + 1] - loss[i + 1, j - 1] - loss[i - 1, j + 1] + loss[i - 1, j - 1])
         / (4 * ha * hb)],
        [0.0, (loss[i, j + 1] - 2 * loss[i, j] + loss[i, j - 1]) / hb**2]])
    hessian[1, 0] = hessian[0, 1]
    eigenvalues = np.linalg.eigvalsh(hessian) if np.isfinite(hessian).all() else [np.nan] * 2
    magnitudes = sorted(abs(float(e)) for e in eigenvalues)
    ratio = magnitudes[1] / magnitudes[0] if magnitudes[0] > 0 else float("nan")
    return {"hessian": [[_number(v) for v in row] for row in hessian],
            "eigenvalues": [_number(e) for e in eigenvalues],
            "curvature_ratio": _number(ratio),  # None: a zero (or non-finite) eigenvalue
            "curvature_note": "ratio of the largest to the smallest absolute eigenvalue of the "
                              "finite-difference Hessian of the 2D surface at the centre "
                              f"(spacing {ha:g} × {hb:g})"}


def path_summary(landscape: Landscape) -> dict[str, Any]:
    """Losses at the two checkpoints of a path (t = 0, t = 1) and the barrier between them.

    ``barrier``: the highest loss for t in [0, 1] minus the higher of the two end losses
    (0 when the loss never rises above both ends: the solutions are linearly connected).
    """
    t, loss = landscape.alphas, landscape.losses
    start, end = int(np.flatnonzero(t == 0)[0]), int(np.flatnonzero(t == 1)[0])
    inside = loss[start:end + 1]
    peak = int(np.nanargmax(inside)) if np.isfinite(inside).any() else 0
    return {"loss_a": _number(loss[start]), "loss_b": _number(loss[end]),
            "max_loss_between": _number(inside[peak]), "t_of_max": float(t[start + peak]),
            "barrier": _number(max(float(inside[peak]) - max(loss[start], loss[end]), 0.0))}


def _number(value: Any) -> float | None:
    """A float for strict JSON: None where it is NaN or infinite."""
    value = float(value)
    return value if np.isfinite(value) else None

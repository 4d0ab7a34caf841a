"""Loss landscapes around a trained network: 1D/2D slices along random directions, and paths.

``compute_landscape`` evaluates the training loss at θ + α·d₁ (+ β·d₂) on a grid, with d₁, d₂
filter-normalised random directions (:mod:`segmentation.instruments.directions`, Li et al.
2018); ``interpolate_landscape`` evaluates it along θ(t) = (1 − t)·θ_A + t·θ_B between two
solutions (Goodfellow et al. 2015). Both measure on a fixed :class:`PatchSet`, with the network
in eval mode (see :data:`EVALUATION`), fill in grid points in row-major order, report each
point through ``progress`` and hand partial results to ``save``, so an interrupted grid can be
continued with ``resume_from`` without recomputing a point.

Choices, each also stated in the landscape's settings:

- the grid has an odd number of points per axis (an even ``steps`` gets one more), so the
  checkpoint itself, α = β = 0 exactly, is its centre and the centre loss is the checkpoint's;
- the loss of a grid point is the loss of all patches as one batch (logits of every patch
  joined before the loss, as batch Dice needs), in float32, under ``torch.no_grad``;
- only parameters move along the directions; buffers (batch-norm running statistics) stay the
  checkpoint's, and biases and norm parameters get a zero direction (Li et al.);
- a path runs over t ∈ [−margin, 1 + margin] (default [−0.5, 1.5] as Goodfellow et al. 2015)
  with t = 0 and t = 1 exact grid points; its floating-point buffers are interpolated like the
  weights, so both ends are exactly the two checkpoints (see :data:`INTERPOLATION_BUFFERS`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segmentation.atomic import write_atomic
from segmentation.instruments.directions import Direction, random_directions
from segmentation.instruments.fixed_patches import PatchSet

# What the network is while it is measured; written into every landscape's settings.
EVALUATION = ("network in eval mode: main output only (deep supervision off), dropout off, "
              "batch norm with the checkpoint's running statistics; only parameters are "
              "perturbed, buffers (running statistics) stay the checkpoint's")
INTERPOLATION_BUFFERS = ("floating-point buffers (batch-norm running statistics) interpolated "
                         "like the weights, running variances clamped at 0 where extrapolated; "
                         "integer buffers taken from A")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, K, *S) logits, (B, 1, *S)
Progress = Callable[[int, int], None]                          # (points done, points in all)


@dataclass
class Landscape:
    """Losses on a grid around a network, possibly only partly computed.

    Attributes:
        alphas: (steps,) coordinates along the first direction (or t along a path).
        betas: (steps,) along the second direction; empty (0,) for 1D landscapes and paths.
        losses: (steps,) or (steps, steps), ``losses[i, j]`` at (alphas[i], betas[j]).
        computed: like ``losses``, True where the loss has been evaluated.
        seed: the directions' seed; None for a path between two checkpoints.
        settings: plain data describing how the landscape was made.
    """

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray
    computed: np.ndarray
    seed: int | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        """1 or 2."""
        return int(self.losses.ndim)

    @property
    def complete(self) -> bool:
        """True when every grid point has been evaluated."""
        return bool(self.computed.all())

    @property
    def centre(self) -> tuple[int, ...]:
        """Index of α = β = 0 (for a path: t = 0, checkpoint A)."""
        return tuple(int(np.flatnonzero(axis == 0)[0]) for axis in self.axes)

    @property
    def axes(self) -> list[np.ndarray]:
        """The grid's coordinate arrays, one per dimension."""
        return [self.alphas, self.betas][: self.dims]

    def save(self, path: str | Path) -> Path:
        """Write ``landscape.npz`` atomically: a reader sees the old file or the new one.

        Keys: alphas, betas, losses, computed, seed (−1 for none) and settings (a JSON
        string); no pickled objects.
        """
        arrays = {"alphas": self.alphas, "betas": self.betas, "losses": self.losses,
                  "computed": self.computed,
                  "seed": np.int64(-1 if self.seed is None else self.seed),
                  "settings": np.str_(json.dumps(self.settings, sort_keys=True))}

        def write(temporary: str) -> None:
            with open(temporary, "wb") as handle:
                np.savez(handle, **arrays)

        return write_atomic(path, write)

    @classmethod
    def load(cls, path: str | Path) -> Landscape:
        """Read a landscape written by :meth:`save`.

        Raises:
            ValueError: naming the file, if it is not such a landscape.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                seed = int(data["seed"])
                return cls(data["alphas"], data["betas"], data["losses"],
                           data["computed"].astype(bool), None if seed < 0 else seed,
                           json.loads(str(data["settings"])))
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"{path}: not a landscape written by `segmentation landscape` "
                             f"({type(error).__name__}); delete it or pass --overwrite"
                             ) from None

    @classmethod
    def empty(cls, axes: list[np.ndarray], seed: int | None, settings: Mapping[str, Any]
              ) -> Landscape:
        """A landscape on the grid of ``axes`` with nothing computed yet."""
        shape = tuple(len(a) for a in axes)
        betas = axes[1] if len(axes) > 1 else np.zeros(0)
        return cls(axes[0], betas, np.full(shape, np.nan), np.zeros(shape, dtype=bool), seed,
                   dict(settings))


def grid_axis(steps: int, range_: float) -> np.ndarray:
    """``steps`` evenly spaced coordinates over [−range_, range_], the exact 0 in the middle.

    An even ``steps`` has no centre point, so it becomes ``steps + 1``: the checkpoint itself
    is always a grid point. The axis is symmetric to the last bit and its middle value is 0.0.

    Raises:
        ValueError: if ``steps`` < 3 or ``range_`` is not positive.
    """
    if steps < 3:
        raise ValueError(f"--steps {steps}: choose at least 3 points per axis")
    if not range_ > 0:
        raise ValueError(f"--range {range_}: choose a positive range")
    steps += 1 - steps % 2
    axis = np.linspace(-range_, range_, steps)
    axis = (axis - axis[::-1]) / 2
    axis[steps // 2] = 0.0
    return axis


def path_axis(steps: int, margin: float) -> np.ndarray:
    """The t of a path: ``steps`` points on [0, 1], and more beyond each end.

    As many points of the same spacing as fit in ``margin`` are added before 0 and after 1;
    t = 0 and t = 1 are exact grid points.

    Raises:
        ValueError: if ``steps`` < 3 or ``margin`` is negative.
    """
    if steps < 3:
        raise ValueError(f"--steps {steps}: choose at least 3 points on the path")
    if not margin >= 0:
        raise ValueError(f"--margin {margin}: choose 0 or more")
    extra = int(round(margin * (steps - 1)))
    axis = np.arange(-extra, steps + extra) / (steps - 1)
    axis[extra], axis[extra + steps - 1] = 0.0, 1.0
    return axis


def evaluate_loss(net: nn.Module, patches: PatchSet, loss_fn: LossFn, *,
                  batch_size: int = 2) -> float:
    """The loss of ``net`` (as it is) on all patches as one batch.

    The network runs on ``batch_size`` patches at a time and the logits of all patches are
    joined before the loss, so a loss over the batch (batch Dice) sees every patch at once and
    the value does not depend on ``batch_size``. A network that returns a list (deep
    supervision) is scored on its first, main output.

    Args:
        net: in eval mode, on the patches' device.
        patches: images (N, C, *S_in), labels (N, 1, *S_out).
        loss_fn: scalar loss of (N, K, *S_out) logits and (N, 1, *S_out) labels.
        batch_size: patches per forward pass.
    """
    outputs = []
    with torch.no_grad():
        for start in range(0, len(patches), batch_size):
            output = net(patches.images[start:start + batch_size])
            outputs.append(output[0] if isinstance(output, list | tuple) else output)
        return float(loss_fn(torch.cat(outputs).float(), patches.labels))


def compute_landscape(net: nn.Module, patches: PatchSet, loss_fn: LossFn, *, dims: int,
                      steps: int, range_: float, seed: int, device: torch.device | str = "cpu",
                      batch_size: int = 2, progress: Progress | None = None,
                      resume_from: Landscape | None = None,
                      save: Callable[[Landscape], None] | None = None, save_every: int = 5,
                      settings: Mapping[str, Any] | None = None) -> Landscape:
    """The loss at θ + α·d₁ (+ β·d₂) on a (steps,) or (steps, steps) grid over ±``range_``.

    ``net`` is moved to ``device`` and set to eval mode; its weights are restored at the end,
    also when interrupted. The same ``seed`` gives the same directions for networks of the same
    parameter shapes, so landscapes of several checkpoints can be compared point for point.

    Args:
        net: the trained network θ.
        patches: the fixed patches (see :func:`fixed_patches`).
        loss_fn: the training loss on logits and integer labels.
        dims: 1 or 2 directions.
        steps: points per axis (an even number gets one more; see :func:`grid_axis`).
        range_: the grid spans [−range_, range_] in units of the filter-normalised direction.
        seed: seed of the directions.
        device: where to evaluate.
        batch_size: patches per forward pass.
        progress: called with (points done, points in all) after every point.
        resume_from: a partial landscape of the same grid and seed; its points are kept.
        save: called with the partial landscape every ``save_every`` new points, when
            interrupted, and with the complete one at the end.
        save_every: see ``save``.
        settings: more plain data for the landscape's settings (checkpoint, loss, ...).

    Raises:
        ValueError: for ``dims`` other than 1 or 2, a bad grid, or a ``resume_from`` of
            another grid or seed.
    """
    if dims not in (1, 2):
        raise ValueError(f"--dims {dims}: choose 1 or 2 directions")
    axis = grid_axis(steps, range_)
    base = {"kind": "directions", "dims": dims, "steps": len(axis), "range": float(range_),
            "seed": int(seed), "patches": len(patches), "evaluation": EVALUATION,
            **(settings or {})}
    landscape = _start(Landscape.empty([axis] * dims, int(seed), base), resume_from)
    net = net.to(device).eval()
    directions = random_directions(net, dims, seed)
    with _restored(net):
        theta = {name: p.detach().clone() for name, p in net.named_parameters()}

        def move_to(index: tuple[int, ...]) -> None:
            coordinates = [axis[i] for i in index]
            _set_parameters(net, theta, directions, coordinates)

        _fill(landscape, move_to, net, _to(patches, device), loss_fn, batch_size, progress,
              save, save_every)
    return landscape


def interpolate_landscape(net_a: nn.Module, net_b: nn.Module, patches: PatchSet,
                          loss_fn: LossFn, *, steps: int, margin: float = 0.5,
                          device: torch.device | str = "cpu", batch_size: int = 2,
                          progress: Progress | None = None,
                          resume_from: Landscape | None = None,
                          save: Callable[[Landscape], None] | None = None, save_every: int = 5,
                          settings: Mapping[str, Any] | None = None) -> Landscape:
    """The loss along θ(t) = (1 − t)·θ_A + t·θ_B, t on :func:`path_axis` (``steps``, ``margin``).

    ``net_a`` is moved to ``device``, evaluated with the interpolated state and restored at the
    end; buffers are handled as :data:`INTERPOLATION_BUFFERS` says, so t = 0 is exactly A and
    t = 1 exactly B. The other arguments are as for :func:`compute_landscape`.

    Raises:
        ValueError: if the networks' state dicts differ in keys or shapes.
    """
    check_same_architecture(net_a, net_b)
    axis = path_axis(steps, margin)
    base = {"kind": "interpolation", "steps": int(steps), "margin": float(margin),
            "patches": len(patches), "evaluation": EVALUATION,
            "buffers": INTERPOLATION_BUFFERS, **(settings or {})}
    landscape = _start(Landscape.empty([axis], None, base), resume_from)
    net_a = net_a.to(device).eval()
    state = net_a.state_dict()
    ends = {k: (v.detach().clone(), net_b.state_dict()[k].detach().to(v.device))
            for k, v in state.items()}
    with _restored(net_a):

        def move_to(index: tuple[int, ...]) -> None:
            _set_interpolated(state, ends, float(axis[index[0]]))

        _fill(landscape, move_to, net_a, _to(patches, device), loss_fn, batch_size, progress,
              save, save_every)
    return landscape


def check_same_architecture(net_a: nn.Module, net_b: nn.Module, names: tuple[str, str] =
                            ("A", "B")) -> None:
    """Refuse two networks whose state dicts differ in keys or shapes, naming both.

    Raises:
        ValueError: naming ``names`` and the first difference.
    """
    state_a, state_b = net_a.state_dict(), net_b.state_dict()
    differ = sorted(set(state_a) ^ set(state_b))
    if differ:
        raise ValueError(f"{names[1]} is not the architecture of {names[0]}: {differ[0]} is in "
                         "one network only; interpolate between checkpoints of one network")
    for key, value in state_a.items():
        if value.shape != state_b[key].shape:
            raise ValueError(f"{names[1]} is not the architecture of {names[0]}: {key} has "
                             f"shape {list(state_b[key].shape)} there, {list(value.shape)} in "
                             f"{names[0]}; interpolate between checkpoints of one network")


def _start(fresh: Landscape, resume_from: Landscape | None) -> Landscape:
    """``fresh``, with the computed points of ``resume_from`` when it is the same grid."""
    if resume_from is None:
        return fresh
    same = (resume_from.seed == fresh.seed and resume_from.losses.shape == fresh.losses.shape
            and all(np.array_equal(a, b) for a, b in zip(resume_from.axes, fresh.axes,
                                                          strict=True)))
    if not same:
        raise ValueError("the landscape to resume has another grid or seed; start afresh")
    fresh.losses[...] = resume_from.losses
    fresh.computed[...] = resume_from.computed
    return fresh


def _fill(landscape: Landscape, move_to: Callable[[tuple[int, ...]], None], net: nn.Module,
          patches: PatchSet, loss_fn: LossFn, batch_size: int, progress: Progress | None,
          save: Callable[[Landscape], None] | None, save_every: int) -> None:
    """Evaluate every point not yet computed, in row-major order, saving as it goes."""
    total, new = landscape.computed.size, 0
    try:
        for index in np.ndindex(landscape.losses.shape):
            if landscape.computed[index]:
                continue
            move_to(index)
            landscape.losses[index] = evaluate_loss(net, patches, loss_fn, batch_size=batch_size)
            landscape.computed[index] = True
            new += 1
            if save is not None and new % save_every == 0:
                save(landscape)
            if progress is not None:
                progress(int(landscape.computed.sum()), total)
    except BaseException:  # Ctrl-C, SIGTERM, an error: keep what was computed
        if save is not None and new:
            save(landscape)
        raise
    if save is not None:
        save(landscape)


@contextmanager
def _restored(net: nn.Module) -> Iterator[None]:
    """Put ``net``'s parameters and buffers back as they were on leaving the block."""
    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for key, value in net.state_dict().items():
                value.copy_(saved[key])


def _set_parameters(net: nn.Module, theta: Mapping[str, torch.Tensor],
                    directions: list[Direction], coordinates: list[float]) -> None:
    """Set every parameter to θ + Σ coordinate·direction (exactly θ at the origin)."""
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            value = theta[name].clone()
            for direction, coordinate in zip(directions, coordinates, strict=True):
                value.add_(direction[name], alpha=float(coordinate))
            parameter.copy_(value)


def _set_interpolated(state: Mapping[str, torch.Tensor],
                      ends: Mapping[str, tuple[torch.Tensor, torch.Tensor]], t: float) -> None:
    """Set every floating-point entry of a state dict to (1 − t)·A + t·B (see the buffers note)."""
    with torch.no_grad():
        for key, value in state.items():
            a, b = ends[key]
            if not value.is_floating_point():
                value.copy_(a)
                continue
            mixed = (1 - t) * a + t * b
            if key.endswith("running_var"):  # extrapolated variances can turn negative
                mixed.clamp_(min=0)
            value.copy_(mixed)


def _to(patches: PatchSet, device: torch.device | str) -> PatchSet:
    """The patches on ``device`` (moved once, not per grid point)."""
    return PatchSet(patches.images.to(device), patches.labels.to(device), patches.case_ids,
                    patches.settings)

"""Training augmentation: one set of probabilities and ranges for both places it can run.

The per-sample chain on the CPU workers (MONAI's transforms, :func:`~segmentation.data.patches.
patch_transforms`) and the batched chain on the training device
(:class:`~segmentation.data.batch_augmentation.BatchAugmentation`) read the same
:class:`AugmentationSettings`, so moving augmentation to the GPU changes where it runs, not
what it does. The defaults are nnU-Net's (``shared`` facts: rotation and scaling p 0.2 each,
noise 0.1, blur 0.2, brightness 0.15, contrast 0.15, simulated low resolution 0.25, gamma 0.3,
mirroring every axis).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import optimize

AUGMENT_ON = ("auto", "cpu", "device")


@dataclass(frozen=True)
class AugmentationSettings:
    """Probabilities (per patch) and ranges of every random augmentation of a training patch.

    Ranges are (low, high) and drawn uniformly, independently per patch. A probability of 0
    removes the step.

    Attributes:
        rotation_probability: rotate the patch.
        rotation_degrees: largest rotation about each axis (3D: all three axes, each its own
            angle; 2D: in plane), in degrees, up to 180.
        scaling_probability: scale the patch.
        scaling_range: scale factors, drawn per axis; > 1 takes a larger region of the scan
            (structures look smaller), as MONAI's ``RandAffine``.
        mirror_probability: mirror along each spatial axis, independently per axis.
        noise_probability: add Gaussian noise.
        noise_std: largest noise standard deviation (drawn from [0, noise_std]).
        blur_probability: Gaussian blur.
        blur_sigma: blur sigma in voxels, drawn per axis.
        brightness_probability: multiply the intensities by a factor.
        brightness_range: that factor.
        contrast_probability: scale the intensities about their mean, clipped to their range.
        contrast_range: that factor.
        low_resolution_probability: downsample (nearest) and upsample back (linear).
        low_resolution_zoom: size of the downsampled patch relative to the patch.
        inverted_gamma_probability: the gamma transform below on the inverted intensities
            (−x, then back), which brightens dark structures where it darkens bright ones;
            nnU-Net applies it (p 0.1) before the plain one.
        gamma_probability: gamma-transform the intensities rescaled to [0, 1], keeping the
            patch's mean and standard deviation.
        gamma_range: the gamma.
    """

    rotation_probability: float = 0.2
    rotation_degrees: float = 30.0
    scaling_probability: float = 0.2
    scaling_range: tuple[float, float] = (0.7, 1.3)
    mirror_probability: float = 0.5
    noise_probability: float = 0.1
    noise_std: float = 0.1
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_probability: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_probability: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    low_resolution_probability: float = 0.25
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    inverted_gamma_probability: float = 0.1
    gamma_probability: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self) -> None:
        """Refuse values outside their valid range, naming the key (``data.augmentation.*``)."""
        for item in fields(self):
            value = getattr(self, item.name)
            key = f"data.augmentation.{item.name}"
            if item.name.endswith("_probability"):
                _check_number(key, value)
                if not 0 <= value <= 1:
                    raise ValueError(f"{key}={value}: choose a probability between 0 and 1")
            elif isinstance(item.default, tuple):
                if (isinstance(value, str | bytes) or not isinstance(value, Sequence)
                        or len(value) != 2):
                    raise ValueError(f"{key}={value!r}: give a range [low, high]")
                for number in value:
                    _check_number(key, number)
                low, high = (float(v) for v in value)
                if low > high:
                    raise ValueError(f"{key}={list(value)}: low {low} is above high {high}")
                object.__setattr__(self, item.name, (low, high))
            else:
                _check_number(key, value)
        for name in ("scaling_range", "blur_sigma", "brightness_range", "contrast_range",
                     "low_resolution_zoom", "gamma_range"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"data.augmentation.{name}={list(getattr(self, name))}: "
                                 "choose values above 0")
        if self.low_resolution_zoom[1] > 1:
            raise ValueError(f"data.augmentation.low_resolution_zoom="
                             f"{list(self.low_resolution_zoom)}: the downsampled patch cannot "
                             "be larger than the patch; choose values in (0, 1]")
        if not 0 <= self.rotation_degrees <= 180:
            raise ValueError(f"data.augmentation.rotation_degrees={self.rotation_degrees}: "
                             "choose an angle between 0 and 180 degrees")
        if self.noise_std < 0:
            raise ValueError(f"data.augmentation.noise_std={self.noise_std}: choose a standard "
                             "deviation >= 0")

    @classmethod
    def from_value(cls, value: AugmentationSettings | dict | None) -> AugmentationSettings:
        """Settings from themselves, a dict of fields (unknown keys refused) or None (defaults).

        Raises:
            ValueError: for a key that is not a setting, naming the known ones.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"data.augmentation.{unknown[0]} is not a setting; choose from "
                             f"{', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})

    def to_dict(self) -> dict:
        """Plain fields, ranges as lists (for YAML, JSON and checkpoints)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def spatial(self) -> bool:
        """Whether rotation or scaling can happen (these resample the patch)."""
        return (self.rotation_probability > 0 and self.rotation_degrees > 0) or (
            self.scaling_probability > 0 and self.scaling_range != (1.0, 1.0))


def _check_number(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key}={value!r}: give a finite number")


def rotation_matrices(angles: np.ndarray) -> np.ndarray:
    """Rotation matrices in array-axis order, MONAI's convention (``create_rotate``, "XYZ").

    Args:
        angles: (B, 1) in-plane angles for 2D or (B, 3) angles about axes 0, 1, 2 for 3D, in
            radians.

    Returns:
        (B, 2, 2) or (B, 3, 3) matrices; 3D ones are R_0 @ R_1 @ R_2 (intrinsic X, Y, Z).
    """
    angles = np.asarray(angles, dtype=np.float64)
    cos, sin = np.cos(angles), np.sin(angles)
    batch = angles.shape[0]
    if angles.shape[1] == 1:
        out = np.empty((batch, 2, 2))
        out[:, 0, 0], out[:, 0, 1] = cos[:, 0], -sin[:, 0]
        out[:, 1, 0], out[:, 1, 1] = sin[:, 0], cos[:, 0]
        return out
    matrices = []
    for axis, (other_a, other_b) in enumerate(((1, 2), (0, 2), (0, 1))):
        m = np.tile(np.eye(3), (batch, 1, 1))
        c, s = cos[:, axis], sin[:, axis]
        m[:, other_a, other_a], m[:, other_b, other_b] = c, c
        if axis == 1:  # rotation about y has the sign flipped (right-handed)
            m[:, other_a, other_b], m[:, other_b, other_a] = s, -s
        else:
            m[:, other_a, other_b], m[:, other_b, other_a] = -s, s
        matrices.append(m)
    return matrices[0] @ matrices[1] @ matrices[2]


def augmentation_window(input_size: Sequence[int], output_size: Sequence[int],
                        settings: AugmentationSettings) -> tuple[int, ...]:
    """The largest window any patch needs so that rotation/scaling samples real voxels.

    The bounding box of the network's input patch rotated by any allowed angle
    (:func:`largest_reach`) and scaled by the largest allowed factor (:func:`window_for_reach`).
    The data loader cuts each patch's own, usually much smaller, window
    (:func:`sample_window`); this is their upper bound.

    Args:
        input_size: the network's input patch.
        output_size: the network's output patch (the label window).
        settings: the augmentation (no rotation or scaling: the input patch itself).

    Returns:
        Window size per axis, >= ``input_size``.
    """
    if not settings.spatial:
        return tuple(int(s) for s in input_size)
    half = (np.asarray(input_size, dtype=np.float64) - 1) / 2
    limit = math.radians(settings.rotation_degrees) if settings.rotation_probability > 0 else 0.0
    extent = largest_reach(half, limit)
    if settings.scaling_probability > 0:
        extent = extent * max(settings.scaling_range[1], 1.0)
    return window_for_reach(extent, input_size, output_size)


def sample_window(matrix: np.ndarray | None, input_size: Sequence[int],
                  output_size: Sequence[int]) -> tuple[int, ...]:
    """The window one patch needs: the bounding box of its own rotated and scaled patch.

    Args:
        matrix: (d, d) the patch's output-to-input map (:func:`spatial_matrices`), or None
            when it is neither rotated nor scaled (its window is the patch).
        input_size: the network's input patch.
        output_size: the network's output patch.
    """
    if matrix is None:
        return tuple(int(s) for s in input_size)
    half = (np.asarray(input_size, dtype=np.float64) - 1) / 2
    return window_for_reach(np.abs(matrix) @ half, input_size, output_size)


def window_for_reach(reach: np.ndarray, input_size: Sequence[int],
                     output_size: Sequence[int]) -> tuple[int, ...]:
    """Window size from the reach per axis (voxels from the centre).

    One voxel more each side for linear interpolation, at least the patch, and an even margin
    to the label window so that the patch and label windows stay in its centre.
    """
    window = []
    for extent, n, out in zip(reach, input_size, output_size, strict=True):
        needed = max(int(math.ceil(2 * extent + 1)) + 2, int(n))     # +1 voxel each side
        needed += (needed - int(out)) % 2                            # even margin to the label
        window.append(needed)
    return tuple(window)


def draw_spatial(settings: AugmentationSettings, random: np.random.RandomState
                 | np.random.Generator, spatial_dims: int, count: int) -> np.ndarray:
    """Rotation and scaling of ``count`` patches, MONAI's distributions (``RandAffine``).

    Drawn where the window is cut (a loader worker, with its own seeded stream) or in one go
    for a batch; both use this function.

    Args:
        settings: probabilities and ranges.
        random: numpy RandomState (MONAI's ``R``) or Generator.
        spatial_dims: 2 or 3.
        count: patches.

    Returns:
        (count, 2 + A + d) float rows: do_rotate, do_scale (0 or 1), A angles in radians
        (1 in 2D, 3 in 3D), d scale factors.
    """
    angles = 1 if spatial_dims == 2 else 3
    limit = math.radians(settings.rotation_degrees)
    do_rotate = random.uniform(0, 1, count) < settings.rotation_probability
    angle = random.uniform(-limit, limit, (count, angles))
    do_scale = random.uniform(0, 1, count) < settings.scaling_probability
    scales = random.uniform(*settings.scaling_range, (count, spatial_dims))
    return np.concatenate([do_rotate[:, None], do_scale[:, None], angle, scales],
                          axis=1).astype(np.float64)


def spatial_matrices(rows: np.ndarray, spatial_dims: int) -> np.ndarray:
    """(n, d, d) output-to-input maps of :func:`draw_spatial` rows.

    Rotation @ scaling (MONAI's order), with the identity for a step that is off.
    """
    rows = np.atleast_2d(rows)
    angles = 1 if spatial_dims == 2 else 3
    rotate, scale = rows[:, 0] > 0.5, rows[:, 1] > 0.5
    theta = np.where(rotate[:, None], rows[:, 2:2 + angles], 0.0)
    factors = np.where(scale[:, None], rows[:, 2 + angles:], 1.0)
    return rotation_matrices(theta) @ (np.eye(spatial_dims)[None] * factors[:, None, :])


def largest_reach(half: np.ndarray, limit: float) -> np.ndarray:
    """Per axis, the farthest a corner of a centred box gets under any allowed rotation.

    The reach along axis i is max over rotations R of sum_j |R_ij| half_j, rotations drawn with
    every angle in [-limit, limit] (one angle in 2D, three in 3D). It is found on a grid of
    angles, refined from the best grid points by bounded optimisation, and never exceeds the
    box's half-diagonal (the reach of the farthest corner, a bound for any rotation).

    Args:
        half: (d,) half-sizes of the box (centre to corner voxel), voxels.
        limit: largest absolute angle, radians (0: no rotation).

    Returns:
        (d,) reach per axis, voxels.
    """
    half = np.asarray(half, dtype=np.float64)
    if limit <= 0:
        return half.copy()
    angles = 1 if len(half) == 2 else 3
    steps = np.linspace(-limit, limit, 721 if angles == 1 else 25)
    grid = np.array(list(itertools.product(steps, repeat=angles)))          # (N, angles)
    reaches = np.abs(rotation_matrices(grid)) @ half                        # (N, d)
    best = reaches.max(axis=0)
    for axis in range(len(half)):
        def negative_reach(a: np.ndarray, axis: int = axis) -> float:
            return -float(np.abs(rotation_matrices(a[None])[0, axis]) @ half)

        for start in grid[np.argsort(reaches[:, axis])[-4:]]:
            found = optimize.minimize(negative_reach, start, method="L-BFGS-B",
                                      bounds=[(-limit, limit)] * angles)
            best[axis] = max(best[axis], -found.fun)
    return np.minimum(best, np.linalg.norm(half))

"""A small synthetic MRI-like dataset: the project's default data, generated in seconds.

Each case holds an ellipsoid "organ", a curved "vessel" (a helix segment, an arc in 2D) winding
around it and sometimes touching it, and a small "lesion" at the organ's edge. Structures are
drawn on the voxel grid (in millimetres, so they are round in physical space), then imaged:
distinct but noisy intensities per structure, partial-volume blur, a smooth multiplicative bias
field, Gaussian noise and an MRI-like scale. Geometry is realistic enough to exercise
resampling and reorientation: anisotropic spacing varying per case, a random rotation of up to
20° (about a random axis in 3D, within the image plane in 2D), RAS-like and LPS-like
orientations alternating between cases, and a non-zero origin. The image and label of a case
share exactly the same affine and header geometry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from segmentation.data.layout import DatasetInfo, read_dataset

LABELS = {"background": 0, "organ": 1, "vessel": 2, "lesion": 3}
# Mean intensity of each label before bias, noise and scaling.
INTENSITIES = (0.2, 0.8, 0.55, 0.35)
BASE_SPACING = {2: (0.8, 1.0), 3: (0.8, 0.8, 2.0)}
SYNTHETIC_NAME = "synthetic"  # dataset.json name; `synth --force` replaces only such datasets
DEFAULT_SHAPE = {2: (128, 128), 3: (64, 64, 40)}
MIN_SIZE = 16
MIN_VOXELS = 4  # every class must cover at least this many voxels in every case
MAX_ANGLE_DEG = 20.0
MIN_ANGLE_DEG = 3.0


class SynthArgumentError(ValueError):
    """An argument of :func:`generate_dataset` or :func:`synth_case` is not usable.

    Attributes:
        argument: the parameter's name, e.g. "seed".
        value: the value given.
        problem: what is wrong and what is accepted, without the name and value.
    """

    def __init__(self, argument: str, value: object, problem: str) -> None:
        self.argument, self.value, self.problem = argument, value, problem
        super().__init__(f"{argument}={value!r}: {problem}")


@dataclass(frozen=True)
class SynthCase:
    """One generated case.

    Attributes:
        image: float32 image, MRI-like intensities (hundreds).
        label: uint8 label map with the values of :data:`LABELS`.
        affine: 4×4 voxel → world (RAS mm) matrix shared by image and label.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def generate_dataset(out: str | Path, cases: int = 32, seed: int = 0,
                     shape: Sequence[int] | None = None, dims: int = 3,
                     test_cases: int = 4) -> DatasetInfo:
    """Write a synthetic dataset in the nnU-Net v2 layout and read it back (:func:`read_dataset`).

    Writes ``dataset.json`` (name "synthetic", one "MRI" channel, labels background/organ/
    vessel/lesion), ``imagesTr/synth_000_0000.nii.gz`` and ``labelsTr/synth_000.nii.gz`` for
    each of the ``cases`` training cases, and ``imagesTs/`` with ``test_cases`` more cases whose
    labels go to ``labelsTs/`` (not part of the layout; for scoring predictions on held-out
    cases). Existing files of the same names are overwritten; nothing else in ``out`` (created
    if missing) is touched. ``shape`` is each case's voxel shape, by default (64, 64, 40) for
    ``dims`` 3 and (128, 128) for 2; the same ``seed`` gives the same arrays.

    Raises:
        SynthArgumentError: (a ValueError) naming the argument, for a bad number of cases,
            seed, dims or shape; raised before anything is written.
    """
    shape = check_arguments(cases=cases, test_cases=test_cases, seed=seed, shape=shape,
                            dims=dims)
    out = Path(out)
    folders = ["imagesTr", "labelsTr"] + (["imagesTs", "labelsTs"] if test_cases else [])
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    for index in range(cases + test_cases):
        case = synth_case(index, seed=seed, shape=shape)
        images, labels = ("imagesTr", "labelsTr") if index < cases else ("imagesTs", "labelsTs")
        case_id = f"synth_{index:03d}"
        _save(case.image, case.affine, out / images / f"{case_id}_0000.nii.gz")
        _save(case.label, case.affine, out / labels / f"{case_id}.nii.gz")
    meta = {
        "name": SYNTHETIC_NAME,
        "description": "Synthetic MRI-like volumes: an organ, a vessel winding around it and a "
                       "lesion (segmentation.data.synth).",
        "channel_names": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return read_dataset(out)


def synth_case(index: int, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE[3]) -> SynthCase:
    """Generate case ``index`` of the dataset with seed ``seed`` (2D or 3D from ``shape``).

    The same (index, seed, shape) always gives the same arrays; index 0 is ``synth_000``. Even
    indices get a RAS-like orientation, odd ones an LPS-like one (2D: rotated in-plane only,
    see the module). Every value of :data:`LABELS` is present in the label.

    Raises:
        SynthArgumentError: (a ValueError) naming the argument, for a negative index or seed
            or a bad shape (it needs 2 or 3 entries, each ≥ 16).
    """
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise SynthArgumentError("index", index, "must be a non-negative integer")
    _check_seed(seed)
    shape = _check_shape(shape, len(shape))
    dims = len(shape)
    rng = np.random.default_rng([seed, index])
    base = np.array(BASE_SPACING[dims])
    if dims == 3:
        jitter = rng.uniform(0.9, 1.1, 2)
        spacing = np.round(base * jitter[[0, 0, 1]], 3)  # isotropic in-plane, thicker slices
    else:
        spacing = np.round(base * rng.uniform(0.9, 1.1, 2), 3)
    affine = _affine(rng, spacing, lps=index % 2 == 1)
    for _ in range(20):
        label = _draw_label(rng, shape, spacing)
        counts = np.bincount(label.ravel(), minlength=len(LABELS))
        if counts.min() >= MIN_VOXELS:
            break
    else:  # pragma: no cover - only for shapes far smaller than MIN_SIZE allows
        raise ValueError(f"shape {shape} is too small to hold every structure")
    image = _image(rng, label, spacing)
    return SynthCase(image=image, label=label, affine=affine)


def check_arguments(*, cases: int, test_cases: int, seed: int, shape: Sequence[int] | None,
                    dims: int) -> tuple[int, ...]:
    """Validate the arguments of :func:`generate_dataset`, writing nothing; return the shape.

    Accepted: cases ≥ 1, test_cases ≥ 0, seed ≥ 0, dims 2 or 3, and a shape of ``dims`` sizes
    ≥ 16 or None for the default.

    Raises:
        SynthArgumentError: (a ValueError) naming the first bad argument and its value.
    """
    if isinstance(dims, bool) or dims not in (2, 3):
        raise SynthArgumentError("dims", dims, "only 2 or 3 are supported")
    for name, value, least in (("cases", cases, 1), ("test_cases", test_cases, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise SynthArgumentError(name, value, f"must be an integer >= {least}")
    _check_seed(seed)
    return _check_shape(shape or DEFAULT_SHAPE[dims], dims)


def _check_seed(seed: int) -> None:
    """Seeds are non-negative integers (numpy's generator refuses others)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise SynthArgumentError("seed", seed, "must be an integer >= 0")


def _check_shape(shape: Sequence[int], dims: int) -> tuple[int, ...]:
    """A shape of ``dims`` integer sizes ≥ MIN_SIZE, as a tuple."""
    try:
        checked = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as error:
        raise SynthArgumentError("shape", shape, "must be a sequence of integers") from error
    if len(checked) not in (2, 3):
        raise SynthArgumentError("shape", checked, "needs 2 (2D) or 3 (3D) entries")
    if len(checked) != dims:
        raise SynthArgumentError("shape", checked, f"has {len(checked)} entries but dims={dims}")
    if min(checked) < MIN_SIZE:
        raise SynthArgumentError("shape", checked, f"too small: every axis needs >= {MIN_SIZE} "
                                                   "voxels")
    return checked


def _rotation(rng: np.random.Generator, max_deg: float, min_deg: float = 0.0,
              axis: np.ndarray | None = None) -> np.ndarray:
    """A 3×3 rotation by an angle in [min_deg, max_deg] (Rodrigues).

    About a random axis, or about ``axis`` (a unit vector) in a random direction: the z axis
    keeps a 2D image in its plane.
    """
    if axis is None:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(min_deg, max_deg))
    else:
        angle = np.deg2rad(rng.uniform(min_deg, max_deg)) * rng.choice([-1.0, 1.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _affine(rng: np.random.Generator, spacing: np.ndarray, lps: bool) -> np.ndarray:
    """Voxel → world: (LPS flip) · rotation up to 20° · spacing, plus a non-zero origin.

    3D affines rotate about a random axis; 2D ones about z only, so the image plane stays the
    xy plane and the voxel spacing of the affine's upper-left 2×2 block is ``spacing``.
    """
    zooms = np.ones(3)
    zooms[: len(spacing)] = spacing
    flip = np.diag([-1.0, -1.0, 1.0]) if lps else np.eye(3)
    axis = None if len(spacing) == 3 else np.array([0.0, 0.0, 1.0])
    rotation = _rotation(rng, MAX_ANGLE_DEG, MIN_ANGLE_DEG, axis)
    affine = np.eye(4)
    affine[:3, :3] = flip @ rotation @ np.diag(zooms)
    affine[:3, 3] = rng.uniform(20, 120, 3) * rng.choice([-1.0, 1.0], 3)
    return affine


def _draw_label(rng: np.random.Generator, shape: tuple[int, ...],
                spacing: np.ndarray) -> np.ndarray:
    """Organ (1), then vessel (2) over it, then lesion (3) over both, in voxel space."""
    dims = len(shape)
    extent = np.array(shape) * spacing
    grid = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)),
                       indexing="ij", sparse=True)
    label = np.zeros(shape, np.uint8)

    centre = extent * rng.uniform(0.4, 0.6, dims)
    radii = extent.min() * rng.uniform(0.18, 0.3, dims)
    rotation = _rotation(rng, 180.0) if dims == 3 else _rotation2d(rng)
    local = [sum(rotation[j, i] * (grid[i] - centre[i]) for i in range(dims))
             for j in range(dims)]
    label[sum((x / r) ** 2 for x, r in zip(local, radii, strict=True)) <= 1.0] = 1

    # Thin, but at least about two voxels across along the coarsest axis, so that it survives
    # partial-volume blur where the helix runs within a slice.
    tube_radius = rng.uniform(1.0, 1.4) * spacing.max()
    curve = _vessel_curve(rng, dims, radii.mean() * rng.uniform(0.9, 1.3) + tube_radius)
    curve = curve + centre + rng.normal(0, 0.05 * radii.mean(), dims)
    label[_tube(curve, shape, spacing, tube_radius)] = 2

    direction = rng.normal(size=dims)
    direction /= np.linalg.norm(direction)
    lesion_centre = centre + direction * radii.min() * rng.uniform(0.5, 0.8)
    lesion_radius = max(radii.min() * rng.uniform(0.3, 0.45), spacing.max())
    distance = sum((g - c) ** 2 for g, c in zip(grid, lesion_centre, strict=True))
    label[distance <= lesion_radius**2] = 3
    return label


def _rotation2d(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _vessel_curve(rng: np.random.Generator, dims: int, radius: float) -> np.ndarray:
    """Points (mm, about the origin) on a helix segment (3D) or a circular arc (2D)."""
    if dims == 2:
        start = rng.uniform(0, 2 * np.pi)
        t = np.linspace(start, start + rng.uniform(1.0, 1.6) * np.pi, 600)
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    turns = rng.uniform(0.8, 1.3)
    t = np.linspace(0, 2 * np.pi * turns, 1200)
    rise = rng.uniform(0.6, 1.0) * radius * t / (2 * np.pi)
    points = np.stack([radius * np.cos(t), radius * np.sin(t), rise - rise.mean()], axis=1)
    return points @ _rotation(rng, 180.0).T


def _tube(curve: np.ndarray, shape: tuple[int, ...], spacing: np.ndarray,
          radius: float) -> np.ndarray:
    """Voxels within ``radius`` mm of the curve's rasterised points."""
    voxels = np.round(curve / spacing).astype(int)
    inside = np.all((voxels >= 0) & (voxels < np.array(shape)), axis=1)
    centreline = np.zeros(shape, bool)
    centreline[tuple(voxels[inside].T)] = True
    if not centreline.any():
        return centreline
    return ndimage.distance_transform_edt(~centreline, sampling=spacing) <= radius


def _image(rng: np.random.Generator, label: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """MRI-like image of a label map: intensities, blur, bias field, noise, scale."""
    means = np.array(INTENSITIES) + rng.normal(0, 0.03, len(INTENSITIES))
    image = means[label]
    image = ndimage.gaussian_filter(image, sigma=0.6 * spacing.min() / spacing)
    axes = np.meshgrid(*(np.linspace(-1, 1, n) for n in label.shape), indexing="ij",
                       sparse=True)
    log_bias = sum(rng.normal(0, 0.06) * u + rng.normal(0, 0.04) * u**2 for u in axes)
    image = image * np.exp(log_bias) + rng.normal(0, 0.03, label.shape)
    image = image * rng.uniform(400, 700) + rng.uniform(0, 30)
    return np.clip(image, 0, None).astype(np.float32)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save with the affine as both sform and qform (code 1, scanner), units mm."""
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.set_data_dtype(data.dtype)
    nib.save(image, str(path))

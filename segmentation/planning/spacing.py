"""The target spacing of a dataset and the median shape after resampling (nnU-Net v2's rules).

The target spacing is the median spacing of the training cases, per axis, except for strongly
anisotropic datasets (nnU-Net's ``determine_fullres_target_spacing``): when the coarsest axis'
median spacing is more than 3× the others' and its median size (in voxels, after cropping) is
less than a third of the others', that axis gets the 10th percentile of its spacings instead,
and never less than the finest other axis (cine MRI at 10 mm slices with some cases at 5 or 6
mm: the median would interpolate the thin-slice cases badly).

Ties between axes (the coarsest of two equal spacings) break towards the first axis given;
:mod:`segmentation.planning.rules` hands these functions nnU-Net's axis order so that ties
break as nnU-Net's do.
"""

from __future__ import annotations

import numpy as np

ANISOTROPY_THRESHOLD = 3.0
"""nnU-Net's ``ANISO_THRESHOLD``: how much coarser (in mm) and smaller (in voxels) an axis must
be for its spacing to come from the 10th percentile rather than the median."""
ANISOTROPIC_PERCENTILE = 10


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """The target spacing of a dataset of ``spacings`` and ``shapes`` (cases × axes).

    ``shapes`` are the cases' sizes in voxels (after cropping, where cropping is done).
    """
    spacings = np.asarray(spacings, dtype=float)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(np.asarray(shapes, dtype=float), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if not others:
        return target
    other_spacings = [target[i] for i in others]
    other_sizes = [target_size[i] for i in others]
    anisotropic_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(other_spacings)
    anisotropic_voxels = target_size[worst] * ANISOTROPY_THRESHOLD < min(other_sizes)
    if anisotropic_spacing and anisotropic_voxels:
        spacing = np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE)
        if spacing < max(other_spacings):  # never finer than the other axes
            spacing = max(max(other_spacings), spacing) + 1e-5
        target[worst] = spacing
    return target


def coarsest_first(spacing: np.ndarray) -> list[int]:
    """nnU-Net's ``transpose_forward``: the coarsest axis first, the others in order."""
    coarsest = int(np.argmax(spacing))
    return [coarsest] + [i for i in range(len(spacing)) if i != coarsest]


def resampled_shapes(shapes: np.ndarray, spacings: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each case's shape after resampling to ``target`` (nnU-Net's ``compute_new_shape``)."""
    shapes = np.asarray(shapes, dtype=float)
    spacings = np.asarray(spacings, dtype=float)
    return np.array([[int(round(s / t * n)) for s, t, n in zip(spacing, target, shape,
                                                               strict=True)]
                     for spacing, shape in zip(spacings, shapes, strict=True)])

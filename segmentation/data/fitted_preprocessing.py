"""The preprocessing fitted to a training fold, fitted once and then read from ``cache_dir``.

Fitting reads every training scan's header, and for "ct" normalisation its voxels. Every DDP
process and every later run of the same fold on unchanged files reads the stored result instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from segmentation.atomic import write_text_atomic
from segmentation.data.cache_keys import fitted_preprocessing_path
from segmentation.data.layout import Case
from segmentation.data.preprocessing import Preprocessing, fit_preprocessing


def load_or_fit_preprocessing(root: Path, cache_dir: Path, cases: Sequence[Case], *,
                              spatial_dims: int, normalization: str,
                              spacing: Sequence[float] | str | None, orientation: str,
                              crop_foreground: bool) -> Preprocessing:
    """:func:`fit_preprocessing` of ``cases`` with these settings, fitted once and then read.

    The fit is stored as ``cache_dir/fingerprints/NAME-KEY.json`` (NAME: the dataset folder's
    name, KEY: :func:`~segmentation.data.cache_keys.fitted_preprocessing_path`), written
    atomically so that concurrent processes never read half a file.
    """
    settings = {"spatial_dims": spatial_dims, "normalization": normalization,
                "spacing": spacing, "orientation": orientation,
                "crop_foreground": crop_foreground}
    stored = fitted_preprocessing_path(root, cache_dir, cases, settings)
    if stored.exists():
        return Preprocessing.from_dict(json.loads(stored.read_text()))
    fitted = fit_preprocessing(cases, **settings)
    stored.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(fitted.as_dict(), indent=2) + "\n", stored)
    return fitted

"""Keys of what the data module stores under ``cache_dir``, so nothing stale is ever read.

Three things are stored, each under a key that changes with whatever it was computed from:

- ``checks/NAME-KEY.passed``: a passed integrity check of the dataset's current files;
- ``fingerprints/NAME-KEY.json``: the preprocessing fitted to a training fold;
- ``NAME-KEY/``: the disk cache of preprocessed volumes, one entry per case.

Files enter a key by path, size and modification time, so a file rewritten in place changes it.
Changing any computation here orphans existing caches: keep the keys as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai

from segmentation.data.layout import DATASET_JSON, Case, read_dataset
from segmentation.data.preprocessing import Preprocessing

# Raise when the cached volumes' chain (preprocessing + class locations) changes its output for
# unchanged settings, so no disk cache written by the old chain is read.
CACHED_CHAIN_VERSION = 2
# Raise when fitting gives another result for unchanged files and settings.
FITTED_PREPROCESSING_VERSION = 1


def files_key(paths: Sequence[str | Path], settings: Mapping[str, Any]) -> str:
    """A key of 16 hex digits that changes when any file (path, size, mtime) or setting changes.

    ``settings`` is everything else the cached result depends on (JSON-serialisable).
    """
    states = []
    for path in sorted(str(p) for p in paths):
        state = os.stat(path)
        states.append([os.path.abspath(path), state.st_size, state.st_mtime_ns])
    text = json.dumps({"files": states, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def case_files(cases: Sequence[Case]) -> list[Path]:
    """Every image and label file of ``cases``."""
    return [p for c in cases for p in (*c.images, *([c.label] if c.label else []))]


def file_state_hash(item: Mapping[str, Any]) -> bytes:
    """Disk-cache key of an item: the item, each file's path, size and mtime, the MONAI version.

    MONAI's default key hashes only the item (file names), so an image or label rewritten in
    place would keep being read from the cache; with this key it is preprocessed again.

    ``item`` is a :func:`~segmentation.data.items.case_item` dict whose "image" (a path or a list
    of paths) and "label" files must exist. Returns a hex digest as bytes, as
    ``PersistentDataset(hash_func=...)`` expects.
    """
    paths = []
    for key in ("image", "label"):
        value = item.get(key)
        if value is not None:
            paths += value if isinstance(value, list | tuple) else [value]
    return files_key(paths, {"item": dict(item), "monai": monai.__version__}).encode()


def passed_check_marker(root: Path, cache_dir: Path) -> Path | None:
    """Where a passed check of the dataset's current files is recorded.

    ``cache_dir/checks/NAME-KEY.passed``, keyed by dataset.json and every case file; None when
    the dataset cannot be read (the check will name the broken or missing files).
    """
    try:
        info = read_dataset(root)
        files = [root / DATASET_JSON, *case_files(info.training + info.test)]
        key = files_key(files, {"monai": monai.__version__})
    except (OSError, ValueError):
        return None
    return cache_dir / "checks" / f"{root.name}-{key}.passed"


def fitted_preprocessing_path(root: Path, cache_dir: Path, cases: Sequence[Case],
                              settings: Mapping[str, Any]) -> Path:
    """Where the preprocessing fitted to ``cases`` with ``settings`` is stored.

    ``cache_dir/fingerprints/NAME-KEY.json``, keyed by the cases' files, the settings and
    ``FITTED_PREPROCESSING_VERSION``.
    """
    key = files_key(case_files(cases), {**settings, "version": FITTED_PREPROCESSING_VERSION})
    return cache_dir / "fingerprints" / f"{root.name}-{key}.json"


def volume_cache_dir(root: Path, cache_dir: Path, preprocessing: Preprocessing) -> Path:
    """Disk-cache folder of the dataset's preprocessed volumes.

    Keyed by the dataset folder, the fitted preprocessing and ``CACHED_CHAIN_VERSION``, so a
    change of spacing or normalisation never reads a stale cache.
    """
    settings = json.dumps(preprocessing.as_dict(), sort_keys=True)
    text = f"{root.resolve()}|{settings}|{CACHED_CHAIN_VERSION}"
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir / f"{root.name}-{key}"

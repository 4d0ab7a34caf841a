"""A fixed set of training patches: the same crops for every grid point and every checkpoint.

A loss landscape compares the loss at many weights, so it must be measured on one unchanging
set of data: no augmentation, no random crops per evaluation. :func:`fixed_patches` cuts
``count`` patches out of a dataset's training cases, preprocessed with a checkpoint's own
fitted preprocessing, at positions fixed by a seed:

- patch ``i`` comes from the case ``permutation[i mod n]`` of the (sorted) case ids, the
  permutation drawn from ``numpy.random.default_rng(seed)``;
- its position is drawn from ``numpy.random.default_rng([seed, i])``: a random foreground class
  of the case, then a random voxel of it (as nnU-Net's forced-foreground patches, from the same
  class locations training records), and the label window is centred on that voxel, moved
  only as far as needed to stay where training windows may lie; a case without foreground
  gets a uniformly placed window;
- image and label are reflect-padded by the network's margin as in training, and the label is
  the window's centre of the network's output size (valid-convolution networks output less
  than they read).

Several checkpoints trained on the same dataset with the same patch size get identical tensors
when their fitted preprocessing is the same (the same training cases give the same fit). When
it differs (another spacing, say), the same seed picks the same cases, classes and draws, but
each checkpoint preprocesses its own copy, so the windows lie in each one's own voxel grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmentation.atomic import write_atomic
from segmentation.data.items import case_item
from segmentation.data.layout import Case, DatasetError
from segmentation.data.patches import CLASS_LOCATIONS, ClassLocationsd
from segmentation.data.preprocessing import Preprocessing


@dataclass
class PatchSet:
    """Image patches and their labels, in memory.

    Attributes:
        images: (N, C, *input_size) float32.
        labels: (N, 1, *output_size) int64.
        case_ids: the case each patch was cut from, (N,).
        settings: how they were made (plain data: seed, sizes, cases, preprocessing).
    """

    images: torch.Tensor
    labels: torch.Tensor
    case_ids: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write the patches atomically as plain tensors and data (``torch.save``)."""
        data = {"images": self.images.cpu(), "labels": self.labels.cpu(),
                "case_ids": list(self.case_ids), "settings": self.settings}
        return write_atomic(path, lambda temporary: torch.save(data, temporary))

    @classmethod
    def load(cls, path: str | Path) -> PatchSet:
        """Read patches written by :meth:`save` (``weights_only``: nothing is unpickled).

        Raises:
            ValueError: naming the file, if it does not hold such patches.
        """
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
            return cls(data["images"], data["labels"], list(data["case_ids"]),
                       dict(data["settings"]))
        except Exception as error:  # any reason: the caller recomputes or reports it
            raise ValueError(f"{path}: not a patch file written by `segmentation landscape` "
                             f"({type(error).__name__}); delete it") from None


def fixed_patches(cases: Sequence[Case], preprocessing: Preprocessing,
                  input_size: Sequence[int], output_size: Sequence[int], *, count: int,
                  seed: int = 0, max_label: int = 255, slice_axis: int | None = None
                  ) -> PatchSet:
    """``count`` deterministic training patches (see the module's description).

    Args:
        cases: the training cases to cut from (labelled); sorted by id here.
        preprocessing: the checkpoint's fitted preprocessing.
        input_size: the network's input patch size (the checkpoint's patch size).
        output_size: the network's output size for ``input_size``.
        count: the number of patches.
        seed: fixes the cases and positions.
        max_label: the dataset's largest label value (it picks the label dtype).
        slice_axis: for a 2D network trained on slices of 3D scans, the slice axis; each patch
            is then a slice window along it.

    Returns:
        The patches: images (count, C, *input_size), labels (count, 1, *output_size).

    Raises:
        ValueError: if there are no cases or ``count`` < 1, or naming a case that cannot be read.
    """
    cases = sorted(cases, key=lambda c: c.case_id)
    if not cases:
        raise ValueError("no training cases to cut patches from")
    if count < 1:
        raise ValueError(f"count={count}: choose at least 1 patch")
    window_in, window_out = _volume_window(input_size, slice_axis), _volume_window(output_size,
                                                                                   slice_axis)
    order = np.random.default_rng(seed).permutation(len(cases))
    by_case: dict[int, list[int]] = {}
    for index in range(count):
        by_case.setdefault(int(order[index % len(cases)]), []).append(index)
    transform = preprocessing.transforms(("image", "label"), max_label=max_label)
    images: list[torch.Tensor | None] = [None] * count
    labels: list[torch.Tensor | None] = [None] * count
    for case_index, indices in sorted(by_case.items()):
        volume = _preprocessed(cases[case_index], transform)
        for index in indices:
            rng = np.random.default_rng([seed, index])
            image, label = crop_pair(volume, window_in, window_out, rng)
            images[index], labels[index] = _squeeze(image, slice_axis), _squeeze(label,
                                                                                 slice_axis)
    return PatchSet(torch.stack(images), torch.stack(labels).long(),
                    [cases[int(order[i % len(cases)])].case_id for i in range(count)],
                    patch_settings(cases, preprocessing, input_size, output_size, count=count,
                                   seed=seed, slice_axis=slice_axis))


def patch_settings(cases: Sequence[Case], preprocessing: Preprocessing,
                   input_size: Sequence[int], output_size: Sequence[int], *, count: int,
                   seed: int, slice_axis: int | None = None) -> dict[str, Any]:
    """What fixes the patches of :func:`fixed_patches` (their ``settings``), as plain data.

    Known before any scan is read, so stored patches can be recognised without cutting them
    again.
    """
    return {"seed": int(seed), "count": int(count), "input_size": [int(s) for s in input_size],
            "output_size": [int(s) for s in output_size], "slice_axis": slice_axis,
            "cases": sorted(c.case_id for c in cases), "preprocessing": preprocessing.as_dict()}


def _volume_window(size: Sequence[int], slice_axis: int | None) -> tuple[int, ...]:
    """The window in the volume: a 2D slice patch is one voxel thick along the slice axis."""
    window = [int(s) for s in size]
    if slice_axis is not None:
        window.insert(slice_axis, 1)
    return tuple(window)


def _squeeze(patch: torch.Tensor, slice_axis: int | None) -> torch.Tensor:
    """(C, *window) → (C, *patch): drop the slice axis of a slice window."""
    return patch if slice_axis is None else patch.squeeze(slice_axis + 1)


def _preprocessed(case: Case, transform: Any) -> dict[str, Any]:
    """The case's preprocessed image (C, *S) and label (1, *S) as arrays, with class locations.

    Raises:
        ValueError: naming the case's file, if it cannot be read or preprocessed.
    """
    if case.label is None:
        raise DatasetError(case.images[0], "has no label; patches need labelled cases")
    try:
        volume = transform(case_item(case))
    except Exception as error:  # MONAI wraps the reason; report it on one line
        while error.__cause__ is not None:
            error = error.__cause__
        raise DatasetError(case.images[0], f"cannot be preprocessed ({error})") from None
    data = {"image": np.asarray(volume["image"], dtype=np.float32),
            "label": np.asarray(volume["label"])}
    data[CLASS_LOCATIONS] = ClassLocationsd("label")(data)[CLASS_LOCATIONS]
    return data


def crop_pair(volume: dict[str, Any], window_in: Sequence[int], window_out: Sequence[int],
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An image window and the label window at its centre, placed by ``rng``.

    The label window is centred on a voxel of a random foreground class (uniform when there
    is none). Image and label are padded as training pads them (reflect by the margin, more if
    the volume is smaller than the window), and the window is moved only as far as needed to
    lie inside that padding, as every training window does.

    Args:
        volume: ``image`` (C, *S), ``label`` (1, *S) and ``class_locations``.
        window_in: the image window.
        window_out: the label window (≤ ``window_in``, by an even margin on every axis).
        rng: the patch's own generator.

    Returns:
        image (C, *window_in) float32 and label (1, *window_out).
    """
    margin = [(i - o) // 2 for i, o in zip(window_in, window_out, strict=True)]
    image, before = _pad(volume["image"], window_in, margin)
    label, _ = _pad(volume["label"], window_in, margin)
    highest = [n - w for n, w in zip(image.shape[1:], window_in, strict=True)]
    locations = volume[CLASS_LOCATIONS]
    if locations:
        classes = sorted(locations)
        voxels = locations[classes[int(rng.integers(len(classes)))]]
        voxel = voxels[int(rng.integers(len(voxels)))] + np.asarray(before)
        start = [min(max(int(c) - m - o // 2, 0), h)
                 for c, m, o, h in zip(voxel, margin, window_out, highest, strict=True)]
    else:
        start = [int(rng.integers(0, h + 1)) for h in highest]
    window = (slice(None),) + tuple(slice(s, s + n) for s, n in zip(start, window_in,
                                                                      strict=True))
    centre = (slice(None),) + tuple(slice(m, m + o) for m, o in zip(margin, window_out,
                                                                      strict=True))
    image_patch = np.ascontiguousarray(image[window])
    label_patch = np.ascontiguousarray(label[window][centre])
    return torch.from_numpy(image_patch), torch.from_numpy(label_patch.astype(np.int64))


def _pad(array: np.ndarray, window: Sequence[int], margin: Sequence[int]
         ) -> tuple[np.ndarray, list[int]]:
    """Reflect-pad (C, *S) by ``margin``, then up to ``window``; returns the padding before.

    The padding of training's crop (:class:`~segmentation.data.patches.ForegroundOversampledCropd`),
    so the windows here are windows training could have cut.
    """
    pads, before = [(0, 0)], []
    for n, size, m in zip(array.shape[1:], window, margin, strict=True):
        extra = max(size - (n + 2 * m), 0)
        pads.append((m + extra // 2, m + extra - extra // 2))
        before.append(m + extra // 2)
    return np.pad(array, pads, mode="reflect"), before

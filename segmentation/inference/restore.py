"""Logits on the preprocessed grid → class probabilities on the scan's own grid.

One implementation for ``segmentation infer`` (the Segmenter) and for ``segmentation predict``
(the training module's predict step): a softmax, then the preprocessing inverted (MONAI's
invertible Orientation and Spacing) on the probabilities, so the written mask has the scan's
exact shape, affine and orientation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.transforms import Compose


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (0) of (K, *S) logits, in place; returns the same tensor.

    In place because a CT-sized scan's logits are gigabytes (float32, the caller's own buffer).
    """
    probabilities = logits.sub_(logits.amax(0, keepdim=True)).exp_()
    return probabilities.div_(probabilities.sum(0, keepdim=True))


def check_finite(logits: torch.Tensor, source: str | Path, precision: str = "fp32") -> None:
    """Refuse logits with NaN or ±inf (both survive a sum): no mask can come from them.

    Raises:
        ValueError: naming ``source`` (the scan) and what to do.
    """
    if not torch.isfinite(logits.sum()):
        advice = ("check the scan's intensities and the checkpoint" if precision == "fp32"
                  else f"they overflowed in {precision}: rerun with --precision fp32")
        raise ValueError(f"{source}: the network gave non-finite logits; {advice}")


def probabilities_on_scan(probabilities: torch.Tensor, image: MetaTensor,
                          transform: Compose) -> torch.Tensor:
    """A scan's class probabilities, mapped back onto the scan's own grid.

    Orientation and spacing are inverted on the probabilities with each transform's own
    (linear) interpolation, and the argmax is taken afterwards by the writer: smoother,
    better-placed boundaries than nearest-neighbour resampling of a label map.

    Args:
        probabilities: (K, *S') probabilities on the preprocessed grid (see :func:`softmax_`).
        image: (C, *S') the preprocessed scan the logits belong to, with the metadata and
            applied operations of ``transform``.
        transform: the preprocessing chain that produced ``image``.

    Returns:
        (K, *S) float32 probabilities on the CPU, S the spatial shape of the scan's file.
    """
    probabilities = probabilities.cpu()                                 # (K, *S')
    inverted = transform.inverse({"image": MetaTensor(
        probabilities, meta=image.meta, applied_operations=image.applied_operations)})
    return torch.as_tensor(inverted["image"]).float()                  # (K, *S)


def check_scan_dimensions(path: Path, shape: tuple[int, ...], spatial_dims: int) -> None:
    """Refuse a file whose number of axes a model of ``spatial_dims`` cannot segment.

    A scan has the model's spatial axes, or one more holding its channels (MSD's 4D).

    Raises:
        ValueError: naming the file, its shape and what the model takes.
    """
    if len(shape) not in (spatial_dims, spatial_dims + 1):
        raise ValueError(f"{path}: a {len(shape)}D image of shape {tuple(shape)}; this "
                         f"model segments {spatial_dims}D scans (a file with several channels "
                         f"holds them on axis {spatial_dims + 1})")

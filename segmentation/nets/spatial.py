"""Symmetric crops and pads of the trailing spatial axes, and the error for impossible sizes.

Shared by the network ("valid" skips and residual shortcuts, "same" inputs padded to a multiple
of 2**depth), the training crops and the tiled predictions: spatial axes are the trailing axes
of a (N, C, *S) batch or a (C, *S) volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

Array = TypeVar("Array", torch.Tensor, np.ndarray)


class InvalidSizeError(ValueError):
    """A spatial size that a layer cannot take (odd before a pooling, or shrunk to nothing)."""


def center_crop(x: Array, size: Sequence[int]) -> Array:
    """Crop the trailing ``len(size)`` axes of ``x`` to ``size`` around the centre.

    ``x`` is a torch tensor or numpy array; the result is a (*B, *size) view of it.

    Raises:
        InvalidSizeError: if an axis is smaller than its target or differs by an odd amount.
    """
    if len(size) > x.ndim:
        raise InvalidSizeError(f"cannot center-crop {x.ndim} axes to size {tuple(size)}")
    slices = []
    for have, want in zip(x.shape[x.ndim - len(size):], size, strict=True):
        if have < want or (have - want) % 2:
            raise InvalidSizeError(f"cannot center-crop size {have} to {want}")
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[(Ellipsis, *slices)]


def pad_spatial(x: torch.Tensor, pads: Sequence[tuple[int, int]],
                mode: str = "constant") -> torch.Tensor:
    """Pad the trailing ``len(pads)`` axes of ``x``, given in natural axis order.

    ``pads`` holds (before, after) per axis, first axis first (``F.pad`` lists the last axis
    first); ``mode`` is ``F.pad``'s: "constant" (zeros), "reflect", "replicate" or "circular".
    Returns ``x`` itself when nothing is padded.
    """
    flat = [p for pair in reversed(pads) for p in pair]
    if not any(flat):
        return x
    return F.pad(x, flat, mode=mode)

"""Sliding-window prediction with Gaussian blending for "same"-padding networks.

The windows, the Gaussian and the normalisation are MONAI's (``sliding_window_inference`` with
``mode="gaussian"``: same window positions, same importance map from
``monai.data.utils.compute_importance_map``, zero padding of scans smaller than a window), so the
result equals MONAI's up to float rounding. It is ours because of what happens around the
network, which dominates once the network runs in bf16 on a GPU:

- the importance map is computed once per window size and device and kept there; MONAI
  rebuilds it on every call (and mirror TTA makes up to 8 calls per scan);
- each window's logits are blended into the output with one fused in-place multiply-add
  (``addcmul_``) instead of a weighted copy followed by an add;
- logits may be stitched on another device (the CPU) than the network's, for scans whose output
  would not fit beside the network on the GPU;
- progress is reported per batch of windows, for the progress bar of large scans.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from monai.data.utils import compute_importance_map

from segmentation.inference.batches import box, run_regions
from segmentation.nets.spatial import pad_spatial

SIGMA_SCALE = 0.125  # nnU-Net's and MONAI's Gaussian: sigma = window / 8


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one axis (MONAI's ``dense_patch_slices`` rule).

    Windows step by ``int(window * (1 - overlap))`` (at least 1); the last one is moved back so
    it ends at the border. ``size`` is the (padded) axis length, at least ``window``;
    ``overlap`` is a fraction in [0, 1).
    """
    if size == window:
        return [0]
    step = max(int(window * (1 - overlap)), 1)
    starts = []
    for start in range(0, size, step):
        starts.append(min(start, size - window))
        if start + window >= size:
            break
    return starts


@lru_cache(maxsize=4)
def importance_map(window: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """MONAI's Gaussian importance map, (1, *window) float32 on ``device``; cached."""
    with torch.inference_mode(False):  # a normal tensor, usable later with autograd on
        return compute_importance_map(window, mode="gaussian", sigma_scale=SIGMA_SCALE,
                                      device=device, dtype=torch.float32)[None]


def _starts(spatial: Sequence[int], window: Sequence[int], overlap: float
            ) -> list[tuple[int, ...]]:
    """Start offsets of all windows over a (padded) scan."""
    per_axis = [window_starts(s, w, overlap) for s, w in zip(spatial, window, strict=True)]
    return list(itertools.product(*per_axis))


def sliding_window(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 1,
    out_device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    fixed_batch: bool = False,
) -> torch.Tensor:
    """Gaussian-blended (N, K, *S) float32 logits for whole scans from a size-keeping network.

    Args:
        net: maps (B, C, *window) to (B, K, *window).
        image: (N, C, *S); axes shorter than the window are zero-padded (as MONAI does).
        window: window size.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass.
        out_device: where the logits are stitched (default: the image's device).
        progress: called with (windows done, windows in all) after every batch.
        fixed_batch: pad a short last batch to ``batch_size`` (see :func:`run_regions`).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap {overlap}: choose a fraction in [0, 1), e.g. 0.5")
    window = tuple(int(w) for w in window)
    spatial = tuple(image.shape[2:])
    out_device = image.device if out_device is None else torch.device(out_device)
    # zero-pad axes shorter than the window, half before and half after (MONAI's convention)
    pads = [(max(w - s, 0) // 2, max(w - s, 0) - max(w - s, 0) // 2)
            for s, w in zip(spatial, window, strict=True)]
    image = pad_spatial(image, pads)
    padded = tuple(image.shape[2:])
    starts = _starts(padded, window, overlap)
    importance = importance_map(window, image.device)               # (1, *window)
    stitch_weight = importance.to(out_device)
    total = torch.zeros((1, *padded), dtype=torch.float32, device=out_device)
    for start in starts:                                           # the normaliser
        total[(slice(None), *box(start, window))] += stitch_weight

    out: torch.Tensor | None = None
    for n, start, tile in run_regions(net, image, starts, window, batch_size, progress,
                                      fixed_batch=fixed_batch):
        if out is None:
            out = torch.zeros((image.shape[0], tile.shape[0], *padded), dtype=torch.float32,
                              device=out_device)
        target = out[(n, slice(None), *box(start, window))]       # (K, *window), a view
        if out.device == tile.device:  # (torch.device("cuda") != torch.device("cuda:0"))
            target.addcmul_(tile, importance)                      # fused: out += tile * w
        else:
            target += (tile.float() * importance).to(out_device)
    assert out is not None
    out /= total                                                   # (N, K, *padded)
    crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, spatial, strict=True))
    return out[(slice(None), slice(None), *crop)]

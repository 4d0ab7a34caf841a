"""Whole-scan logits from a network: one implementation for validation and for inference."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from segmentation.inference.tiling import overlap_tile


class Predictor:
    """Turns a preprocessed scan into logits of the same size.

    "valid"-padding networks (those with ``padding == "valid"`` and ``output_shape``) are run by
    overlap-tile, exact stitching of mirror-padded tiles; every other network (our "same" U-Net
    or any MONAI network) by MONAI's sliding window with Gaussian blending. A 2D network given a
    3D scan segments it slice by slice along ``slice_axis``.

    Args:
        net: the network (eval mode is the caller's business).
        patch_size: window (input tile) size, as trained.
        overlap: sliding-window overlap for "same" networks (nnU-Net: 0.5).
        batch_size: windows per forward pass.
        mirror: mirror test-time augmentation: average logits over flips of every spatial axis.
        slice_axis: for a 2D network on 3D scans, the axis slices are taken along.
        out_device: device of the stitched logits ("cpu" for large scans on a GPU).
    """

    def __init__(self, net: nn.Module, patch_size: Sequence[int], *, overlap: float = 0.5,
                 batch_size: int = 2, mirror: bool = False, slice_axis: int | None = None,
                 out_device: torch.device | str | None = None) -> None:
        self.net, self.patch_size = net, tuple(int(s) for s in patch_size)
        self.overlap, self.batch_size, self.mirror = overlap, batch_size, mirror
        self.slice_axis, self.out_device = slice_axis, out_device
        self.valid = getattr(net, "padding", "same") == "valid"
        if self.valid:
            net.check_input_shape(self.patch_size)

    def __call__(self, image: torch.Tensor,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Logits for whole scans.

        Args:
            image: (N, C, *S) preprocessed scans.
            progress: called with (windows done, windows in all) where the method reports it.

        Returns:
            (N, K, *S) logits.
        """
        if image.ndim - 2 == len(self.patch_size) + 1:  # 2D network, 3D scan
            return self._slice_by_slice(image)
        if not self.mirror:
            return self._windows(image, progress)
        spatial_axes = range(2, image.ndim)
        flips = [axes for r in range(len(spatial_axes) + 1)
                 for axes in itertools.combinations(spatial_axes, r)]
        total = None
        for axes in flips:
            logits = self._windows(image.flip(axes) if axes else image, progress)
            logits = logits.flip(axes) if axes else logits
            total = logits if total is None else total + logits
        return total / len(flips)

    def _windows(self, image: torch.Tensor, progress: Callable[[int, int], None] | None
                 ) -> torch.Tensor:
        if self.valid:
            return overlap_tile(self.net, image, self.patch_size,
                                self.net.output_shape(self.patch_size), self.net.depth,
                                batch_size=self.batch_size, out_device=self.out_device,
                                progress=progress)
        return sliding_window_inference(image, self.patch_size, self.batch_size, self.net,
                                        overlap=self.overlap, mode="gaussian",
                                        device=self.out_device)

    def _slice_by_slice(self, image: torch.Tensor) -> torch.Tensor:
        axis = 2 + (self.slice_axis or 0)
        outputs = []
        for n in range(image.shape[0]):
            slices = image[n].movedim(axis - 1, 0)                # (S_a, C, h, w)
            logits = torch.cat([self._windows(slices[i:i + self.batch_size], None)
                                for i in range(0, slices.shape[0], self.batch_size)])
            outputs.append(logits.movedim(0, axis - 1))           # (K, *S)
        return torch.stack(outputs)

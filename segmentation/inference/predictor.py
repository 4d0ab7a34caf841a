"""Whole-scan logits from a network: one implementation for validation and for inference."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from segmentation.inference.sliding_window import sliding_window
from segmentation.inference.tiling import inference_tile, network_strides, overlap_tile

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Predictor:
    """Turns a preprocessed scan into logits of the same size.

    "valid"-padding networks (those with ``padding == "valid"`` and ``output_shape``) are run by
    overlap-tile, exact stitching of mirror-padded tiles; every other network (our "same" U-Net
    or any MONAI network) by a sliding window with Gaussian blending (MONAI's windows and
    weights, our stitching). A 2D network given a 3D scan segments it slice by slice along
    ``slice_axis``.

    Args:
        net: the network (eval mode is the caller's business).
        patch_size: window (input tile) size, as trained.
        overlap: sliding-window overlap for "same" networks (nnU-Net: 0.5).
        batch_size: windows per forward pass.
        mirror: mirror test-time augmentation: average logits over flips of every spatial axis.
        slice_axis: for a 2D network on 3D scans, the axis slices are taken along.
        out_device: device of the stitched logits ("cpu" for large scans on a GPU).
        precision: "fp32", "bf16" or "fp16" runs the network under that autocast (logits are
            stitched in float32 either way); None leaves the caller's autocast as it is.
        channels_last: feed windows in channels-last memory format (for a network converted
            with ``net.to(memory_format=...)``; faster convolutions on recent GPUs).
        tile_scale: "valid" networks: tiles up to this many training patches (voxels) where the
            network's output does not depend on the tile (see ``inference_tile``); 1 keeps
            the training patch. Larger tiles go fewer to a pass (at least one), so a pass
            reads about ``batch_size`` training patches' voxels, at most ``tile_scale``.
        fixed_batch: always run full batches (a short last batch is filled with zero
            windows whose outputs are dropped), for a network compiled with static shapes.
    """

    def __init__(self, net: nn.Module, patch_size: Sequence[int], *, overlap: float = 0.5,
                 batch_size: int = 2, mirror: bool = False, slice_axis: int | None = None,
                 out_device: torch.device | str | None = None, precision: str | None = None,
                 channels_last: bool = False, tile_scale: float = 4.0,
                 fixed_batch: bool = False) -> None:
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {sorted(PRECISIONS)}")
        self.net, self.patch_size = net, tuple(int(s) for s in patch_size)
        self.precision, self.channels_last = precision, channels_last
        self.tile_scale, self.fixed_batch = tile_scale, fixed_batch
        self._tiles: dict[tuple[int, ...], tuple[int, ...]] = {}  # scan shape → tile
        self.overlap, self.batch_size, self.mirror = overlap, batch_size, mirror
        self.slice_axis, self.out_device = slice_axis, out_device
        self.valid = getattr(net, "padding", "same") == "valid"
        if self.valid:
            net.check_input_shape(self.patch_size)

    def __call__(self, image: torch.Tensor,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """(N, K, *S) logits for (N, C, *S) preprocessed scans.

        ``progress`` is called with (windows done, windows in all) where the method reports it.
        """
        with self._autocast(image.device):
            if image.ndim - 2 == len(self.patch_size) + 1:  # 2D network, 3D scan
                return self._slice_by_slice(image, progress)
            return self._mirrored(image, progress)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision is None:
            return contextlib.nullcontext()
        dtype = PRECISIONS[self.precision]
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def _mirrored(self, image: torch.Tensor, progress: Callable[[int, int], None] | None
                  ) -> torch.Tensor:
        """Logits of ``_windows``, averaged over the flips of every spatial axis with ``mirror``.

        Progress counts the windows of all passes together.
        """
        if not self.mirror:
            return self._windows(image, progress)
        spatial_axes = range(2, image.ndim)
        flips = [axes for r in range(len(spatial_axes) + 1)
                 for axes in itertools.combinations(spatial_axes, r)]
        total: torch.Tensor | None = None
        for index, axes in enumerate(flips):
            def report(done: int, count: int, index: int = index) -> None:
                if progress is not None:
                    progress(index * count + done, len(flips) * count)

            logits = self._windows(image.flip(axes) if axes else image, report)
            logits = logits.flip(axes) if axes else logits
            if total is None:
                total = logits
            else:
                total += logits
        assert total is not None
        return total.div_(len(flips))

    def _windows(self, image: torch.Tensor, progress: Callable[[int, int], None] | None
                 ) -> torch.Tensor:
        if self.valid:
            shape = tuple(image.shape[2:])
            if shape not in self._tiles:  # TTA passes and slice batches share one search
                self._tiles[shape] = inference_tile(self.net, self.patch_size, shape,
                                                    self.tile_scale,
                                                    in_use=sorted(set(self._tiles.values())))
            tile = self._tiles[shape]
            # fewer tiles per pass as they grow: a pass reads about as much as trained batches
            batch = max(1, round(self.batch_size * math.prod(self.patch_size) / math.prod(tile)))
            return overlap_tile(self._network, image, tile, self.net.output_shape(tile),
                                total_strides=network_strides(self.net, len(tile)),
                                batch_size=batch, out_device=self.out_device,
                                progress=progress, fixed_batch=self.fixed_batch)
        return sliding_window(self._network, image, self.patch_size, overlap=self.overlap,
                              batch_size=self.batch_size, out_device=self.out_device,
                              progress=progress, fixed_batch=self.fixed_batch)

    def _network(self, windows: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last_3d if windows.ndim == 5
                                         else torch.channels_last)
        return self.net(windows)

    def _slice_by_slice(self, image: torch.Tensor,
                        progress: Callable[[int, int], None] | None) -> torch.Tensor:
        """A 2D network over the slices of 3D scans; progress counts slices."""
        axis = 2 + (self.slice_axis or 0)
        outputs = []
        count = image.shape[0] * image.shape[axis]
        for n in range(image.shape[0]):
            slices = image[n].movedim(axis - 1, 0)                # (S_a, C, h, w)
            chunks = []
            for first in range(0, slices.shape[0], self.batch_size):
                chunks.append(self._mirrored(slices[first:first + self.batch_size], None))
                if progress is not None:
                    progress(n * image.shape[axis] + first + chunks[-1].shape[0], count)
            outputs.append(torch.cat(chunks).movedim(0, axis - 1))  # (K, *S)
        return torch.stack(outputs)

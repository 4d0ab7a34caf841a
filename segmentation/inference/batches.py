"""A network over many regions of whole scans, a batch of regions per forward pass.

Shared by the sliding window (``sliding_window.py``) and overlap-tile (``tiling.py``): both cut
equal-sized regions out of the scans, run the network on a batch of them at a time and place
each output themselves, the one with Gaussian weights, the other exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch


def box(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    """Slices of the region of ``size`` at ``start``, one per spatial axis."""
    return tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))


def run_regions(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    starts: Sequence[tuple[int, ...]],
    size: Sequence[int],
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    *,
    fixed_batch: bool = False,
) -> Iterator[tuple[int, tuple[int, ...], torch.Tensor]]:
    """The network's output for every region of every scan, in order.

    Args:
        net: maps (B, C, *size) to (B, K, *out).
        image: (N, C, *S) scans, already padded so that every region lies inside.
        starts: region start offsets, the same for every scan.
        size: region (network input) size.
        batch_size: regions per forward pass; a batch may mix scans.
        progress: called with (regions done, regions in all) after every batch.
        fixed_batch: fill a short last batch with zero regions (their outputs are dropped), so
            the network only ever sees one batch shape: a network compiled with static shapes
            then compiles once instead of once per remainder.

    Yields:
        (n, start, output): the scan's index, the region's start and its (K, *out) output.
    """
    jobs = [(n, start) for n in range(image.shape[0]) for start in starts]
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first:first + batch_size]
        windows = torch.stack([image[(n, slice(None), *box(start, size))]
                               for n, start in batch])                    # (B, C, *size)
        if fixed_batch and len(batch) < batch_size:
            filler = windows.new_zeros((batch_size - len(batch), *windows.shape[1:]))
            windows = torch.cat([windows, filler])                        # (batch_size, ...)
        outputs = net(windows)[:len(batch)]                               # (B, K, *out)
        for (n, start), output in zip(batch, outputs, strict=True):
            yield n, start, output
        if progress is not None:
            progress(first + len(batch), len(jobs))

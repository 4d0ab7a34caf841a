"""Capacity matching: decoder widths that give a U-Net the parameter count of another.

Removing a concatenative long skip also removes the skip's input channels from the next decoder
convolution, so a U-Net without skips has fewer parameters than one with them, and a comparison
of the two confounds the skips with capacity (Kamath et al. 2023). Widening the decoder levels
that lost their skip restores the count; this module finds the widths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from segmentation.nets.unet import UNet

DEFAULT_TOLERANCE = 0.02  # ±2 % of the reference's parameters


def count_parameters(init_args: Mapping[str, Any]) -> int:
    """Parameters of ``UNet(**init_args)`` (as :meth:`UNet.num_parameters` counts them).

    The network is built on the meta device: no memory is allocated and no weights are drawn,
    so even nnU-Net-sized networks are counted in milliseconds.
    """
    with torch.device("meta"):
        return UNet(**init_args).num_parameters()


def match_decoder_width(init_args: Mapping[str, Any], target: int, *,
                        tolerance: float = DEFAULT_TOLERANCE,
                        count: Callable[[Mapping[str, Any]], int] = count_parameters
                        ) -> list[int]:
    """``decoder_features`` for ``UNet(**init_args)`` so its parameters come close to ``target``.

    The decoder levels without a long skip are widened by one common factor (the levels that
    keep their skip keep the encoder's width), found by bisection; single levels are then
    nudged by ±1 channel while that brings the count closer (small networks step coarsely).

    Args:
        init_args: the network's arguments (``long_skips`` decides which levels widen).
        target: the parameter count to match, e.g. that of the same network with every skip.
        tolerance: the largest accepted relative difference.
        count: parameters of a network given its arguments.

    Returns:
        One width per decoder level, top first.

    Raises:
        ValueError: if every level keeps its skip (nothing to widen) or no factor comes within
            ``tolerance`` of ``target``.
    """
    args = dict(init_args)
    features = list(args["features"])
    depth = len(features) - 1
    skips = args.get("long_skips", True)
    skips = [bool(skips)] * depth if isinstance(skips, bool) else [bool(s) for s in skips]
    if all(skips):
        raise ValueError("capacity matching widens the decoder levels without a long skip, but "
                         "this network keeps every skip; it needs no matching")

    def widths(factor: float) -> list[int]:
        return [c if keep else max(1, round(c * factor))
                for c, keep in zip(features[:depth], skips, strict=True)]

    cache: dict[tuple[int, ...], int] = {}

    def params_of(candidate: Sequence[int]) -> int:
        key = tuple(candidate)
        if key not in cache:
            cache[key] = count({**args, "decoder_features": list(key)})
        return cache[key]

    low, high = 1.0, 1.0
    while params_of(widths(high)) < target:
        high *= 2
        if high > 64:
            raise ValueError(f"no decoder width reaches {target:,} parameters")
    while widths(low) != widths(high) and high - low > 1e-6:  # bisection on the factor
        middle = (low + high) / 2
        low, high = (middle, high) if params_of(widths(middle)) < target else (low, middle)
    best = min((widths(low), widths(high)), key=lambda w: abs(params_of(w) - target))
    # Small networks: one common factor moves in coarse steps; nudge single levels by ±1.
    improved = True
    while improved:
        improved = False
        for level in (i for i, keep in enumerate(skips) if not keep):
            for step in (-1, 1):
                candidate = list(best)
                candidate[level] = max(1, candidate[level] + step)
                if abs(params_of(candidate) - target) < abs(params_of(best) - target):
                    best, improved = candidate, True

    def params(chosen: Sequence[int]) -> int:
        return params_of(chosen)

    error = abs(params(best) - target) / target
    if error > tolerance:
        raise ValueError(f"the closest decoder widths {best} give {params(best):,} "
                         f"parameters, {error:.1%} from {target:,} (more than "
                         f"{tolerance:.0%}); the network is too small to match finely")
    return best

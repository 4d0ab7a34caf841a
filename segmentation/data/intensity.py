"""Intensity normalisations MONAI has no transform for, as MONAI transforms.

nnU-Net's z-score within one foreground mask shared by all channels, and its "CT" scheme.
MONAI's ClipIntensityPercentilesd computes percentiles per image; CT normalisation needs the
*dataset's* percentiles and statistics per channel, fitted once on the training set, so it is
written here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform


class ClipAndNormalized(MapTransform):
    """Clip each channel to [lower, upper], then subtract mean and divide by std.

    Args:
        keys: keys of (C, *S) images.
        channel_stats: one {"lower", "upper", "mean", "std"} per channel.
    """

    def __init__(self, keys: KeysCollection, channel_stats: Sequence[Mapping[str, float]]
                 ) -> None:
        super().__init__(keys)
        self.channel_stats = [dict(s) for s in channel_stats]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise every key; the channel count must match the fitted statistics."""
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.channel_stats):
                source = getattr(image, "meta", {}).get("filename_or_obj", f"key {key!r}")
                raise ValueError(f"{source}: image has {image.shape[0]} channel(s) but the CT "
                                 f"statistics were fitted on {len(self.channel_stats)}; give "
                                 f"{len(self.channel_stats)} channel file(s) per case, as in "
                                 "training")
            out = torch.as_tensor(image, dtype=torch.float32).clone()
            for c, s in enumerate(self.channel_stats):
                out[c] = (out[c].clamp(s["lower"], s["upper"]) - s["mean"]) / s["std"]
            d[key] = _with_meta_of(image, out)
        return d


class ZScoreOverForegroundd(MapTransform):
    """z-score every channel over the scan's foreground; the background stays 0.

    The foreground is one mask for all channels: the voxels non-zero in any channel (where a
    foreground crop found the scan), as nnU-Net normalises. MONAI's
    ``NormalizeIntensityd(nonzero=True)`` takes each channel's own non-zero voxels instead, so
    a voxel that is 0 in one channel only would be left out of that channel's statistics.

    Args:
        keys: keys of (C, *S) images.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise every key: (x − mean) / std per channel inside the shared mask."""
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            out = torch.as_tensor(image, dtype=torch.float32).clone()    # (C, *S)
            mask = (out != 0).any(0)                                      # (*S)
            if mask.any():
                for channel in out:                                       # (*S) views
                    values = channel[mask]
                    std = float(values.std(correction=0)) if values.numel() > 1 else 0.0
                    channel[mask] = (values - values.mean()) / max(std, 1e-8)
            d[key] = _with_meta_of(image, out)
        return d


def _with_meta_of(image: Any, out: torch.Tensor) -> Any:
    """``out`` as a MetaTensor with ``image``'s metadata when ``image`` is one (geometry kept)."""
    if hasattr(image, "copy_meta_from"):
        return type(image)(out, meta=image.meta, applied_operations=image.applied_operations)
    return out

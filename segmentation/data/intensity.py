"""Dataset-level intensity normalisation (nnU-Net's "CT" scheme) as a MONAI transform.

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
            if hasattr(image, "copy_meta_from"):  # keep MetaTensor geometry
                out = type(image)(out, meta=image.meta, applied_operations=image.applied_operations)
            d[key] = out
        return d

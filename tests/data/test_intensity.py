"""Intensity normalisation: CT clipping with dataset statistics, z-score over the foreground."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from segmentation.data.intensity import ClipAndNormalized


def test_ct_channel_count_error_names_the_file():
    stats = [{"lower": 0.0, "upper": 1.0, "mean": 0.5, "std": 0.2}]
    image = MetaTensor(torch.zeros(2, 4, 4, 4), meta={"filename_or_obj": "/data/x_0000.nii.gz"})
    with pytest.raises(ValueError, match=r"/data/x_0000\.nii\.gz: image has 2 channel\(s\) but "
                                         r"the CT statistics were fitted on 1"):
        ClipAndNormalized("image", stats)({"image": image})


def test_zscore_over_the_foreground_shares_one_mask_between_channels():
    """A voxel that is 0 in one channel only is still foreground there (nnU-Net's mask)."""
    from segmentation.data.intensity import ZScoreOverForegroundd

    rng = np.random.default_rng(0)
    image = np.zeros((2, 10, 10, 10), dtype=np.float32)
    image[:, 2:8, 2:8, 2:8] = rng.normal(50, 5, (2, 6, 6, 6))
    image[0, 2:4, 2:8, 2:8] = 0  # channel 0 is zero in part of the foreground
    out = ZScoreOverForegroundd("image")({"image": torch.from_numpy(image)})["image"]
    mask = torch.from_numpy((image != 0).any(0))
    assert torch.all(out[:, ~mask] == 0)  # background stays 0
    for channel in out:
        assert abs(channel[mask].mean().item()) < 1e-4
        assert abs(channel[mask].std(correction=0).item() - 1) < 1e-4
    assert torch.all(out[0, 2:4, 2:8, 2:8] < -1)  # normalised with the channel's statistics

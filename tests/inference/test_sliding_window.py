"""Our sliding window equals MONAI's Gaussian sliding window; window starts; overlap checks."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet as MonaiUNet

from segmentation import UNet
from segmentation.inference.sliding_window import sliding_window, window_starts


@pytest.mark.parametrize(("dims", "scan", "window", "overlap", "batch"), [
    (3, (21, 18, 23), (16, 16, 16), 0.5, 2),     # odd sizes, last window moved back
    (3, (9, 40, 16), (16, 16, 16), 0.25, 3),     # one axis smaller than a window: zero-padded
    (3, (16, 16, 16), (16, 16, 16), 0.5, 1),     # exactly one window
    (2, (37, 50), (16, 24), 0.0, 4),             # no overlap, anisotropic window
    (2, (33, 33), (32, 32), 0.9, 5),             # heavy overlap, step of 3
])
def test_sliding_window_equals_monai(dims, scan, window, overlap, batch):
    torch.manual_seed(0)
    net = UNet(spatial_dims=dims, in_channels=2, out_channels=3, features=(4, 8, 16),
               norm="batch").eval()
    image = torch.randn(2, 2, *scan)
    with torch.no_grad():
        ours = sliding_window(net, image, window, overlap=overlap, batch_size=batch)
        reference = sliding_window_inference(image, window, batch, net, overlap=overlap,
                                             mode="gaussian")
    assert ours.shape == (2, 3, *scan) and ours.dtype == torch.float32
    assert (ours - reference).abs().max().item() < 1e-5


def test_sliding_window_serves_any_monai_network_and_stitches_elsewhere():
    torch.manual_seed(0)
    net = MonaiUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
                    strides=(2, 2), norm="batch").eval()
    image = torch.randn(1, 1, 20, 24, 18)
    with torch.no_grad():
        ours = sliding_window(net, image, (16, 16, 16), out_device="meta")
        assert ours.device.type == "meta" and ours.shape == (1, 2, 20, 24, 18)
        reference = sliding_window_inference(image, (16, 16, 16), 1, net, mode="gaussian")
        assert torch.allclose(sliding_window(net, image, (16, 16, 16)), reference, atol=1e-5)


def test_window_starts_cover_the_axis_and_end_at_the_border():
    assert window_starts(40, 16, 0.5) == [0, 8, 16, 24]
    assert window_starts(41, 16, 0.5) == [0, 8, 16, 24, 25]
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(20, 16, 0.99) == [0, 1, 2, 3, 4]  # step never below one voxel


def test_sliding_window_rejects_an_overlap_of_one():
    with pytest.raises(ValueError, match=r"choose a fraction in \[0, 1\)"):
        sliding_window(lambda x: x, torch.zeros(1, 1, 8, 8), (4, 4), overlap=1.0)

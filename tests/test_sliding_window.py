"""Our sliding window equals MONAI's Gaussian sliding window; precision, progress, TTA."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet as MonaiUNet

from segmentation import UNet
from segmentation.inference.predictor import Predictor
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


def test_predictor_reports_progress_over_all_mirror_passes():
    net = UNet(spatial_dims=3, features=(4, 8), norm="batch").eval()
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        Predictor(net, (8, 8, 8), batch_size=3, mirror=True)(
            torch.randn(1, 1, 12, 8, 8), lambda done, total: calls.append((done, total)))
    # 2 windows per pass (one batch), 8 mirror passes
    assert calls == [(2 * k, 16) for k in range(1, 9)]


def test_predictor_bf16_precision_is_close_to_fp32():
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, features=(4, 8, 16), norm="instance").eval()
    image = torch.randn(1, 1, 20, 20, 20)
    with torch.no_grad():
        full = Predictor(net, (16, 16, 16))(image)
        half = Predictor(net, (16, 16, 16), precision="bf16")(image)
        last = Predictor(net, (16, 16, 16), channels_last=True)(image)
    assert half.dtype == torch.float32
    assert 0 < (half - full).abs().max().item() < 0.1 * full.abs().max().item()
    assert torch.allclose(last, full, atol=1e-5)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Predictor(net, (16, 16, 16), precision="fp8")


def test_slice_by_slice_honours_mirror_tta_and_reports_slices():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, features=(4, 8, 16), norm="batch").eval()
    image = torch.randn(1, 1, 20, 3, 24)
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        logits = Predictor(net, (16, 16), slice_axis=1, mirror=True, batch_size=2)(
            image, lambda done, total: calls.append((done, total)))
        direct = Predictor(net, (16, 16), mirror=True)(image[:, :, :, 1])
        plain = Predictor(net, (16, 16))(image[:, :, :, 1])
    assert logits.shape == (1, 2, 20, 3, 24)
    assert torch.allclose(logits[:, :, :, 1], direct, atol=1e-5)
    assert not torch.allclose(direct, plain, atol=1e-4)  # TTA did something
    assert calls == [(2, 3), (3, 3)]

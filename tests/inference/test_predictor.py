"""The predictor: logits of the scan's size, mirror TTA, slice by slice, precision, progress,
tiles reused across scans."""

from __future__ import annotations

import pytest
import torch

from segmentation import UNet
from segmentation.inference.predictor import Predictor
from segmentation.inference.tiling import inference_tile


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_predictor_returns_logits_of_the_scan_size_and_mirror_tta_is_equivariant(padding):
    torch.manual_seed(0)
    features = (4, 8, 16) if padding == "same" else (4, 8)  # a shallow valid net keeps it fast
    net = UNet(spatial_dims=3, features=features, padding=padding, norm="batch").eval()
    patch = (16, 16, 16) if padding == "same" else net.valid_input_shape((20, 20, 20))
    image = torch.randn(1, 1, 21, 18, 23)
    with torch.no_grad():
        logits = Predictor(net, patch, batch_size=2)(image)
        assert logits.shape == (1, 2, 21, 18, 23)
        tta = Predictor(net, patch, mirror=True)(image)
        flipped = Predictor(net, patch, mirror=True)(image.flip(2)).flip(2)
    assert tta.shape == logits.shape
    assert torch.allclose(tta, flipped, atol=1e-4)  # averaging over all flips is flip-invariant


def test_predictor_runs_a_2d_network_slice_by_slice():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, features=(4, 8, 16), norm="batch").eval()
    image = torch.randn(1, 1, 5, 20, 24)
    with torch.no_grad():
        logits = Predictor(net, (16, 16), slice_axis=0)(image)
        direct = Predictor(net, (16, 16))(image[:, :, 3])
    assert logits.shape == (1, 2, 5, 20, 24)
    assert torch.allclose(logits[:, :, 3], direct, atol=1e-5)


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


def test_one_predictor_reuses_its_tiles_across_scans():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, features=(4, 8, 16), padding="valid", norm="batch").eval()
    patch = net.valid_input_shape((44, 44))
    predictor = Predictor(net, patch)
    with torch.no_grad():
        for scan in [(70, 53), (61, 55), (67, 45)]:  # alone, each would pick its own tile
            predictor(torch.randn(1, 1, *scan))
    assert len({inference_tile(net, patch, scan) for scan in predictor._tiles}) == 3
    assert len(set(predictor._tiles.values())) == 1

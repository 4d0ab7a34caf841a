"""Device and precision choice, and where the logits are stitched, without a GPU."""

from __future__ import annotations

import pytest
import torch

from segmentation.inference import devices
from segmentation.inference.segmenter import Segmenter


def test_precision_choice_and_cpu_stitching_when_the_gpu_would_not_hold_the_buffers(
        trained_checkpoint, monkeypatch):
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert devices.resolve_precision("bf16", cpu) == "bf16"
    assert devices.resolve_precision("fp16", cpu) == "fp16"
    with pytest.raises(ValueError, match="--precision fp8: choose auto, fp32, bf16 or fp16"):
        devices.resolve_precision("fp8", cpu)

    notes: list[str] = []
    model = Segmenter(trained_checkpoint, device="cpu", tta=True, note=notes.append)
    model.device = torch.device("cuda")  # decide as if on a GPU; nothing runs on it
    voxels = 512 * 512 * 400  # (4 classes × 3 with TTA + normaliser + 2 scan copies) × 4 B
    monkeypatch.setattr(devices, "available_gpu_memory", lambda device: 15 * 2**30)
    model.place_stitching(voxels, 1)
    assert model.predictor.out_device == torch.device("cpu")  # > 25% of a 16 GB card
    assert "stitching them on the CPU" in notes[-1] and "5.9 GiB" in notes[-1]
    monkeypatch.setattr(devices, "available_gpu_memory", lambda device: 75 * 2**30)
    model.place_stitching(voxels, 1)
    assert model.predictor.out_device == torch.device("cuda")
    assert len(notes) == 1


def test_gpu_choices_without_a_gpu(monkeypatch):
    """auto precision follows the card's generation; memory queries get a device index."""
    cuda = torch.device("cuda")  # no index, as resolve_device("auto") gives it
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert devices.resolve_precision("auto", cuda) == "fp16"  # V100, T4: no native bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert devices.resolve_precision("auto", cuda) == "bf16"

    def expects_index(value):
        def query(device):
            assert isinstance(device, int), device  # some torch.cuda calls reject "cuda"
            return value
        return query

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", expects_index((10 * 2**30, 16 * 2**30)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", expects_index(2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", expects_index(3 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", expects_index(0.5))
    # free 10 GiB + 2 GiB cached by us, but capped at half the card less what we hold: 7 GiB
    assert devices.available_gpu_memory(cuda) == 7 * 2**30

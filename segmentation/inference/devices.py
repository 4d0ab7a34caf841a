"""Where and in what precision inference runs: device and precision choice, GPU memory."""

from __future__ import annotations

import re

import torch

from segmentation.inference.predictor import PRECISIONS

# Stitch the logits on the CPU when their buffers would take more than this share of the free GPU
# memory: the rest is needed by the network's activations, the Gaussian weights and the TTA sum.
GPU_BUFFER_FRACTION = 0.25


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; "cuda" without a GPU is an error.

    Raises:
        ValueError: for a name other than auto, cpu, cuda or cuda:N, or cuda without a GPU.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device {device}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no GPU is available; use auto or cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" → "bf16" on a GPU that supports it, "fp16" on an older GPU, "fp32" on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        # native bf16 from Ampere (compute capability 8) on; is_bf16_supported() also counts
        # emulation, which is slow on V100/T4
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if precision not in PRECISIONS:
        *first, last = PRECISIONS
        raise ValueError(f"--precision {precision}: choose auto, {', '.join(first)} or {last}")
    return precision


def available_gpu_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``.

    The card's free memory plus what our allocator holds unused, within any
    ``torch.cuda.set_per_process_memory_fraction`` cap.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    cached = torch.cuda.memory_reserved(index) - allocated
    cap = int(torch.cuda.get_per_process_memory_fraction(index) * total) - allocated
    return max(min(free + cached, cap), 0)


def stitching_buffer_bytes(voxels: int, classes: int, channels: int, tta: bool) -> int:
    """Peak bytes of the float32 whole-scan buffers of one scan.

    The logits (softmax runs in place); with ``tta`` the running sum, one pass's logits and
    their flipped copy; the Gaussian normaliser; the scan and its flipped copy. ``voxels`` and
    ``channels`` are the preprocessed scan's, ``classes`` the network's output channels.
    """
    return (classes * (3 if tta else 1) + 1 + 2 * channels) * voxels * 4


def stitching_device(device: torch.device, needed: int) -> tuple[torch.device, str | None]:
    """The device to stitch on: ``device``, or the CPU when a GPU would not hold the buffers.

    ``needed`` is :func:`stitching_buffer_bytes`. Also returns a one-line remark for the user
    when the CPU was chosen.
    """
    if device.type != "cuda":
        return device, None
    free = available_gpu_memory(device)
    if needed <= GPU_BUFFER_FRACTION * free:
        return device, None
    return torch.device("cpu"), (
        f"stitching buffers of {needed / 2**30:.1f} GiB would take more than "
        f"{GPU_BUFFER_FRACTION:.0%} of the free GPU memory ({free / 2**30:.1f} GiB): "
        "stitching them on the CPU")

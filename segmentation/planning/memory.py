"""How much memory training a planned U-Net takes: nnU-Net's feature-map count, in bytes.

The planner needs a number that grows with the memory a training step takes, cheap enough to
evaluate a few hundred times per plan. nnU-Net v2 uses the number of elements of the feature
maps the network computes for one sample (``compute_conv_feature_map_size`` of its
``PlainConvUNet``) and :func:`feature_map_elements` computes the same count from the plan by
arithmetic, for the network :class:`segmentation.UNet` builds from it (the same layers):

* every convolution's output (2 per encoder level, 2 per decoder level), at the level's size;
* every transposed convolution's output (the skip level's channels, at the skip's size);
* the segmentation output at full resolution (nnU-Net's planner counts the deep-supervision
  heads out, and so does this count).

**Why it tracks memory.** Autograd keeps, per convolution unit (conv → instance norm → leaky
ReLU in place), two tensors of the conv's output size: the conv output (for the norm's
backward) and the normalised, activated map (for the next conv's backward). A decoder level
keeps the concatenation of skip and upsampled map, twice the transposed conv's output. So the
saved activations are two tensors per counted element, 8 bytes in float32 (the segmentation
output is kept once: a few % of the count for narrow networks, under 1% at 32 channels). At
the peak, early in the backward pass, the gradients of the uppermost (largest) maps are alive
as well, about 2 bytes per element more; parameter gradients add up to 4 bytes per parameter.
On a CPU in float32 the estimate is therefore :data:`CPU_FP32_BYTES_PER_ELEMENT` = 10 bytes per
element and sample plus 4 bytes per parameter (:func:`estimated_cpu_fp32_bytes`).
``tests/planning/test_memory.py`` measures training steps of small planned networks with
torch's profiler: what the forward pass leaves for the backward pass is the 8 bytes within
±3%, the peak within ±15% of the estimate (measured 1.24–1.37 × the 8 bytes at batch 2; at
batch 1, which the planner never plans, oneDNN's 3D convolutions add scratch buffers of several
times the activations).

**On the GPU** (bf16 mixed precision, cuDNN workspaces, the caching allocator's slack) nnU-Net
calibrated the count against measured runs: 560 million elements at batch 2 (3D), 85 million
at batch 12 (2D) fill its 8 GB reference budget, about 7.1 and 7.8 bytes per element and
sample. :func:`estimated_gpu_gb` uses that calibration, so a plan for ``--gpu-memory 8`` is
nnU-Net's default plan, and a budget of ``G`` GB scales the allowance by ``G / 8``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

REFERENCE_GB = 8.0
"""nnU-Net's reference GPU budget (``gpu_memory_target_in_gb`` of its ExperimentPlanner)."""
REFERENCE_ELEMENTS = {3: 560_000_000, 2: 85_000_000}
"""Feature-map elements per sample that fill :data:`REFERENCE_GB` at :data:`REFERENCE_BATCH`."""
REFERENCE_BATCH = {3: 2, 2: 12}
"""The batch sizes nnU-Net's reference element counts were calibrated with."""
CPU_FP32_BYTES_PER_ELEMENT = 10.0
"""Peak bytes per counted element and sample of a float32 training step on a CPU (see above)."""
PARAMETER_GRADIENT_BYTES = 4
"""Bytes per parameter for its float32 gradient, allocated during the backward pass."""

PerAxis = tuple[int, ...]


def _expand_strides(strides: Sequence[Sequence[int]], dims: int) -> list[PerAxis]:
    return [tuple(int(f) for f in s) if not isinstance(s, int) else (int(s),) * dims
            for s in strides]


def level_shapes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]
                 ) -> list[PerAxis]:
    """The spatial size of every level's feature maps for a patch, top first.

    ``strides`` has one per-axis factor per downsampling (``len(features) − 1`` entries);
    sizes are divided with floor division, as nnU-Net counts them.
    """
    dims = len(patch_size)
    shape = tuple(int(n) for n in patch_size)
    shapes = [shape]
    for factors in _expand_strides(strides, dims):
        shape = tuple(n // f for n, f in zip(shape, factors, strict=True))
        shapes.append(shape)
    return shapes


def feature_map_elements(patch_size: Sequence[int], features: Sequence[int],
                         strides: Sequence[Sequence[int]], num_classes: int, *,
                         convs_per_level: int = 2, decoder_convs_per_level: int = 2) -> int:
    """Elements of the feature maps a plain U-Net computes for one sample (nnU-Net's count).

    Args:
        patch_size: the spatial input size.
        features: channels per level, top first.
        strides: one per-axis factor per downsampling, top first.
        num_classes: output channels (labels, background included).
        convs_per_level: convolutions per encoder level.
        decoder_convs_per_level: convolutions per decoder level.

    Returns:
        The count of :mod:`this module <segmentation.planning.memory>`'s docstring, equal to
        ``PlainConvUNet.compute_conv_feature_map_size`` of nnU-Net's planner for the same
        network (deep supervision off, as the planner builds it).
    """
    if len(strides) != len(features) - 1:
        raise ValueError(f"strides needs {len(features) - 1} entries (len(features) - 1), "
                         f"got {len(strides)}")
    shapes = level_shapes(patch_size, strides)
    voxels = [math.prod(s) for s in shapes]
    total = sum(convs_per_level * c * v for c, v in zip(features, voxels, strict=True))
    for level in range(len(features) - 1):
        total += decoder_convs_per_level * features[level] * voxels[level]  # decoder convs
        total += features[level] * voxels[level]                           # transposed conv
    total += num_classes * voxels[0]                                       # segmentation
    return int(total)


def reference_elements(gpu_memory_gb: float, dims: int) -> float:
    """Feature-map elements per sample that fit ``gpu_memory_gb`` at :data:`REFERENCE_BATCH`.

    nnU-Net's reference scaled by ``gpu_memory_gb / 8``; times the reference batch it is the
    whole budget in elements (a batch of 2 may have ``REFERENCE_BATCH / 2`` times as many per
    sample). Computed in nnU-Net's order of operations, so plans round as its do.
    """
    return REFERENCE_ELEMENTS[dims] * (gpu_memory_gb / REFERENCE_GB)


def estimated_gpu_gb(elements: int, batch_size: int, dims: int) -> float:
    """GPU memory (GB) of a training step by nnU-Net's calibration.

    The inverse of :func:`reference_elements` for ``elements`` per sample and ``batch_size``
    samples.
    """
    reference = REFERENCE_ELEMENTS[dims] * REFERENCE_BATCH[dims]
    return elements * batch_size * REFERENCE_GB / reference


def estimated_cpu_fp32_bytes(elements: int, batch_size: int, parameters: int) -> float:
    """Peak bytes a float32 forward and backward pass allocates on a CPU (see module docstring).

    Counts what the step allocates, not the weights and inputs that exist before it.
    """
    return (CPU_FP32_BYTES_PER_ELEMENT * elements * batch_size
            + PARAMETER_GRADIENT_BYTES * parameters)


def count_parameters(in_channels: int, out_channels: int, features: Sequence[int],
                     kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], *,
                     convs_per_level: int = 2, decoder_convs_per_level: int = 2,
                     deep_supervision: bool = True) -> int:
    """Parameters of the plain U-Net :class:`segmentation.UNet` builds for a plan, by arithmetic.

    Convolutions with bias, instance norm with affine weight and bias, transposed convolutions
    with kernel = stride, a 1×1 head and, with deep supervision, one 1×1 auxiliary head per
    decoder level below the top (``UNet.num_parameters()`` counts those only then).
    """
    def conv(cin: int, cout: int, kernel: Sequence[int]) -> int:
        return cin * cout * math.prod(kernel) + cout

    def unit(cin: int, cout: int, kernel: Sequence[int]) -> int:
        return conv(cin, cout, kernel) + 2 * cout  # + instance norm weight and bias

    total, previous = 0, in_channels
    for width, kernel in zip(features, kernel_sizes, strict=True):
        total += unit(previous, width, kernel)
        total += (convs_per_level - 1) * unit(width, width, kernel)
        previous = width
    for level in range(len(features) - 1):
        width, kernel = features[level], kernel_sizes[level]
        total += conv(features[level + 1], width, strides[level])  # transposed conv
        total += unit(2 * width, width, kernel)
        total += (decoder_convs_per_level - 1) * unit(width, width, kernel)
    ones = (1,) * len(kernel_sizes[0])
    total += conv(features[0], out_channels, ones)
    if deep_supervision:
        total += sum(conv(features[level], out_channels, ones)
                     for level in range(1, len(features) - 1))
    return int(total)

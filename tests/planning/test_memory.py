"""The memory estimate against the network it estimates, and against measured memory on a CPU.

Measured with torch's profiler (``profile_memory``): every allocation and free of the CPU
allocator during a float32 training step (forward, mean of the outputs, backward). Small
networks are narrow (4 to 8 channels at the top), so that activations dominate as they do at
planned sizes (a 31-million-parameter plan has 0.1 GB of gradients beside gigabytes of
activations); batch 2, the planner's smallest (in 3D at batch 1 oneDNN picks convolution
algorithms with scratch buffers several times the activations).
"""

from __future__ import annotations

import gzip
import json
import math
import warnings

import pytest
import torch
from torch import nn

from segmentation import UNet
from segmentation.planning import memory
from segmentation.planning.rules import plan_dataset
from segmentation.planning.topology import topology
from tests.planning.test_rules import cine_like, prostate_like

CLASSES = 3


def planned_net(spacing, shape, base: int, deep_supervision: bool = True):
    """A narrow U-Net with the planned levels, kernels and strides of a patch."""
    topo = topology(spacing, shape)
    features = [min(base * 2 ** level, base * 8) for level in range(topo.levels)]
    net = UNet(len(spacing), 1, CLASSES, features=features, kernel_sizes=topo.kernel_sizes,
               strides=topo.strides, downsample="conv", deep_supervision=deep_supervision)
    return net, topo, features


@pytest.mark.parametrize(("spacing", "shape", "base"), [
    ((1.0, 1.0, 1.0), (24, 24, 24), 8), ((0.6, 0.6, 3.6), (48, 48, 8), 4),
    ((1.0, 1.0), (96, 64), 4), ((0.7, 0.7, 5.0), (40, 40, 12), 2)])
def test_the_count_is_the_elements_of_the_unets_convolution_outputs(spacing, shape, base):
    """feature_map_elements counts what this UNet computes: every (transposed) convolution's
    output and the segmentation head's, at batch 1 (not the deep-supervision heads)."""
    net, topo, features = planned_net(spacing, shape, base)
    heads = {id(m) for m in net.aux_heads}
    outputs = []
    for module in net.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and id(module) not in heads:
            module.register_forward_hook(lambda m, i, out: outputs.append(out.numel()))
    with torch.no_grad():
        net.eval()(torch.zeros(1, 1, *topo.patch_size))
    assert sum(outputs) == memory.feature_map_elements(topo.patch_size, features, topo.strides,
                                                       CLASSES)


@pytest.mark.parametrize("fingerprint", [prostate_like, cine_like], ids=["prostate", "cine"])
def test_the_parameter_count_is_the_unets(fingerprint):
    for configuration in plan_dataset(fingerprint()).configurations:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            net = UNet(configuration.spatial_dims, 2 if fingerprint is prostate_like else 1,
                       3 if fingerprint is prostate_like else 4,
                       features=configuration.features,
                       kernel_sizes=configuration.kernel_sizes, strides=configuration.strides,
                       downsample="conv", deep_supervision=True)
        assert net.num_parameters() == configuration.parameters


def test_the_gpu_estimate_is_nnunets_calibration():
    # 560 million elements at batch 2 fill 8 GB in 3D; 85 million at batch 12 in 2D
    assert memory.estimated_gpu_gb(560_000_000, 2, 3) == pytest.approx(8.0)
    assert memory.estimated_gpu_gb(85_000_000, 12, 2) == pytest.approx(8.0)
    assert memory.reference_elements(24, 3) == pytest.approx(3 * 560_000_000)


MARKER = torch.float64, 7919  # a tensor of 63,352 bytes marks the end of the forward pass


def profiled_training_step(net: UNet, x: torch.Tensor, tmp_path) -> tuple[int, int]:
    """(bytes held after the forward pass, peak bytes) of a training step, relative to before.

    Every allocation and free of the CPU allocator during the step, from torch's profiler
    (``profile_memory``) as its raw memory timeline; a marker tensor allocated between
    forward and backward tells the two apart.
    """
    def step() -> None:
        outputs = net(x)
        torch.empty(MARKER[1], dtype=MARKER[0])  # allocated and freed at once
        loss = sum(o.mean() for o in outputs)
        del outputs
        loss.backward()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True, record_shapes=True,
                                with_stack=True) as profiler:
        step()
    path = tmp_path / "timeline.raw.json.gz"
    with warnings.catch_warnings():  # deprecated in favour of a CUDA-only API
        warnings.simplefilter("ignore")
        try:
            profiler.export_memory_timeline(str(path), device="cpu")
        except AttributeError as error:  # pragma: no cover - a torch without the timeline
            pytest.skip(f"torch's profiler has no memory timeline here: {error}")
    with gzip.open(path, "rt") as file:
        events = json.load(file)  # (time, action, signed bytes, category)
    preexisting, marker_bytes = 1, MARKER[0].itemsize * MARKER[1]
    allocated = peak = 0
    held = None
    for _, action, size, _ in events:
        if action == preexisting:
            continue
        if held is None and size == marker_bytes:
            held = allocated
        allocated += size
        peak = max(peak, allocated)
    assert held is not None, "the marker tensor was not seen"
    return held, peak


MEASURED = [  # (spacing, shape, base channels): small and fast on two cores
    ((1.0, 1.0, 1.0), (16, 16, 16), 4),
    ((0.6, 0.6, 3.6), (32, 32, 8), 4),
    ((1.0, 1.0), (64, 64), 4),
]


@pytest.mark.parametrize(("spacing", "shape", "base"), MEASURED)
def test_the_estimate_tracks_the_measured_memory_of_a_training_step(spacing, shape, base,
                                                                    tmp_path):
    """Two measurements of one float32 training step at batch 2.

    Held after the forward pass: two float32 tensors per counted element (module docstring
    of memory.py), except the segmentation output, held once; within ±3% (what the count
    leaves out: norm statistics, the deep-supervision outputs, about 1%).

    Peak: within ±15% of the estimate, 10 bytes per element and sample plus 4 per parameter.
    Measured: 1.24–1.37 × the 8-byte activations over 2D, 3D and anisotropic networks (the
    gradients of the largest maps come on top early in the backward pass, more in 2D whose
    upper levels weigh more), i.e. within ±10% of 10 bytes; 15% leaves room for other torch
    and oneDNN versions.
    """
    torch.manual_seed(0)
    net, topo, features = planned_net(spacing, shape, base)
    net.train()
    x = torch.randn(2, 1, *topo.patch_size)
    outputs = net(x)  # a first step sets oneDNN up: nothing it allocates recurs
    sum(o.mean() for o in outputs).backward()
    net.zero_grad(set_to_none=True)
    del outputs

    held, peak = profiled_training_step(net, x, tmp_path)
    elements = memory.feature_map_elements(topo.patch_size, features, topo.strides, CLASSES)
    segmentation = CLASSES * math.prod(topo.patch_size)
    assert held == pytest.approx(4 * 2 * (2 * elements - segmentation), rel=0.03)
    estimate = memory.estimated_cpu_fp32_bytes(elements, 2, net.num_parameters(True))
    assert peak == pytest.approx(estimate, rel=0.15), (
        f"measured {peak / 2**20:.2f} MiB, estimated {estimate / 2**20:.2f} MiB "
        f"({peak / estimate:.2f}×)")

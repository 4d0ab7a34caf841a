"""From a fingerprint to a plan: nnU-Net v2's default ExperimentPlanner (3d_fullres and 2d).

:func:`plan_dataset` is a pure function of a :class:`~segmentation.planning.fingerprint.
Fingerprint` and the GPU budget. Per configuration (:func:`plan_configuration`, nnU-Net's
``get_plans_for_configuration``):

1. an initial patch with the aspect ratio of the voxel spacing (in mm, roughly a cube) and the
   volume of 256³ voxels (2048² in 2D), clipped to the median image shape after resampling;
2. the topology for it (:func:`~segmentation.planning.topology.topology`): where to
   downsample, which kernels, the patch rounded up to what the downsampling divides;
3. channels doubling from 32 per level, capped at 320 (3D) or 512 (2D);
4. while the network's feature maps for a batch of 2 exceed the memory budget
   (:mod:`~segmentation.planning.memory`), the axis largest relative to the median shape
   shrinks by one step of its divisor and the topology is planned again;
5. the batch size fills the budget, capped so that one batch covers at most 5% of the
   dataset's voxels, and never below 2.

The 2D configuration is the data module's slice mode: slices across the coarsest axis
(``data.slice_axis``), the axis nnU-Net's 2d configuration slices across in its transposed
volumes, with the same spacing, median shape and dataset size for the rules.

Where this differs from nnU-Net (on purpose; scripts/compare_nnunet_plans.py shows identical
plans for datasets where none of this applies):

* axes are reported in preprocessing's RAS order (spacing, shapes, patch, kernels and
  strides); the rules run in nnU-Net's order (the reverse, i.e. SimpleITK's z, y, x, with the
  coarsest axis moved first) so that ties between equal axes break the same way;
* shapes are cropped to the non-zero region only when preprocessing will crop
  (``crop_foreground``, planned as nnU-Net decides ``use_mask_for_norm``: when cropping keeps
  less than 3/4 of the median case); otherwise the plan uses the whole image, as the data
  module will (nnU-Net always crops);
* one normalisation for all channels (the data module has one), CT when any channel is CT;
* no 3d_lowres / cascade configuration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segmentation.planning import memory
from segmentation.planning.fingerprint import Fingerprint
from segmentation.planning.spacing import coarsest_first, resampled_shapes, target_spacing
from segmentation.planning.topology import topology

BASE_FEATURES = 32
MAX_FEATURES = {3: 320, 2: 512}
CONVS_PER_LEVEL = 2
MIN_BATCH_SIZE = 2
MAX_DATASET_COVERED = 0.05  # one batch sees at most 5% of the dataset's voxels
INITIAL_PATCH_EDGE = {3: 256, 2: 2048}  # the initial patch has the volume of this edge**dims
CROP_THRESHOLD = 0.75  # crop (and normalise within the non-zero mask) below this median share
ITERATIONS_PER_EPOCH = 250  # nnU-Net's epoch: 250 batches

# nnU-Net's channel name → normalisation scheme (get_normalization_scheme), in our names
NORMALIZATION_OF_CHANNEL = {"ct": "ct", "nonorm": "none", "zscore": "zscore",
                            "rescale_to_0_1": "minmax", "rgb_to_0_1": "minmax"}


@dataclass(frozen=True)
class ConfigurationPlan:
    """One network and its training patches; every per-axis value in the network's axis order.

    For "3d" that order is the volumes' (RAS after preprocessing); for "2d" on 3D volumes it
    is the volumes' order without ``slice_axis``.

    Attributes:
        name: "3d" or "2d".
        spatial_dims: the network's dimensions.
        spacing: voxel spacing in mm along the network's axes.
        median_shape: the median image shape after resampling, in voxels.
        patch_size: the training patch.
        batch_size: patches per batch.
        features: channels per level, top first.
        kernel_sizes: per level, one kernel size per axis.
        strides: per downsampling, one factor per axis.
        slice_axis: for 2D on 3D volumes: the volume axis the slices are taken along.
        feature_map_elements: nnU-Net's count for one sample (see :mod:`memory`).
        estimated_gb: estimated GPU memory of a training step (nnU-Net's calibration).
        parameters: parameters of the network (deep-supervision heads included).
    """

    name: str
    spatial_dims: int
    spacing: tuple[float, ...]
    median_shape: tuple[float, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    features: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    slice_axis: int | None
    feature_map_elements: int
    estimated_gb: float
    parameters: int

    @property
    def levels(self) -> int:
        """Resolution levels, the bottleneck included."""
        return len(self.features)


@dataclass(frozen=True)
class DatasetPlan:
    """The plans of a dataset and the preprocessing they assume.

    Attributes:
        name: the dataset folder's name.
        spacing: the target spacing of the volumes in mm (RAS order): ``data.spacing``.
        median_shape: the median volume shape after resampling (RAS order).
        in_channels: image channels.
        out_channels: labels, background included.
        normalization: ``data.normalization`` (from dataset.json's channel names, as nnU-Net).
        crop_foreground: ``data.crop_foreground``.
        gpu_memory_gb: the budget planned for.
        num_training: training cases.
        configurations: "3d" (3D datasets) and "2d".
        notes: where the plan could not follow nnU-Net, one line each.
    """

    name: str
    spacing: tuple[float, ...]
    median_shape: tuple[float, ...]
    in_channels: int
    out_channels: int
    normalization: str
    crop_foreground: bool
    gpu_memory_gb: float
    num_training: int
    configurations: tuple[ConfigurationPlan, ...]
    notes: tuple[str, ...] = field(default=())

    def configuration(self, name: str) -> ConfigurationPlan:
        """The configuration called ``name`` ("3d" or "2d")."""
        for configuration in self.configurations:
            if configuration.name == name:
                return configuration
        raise KeyError(name)


@dataclass(frozen=True)
class _Network:
    """A configuration's result in the axis order the rules ran in."""

    patch_size: tuple[int, ...]
    batch_size: int
    features: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    elements: int


def check_gpu_memory(gpu_memory_gb: float) -> float:
    """``gpu_memory_gb`` as a float, or a one-line ValueError naming ``--gpu-memory``."""
    try:
        value = float(gpu_memory_gb)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--gpu-memory {gpu_memory_gb}: give the GPU memory to plan for in "
                         f"GB, a number > 0 (default {memory.REFERENCE_GB:g}, nnU-Net's "
                         "reference)")
    return value


def features_per_level(levels: int, dims: int) -> tuple[int, ...]:
    """Channels doubling from 32, capped at 320 (3D) or 512 (2D)."""
    return tuple(min(MAX_FEATURES[dims], BASE_FEATURES * 2 ** i) for i in range(levels))


def plan_configuration(spacing: Sequence[float], median_shape: Sequence[float],
                       dataset_voxels: float, num_classes: int, gpu_memory_gb: float
                       ) -> _Network:
    """Patch, batch and network for one configuration (see the module docstring).

    Args:
        spacing: the voxel spacing, in the axis order the rules run in.
        median_shape: the median image shape after resampling, same order (may be fractional).
        dataset_voxels: the dataset's voxels after resampling (median volume × cases).
        num_classes: output channels.
        gpu_memory_gb: the budget.

    Raises:
        ValueError: when no patch fits ``gpu_memory_gb``.
    """
    dims = len(spacing)
    spacing = np.asarray(spacing, dtype=float)
    median = np.asarray(median_shape, dtype=float)
    aspect = 1 / spacing
    edge = INITIAL_PATCH_EDGE[dims]
    initial = [round(v) for v in aspect * (edge ** dims / np.prod(aspect)) ** (1 / dims)]
    initial = [min(p, m) for p, m in zip(initial, median, strict=True)]
    topo = topology(spacing, initial)

    def estimate(topo_: object) -> int:
        features = features_per_level(topo_.levels, dims)
        return memory.feature_map_elements(topo_.patch_size, features, topo_.strides,
                                           num_classes)

    reference = memory.reference_elements(gpu_memory_gb, dims)
    reference_batch = memory.REFERENCE_BATCH[dims]
    elements = estimate(topo)
    while elements / reference_batch * MIN_BATCH_SIZE > reference:  # a batch of 2 must fit
        patch = list(topo.patch_size)
        ratios = [p / m for p, m in zip(patch, median, strict=True)]
        axis = int(np.argsort(ratios, kind="stable")[-1])
        # one step of the divisor the smaller patch would have (nnU-Net: skipping a step of
        # the current divisor could skip a valid size, 256 → 192 instead of 224)
        trial = list(patch)
        trial[axis] -= topo.divisor[axis]
        step = topology(spacing, trial).divisor[axis]
        patch[axis] -= step
        if patch[axis] < 1:
            raise ValueError(f"--gpu-memory {gpu_memory_gb:g}: no {dims}D patch fits in "
                             f"{gpu_memory_gb:g} GB; give a larger budget")
        topo = topology(spacing, patch)
        elements = estimate(topo)
    batch = round(reference / elements * reference_batch)
    cap = round(dataset_voxels * MAX_DATASET_COVERED / np.prod(topo.patch_size, dtype=float))
    batch = max(min(batch, cap), MIN_BATCH_SIZE)
    return _Network(patch_size=tuple(int(p) for p in topo.patch_size), batch_size=int(batch),
                    features=features_per_level(topo.levels, dims),
                    kernel_sizes=topo.kernel_sizes, strides=topo.strides, elements=elements)


def normalization_of(channel_names: Sequence[str]) -> tuple[str, list[str]]:
    """``data.normalization`` for channels with these names, and notes.

    nnU-Net normalises each channel by its name (CT: clip to the foreground's percentiles and
    z-score with the dataset's statistics; anything else: z-score per image). The data module
    has one scheme for all channels: CT for all when any is CT.
    """
    schemes = [NORMALIZATION_OF_CHANNEL.get(n.strip().lower(), "zscore") for n in channel_names]
    notes = []
    chosen = "ct" if "ct" in schemes else schemes[0]
    if len(set(schemes)) > 1:
        notes.append(f"channels {', '.join(channel_names)} would be normalised differently by "
                     f"nnU-Net ({', '.join(schemes)}); the data module normalises all channels "
                     f"the same way: {chosen}")
    if any(n.strip().lower() == "rgb_to_0_1" for n in channel_names):
        notes.append("rgb_to_0_1 channels are scaled per image to [0, 1] (minmax), not by 255")
    return chosen, notes


def plan_dataset(fingerprint: Fingerprint, gpu_memory_gb: float = memory.REFERENCE_GB
                 ) -> DatasetPlan:
    """The 3D (for 3D datasets) and 2D plans of a dataset for a GPU of ``gpu_memory_gb`` GB.

    Raises:
        ValueError: for a bad budget, or one that no patch fits.
    """
    gpu_memory_gb = check_gpu_memory(gpu_memory_gb)
    dims = fingerprint.spatial_dims
    crop = fingerprint.median_relative_size_after_cropping < CROP_THRESHOLD
    normalization, notes = normalization_of(fingerprint.channel_names)
    # nnU-Net's axis order: the reverse of ours
    spacings = np.array([c.spacing[::-1] for c in fingerprint.cases], dtype=float)
    shapes = np.array([(c.cropped_shape if crop else c.shape)[::-1] for c in fingerprint.cases],
                      dtype=float)
    if dims == 2:  # nnU-Net plans 2D images as 1 × X × Y volumes with a dummy coarsest axis
        target = np.median(spacings, axis=0)
        order = [0, 1]
    else:
        target = target_spacing(spacings, shapes)
        order = coarsest_first(target)
    median = np.median(resampled_shapes(shapes, spacings, target), axis=0)
    dataset_voxels = float(np.prod(median, dtype=np.float64) * len(fingerprint.cases))
    to_ours = [dims - 1 - axis for axis in order]  # our axis of each planning axis
    in_channels, out_channels = len(fingerprint.channel_names), fingerprint.num_classes
    configurations = []
    names = ["3d", "2d"] if dims == 3 else ["2d"]
    for name in names:
        planning_axes = list(range(dims)) if name == "3d" or dims == 2 else list(range(1, 3))
        network = plan_configuration(target[order][planning_axes], median[order][planning_axes],
                                     dataset_voxels, out_channels, gpu_memory_gb)
        ours = [to_ours[a] for a in planning_axes]
        # the network's axes: ours in ascending order (a 2D slice keeps the others' order)
        position = [ours.index(axis) for axis in sorted(ours)]

        def arrange(values: Sequence, position: list[int] = position) -> tuple:
            return tuple(values[p] for p in position)

        spatial = len(planning_axes)
        configurations.append(ConfigurationPlan(
            name=name, spatial_dims=spatial,
            spacing=tuple(float(s) for s in arrange(target[order][planning_axes])),
            median_shape=tuple(float(m) for m in arrange(median[order][planning_axes])),
            patch_size=arrange(network.patch_size), batch_size=network.batch_size,
            features=network.features,
            kernel_sizes=tuple(arrange(k) for k in network.kernel_sizes),
            strides=tuple(arrange(s) for s in network.strides),
            slice_axis=to_ours[0] if spatial < dims else None,  # the coarsest axis
            feature_map_elements=network.elements,
            estimated_gb=memory.estimated_gpu_gb(network.elements, network.batch_size, spatial),
            parameters=memory.count_parameters(
                in_channels, out_channels, network.features,
                tuple(arrange(k) for k in network.kernel_sizes),
                tuple(arrange(s) for s in network.strides))))
    ours_order = [to_ours.index(axis) for axis in range(dims)]
    return DatasetPlan(
        name=fingerprint.name,
        spacing=tuple(float(target[order][p]) for p in ours_order),
        median_shape=tuple(float(median[order][p]) for p in ours_order),
        in_channels=in_channels, out_channels=out_channels, normalization=normalization,
        crop_foreground=crop, gpu_memory_gb=gpu_memory_gb,
        num_training=len(fingerprint.cases), configurations=tuple(configurations),
        notes=tuple(notes))

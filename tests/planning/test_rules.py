"""The planner as a pure function: fingerprint → plan, pinned for the datasets nnU-Net users bring.

Axes are in preprocessing's RAS order: an axial scan's slices are the last axis, so a prostate
MRI of 20 slices of 320 × 320 at 0.6 × 0.6 × 3.6 mm has shape (320, 320, 20) and spacing
(0.6, 0.6, 3.6). scripts/compare_nnunet_plans.py checks the same rules against nnU-Net's own
planner on files.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmentation.planning.fingerprint import CaseFingerprint, Fingerprint
from segmentation.planning.memory import REFERENCE_GB
from segmentation.planning.rules import plan_dataset
from segmentation.planning.spacing import target_spacing
from segmentation.planning.topology import topology


def prostate_like() -> Fingerprint:
    """32 cases of 20 slices: 0.6 or 0.625 mm pixels, 3.6 mm slices (4 cases at 4 mm), most
    320 × 320, every fourth 256 × 256 (as the MSD prostate task), two channels, 3 labels."""
    spacings = [((0.625 if i % 2 else 0.6),) * 2 + ((4.0 if i < 4 else 3.6),) for i in range(32)]
    shapes = [(256, 256, 20) if i % 4 == 0 else (320, 320, 20) for i in range(32)]
    return Fingerprint.of(spacings, shapes, channel_names=("T2", "ADC"), num_classes=3)


def cine_like() -> Fingerprint:
    """100 cine MRI frames of 10 × 320 × 320: 10 mm slices, and 20 cases at 5 mm (20 slices)."""
    spacings = [(1.5, 1.5, 10.0)] * 80 + [(1.5, 1.5, 5.0)] * 20
    shapes = [(320, 320, 10)] * 80 + [(320, 320, 20)] * 20
    return Fingerprint.of(spacings, shapes, channel_names=("cineMRI",), num_classes=4)


def test_prostate_like_plan_is_pinned():
    plan = plan_dataset(prostate_like())
    assert plan.spacing == (0.6125, 0.6125, 3.6)
    assert plan.median_shape == (320.0, 320.0, 20.0)
    assert (plan.in_channels, plan.out_channels, plan.normalization) == (2, 3, "zscore")
    assert not plan.crop_foreground
    full = plan.configuration("3d")
    # nnU-Net's MSD prostate plan, in nnU-Net's (z, y, x) order: patch [20, 320, 256]
    assert full.patch_size == (256, 320, 20)
    assert full.batch_size == 2
    assert full.features == (32, 64, 128, 256, 320, 320, 320)
    assert full.kernel_sizes == ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3),
                                 (3, 3, 3), (3, 3, 3))
    assert full.strides == ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1))
    assert full.slice_axis is None
    assert full.parameters == 44_578_770
    assert full.estimated_gb == pytest.approx(6.9045, abs=1e-4)
    flat = plan.configuration("2d")
    assert flat.slice_axis == 2  # slices across the 3.6 mm axis
    assert flat.spacing == (0.6125, 0.6125)
    assert flat.patch_size == (320, 320)
    assert flat.batch_size == 32  # 5% of the dataset's voxels: 320² × 20 × 32 × 0.05 / 320²
    assert flat.features == (32, 64, 128, 256, 512, 512, 512)
    assert flat.kernel_sizes == ((3, 3),) * 7
    assert flat.strides == ((2, 2),) * 6


def test_cine_like_plan_takes_the_10th_percentile_of_the_thick_slices():
    plan = plan_dataset(cine_like())
    # 10 mm median slices are > 3 × 1.5 mm and 10 slices < 320 / 3: the 10th percentile, 5 mm
    assert plan.spacing == (1.5, 1.5, 5.0)
    assert plan.median_shape == (320.0, 320.0, 20.0)  # the 10 mm cases resampled to 20 slices
    full = plan.configuration("3d")
    assert full.patch_size == (320, 320, 20)
    assert full.batch_size == 2
    assert full.features == (32, 64, 128, 256, 320, 320, 320)
    assert full.kernel_sizes == ((3, 3, 1),) + ((3, 3, 3),) * 6
    assert full.strides == ((2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1), (2, 2, 1))
    flat = plan.configuration("2d")
    assert (flat.slice_axis, flat.patch_size, flat.batch_size) == (2, (320, 320), 31)
    assert flat.features == (32, 64, 128, 256, 512, 512, 512)


def test_isotropic_brain_mri_gets_the_default_nnunet_network():
    plan = plan_dataset(Fingerprint.of([(1.0, 1.0, 1.0)] * 20, [(160, 192, 160)] * 20))
    full = plan.configuration("3d")
    assert full.patch_size == (128, 128, 128)
    assert full.batch_size == 2
    assert full.features == (32, 64, 128, 256, 320, 320)  # configs/model/unet3d_plain.yaml
    assert full.kernel_sizes == ((3, 3, 3),) * 6
    assert full.strides == ((2, 2, 2),) * 5
    assert plan.configuration("2d").slice_axis == 2  # equal spacings: nnU-Net's first axis, z


def test_ct_at_5mm_slices_convolves_in_plane_first():
    plan = plan_dataset(Fingerprint.of([(0.8, 0.8, 5.0)] * 40, [(512, 512, 60)] * 40,
                                       channel_names=("CT",)))
    assert plan.normalization == "ct"
    assert plan.spacing == (0.8, 0.8, 5.0)  # 60 slices is not < 512 / 3: the median stays
    full = plan.configuration("3d")
    assert full.patch_size == (256, 256, 28)
    assert full.kernel_sizes[:2] == ((3, 3, 1), (3, 3, 1))
    assert full.strides[:3] == ((2, 2, 1), (2, 2, 1), (2, 2, 2))
    for axis in range(3):  # every feature map of the bottleneck is ≥ 4 voxels
        factor = math.prod(s[axis] for s in full.strides)
        assert full.patch_size[axis] % factor == 0 and full.patch_size[axis] // factor >= 4


def test_gpu_memory_shrinks_the_patch_or_grows_the_patch_and_batch():
    fingerprint = prostate_like()
    reference = plan_dataset(fingerprint).configuration("3d")
    assert reference.estimated_gb <= REFERENCE_GB
    small = plan_dataset(fingerprint, 2).configuration("3d")
    assert math.prod(small.patch_size) < math.prod(reference.patch_size)
    assert small.batch_size == 2 and small.estimated_gb <= 2
    large = plan_dataset(fingerprint, 40).configuration("3d")
    assert large.patch_size == (320, 320, 20)  # the whole median image
    assert large.batch_size == 2  # 32 cases: 2 patches are 5% of the dataset already
    brains = Fingerprint.of([(1.0, 1.0, 1.0)] * 200, [(160, 192, 160)] * 200)
    for gpu_memory, patch, batch in ((8, (128, 128, 128), 2), (40, (160, 192, 160), 5),
                                     (80, (160, 192, 160), 10)):
        full = plan_dataset(brains, gpu_memory).configuration("3d")
        assert (full.patch_size, full.batch_size) == (patch, batch)
        assert full.estimated_gb <= gpu_memory


@pytest.mark.parametrize("bad", [0, -1, "eight", float("nan"), float("inf")])
def test_a_bad_gpu_memory_is_one_line_naming_the_option(bad):
    with pytest.raises(ValueError, match=r"^--gpu-memory .*: give the GPU memory") as error:
        plan_dataset(prostate_like(), bad)
    assert "\n" not in str(error.value)


def test_a_budget_no_patch_fits_is_refused():
    with pytest.raises(ValueError, match="--gpu-memory 1e-06: no 3D patch fits"):
        plan_dataset(prostate_like(), 1e-6)


def test_topology_pools_thick_slices_only_once_the_pixels_have_caught_up():
    topo = topology((3.6, 0.6, 0.6), (20, 320, 256))  # nnU-Net's axis order, coarse first
    assert topo.strides[0] == (1, 2, 2)  # 3.6 / 0.6 ≥ 2: the slices wait
    assert topo.kernel_sizes[0] == (1, 3, 3)
    assert topo.strides[2] == (2, 2, 2)  # 3.6 / 2.4 < 2 after two in-plane poolings
    assert topo.patch_size == (20, 320, 256)
    assert topo.divisor == (4, 64, 64)


def test_the_anisotropic_spacing_never_drops_below_the_other_axes():
    spacings = np.array([[10.0, 1.0, 1.0]] * 9 + [[0.5, 1.0, 1.0]] * 1)
    shapes = np.array([[10, 300, 300]] * 10)
    # the 10th percentile (≈ 9.05) is used; a percentile below 1 mm would give 1 + 1e-5
    assert target_spacing(spacings, shapes)[0] == pytest.approx(np.percentile(spacings[:, 0], 10))
    spacings[:, 0] = [0.5] * 2 + [10.0] * 8
    assert target_spacing(spacings, shapes)[0] == pytest.approx(1.0 + 1e-5)


def test_a_2d_dataset_gets_a_2d_network_without_slice_axis():
    plan = plan_dataset(Fingerprint.of([(0.5, 0.5)] * 10, [(512, 384)] * 10))
    assert [c.name for c in plan.configurations] == ["2d"]
    flat = plan.configuration("2d")
    assert flat.slice_axis is None and flat.spatial_dims == 2
    assert flat.patch_size == (512, 384)
    assert plan.spacing == (0.5, 0.5)


def test_zero_background_is_cropped_and_planned_cropped():
    """Cases keeping < 3/4 of their voxels in the non-zero box: crop (and normalise inside)."""
    cases = tuple(CaseFingerprint(f"c{i}", (1.0, 1.0, 1.0), (200, 200, 200), (120, 140, 130))
                  for i in range(10))
    plan = plan_dataset(Fingerprint("brain", ("T1",), 2, cases))
    assert plan.crop_foreground
    assert plan.median_shape == (120.0, 140.0, 130.0)
    kept = tuple(CaseFingerprint(f"c{i}", (1.0, 1.0, 1.0), (200, 200, 200), (190, 190, 190))
                 for i in range(10))
    plan = plan_dataset(Fingerprint("ct", ("CT",), 2, kept))
    assert not plan.crop_foreground
    assert plan.median_shape == (200.0, 200.0, 200.0)  # no crop: the whole image is planned


def test_mixed_channel_normalisation_is_noted():
    plan = plan_dataset(Fingerprint.of([(1, 1, 1)] * 3, [(64, 64, 64)] * 3,
                                       channel_names=("CT", "PET")))
    assert plan.normalization == "ct"
    assert any("normalised differently" in note for note in plan.notes)

"""Batched device augmentation does what the per-sample CPU chain does, with its distributions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import (
    AdjustContrast,
    Affine,
    GaussianSmooth,
    RandSimulateLowResolution,
    ScaleIntensityFixedMean,
)
from scipy import stats

from segmentation.data.augmentation_settings import (
    AugmentationSettings,
    augmentation_window,
    rotation_matrices,
    sample_window,
)
from segmentation.data.batch_augmentation import (
    AugmentationDraw,
    BatchAugmentation,
    draw_parameters,
    gaussian_kernel,
    sampling_grid,
)
from segmentation.data.patches import (
    ForegroundOversampledCropd,
    collate_windows,
    patch_transforms,
)

NOTHING = AugmentationSettings(**{f"{name}_probability": 0.0 for name in (
    "rotation", "scaling", "mirror", "noise", "blur", "brightness", "contrast",
    "low_resolution", "gamma")})


def smooth(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(1, C, *S) smooth random image (interpolation differences stay small)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *shape, generator=generator)
    pool = F.avg_pool3d if len(shape) == 4 else F.avg_pool2d
    return pool(x, 5, 1, 2) * 4


def no_op_draw(batch: int, dims: int) -> AugmentationDraw:
    return draw_parameters(NOTHING, batch, dims, np.random.default_rng(0))


def test_rotation_matrices_are_monais():
    from monai.transforms.utils import create_rotate

    angles = np.array([[0.3, -0.2, 0.5], [-0.4, 0.1, 0.0]])
    for row, matrix in zip(angles, rotation_matrices(angles), strict=True):
        np.testing.assert_allclose(matrix, create_rotate(3, row)[:3, :3], atol=1e-12)
    np.testing.assert_allclose(rotation_matrices(np.array([[0.7]]))[0],
                               create_rotate(2, 0.7)[:2, :2], atol=1e-12)


@pytest.mark.parametrize("input_size,window", [((20, 18, 16), (34, 32, 30)), ((20, 17), (30, 29))])
def test_rotation_and_scaling_resample_as_monais_affine(input_size, window):
    dims = len(input_size)
    image = smooth((2, *window))                                   # (1, 2, *window)
    label = (image[:, :1] > 0).to(torch.uint8)
    augmentation = BatchAugmentation(NOTHING, input_size, input_size, window_size=window)
    draw = no_op_draw(1, dims)
    draw.do_rotate[:], draw.do_scale[:] = True, True
    angles = [0.3, -0.2, 0.4][: 3 if dims == 3 else 1]
    scales = [1.2, 0.8, 1.1][:dims]
    draw.angles[0], draw.scales[0] = angles, scales
    values = augmentation.device_values(draw, image.device)
    ours_image, ours_label = augmentation.spatial(image, label, draw, values)

    affine = {"rotate_params": angles, "scale_params": scales, "padding_mode": "reflection",
              "image_only": True}
    monai_image = Affine(mode="bilinear", **affine)(image[0], spatial_size=input_size)
    monai_label = Affine(mode="nearest", **affine)(label[0].float(), spatial_size=input_size)
    # every sampled point lies inside the window: no padding convention plays a part
    torch.testing.assert_close(ours_image[0], monai_image.as_tensor(), atol=1e-5, rtol=0)
    agreement = (ours_label[0].float() == monai_label.as_tensor()).float().mean()
    assert agreement > 0.995  # nearest neighbour: only exact ties may round differently


def test_untransformed_samples_are_cut_exactly_and_labels_cropped_to_the_output():
    window, input_size, output_size = (16, 14, 12), (12, 10, 8), (8, 6, 4)
    image = torch.arange(np.prod(window), dtype=torch.float32).reshape(1, 1, *window)
    label = torch.arange(np.prod(window)).reshape(1, 1, *window) % 7
    augmentation = BatchAugmentation(NOTHING, input_size, output_size, window_size=window)
    out_image, out_label = augmentation(image, label)
    assert out_image.shape == (1, 1, *input_size) and out_label.shape == (1, 1, *output_size)
    assert out_label.dtype == torch.long
    torch.testing.assert_close(out_image, image[:, :, 2:14, 2:12, 2:10])
    torch.testing.assert_close(out_label, label[:, :, 4:12, 4:10, 4:8])


def test_the_window_holds_every_rotation_and_scaling_of_the_patch():
    settings = AugmentationSettings()
    input_size, output_size = (48, 48, 32), (48, 48, 32)
    window = augmentation_window(input_size, output_size, settings)
    assert all((w - o) % 2 == 0 for w, o in zip(window, output_size, strict=True))
    draw = draw_parameters(settings, 20_000, 3, np.random.default_rng(1))
    draw.do_rotate[:], draw.do_scale[:] = True, True
    half = (np.asarray(input_size) - 1) / 2
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    reach = np.abs(draw.matrices() @ corners).max(axis=(0, 2))          # (3,) voxels
    assert np.all(reach + 1 <= (np.asarray(window) - 1) / 2)  # + 1: linear interpolation
    augmentation = BatchAugmentation(settings, input_size, output_size)
    theta = torch.as_tensor(augmentation.affine_theta(draw.matrices()[:20]), dtype=torch.float32)
    grid = F.affine_grid(theta, [20, 1, *input_size], align_corners=True)  # as spatial() does
    assert grid.abs().max() <= 1.0  # the grid never reads outside the window
    assert augmentation_window(input_size, output_size, NOTHING) == input_size


@pytest.mark.parametrize("size", [(5, 7, 9), (1, 4, 6), (8, 3), (1, 5)])
def test_the_sampling_grid_is_affine_grids(size):
    theta = torch.randn(3, len(size), len(size) + 1, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # affine_grid's note on unit sizes
        expected = F.affine_grid(theta, [3, 1, *size], align_corners=True)
    torch.testing.assert_close(sampling_grid(theta, size), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("input_size", [(24, 20, 12), (40, 33)])
def test_each_patch_reads_only_its_own_window_a_voxel_from_the_edge(input_size):
    """The workers cut each moved patch's own window; resampling must stay inside it (the
    padding is then never read) and its nearest labels are grid_sample's."""
    dims = len(input_size)
    settings = AugmentationSettings(rotation_degrees=180, rotation_probability=1.0,
                                    scaling_probability=1.0)
    augmentation = BatchAugmentation(settings, input_size, input_size)
    draw = draw_parameters(settings, 200, dims, np.random.default_rng(3))
    windows = np.array([sample_window(m, input_size, input_size) for m in draw.matrices()])
    values = augmentation.device_values(draw, torch.device("cpu"), windows)
    grid = sampling_grid(values.theta, input_size)                     # (k, *in, d)
    reverse = torch.as_tensor(windows[:, ::-1].copy(), dtype=torch.float32)
    voxels = (grid + 1) / 2 * (reverse - 1).reshape(-1, *[1] * dims, dims)
    assert voxels.min() >= 1 - 1e-4
    assert torch.all(voxels.amax(dim=tuple(range(1, dims + 1))) <= reverse - 2 + 1e-4)
    generator = torch.Generator().manual_seed(4)
    for j in range(0, 200, 40):
        label = torch.randint(0, 5, (1, *windows[j]), generator=generator, dtype=torch.uint8)
        ours = augmentation.nearest(label, values.matrices[j])
        theirs = F.grid_sample(label[None].float(), grid[j:j + 1], mode="nearest",
                               align_corners=True)[0]
        assert ours.dtype == torch.uint8
        assert (ours.float() == theirs).float().mean() > 0.999  # ties may round apart


@pytest.mark.parametrize("shape", [(2, 14, 12, 10), (1, 3, 12, 2), (1, 2, 9)])
def test_blur_is_monais_gaussian_smooth_even_across_thin_axes(shape):
    dims = len(shape) - 1
    image = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    augmentation = BatchAugmentation(NOTHING, shape[1:], shape[1:])
    draw = no_op_draw(1, dims)
    draw.blur_sigma[0] = [1.0, 0.5, 0.75][:dims]
    values = augmentation.device_values(draw, image.device)
    expected = GaussianSmooth(sigma=draw.blur_sigma[0].tolist())(image)
    torch.testing.assert_close(augmentation._blur(image, 0, draw, values),
                               torch.as_tensor(expected), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("input_size", [(512, 512), (48, 320, 320), (20, 96, 64)])
def test_the_window_holds_large_rotations_of_any_patch_shape(input_size):
    """nnU-Net rotates 2D and anisotropic patches by up to 180°: the worst case lies between
    any grid of angles, and the window must still hold it."""
    settings = AugmentationSettings(rotation_degrees=180, rotation_probability=1.0,
                                    scaling_probability=1.0, scaling_range=(0.7, 1.4))
    window = augmentation_window(input_size, input_size, settings)
    draw = draw_parameters(settings, 100_000, len(input_size), np.random.default_rng(2))
    half = (np.asarray(input_size) - 1) / 2
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(
        len(input_size), -1)
    reach = np.abs(draw.matrices() @ corners).max(axis=(0, 2))
    assert np.all(reach + 1 <= (np.asarray(window) - 1) / 2)
    assert np.all(np.asarray(window) <= 2 * np.linalg.norm(half) * 1.4 + 6)  # and not much more


def test_an_explicit_window_must_keep_the_margins_even():
    with pytest.raises(ValueError, match="even"):
        BatchAugmentation(NOTHING, (12, 10, 8), (8, 6, 4), window_size=(15, 14, 12))


@pytest.mark.parametrize("dims", [2, 3])
def test_intensity_steps_are_monais(dims):
    shape = (2, 14, 12, 10)[: dims + 1]
    image = torch.cat([smooth(shape, 1), smooth(shape, 2)])       # (2, C, *S)
    augmentation = BatchAugmentation(NOTHING, shape[1:], shape[1:])
    draw = no_op_draw(2, dims)
    draw.blur_sigma[:] = [[0.6, 0.9, 0.75][:dims], [1.0, 0.5, 0.55][:dims]]
    draw.brightness[:], draw.contrast[:] = [0.8, 1.2], [0.77, 1.24]
    draw.zoom[:], draw.gamma[:] = [0.5, 0.83], [0.7, 1.45]
    draw.inverted_gamma[:] = [1.3, 0.8]
    values = augmentation.device_values(draw, image.device)
    for i in range(2):
        x = image[i]
        expected = {
            "_blur": GaussianSmooth(sigma=draw.blur_sigma[i].tolist())(x),
            "_contrast": ScaleIntensityFixedMean(factor=draw.contrast[i] - 1, fixed_mean=True,
                                                 preserve_range=True)(x),
            "_gamma": AdjustContrast(gamma=draw.gamma[i], retain_stats=True)(x),
            "_inverted_gamma": AdjustContrast(gamma=draw.inverted_gamma[i], invert_image=True,
                                              retain_stats=True)(x),
        }
        low_resolution = RandSimulateLowResolution(
            prob=1.0, zoom_range=(draw.zoom[i], draw.zoom[i]),
            upsample_mode="trilinear" if dims == 3 else "bilinear")
        expected["_low_resolution"] = low_resolution(x)
        for name, want in expected.items():
            got = getattr(augmentation, name)(image[i], i, draw, values)
            torch.testing.assert_close(got, torch.as_tensor(want), atol=2e-5, rtol=1e-5,
                                       msg=name)
        torch.testing.assert_close(augmentation._brightness(image[i], i, draw, values),
                                   x * float(draw.brightness[i]))
    draw.noise_std[:] = [0.05, 0.2]
    values = augmentation.device_values(draw, image.device)
    noise = [augmentation._noise(image[i], i, draw, values) - image[i] for i in range(2)]
    assert abs(noise[0].std() - 0.05) < 0.01 and abs(noise[1].std() - 0.2) < 0.03


def test_mirroring_flips_image_and_label_together():
    image = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 1, 4, 5, 6)
    label = image.long()
    draw = no_op_draw(2, 3)
    draw.mirror[:] = [[True, False, True], [False, False, False]]
    out_image, out_label = BatchAugmentation.mirror(image.clone(), label.clone(), draw)
    torch.testing.assert_close(out_image[0], image[0].flip(1).flip(3))
    torch.testing.assert_close(out_image[1], image[1])
    assert torch.equal(out_label, out_image.long())


def cpu_chain_draws(settings: AugmentationSettings, n: int) -> dict[str, np.ndarray]:
    """Run the CPU chain n times and read what each of its MONAI transforms drew."""
    chain = patch_transforms(3, (4, 4, 4), (4, 4, 4), settings=settings)
    chain.set_random_state(7)
    steps = chain.transforms
    rotate, scale, flips = steps[1], steps[2], steps[3:6]
    noise, blur, brightness, contrast, low_res, inverted_gamma, gamma = steps[6:13]
    volume = {"image": np.random.default_rng(0).normal(size=(1, 4, 4, 4)).astype(np.float32),
              "label": np.zeros((1, 4, 4, 4), dtype=np.int64)}
    rows: dict[str, list] = {key: [] for key in (
        "do_rotate", "angles", "do_scale", "scales", "mirror", "do_noise", "do_blur",
        "blur_sigma", "do_brightness", "brightness", "do_contrast", "contrast",
        "do_low_resolution", "zoom", "do_inverted_gamma", "inverted_gamma", "do_gamma",
        "gamma")}
    for _ in range(n):
        chain(dict(volume))
        rows["do_rotate"].append(rotate._do_transform)
        rows["angles"].append(rotate.rand_affine.rand_affine_grid.rotate_params)
        rows["do_scale"].append(scale._do_transform)
        rows["scales"].append(scale.rand_affine.rand_affine_grid.scale_params)
        rows["mirror"].append([f._do_transform for f in flips])
        rows["do_noise"].append(noise._do_transform)
        rows["do_blur"].append(blur._do_transform)
        rows["blur_sigma"].append([blur.rand_smooth.x, blur.rand_smooth.y, blur.rand_smooth.z])
        rows["do_brightness"].append(brightness._do_transform)
        rows["brightness"].append(1 + brightness.scaler.factor)
        rows["do_contrast"].append(contrast._do_transform)
        rows["contrast"].append(1 + contrast.scaler.factor)
        rows["do_low_resolution"].append(low_res._do_transform)
        rows["zoom"].append(low_res.sim_lowres_tfm.zoom_factor)
        rows["do_inverted_gamma"].append(inverted_gamma._do_transform)
        rows["inverted_gamma"].append(inverted_gamma.adjuster.gamma_value)
        rows["do_gamma"].append(gamma._do_transform)
        rows["gamma"].append(gamma.adjuster.gamma_value)
    return {key: np.asarray(value, dtype=float) for key, value in rows.items()}


def test_parameter_distributions_match_the_cpu_chain():
    """Every probability and every range of the two paths, drawn 600 times each."""
    settings = AugmentationSettings()
    n = 600
    cpu = cpu_chain_draws(settings, n)
    device = draw_parameters(settings, n, 3, np.random.default_rng(3))
    for key, values in cpu.items():
        ours = np.asarray(getattr(device, key), dtype=float)
        if key.startswith("do_") or key == "mirror":
            p_cpu, p_ours = values.mean(axis=0), ours.mean(axis=0)
            p = np.clip(p_cpu, 0.02, 0.98)
            assert np.all(np.abs(p_cpu - p_ours) < 5 * np.sqrt(2 * p * (1 - p) / n)), key
            continue
        mask = cpu[f"do_{key}"] if f"do_{key}" in cpu else None
        mask = {"angles": cpu["do_rotate"], "scales": cpu["do_scale"],
                "blur_sigma": cpu["do_blur"], "zoom": cpu["do_low_resolution"]}.get(key, mask)
        drawn = values[mask.astype(bool)]                          # parameters of applied steps
        for column in range(1 if drawn.ndim == 1 else drawn.shape[1]):
            a = drawn if drawn.ndim == 1 else drawn[:, column]
            b = ours.reshape(n, -1)[:, column]
            assert stats.ks_2samp(a, b).pvalue > 1e-3, (key, column)


def test_output_statistics_match_the_cpu_chain():
    """Same patch, same settings, 400 draws each: the outputs agree in distribution.

    The device path runs as the data module runs it: windows of each patch's own size, cut
    with the rotation and scaling drawn in the loader, batched by :func:`collate_windows`.

    The volume is the patch, so every draw starts from the same voxels and only augmentation
    varies. The statistics (mean, spread, label share, mean change of a slice) catch a wrong
    rotation, scaling or mirroring probability or range (checked by hand: each such change
    gives p < 1e-3); the intensity steps, which move them little, are pinned by the two tests
    above (same parameters → MONAI's outputs; same parameter distributions).
    """
    size = (16, 16, 12)
    generator = torch.Generator().manual_seed(0)
    volume = F.avg_pool3d(torch.randn(1, 1, 24, 24, 20, generator=generator), 5, 1, 2)[0] * 3
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in (24, 24, 20)],
                                        indexing="ij")).float()
    centre = torch.tensor([12.0, 12.0, 10.0])[:, None, None, None]
    label = (((coords - centre) ** 2).sum(0) < 6**2).long()[None]       # a ball
    volume = (volume + 2.0 * label)[:, 4:20, 4:20, 4:16]                # brighter ball
    label = label[:, 4:20, 4:20, 4:16]
    data = {"image": volume.numpy(), "label": label.numpy()}
    settings, n = AugmentationSettings(), 400

    def summary(image: torch.Tensor, label: torch.Tensor) -> np.ndarray:
        change = (image[0, :, :, 6] - volume[0, :, :, 6]).abs().mean()
        return np.array([image.mean().item(), image.std().item(), label.float().mean().item(),
                         change.item()])

    cpu = patch_transforms(3, size, size, foreground_fraction=0, settings=settings)
    cpu.set_random_state(1)
    cpu_stats = np.array([summary(p["image"], p["label"])
                          for p in (cpu(dict(data)) for _ in range(n))])
    augmentation = BatchAugmentation(settings, size, size, seed=2)
    windows = patch_transforms(3, size, size, foreground_fraction=0, settings=settings,
                               on_device=True)
    windows.set_random_state(1)
    batch = collate_windows([windows(dict(data)) for _ in range(n)])
    assert batch["label"][0].dtype == torch.uint8  # labels travel compact
    moved = (batch["spatial"][:, :2] > 0.5).any(1)
    shapes = [tuple(w.shape[1:]) for w in batch["image"]]
    assert all(s == size for s, m in zip(shapes, moved, strict=True) if not m)
    assert all(a >= b for s in shapes for a, b in zip(s, size, strict=True))
    assert any(s != size for s in shapes)  # moved patches carry the margin they need
    images, labels = augmentation(batch["image"], batch["label"],
                                  spatial=batch["spatial"])
    device_stats = np.array([summary(i, lab) for i, lab in zip(images, labels, strict=True)])
    for column, name in enumerate(("mean", "std", "label share", "slice change")):
        assert stats.ks_2samp(cpu_stats[:, column], device_stats[:, column]).pvalue > 1e-3, name


def test_window_crop_forces_foreground_into_the_label_window():
    window, size = (20, 20, 16), (8, 8, 6)
    label = np.zeros((1, 30, 30, 30), dtype=np.int64)
    label[0, 5, 6, 7] = 1
    crop = ForegroundOversampledCropd("image", "label", window, size, foreground_fraction=1.0)
    crop.set_random_state(0)
    for _ in range(20):
        out = crop({"image": np.zeros((1, 30, 30, 30), np.float32), "label": label})
        centre = out["label"][0, 6:14, 6:14, 5:11]
        assert centre.sum() == 1


def test_settings_refuse_values_outside_their_range_naming_the_key():
    with pytest.raises(ValueError, match=r"data\.augmentation\.rotation_probability=1\.5"):
        AugmentationSettings(rotation_probability=1.5)
    with pytest.raises(ValueError, match=r"data\.augmentation\.scaling_range.*low 1\.2 is above"):
        AugmentationSettings(scaling_range=(1.2, 0.5))
    with pytest.raises(ValueError, match=r"data\.augmentation\.gamma_range.*above 0"):
        AugmentationSettings(gamma_range=(0.0, 1.5))
    with pytest.raises(ValueError, match=r"low_resolution_zoom.*\(0, 1\]"):
        AugmentationSettings(low_resolution_zoom=(0.5, 1.5))
    with pytest.raises(ValueError, match=r"data\.augmentation\.noise_std='a lot'"):
        AugmentationSettings(noise_std="a lot")
    with pytest.raises(ValueError, match=r"data\.augmentation\.rotation_degres is not a setting"):
        AugmentationSettings.from_value({"rotation_degres": 10})
    assert AugmentationSettings.from_value({"blur_sigma": [0.4, 0.8]}).blur_sigma == (0.4, 0.8)


@pytest.mark.parametrize("sigma", [0.5, 0.73, 1.0, 1.4, 2.6])
def test_blur_kernels_are_monais(sigma):
    """The host's kernels equal MONAI's gaussian_1d (erf, truncated at 4 σ): same taps."""
    from monai.networks.layers.convutils import gaussian_1d

    monai = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="erf").tolist()
    np.testing.assert_allclose(gaussian_kernel(sigma), monai, rtol=0, atol=3e-8)

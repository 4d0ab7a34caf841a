"""Augmentation of whole batches on the training device, so a GPU never waits for CPU workers.

Per-sample augmentation with MONAI's transforms on CPU workers yields a few 128³ patches per
second per worker, while one compiled training step consumes dozens: the GPU starves. Here
the CPU workers only draw each patch's rotation and scaling and cut its window
(:class:`~segmentation.data.patches.AugmentationWindowCropd`: the patch, or the bounding box of
the rotated and scaled patch), and this module applies the same augmentation as
:func:`~segmentation.data.patches.patch_transforms`, with the same probabilities and ranges
(:class:`AugmentationSettings`), batched on whatever device the batch is on. It is our own
because MONAI's and Lightning's augmentations work per sample.

Order (as the CPU chain): rotation and scaling in one resampling (``grid_sample``; the CPU
chain resamples twice), mirroring, Gaussian noise, blur, brightness, contrast, simulated low
resolution, gamma of the inverted intensities, gamma. Labels are resampled by nearest
neighbour, as the CPU chain does: a one-hot + linear + argmax resampling would smooth borders
slightly better but costs a float map per class, which is memory the GPU needs for the
network, and would make the two paths differ.

Every point a moved sample reads lies inside its window, at least a voxel from the edge
(:func:`~segmentation.data.augmentation_settings.window_for_reach`), so padding never plays a
part: resampling uses ``grid_sample``'s cheapest padding (zeros) and gives what MONAI's
reflection padding gives.

Every decision and parameter is drawn on the host (rotation and scaling by the worker that cut
the window, the rest from one numpy generator seeded per DDP rank by the data module), so none
reads a device value back, and a batch's numbers reach the device in one pinned, non-blocking
copy: augmentation never makes the host wait for the GPU. Noise values are drawn on the device
from a generator seeded from the host one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segmentation.data.augmentation_settings import (
    AugmentationSettings,
    augmentation_window,
    draw_spatial,
    spatial_matrices,
)
from segmentation.nets.spatial import center_crop

_BLUR_TRUNCATED = 4.0  # MONAI GaussianFilter's truncation, in sigmas


@dataclass
class AugmentationDraw:
    """Per-sample random parameters of one batch; the first axis of every array is the sample.

    Each step has a boolean ``do_*`` mask and its parameters (drawn for every sample; used
    where the mask is set).
    """

    do_rotate: np.ndarray           # (B,)
    angles: np.ndarray              # (B, 1) in 2D or (B, 3) in 3D, radians
    do_scale: np.ndarray            # (B,)
    scales: np.ndarray              # (B, d)
    mirror: np.ndarray              # (B, d)
    do_noise: np.ndarray            # (B,)
    noise_std: np.ndarray           # (B,)
    do_blur: np.ndarray             # (B,)
    blur_sigma: np.ndarray          # (B, d)
    do_brightness: np.ndarray       # (B,)
    brightness: np.ndarray          # (B,)
    do_contrast: np.ndarray         # (B,)
    contrast: np.ndarray            # (B,)
    do_low_resolution: np.ndarray   # (B,)
    zoom: np.ndarray                # (B,)
    do_inverted_gamma: np.ndarray   # (B,)
    inverted_gamma: np.ndarray      # (B,)
    do_gamma: np.ndarray            # (B,)
    gamma: np.ndarray               # (B,)

    def spatial_rows(self) -> np.ndarray:
        """The rotation and scaling as :func:`draw_spatial` rows (B, 2 + A + d)."""
        return np.concatenate([self.do_rotate[:, None], self.do_scale[:, None], self.angles,
                               self.scales], axis=1).astype(np.float64)

    def set_spatial(self, rows: np.ndarray) -> None:
        """Take the rotation and scaling from :func:`draw_spatial` rows (e.g. the workers')."""
        rows = np.asarray(rows, dtype=np.float64)
        angles = self.angles.shape[1]
        self.do_rotate, self.do_scale = rows[:, 0] > 0.5, rows[:, 1] > 0.5
        self.angles, self.scales = rows[:, 2:2 + angles], rows[:, 2 + angles:]

    def matrices(self) -> np.ndarray:
        """(B, d, d) maps from output to input coordinates: rotation @ scaling (MONAI's)."""
        return spatial_matrices(self.spatial_rows(), self.scales.shape[1])

    @property
    def moved(self) -> np.ndarray:
        """Samples that are rotated or scaled (resampled)."""
        return np.flatnonzero(self.do_rotate | self.do_scale)


def draw_parameters(settings: AugmentationSettings, batch_size: int, spatial_dims: int,
                    rng: np.random.Generator) -> AugmentationDraw:
    """Draw every sample's parameters, with the CPU chain's distributions.

    Args:
        settings: probabilities and ranges.
        batch_size: samples B.
        spatial_dims: 2 or 3.
        rng: the host generator.
    """
    b, d = batch_size, spatial_dims

    def chance(p: float, *shape: int) -> np.ndarray:
        return rng.random((b, *shape)) < p

    def uniform(bounds: tuple[float, float], *shape: int) -> np.ndarray:
        return rng.uniform(bounds[0], bounds[1], size=(b, *shape))

    draw = AugmentationDraw(
        do_rotate=np.zeros(b, dtype=bool), angles=np.zeros((b, 1 if d == 2 else 3)),
        do_scale=np.zeros(b, dtype=bool), scales=np.ones((b, d)),
        mirror=chance(settings.mirror_probability, d),
        do_noise=chance(settings.noise_probability),
        noise_std=rng.uniform(0.0, settings.noise_std, size=b),
        do_blur=chance(settings.blur_probability),
        blur_sigma=uniform(settings.blur_sigma, d),
        do_brightness=chance(settings.brightness_probability),
        brightness=uniform(settings.brightness_range),
        do_contrast=chance(settings.contrast_probability),
        contrast=uniform(settings.contrast_range),
        do_low_resolution=chance(settings.low_resolution_probability),
        zoom=uniform(settings.low_resolution_zoom),
        do_inverted_gamma=chance(settings.inverted_gamma_probability),
        inverted_gamma=uniform(settings.gamma_range),
        do_gamma=chance(settings.gamma_probability),
        gamma=uniform(settings.gamma_range),
    )
    draw.set_spatial(draw_spatial(settings, rng, d, b))
    return draw


class BatchAugmentation:
    """Windows cut by the CPU workers → augmented training batches, on the batch's device.

    Args:
        settings: probabilities and ranges (the CPU chain's).
        input_size: the network's input patch.
        output_size: the network's output patch; labels are cropped to it last.
        seed: seed of the host generator (the data module mixes in the DDP rank).
        window_size: size of the windows the workers cut; default
            :func:`augmentation_window`.
    """

    def __init__(self, settings: AugmentationSettings, input_size: Sequence[int],
                 output_size: Sequence[int], seed: int = 0,
                 window_size: Sequence[int] | None = None) -> None:
        self.settings = settings
        self.input_size = tuple(int(s) for s in input_size)
        self.output_size = tuple(int(s) for s in output_size)
        self.window_size = tuple(int(s) for s in window_size) if window_size else \
            augmentation_window(self.input_size, self.output_size, settings)
        if any(w < i for w, i in zip(self.window_size, self.input_size, strict=True)):
            raise ValueError(f"window {self.window_size} is smaller than the input patch "
                             f"{self.input_size}")
        if any((w - i) % 2 or (w - o) % 2 for w, i, o in zip(
                self.window_size, self.input_size, self.output_size, strict=True)):
            raise ValueError(f"window {self.window_size} must exceed the input patch "
                             f"{self.input_size} and the output patch {self.output_size} by "
                             "even amounts (their centres must coincide)")
        self.spatial_dims = len(self.input_size)
        self.rng = np.random.default_rng(seed)
        self._device_generators: dict[str, torch.Generator] = {}

    def __call__(self, image: torch.Tensor | Sequence[torch.Tensor],
                 label: torch.Tensor | Sequence[torch.Tensor],
                 draw: AugmentationDraw | None = None,
                 spatial: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch.

        Args:
            image: (B, C, *window) float windows, or a list of B (C, *window_b) windows of
                their own sizes (the data loader's: each patch cut with the margin its own
                rotation and scaling need).
            label: the same for the (1, *window) integer labels.
            draw: the parameters; drawn from the host generator when None.
            spatial: (B, 2 + A + d) rotation and scaling drawn where the windows were cut
                (:func:`draw_spatial` rows, on the host); they replace the draw's.

        Returns:
            image (B, C, *input_size) float32 and label (B, 1, *output_size) int64.
        """
        windows = self._window_sizes(image, label)
        if draw is None:
            draw = draw_parameters(self.settings, len(windows), self.spatial_dims, self.rng)
        if spatial is not None:
            draw.set_spatial(spatial)
        values = self.device_values(draw, _device_of(image), windows)
        image, label = self.spatial(image, label, draw, values)     # (B, C|1, *input_size)
        image, label = self.mirror(image, label, draw)
        image = self.intensity(image, draw, values)
        return image, center_crop(label, self.output_size).long()

    def _window_sizes(self, image: torch.Tensor | Sequence[torch.Tensor],
                      label: torch.Tensor | Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
        """Each sample's window size, checked: the fixed one, or each its own (list input)."""
        if isinstance(image, torch.Tensor):
            if tuple(image.shape[2:]) != self.window_size or image.shape[2:] != label.shape[2:]:
                raise ValueError(f"expected windows of {self.window_size}, got image "
                                 f"{tuple(image.shape[2:])} and label {tuple(label.shape[2:])}")
            return [self.window_size] * image.shape[0]
        windows = []
        for x, y in zip(image, label, strict=True):
            window = tuple(x.shape[1:])
            if window != tuple(y.shape[1:]) or any(
                    w < n or (w - n) % 2 for w, n in zip(window, self.input_size, strict=True)):
                raise ValueError(f"window {window} (label {tuple(y.shape[1:])}) must hold the "
                                 f"input patch {self.input_size} centred")
            windows.append(window)
        return windows

    def device_values(self, draw: AugmentationDraw, device: torch.device,
                      windows: Sequence[Sequence[int]] | None = None) -> DeviceValues:
        """The draw's numbers on ``device``, in one copy.

        One pinned buffer sent with ``non_blocking=True``: a copy from ordinary host memory
        (``torch.as_tensor(array, device=...)``) makes the host wait for every kernel queued
        before it, which would stall the GPU once per parameter.

        Args:
            draw: the batch's parameters.
            device: the batch's device.
            windows: each sample's window size (default: the fixed window).
        """
        moved = draw.moved
        sizes = np.asarray(windows if windows is not None
                           else [self.window_size] * len(draw.noise_std), dtype=np.float64)
        matrices = draw.matrices()[moved]
        arrays = {"theta": self.affine_theta(matrices, sizes[moved]), "matrices": matrices,
                  "noise_std": draw.noise_std, "brightness": draw.brightness,
                  "contrast": draw.contrast, "inverted_gamma": draw.inverted_gamma,
                  "gamma": draw.gamma}
        flat = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays.values()])
        host = torch.from_numpy(flat)
        if device.type == "cuda":
            host = host.pin_memory()
        packed = host.to(device, non_blocking=True)
        tensors, start = {}, 0
        for name, array in arrays.items():
            size = int(np.prod(np.shape(array)))
            tensors[name] = packed[start:start + size].view(np.shape(array))
            start += size
        return DeviceValues(**tensors)

    # ------------------------------------------------------------------ spatial
    def spatial(self, image: torch.Tensor | Sequence[torch.Tensor],
                label: torch.Tensor | Sequence[torch.Tensor], draw: AugmentationDraw,
                values: DeviceValues) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate and scale about each window's centre and cut the input patch, in one step.

        Samples that are neither rotated nor scaled are cut out exactly (no interpolation).
        One sampling grid serves the batch (:func:`sampling_grid`); each moved sample is
        resampled from its own window (a view: indexing the batch with a list of samples would
        copy whole windows), its label by nearest neighbour.

        Returns:
            image (B, C, *input_size) float32, label (B, 1, *input_size).
        """
        first = image[0]
        batch = len(image)
        image_out = torch.empty((batch, first.shape[0], *self.input_size), dtype=torch.float32,
                                device=first.device)
        dtypes = {x.dtype for x in label}   # uint8 windows, int64 where a label exceeds 255
        label_out = torch.empty((batch, 1, *self.input_size), device=first.device,
                                dtype=dtypes.pop() if len(dtypes) == 1 else torch.long)
        moved = draw.moved
        grid = sampling_grid(values.theta, self.input_size) if moved.size else None
        slot = {int(i): j for j, i in enumerate(moved)}
        for i in range(batch):
            window, window_label = image[i].float(), label[i]       # (C, *w), (1, *w)
            if i not in slot:
                image_out[i] = center_crop(window[None], self.input_size)[0]
                label_out[i] = center_crop(window_label[None], self.input_size)[0]
                continue
            j = slot[i]
            # (k, *in, d) grid → (1, C, *in); padding never plays a part (module docstring)
            image_out[i] = F.grid_sample(window[None], grid[j:j + 1], mode="bilinear",
                                         padding_mode="zeros", align_corners=True)[0]
            label_out[i] = self.nearest(window_label, values.matrices[j])
        return image_out, label_out

    def affine_theta(self, matrices: np.ndarray, windows: np.ndarray | None = None
                     ) -> np.ndarray:
        """``affine_grid``'s theta: output voxel p (centred) reads window voxel M p (centred).

        M in normalised coordinates, diag(2/(w−1)) · M · diag((n−1)/2), axes reversed to
        grid_sample's (x, y[, z]) order, no translation.

        Args:
            matrices: (k, d, d) output-to-input maps in array-axis order.
            windows: (k, d) each sample's window size (default: the fixed window).

        Returns:
            (k, d, d + 1) for ``align_corners=True``.
        """
        k, dims = len(matrices), len(self.input_size)
        window = (np.asarray(windows, dtype=np.float64).reshape(k, dims) if windows is not None
                  else np.tile(np.asarray(self.window_size, dtype=np.float64), (k, 1)))
        size = np.asarray(self.input_size, dtype=np.float64)
        to_window = 2 / np.maximum(window - 1, 1)                            # (k, d)
        normalised = to_window[:, :, None] * matrices * ((size - 1) / 2)[None, None, :]
        reverse = normalised[:, ::-1, ::-1]                                  # x, y[, z] order
        return np.concatenate([reverse, np.zeros((k, dims, 1))], axis=2)

    def nearest(self, label: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour resampling of one label window, as integers (no float copy).

        Each window coordinate is an affine function of the output voxel, built from one line
        per axis, rounded (half to even, as ``grid_sample``) and folded into a flat index: on
        a CPU this takes half the time of a nearest ``grid_sample`` of the label as floats.

        Args:
            label: (1, *window) integer labels.
            matrix: (d, d) output-to-window map in voxels (array order), on label's device.

        Returns:
            (1, *input_size) labels of ``label``'s dtype.
        """
        window, dims = label.shape[1:], len(self.input_size)
        index_type = torch.int32 if label.numel() < 2**31 else torch.int64
        index = None
        for axis, size in enumerate(window):
            position = torch.full([1] * dims, (size - 1) / 2, device=label.device)
            for along, n in enumerate(self.input_size):
                shape = [1] * dims
                shape[along] = n
                line = torch.arange(n, device=label.device, dtype=torch.float32) - (n - 1) / 2
                position = position + (line * matrix[axis, along]).reshape(shape)
            voxel = position.round_().clamp_(0, size - 1).to(index_type)      # (*input_size)
            index = voxel if index is None else index.mul_(size).add_(voxel)
        return label.reshape(-1)[index.reshape(-1)].reshape(1, *self.input_size)

    # ------------------------------------------------------------------ mirroring
    @staticmethod
    def mirror(image: torch.Tensor, label: torch.Tensor, draw: AugmentationDraw
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flip each sample along the axes its draw chose."""
        for i, axes in enumerate(draw.mirror.tolist()):
            dims = [1 + axis for axis, flip in enumerate(axes) if flip]  # of (C, *S)
            if dims:
                image[i] = image[i].flip(dims)
                label[i] = label[i].flip(dims)
        return image, label

    # ------------------------------------------------------------------ intensity
    def intensity(self, image: torch.Tensor, draw: AugmentationDraw, values: DeviceValues
                  ) -> torch.Tensor:
        """Noise, blur, brightness, contrast, low resolution, inverted gamma and gamma.

        Sample by sample on views of the batch, with that sample's numbers from ``values``;
        which samples a step touches is decided on the host.
        """
        steps = ((draw.do_noise, self._noise), (draw.do_blur, self._blur),
                 (draw.do_brightness, self._brightness), (draw.do_contrast, self._contrast),
                 (draw.do_low_resolution, self._low_resolution),
                 (draw.do_inverted_gamma, self._inverted_gamma), (draw.do_gamma, self._gamma))
        for chosen, step in steps:
            for i in np.flatnonzero(chosen).tolist():
                image[i] = step(image[i], i, draw, values)
        return image

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._device_generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(self.rng.integers(2**62)))
            self._device_generators[key] = generator
        return self._device_generators[key]

    def _noise(self, x: torch.Tensor, i: int, draw: AugmentationDraw, values: DeviceValues
               ) -> torch.Tensor:
        """MONAI RandGaussianNoise: + N(0, std²), std drawn from [0, noise_std]."""
        noise = torch.randn(x.shape, generator=self._generator(x.device), device=x.device)
        return x + noise * values.noise_std[i]

    def _blur(self, x: torch.Tensor, i: int, draw: AugmentationDraw, values: DeviceValues
              ) -> torch.Tensor:
        """MONAI RandGaussianSmooth: separable erf-sampled Gaussian, zero padding.

        The kernels come from the host's sigmas (:func:`gaussian_kernel`; no device value is
        read); each axis is a few shifted multiply-adds, which on a CPU run 5× faster than a
        depthwise ``conv3d``.

        Args:
            x: (C, *S) one sample.
            i: its index in the batch.
            draw: the batch's draw (sigmas).
            values: unused (the kernels are host numbers).
        """
        for axis, sigma in enumerate(draw.blur_sigma[i].tolist()):
            x = _correlate(x, gaussian_kernel(sigma), dim=1 + axis)
        return x

    @staticmethod
    def _brightness(x: torch.Tensor, i: int, draw: AugmentationDraw, values: DeviceValues
                    ) -> torch.Tensor:
        """MONAI RandScaleIntensity: x · factor (one factor for all channels)."""
        return x * values.brightness[i]

    @staticmethod
    def _contrast(x: torch.Tensor, i: int, draw: AugmentationDraw, values: DeviceValues
                  ) -> torch.Tensor:
        """MONAI RandScaleIntensityFixedMean (fixed mean, range kept): (x − m)·f + m, clipped."""
        mean = x.mean()
        out = (x - mean) * values.contrast[i] + mean
        return torch.minimum(torch.maximum(out, x.min()), x.max())

    @staticmethod
    def _low_resolution(x: torch.Tensor, i: int, draw: AugmentationDraw, values: DeviceValues
                        ) -> torch.Tensor:
        """MONAI RandSimulateLowResolution: nearest down to zoom·size, (bi/tri)linear back up."""
        spatial = tuple(x.shape[1:])
        linear = "bilinear" if len(spatial) == 2 else "trilinear"
        coarse = tuple(max(1, int(np.round(s * draw.zoom[i]))) for s in spatial)
        small = F.interpolate(x[None], size=coarse, mode="nearest")
        return F.interpolate(small, size=spatial, mode=linear, align_corners=False)[0]

    @staticmethod
    def _inverted_gamma(x: torch.Tensor, i: int, draw: AugmentationDraw, values: DeviceValues
                        ) -> torch.Tensor:
        """MONAI AdjustContrast with invert_image and retain_stats: gamma of −x, negated back."""
        return -_retained_gamma(-x, values.inverted_gamma[i])

    @staticmethod
    def _gamma(x: torch.Tensor, i: int, draw: AugmentationDraw, values: DeviceValues
               ) -> torch.Tensor:
        """MONAI AdjustContrast with retain_stats: gamma on [0, 1]-rescaled x, mean/std kept."""
        return _retained_gamma(x, values.gamma[i])


@dataclass
class DeviceValues:
    """A batch's per-sample numbers on the device (:meth:`BatchAugmentation.device_values`)."""

    theta: torch.Tensor        # (k, d, d + 1) affine_grid thetas of the moved samples
    matrices: torch.Tensor     # (k, d, d) their output-to-window maps in voxels, array order
    noise_std: torch.Tensor    # (B,)
    brightness: torch.Tensor   # (B,)
    contrast: torch.Tensor     # (B,)
    inverted_gamma: torch.Tensor  # (B,)
    gamma: torch.Tensor        # (B,)


def _retained_gamma(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Gamma of x rescaled to [0, 1], scaled back, then given x's mean and std (MONAI's)."""
    mean, std = x.mean(), x.std()
    low = x.min()
    span = x.max() - low
    out = ((x - low) / (span + 1e-7)) ** gamma * span + low
    return (out - out.mean()) / (out.std() + 1e-8) * std + mean


def sampling_grid(theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.affine_grid(theta, (k, 1, *size), align_corners=True)``, built by broadcasting.

    Our own because ``affine_grid`` multiplies a materialised base grid by theta, which on a
    CPU takes as long as the resampling itself; the grid of an affine map is a sum of one
    line per axis.

    Args:
        theta: (k, d, d + 1) maps in grid_sample's (x, y[, z]) order.
        size: the output's spatial size, array order (z, y, x) / (y, x).

    Returns:
        (k, *size, d) coordinates in [-1, 1] of the input.
    """
    k, dims = theta.shape[0], len(size)
    grid = theta[:, :, dims].reshape(k, *[1] * dims, dims)                 # translation
    for component in reversed(range(dims)):       # x varies along the last array axis, and so on
        axis = dims - 1 - component
        n = int(size[axis])
        line = (torch.linspace(-1.0, 1.0, n, device=theta.device, dtype=theta.dtype)
                if n > 1 else torch.zeros(1, device=theta.device, dtype=theta.dtype))
        shape = [1] * dims
        shape[axis] = n
        grid = grid + line.reshape(1, *shape, 1) * theta[:, :, component].reshape(
            k, *[1] * dims, dims)
    return grid


def gaussian_kernel(sigma: float) -> list[float]:
    """MONAI's erf-sampled Gaussian (``gaussian_1d(approx="erf")``, truncated at 4 σ).

    Our own, in plain Python on the host: MONAI's builds tensors, which in the augmentation's
    hook would be one more tensor made and read per sample and axis (equal within 3e-8, tested).
    """
    tail = int(math.floor(max(sigma * _BLUR_TRUNCATED, 0.5) + 0.5))
    t = 0.70710678 / sigma
    return [max(0.0, 0.5 * (math.erf(t * (o + 0.5)) - math.erf(t * (o - 0.5))))
            for o in range(-tail, tail + 1)]


def _correlate(x: torch.Tensor, kernel: Sequence[float], dim: int) -> torch.Tensor:
    """Correlation of ``x`` with an odd ``kernel`` along ``dim``, zero padding, same size."""
    tail, n = len(kernel) // 2, x.shape[dim]
    out = x * kernel[tail]
    for offset in range(1, min(tail, n - 1) + 1):
        out.narrow(dim, 0, n - offset).add_(x.narrow(dim, offset, n - offset),
                                            alpha=kernel[tail + offset])
        out.narrow(dim, offset, n - offset).add_(x.narrow(dim, 0, n - offset),
                                                 alpha=kernel[tail - offset])
    return out


def _device_of(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else x[0].device

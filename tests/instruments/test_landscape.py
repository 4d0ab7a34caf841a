"""Directions, grids, landscapes, paths, summaries and figures, on tiny networks in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segmentation.instruments.directions import filter_normalized_direction, random_directions
from segmentation.instruments.fixed_patches import PatchSet
from segmentation.instruments.landscape import (
    Landscape,
    check_same_architecture,
    compute_landscape,
    evaluate_loss,
    grid_axis,
    interpolate_landscape,
    path_axis,
)
from segmentation.instruments.landscape_figures import plot_landscape, plot_landscapes
from segmentation.instruments.landscape_summary import path_summary, sharpness_summary
from segmentation.training.losses import SegmentationLoss


class Filters(nn.Module):
    """One of every layout: conv, transposed conv (plain and grouped), linear, norms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3)
        self.up = nn.ConvTranspose3d(4, 6, 2, stride=2)
        self.grouped_up = nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2)
        self.linear = nn.Linear(5, 7)
        self.batch = nn.BatchNorm3d(4)
        self.instance = nn.InstanceNorm3d(4, affine=True)


def tiny_net(seed: int = 0) -> nn.Module:
    """(N, 1, *S) → (N, 3, *S) with batch norm, so running statistics matter."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                        nn.Conv3d(4, 3, 1))
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def patches() -> PatchSet:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 1, 6, 6, 6, generator=generator)
    labels = torch.randint(0, 3, (3, 1, 6, 6, 6), generator=generator)
    return PatchSet(images, labels, ["a", "b", "c"])


LOSS = SegmentationLoss()


def landscape_of(net: nn.Module, patches: PatchSet, **kwargs) -> Landscape:
    options = {"dims": 2, "steps": 3, "range_": 0.5, "seed": 0, **kwargs}
    return compute_landscape(net, patches, LOSS, **options)


# ------------------------------------------------------------------ directions


def test_directions_are_filter_normalised_along_each_layers_output_dim():
    net = Filters()
    direction = filter_normalized_direction(net, torch.Generator().manual_seed(0))
    params = dict(net.named_parameters())
    conv, d = params["conv.weight"], direction["conv.weight"]
    torch.testing.assert_close(d.flatten(1).norm(dim=1), conv.flatten(1).norm(dim=1))
    linear, d = params["linear.weight"], direction["linear.weight"]
    torch.testing.assert_close(d.norm(dim=1), linear.norm(dim=1))
    # ConvTranspose3d stores (in, out, *k): the real output filters lie along dim 1
    up, d = params["up.weight"], direction["up.weight"]
    real = [up[:, j].norm() for j in range(up.shape[1])]
    torch.testing.assert_close(torch.stack([d[:, j].norm() for j in range(6)]),
                               torch.stack(real))
    assert not torch.allclose(d.flatten(1).norm(dim=1), up.flatten(1).norm(dim=1))
    # groups=2: weight (4, 3, *k); output channel g·3 + j reads inputs of group g only
    grouped, d = params["grouped_up.weight"], direction["grouped_up.weight"]
    for g in range(2):
        for j in range(3):
            rows = slice(2 * g, 2 * g + 2)
            torch.testing.assert_close(d[rows, j].norm(), grouped[rows, j].norm())
    for name, parameter in params.items():
        if parameter.ndim <= 1:  # biases and norm parameters: Li et al.'s "ignore biasbn"
            assert torch.equal(direction[name], torch.zeros_like(parameter)), name


def test_directions_are_fixed_by_the_seed_and_the_second_follows_the_first():
    first = random_directions(Filters(), 2, seed=3)
    again = random_directions(Filters(), 2, seed=3)   # other weights, same shapes
    other = random_directions(Filters(), 1, seed=4)
    for a, b in zip(first, again, strict=True):
        # the same random values, rescaled to each network's filter norms
        ratio = a["conv.weight"].flatten(1) / b["conv.weight"].flatten(1)
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert not torch.allclose(first[0]["conv.weight"], first[1]["conv.weight"])
    assert not torch.allclose(first[0]["conv.weight"], other[0]["conv.weight"])


# ------------------------------------------------------------------ grids


def test_grid_axis_is_odd_symmetric_and_has_an_exact_centre():
    axis = grid_axis(24, 1.0)
    assert len(axis) == 25 and axis[12] == 0.0
    np.testing.assert_array_equal(axis, -axis[::-1])
    assert axis[0] == -1.0 and axis[-1] == 1.0
    assert len(grid_axis(5, 0.3)) == 5
    for steps, range_ in ((2, 1.0), (5, 0.0), (5, -1.0)):
        with pytest.raises(ValueError):
            grid_axis(steps, range_)


def test_path_axis_has_the_two_checkpoints_as_exact_points():
    t = path_axis(5, 0.5)
    assert len(t) == 9 and t[0] == -0.5 and t[-1] == 1.5
    assert 0.0 in t and 1.0 in t
    np.testing.assert_allclose(np.diff(t), 0.25)
    np.testing.assert_array_equal(path_axis(3, 0.0), [0.0, 0.5, 1.0])


# ------------------------------------------------------------------ landscapes


def test_landscape_centre_is_the_networks_loss_and_a_seed_repeats_it(patches):
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss = evaluate_loss(net, patches, LOSS)
    plane = landscape_of(net, patches)
    assert plane.losses.shape == (3, 3) and plane.complete and plane.betas.shape == (3,)
    assert plane.losses[plane.centre] == loss
    for key, value in net.state_dict().items():  # the weights are put back
        assert torch.equal(value, before[key]), key
    line = landscape_of(tiny_net(), patches, dims=1, steps=4)   # 4 → 5 points
    assert line.losses.shape == (5,) and line.betas.shape == (0,) and line.losses[2] == loss
    np.testing.assert_array_equal(line.losses, landscape_of(tiny_net(), patches, dims=1,
                                                            steps=5).losses)
    # the 1D direction is the 2D landscape's first: the same values along β = 0
    np.testing.assert_array_equal(line.losses[::2], plane.losses[:, 1])
    other = landscape_of(tiny_net(), patches, dims=1, seed=1)
    assert other.losses[1] == loss and not np.allclose(other.losses, plane.losses[:, 1])


def test_the_loss_does_not_depend_on_the_batch_size(patches):
    net = tiny_net()
    whole = evaluate_loss(net, patches, LOSS, batch_size=3)
    assert evaluate_loss(net, patches, LOSS, batch_size=1) == pytest.approx(whole, rel=1e-6)


def test_an_interrupted_grid_resumes_without_recomputing(patches):
    full = landscape_of(tiny_net(), patches)
    saved: list[Landscape] = []

    def stop_after_four(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        landscape_of(tiny_net(), patches, progress=stop_after_four, save=saved.append,
                     save_every=100)
    partial = saved[-1]
    assert partial.computed.sum() == 4 and not partial.complete
    calls = []

    def counting(logits, labels):
        calls.append(1)
        return LOSS(logits, labels)

    resumed = compute_landscape(tiny_net(), patches, counting, dims=2, steps=3, range_=0.5,
                                seed=0, resume_from=partial)
    assert len(calls) == 9 - 4
    np.testing.assert_array_equal(resumed.losses, full.losses)
    with pytest.raises(ValueError, match="another grid or seed"):
        landscape_of(tiny_net(), patches, seed=1, resume_from=partial)


def test_dims_must_be_one_or_two(patches):
    with pytest.raises(ValueError, match="--dims 3"):
        landscape_of(tiny_net(), patches, dims=3)


def test_a_path_starts_and_ends_at_the_two_networks(patches):
    net_a, net_b = tiny_net(0), tiny_net(1)
    loss_a, loss_b = evaluate_loss(net_a, patches, LOSS), evaluate_loss(net_b, patches, LOSS)
    path = interpolate_landscape(net_a, net_b, patches, LOSS, steps=3, margin=0.5)
    assert path.seed is None and path.alphas.tolist() == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert path.losses[1] == loss_a and path.losses[3] == loss_b
    assert np.isfinite(path.losses).all()  # extrapolated running variances stay ≥ 0
    assert evaluate_loss(net_a, patches, LOSS) == loss_a  # A is put back
    summary = path_summary(path)
    assert summary["loss_a"] == loss_a and summary["loss_b"] == loss_b
    assert summary["barrier"] >= 0


def test_another_architecture_is_refused_naming_both():
    wide = nn.Sequential(nn.Conv3d(1, 5, 3, padding=1), nn.BatchNorm3d(5), nn.ReLU(),
                         nn.Conv3d(5, 3, 1))
    with pytest.raises(ValueError, match=r"b\.ckpt is not the architecture of a\.ckpt: 0\.weight"):
        check_same_architecture(tiny_net(), wide, ("a.ckpt", "b.ckpt"))
    with pytest.raises(ValueError, match="in one network only"):
        check_same_architecture(tiny_net(), nn.Sequential(nn.Conv3d(1, 4, 3)), ("a", "b"))


# ------------------------------------------------------------------ summaries, files


def quadratic(a: float, b: float, steps: int = 9) -> Landscape:
    axis = grid_axis(steps, 1.0)
    alpha, beta = np.meshgrid(axis, axis, indexing="ij")
    losses = 1.0 + a * alpha**2 + b * beta**2
    return Landscape(axis, axis, losses, np.ones_like(losses, dtype=bool), 0, {})


def test_sharpness_of_a_known_quadratic():
    summary = sharpness_summary(quadratic(1.0, 4.0))
    assert summary["centre_loss"] == 1.0
    assert summary["loss_increase"]["0.25"] == pytest.approx((1 + 4) * 0.0625 / 2)
    assert summary["loss_increase"]["0.5"] == pytest.approx((1 + 4) * 0.25 / 2)
    assert summary["eigenvalues"] == pytest.approx([2.0, 8.0])
    assert summary["curvature_ratio"] == pytest.approx(4.0)
    saddle = sharpness_summary(quadratic(-1.0, 3.0))
    assert saddle["eigenvalues"] == pytest.approx([-2.0, 6.0])
    assert saddle["curvature_ratio"] == pytest.approx(3.0)  # absolute values
    narrow = quadratic(1.0, 1.0)
    narrow.alphas, narrow.betas = narrow.alphas * 0.4, narrow.betas * 0.4
    assert sharpness_summary(narrow)["loss_increase"]["0.5"] is None  # beyond the grid


def test_a_landscape_file_round_trips(tmp_path):
    landscape = quadratic(1.0, 2.0, steps=3)
    landscape.computed[0, 0] = False
    landscape.settings = {"loss": "x", "range": 1.0}
    loaded = Landscape.load(landscape.save(tmp_path / "landscape.npz"))
    np.testing.assert_array_equal(loaded.losses, landscape.losses)
    np.testing.assert_array_equal(loaded.computed, landscape.computed)
    assert loaded.seed == 0 and loaded.settings == landscape.settings
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not a landscape"):
        Landscape.load(tmp_path / "bad.npz")


def test_figures_share_levels_and_axes(tmp_path):
    written = plot_landscape(quadratic(1.0, 2.0, steps=5), tmp_path)
    assert [p.name for p in written] == ["landscape_contour.png", "landscape_surface.png"]
    out = plot_landscapes([("all", quadratic(1.0, 2.0, 5)), ("none", quadratic(3.0, 1.0, 5))],
                          tmp_path / "side_by_side.png")
    assert out.stat().st_size > 0
    line = Landscape(grid_axis(3, 1.0), np.zeros(0), np.array([2.0, 1.0, 2.0]),
                     np.ones(3, dtype=bool), 0, {})
    assert [p.name for p in plot_landscape(line, tmp_path)] == ["landscape_1d.png"]
    with pytest.raises(ValueError, match="1D and 2D"):
        plot_landscapes([("a", line), ("b", quadratic(1.0, 1.0, 3))], tmp_path / "x.png")

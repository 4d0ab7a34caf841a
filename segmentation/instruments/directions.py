"""Filter-normalised random directions in weight space (Li et al. 2018, arXiv:1712.09913).

A random Gaussian direction says little about a network on its own: the loss of a ReLU network
with batch or instance norm does not change when a filter's weights are scaled, so a step of
the same size is a large change for a filter with small weights and a negligible one for a
filter with large weights. Li et al. rescale every filter of the direction to the norm of the
filter it perturbs, so that a step α moves each filter by α times its own size and landscapes
of different networks (or of one network at different scales) can be compared.

Biases and normalisation parameters (every parameter with at most one dimension) get a zero
direction, Li et al.'s "ignore biasbn": they are few, and their scale is not a filter's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

Direction = dict[str, torch.Tensor]  # parameter name → tensor of the parameter's shape

# Keeps a filter of random values that happens to be tiny from dividing by zero.
_NORM_EPS = 1e-10


def transposed_weights(net: nn.Module) -> dict[str, int]:
    """Names of the transposed-convolution weights of ``net`` and their ``groups``.

    ``ConvTranspose`` stores its weight as (in, out / groups, *k): the filters that make one
    output channel lie along dim 1, not dim 0 as for every other layer.
    """
    return {f"{name}.weight" if name else "weight": module.groups
            for name, module in net.named_modules() if isinstance(module, _ConvTransposeNd)}


def filter_norms(weight: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """The norm of each output filter of a weight.

    Args:
        weight: (out, *rest) for convolutions and linear layers; with ``groups`` a transposed
            convolution's (in, out / groups, *k).
        groups: the transposed convolution's groups, or None for a dim-0 layout.

    Returns:
        (out,) norms; for a transposed convolution (groups, out / groups), the output channel
        ``g · out / groups + j`` at ``[g, j]``.
    """
    if groups is None:
        return weight.reshape(weight.shape[0], -1).norm(dim=1)
    grouped = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
    return grouped.pow(2).sum(dim=(1, 3)).sqrt()


def normalize_filters(direction: torch.Tensor, weight: torch.Tensor,
                      groups: int | None = None) -> torch.Tensor:
    """Rescale each output filter of ``direction`` to the norm of the same filter of ``weight``.

    Args:
        direction: a tensor of ``weight``'s shape.
        weight: (out, *rest), or a transposed convolution's (in, out / groups, *k).
        groups: the transposed convolution's groups, or None for a dim-0 layout.

    Returns:
        A new tensor of ``weight``'s shape.
    """
    scale = filter_norms(weight, groups) / (filter_norms(direction, groups) + _NORM_EPS)
    if groups is None:
        return direction * scale.reshape(-1, *([1] * (direction.ndim - 1)))
    grouped = direction.reshape(groups, direction.shape[0] // groups, direction.shape[1], -1)
    return (grouped * scale[:, None, :, None]).reshape(direction.shape)


def filter_normalized_direction(net: nn.Module, generator: torch.Generator) -> Direction:
    """A random Gaussian direction for every parameter, filter-normalised to ``net``'s weights.

    Values are drawn on the CPU from ``generator`` in ``named_parameters()`` order, for the
    parameters with more than one dimension only, so the same generator state gives the same
    direction for networks of the same parameter shapes on any device.

    Args:
        net: the network whose weights θ the direction perturbs.
        generator: a CPU generator.

    Returns:
        Parameter name → tensor of its shape, dtype and device; zero for every parameter with
        at most one dimension (biases, normalisation scales and shifts).
    """
    transposed = transposed_weights(net)
    direction: Direction = {}
    for name, parameter in net.named_parameters():
        weight = parameter.detach()
        if weight.ndim <= 1:
            direction[name] = torch.zeros_like(weight)
            continue
        random = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
        normalized = normalize_filters(random, weight.float().cpu(), transposed.get(name))
        direction[name] = normalized.to(device=weight.device, dtype=weight.dtype)
    return direction


def random_directions(net: nn.Module, count: int, seed: int) -> list[Direction]:
    """``count`` filter-normalised directions drawn one after the other from one generator.

    The second direction comes from the same ``torch.Generator`` after the first, so a seed
    fixes both, and a 1D landscape's direction is the 2D landscape's first.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return [filter_normalized_direction(net, generator) for _ in range(count)]

"""The configurable 2D/3D U-Net: encoder → long skips → decoder → 1×1 head."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn

from segmentation.nets import axes, layers
from segmentation.nets.decoder import Decoder
from segmentation.nets.encoder import Encoder
from segmentation.nets.spatial import InvalidSizeError, pad_spatial

_SEARCH_LIMIT = 4096  # how far the valid-size search looks above or below a requested size


def _plain(value: object) -> object:
    """Tuples and lists, nested ones too, as lists: what a YAML config holds."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _per_level(name: str, value: int | Sequence[int], levels: int) -> tuple[int, ...]:
    """Expand an int to one value per level, or check a sequence has one per level."""
    if isinstance(value, int):
        values: tuple[int, ...] = (value,) * levels
    else:
        values = tuple(int(v) for v in value)
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries but the network has {levels} "
                         f"levels (len(features)); give one value per level or a single int")
    if min(values) < 1:
        raise ValueError(f"{name} must be ≥ 1 everywhere, got {list(values)}")
    return values


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) for 2D or 3D images, with every design choice switchable.

    ``forward`` is the diagram: the encoder returns one feature map per level, the decoder
    consumes them bottom-up, concatenating the level's encoder map where its long skip is on,
    and a 1×1 convolution maps the top decoder level to class logits.

    Anisotropic networks (nnU-Net's plans for scans with thick slices) take a kernel size per
    level and axis (``kernel_sizes``) and a downsampling factor per level and axis
    (``strides``). A prostate MRI network with 3.6 mm slices and 0.6 mm pixels, patches of
    20 × 320 × 320 voxels, convolves and downsamples in-plane only at the top::

        UNet(spatial_dims=3, features=[32, 64, 128, 256, 320],
             kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
             strides=[[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]])

    Its bottleneck sees 20 / 4 = 5 slices and 320 / 16 = 20 pixels per side; ``total_strides``
    is ``(4, 16, 16)``. In a YAML config the same two arguments are lists of lists under
    ``init_args``. Without them (the default) every level has ``kernel_size`` along every
    axis and halves every axis: the network, its parameter names and its outputs are those
    of the isotropic U-Net, so older configs and checkpoints load unchanged.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (modalities).
        out_channels: classes, background included.
        features: channels per level, top first; depth (number of downsamplings) is
            ``len(features) − 1``.
        convs_per_level: convolutions per level of a plain encoder (int or one per level).
        decoder_convs_per_level: convolutions per decoder level (one number for all levels).
        decoder_features: channels per decoder level, top first (``len(features) − 1``
            values); default: the encoder's ``features`` of the same level. A wider level
            gives a network without long skips the parameters of one with them (see
            ``segmentation.nets.capacity.match_decoder_width``).
        padding: "same" (zero-padded convs; any input size, output = input size) or "valid"
            (unpadded convs as in the original U-Net; encoder maps are center-cropped before
            concatenation and the output is smaller than the input).
        long_skips: True/False for every level, or one flag per level except the bottleneck,
            top first (``[False, True, True, True]`` drops only the uppermost skip).
        encoder_block: "plain" (conv → norm → act) or "residual" (pre-activation blocks with a
            1×1 projection shortcut when the channel count changes).
        blocks_per_level: residual blocks per encoder level (int or one per level), e.g.
            ``[1, 3, 4, 6, 6, 6]`` as in nnU-Net ResEnc.
        downsample: "maxpool" (max-pooling, kernel = stride = the level's factor, 2×2 by
            default) or "conv" (learned, as nnU-Net: the first convolution of each lower level
            is strided by the factor).
        upsample: "transpose" (up-conv, kernel = stride = the level's factor, 2×2 by default)
            or "interpolate" (nearest by the factor + 1×1 conv).
        norm: "instance", "batch", "group" or "none"/None.
        act: "relu", "leakyrelu" or "gelu".
        dropout: dropout probability after each activation (0 disables it).
        kernel_size: odd kernel size of the main convolutions, along every axis of every level
            (unless ``kernel_sizes`` is given).
        deep_supervision: return auxiliary outputs of the lower decoder levels while training.
            The auxiliary 1×1 heads always exist, so checkpoints load either way; without deep
            supervision they are frozen (no gradients), so DDP finds no unused parameters.
        kernel_sizes: kernel size of every level, top first (``len(features)`` entries); each
            an odd int (every axis) or a list of one odd int per spatial axis, e.g.
            ``[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]`` (a 1 leaves that axis
            unconvolved). Decoder level ``l`` uses the kernel of encoder level ``l``. None:
            ``kernel_size`` everywhere. Takes precedence over ``kernel_size``.
        strides: downsampling factor of every downsampling, top first (``len(features) − 1``
            entries: entry ``i`` is between levels ``i`` and ``i + 1``); each 1 or 2 (every
            axis) or a list of one 1 or 2 per spatial axis, e.g. ``[[1, 2, 2], [1, 2, 2],
            [2, 2, 2], [2, 2, 2]]``. The decoder upsamples by the same factors. None: 2 along
            every axis.

    Raises:
        ValueError: for an argument the network cannot be built with, saying what to change
            (e.g. an even kernel size, a factor other than 1 or 2, a per-level or per-axis list
            of the wrong length, "valid" padding with "conv" downsampling).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 320),
        convs_per_level: int | Sequence[int] = 2,
        decoder_convs_per_level: int = 2,
        decoder_features: Sequence[int] | None = None,
        padding: str = "same",
        long_skips: bool | Sequence[bool] = True,
        encoder_block: str = "plain",
        blocks_per_level: int | Sequence[int] = 1,
        downsample: str = "maxpool",
        upsample: str = "transpose",
        norm: str | None = "instance",
        act: str = "leakyrelu",
        dropout: float = 0.0,
        bias: bool = True,
        kernel_size: int = 3,
        deep_supervision: bool = False,
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
        strides: Sequence[int | Sequence[int]] | None = None,
    ) -> None:
        init_args = {k: _plain(v) for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        # Drawn before any layer exists, so the global RNG is in the same state for every
        # network built after the same seed, whatever layers follow (see _init_weights).
        init_seed = int(torch.randint(0, 2**31 - 1, (1,), device="cpu"))
        # The arguments that rebuild this network, as a config would name them.
        cls = type(self)
        class_path = ("segmentation.UNet" if cls is UNet
                      else f"{cls.__module__}.{cls.__qualname__}")  # subclasses rebuild as such
        self.config = {"class_path": class_path, "init_args": init_args}
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels (depth ≥ 1), got {list(features)}")
        if min(features) < 1:
            raise ValueError(f"features must be ≥ 1 channel at every level, got {list(features)}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        if not isinstance(decoder_convs_per_level, int) or decoder_convs_per_level < 1:
            raise ValueError("decoder_convs_per_level must be a single int ≥ 1 (every decoder "
                             f"level has as many convolutions), got {decoder_convs_per_level!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so a voxel stays centred, got {kernel_size}")
        levels = len(features)
        self.kernel_sizes = axes.level_kernel_sizes(kernel_sizes, kernel_size, levels,
                                                    spatial_dims)
        self.strides = axes.level_strides(strides, levels, spatial_dims)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.padding = layers.check_choice("padding", padding, layers.PADDINGS)
        self.deep_supervision = deep_supervision
        self.depth = len(features) - 1
        if isinstance(long_skips, bool):
            long_skips = (long_skips,) * self.depth
        if len(long_skips) != self.depth:
            raise ValueError(f"long_skips has {len(long_skips)} flags but the network has "
                             f"{self.depth} skip levels (len(features) − 1); give one per level, "
                             "top first, or a single true/false")
        self.long_skips = tuple(bool(s) for s in long_skips)
        act = layers.check_choice("act", act, layers.ACTS)
        unit_kwargs = dict(padding=self.padding, bias=bias,
                           norm=layers.check_choice("norm", norm, layers.NORMS), act=act,
                           dropout=dropout)

        self.encoder = Encoder(
            spatial_dims, in_channels, features,
            block=layers.check_choice("encoder_block", encoder_block, layers.ENCODER_BLOCKS),
            convs_per_level=_per_level("convs_per_level", convs_per_level, levels),
            blocks_per_level=_per_level("blocks_per_level", blocks_per_level, levels),
            downsample=downsample, kernel_sizes=self.kernel_sizes, strides=self.strides,
            **unit_kwargs)
        self.decoder = Decoder(
            self.encoder, self.long_skips, upsample=upsample, spatial_dims=spatial_dims,
            convs_per_level=decoder_convs_per_level, widths=decoder_features,
            **unit_kwargs)
        widths = self.decoder.channels
        self.head = layers.conv(spatial_dims, widths[0], out_channels, 1)
        # One auxiliary head per decoder level below the top (deep supervision).
        self.aux_heads = nn.ModuleList(
            layers.conv(spatial_dims, widths[level], out_channels, 1)
            for level in range(1, self.depth))
        self.aux_heads.requires_grad_(deep_supervision)
        self._init_weights(act, init_seed)

    def _init_weights(self, act: str, seed: int) -> None:
        """He (Kaiming) normal initialisation of every convolution, zero biases.

        Each convolution draws from a generator of its own, seeded with ``seed`` and the
        convolution's name. Networks built after the same global seed that differ in some
        layers (a level without its skip, a wider decoder level) therefore start every layer
        they share, same name and shape, from identical weights: an ablation compares the
        architectures, not their random draws. ``act`` is the activation's checked name;
        "leakyrelu" sets the slope.
        """
        slope = layers.LEAKY_SLOPE if act == "leakyrelu" else 0.0
        for name, module in self.named_modules():
            if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d
                              | nn.ConvTranspose3d) or module.weight.is_meta:
                continue
            generator = torch.Generator(module.weight.device)
            generator.manual_seed(seed ^ zlib.crc32(name.encode()))
            nn.init.kaiming_normal_(module.weight, a=slope, nonlinearity="leaky_relu",
                                    generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self, include_aux_heads: bool | None = None) -> int:
        """Number of parameters.

        Args:
            include_aux_heads: count the deep-supervision heads too; by default only when deep
                supervision is enabled, so that the count is the size of the network that
                produces the segmentation, the figure papers report.
        """
        if include_aux_heads is None:
            include_aux_heads = self.deep_supervision
        aux = {id(p) for p in self.aux_heads.parameters()}
        return sum(p.numel() for p in self.parameters() if include_aux_heads or id(p) not in aux)

    # ---------------------------------------------------------------- shape arithmetic
    @property
    def total_strides(self) -> tuple[int, ...]:
        """Per-axis factor between the input grid and the bottleneck's (product of ``strides``).

        ``(2**depth,) * spatial_dims`` for an isotropic network. A "same" network pads its
        input to a multiple of it; a "valid" network is translation-equivariant for shifts
        that are multiples of it (what overlap-tile steps by).
        """
        return tuple(math.prod(level[axis] for level in self.strides)
                     for axis in range(self.spatial_dims))

    @property
    def level_strides(self) -> tuple[tuple[int, ...], ...]:
        """Per-axis factor between the input grid and level ``l``'s, for l = 0 … depth.

        Level 0 is ``(1, …)``, the last is :attr:`total_strides`; decoder level ``l`` (and its
        deep-supervision output) is on the grid of encoder level ``l``.
        """
        grids = [(1,) * self.spatial_dims]
        for factors in self.strides:
            grids.append(tuple(g * f for g, f in zip(grids[-1], factors, strict=True)))
        return tuple(grids)

    @property
    def same_on_every_axis(self) -> bool:
        """Whether every axis has the same kernels and strides (shape arithmetic needs no axis)."""
        return axes.isotropic(self.kernel_sizes, self.strides)

    def _axis(self, axis: int | None) -> int:
        return axes.resolve_axis(axis, self.spatial_dims, self.same_on_every_axis)

    def _output_size(self, n: int, axis: int = 0) -> int:
        """Output size along ``axis`` for a "valid" network; raises InvalidSizeError."""
        if n < 1:
            raise InvalidSizeError(f"size {n} is not positive")
        return self.decoder.output_sizes(self.encoder.output_sizes(n, axis), axis)[0]

    def _is_valid(self, n: int, axis: int = 0) -> bool:
        try:
            self._output_size(n, axis)
        except InvalidSizeError:
            return False
        return True

    def nearest_valid_sizes(self, n: int, axis: int | None = None
                            ) -> tuple[int | None, int | None]:
        """The largest valid size ≤ ``n`` and the smallest ≥ ``n`` along ``axis``.

        In "same" mode every positive size is valid. A side is ``None`` where no valid size
        exists within 4096 of ``n``. ``axis`` (0 … spatial_dims − 1) matters where kernel sizes
        or strides differ between axes; it may be left out where they do not.

        Raises:
            ValueError: if ``axis`` is left out on a network whose axes differ.
        """
        axis = self._axis(axis)
        if self.padding == "same":
            return (n, n) if n >= 1 else (None, 1)
        below = next((m for m in range(n, max(n - _SEARCH_LIMIT, 0), -1)
                      if self._is_valid(m, axis)), None)
        above = next((m for m in range(max(n, 1), n + _SEARCH_LIMIT)
                      if self._is_valid(m, axis)), None)
        return below, above

    def check_input_shape(self, input_shape: Sequence[int]) -> None:
        """Raise ValueError unless the network accepts this spatial input shape.

        The message names each bad size and the nearest valid sizes along that axis (which
        differ between axes where the kernel sizes or strides do).
        """
        if len(input_shape) != self.spatial_dims:
            raise ValueError(f"expected a {self.spatial_dims}D spatial shape, got "
                             f"{tuple(input_shape)}")
        problems = []
        for axis, n in enumerate(input_shape):
            below, above = self.nearest_valid_sizes(int(n), axis)
            if below != n:
                nearest = " and ".join(str(m) for m in (below, above) if m is not None)
                problems.append(f"input {n} (axis {axis}) is not valid; nearest valid sizes "
                                f"are {nearest}")
        if problems:
            strides = ("" if self.same_on_every_axis
                       else f", total strides {self.total_strides} per axis")
            raise ValueError("; ".join(problems) + f" (depth {self.depth}{strides}, padding "
                             f"{self.padding!r}; see UNet.valid_input_shape)")

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial input shape.

        Raises:
            ValueError: if the input shape is not valid (see :meth:`check_input_shape`).
        """
        self.check_input_shape(input_shape)
        if self.padding == "same":
            return tuple(int(n) for n in input_shape)
        return tuple(self._output_size(int(n), axis) for axis, n in enumerate(input_shape))

    def valid_input_shape(self, min_shape: Sequence[int]) -> tuple[int, ...]:
        """The smallest input shape, at least ``min_shape`` along every axis, that is valid."""
        if len(min_shape) != self.spatial_dims:
            raise ValueError(f"expected a {self.spatial_dims}D spatial shape, got "
                             f"{tuple(min_shape)}")
        shape = []
        for axis, n in enumerate(min_shape):
            above = self.nearest_valid_sizes(int(n), axis)[1]
            if above is None:
                raise ValueError(f"no valid input size found in [{n}, {n + _SEARCH_LIMIT})")
            shape.append(above)
        return tuple(shape)

    def input_shape_for_output(self, min_output: Sequence[int]) -> tuple[int, ...]:
        """The smallest valid input whose output is at least ``min_output`` along every axis.

        What to train on or tile with for a wanted output: a "valid" network predicts less than
        it reads (the paper's 572×572 input gives 388×388), a "same" one exactly its input.

        Raises:
            ValueError: if the shape has the wrong number of axes or no valid input reaches it.
        """
        if len(min_output) != self.spatial_dims:
            raise ValueError(f"expected a {self.spatial_dims}D spatial shape, got "
                             f"{tuple(min_output)}")
        if self.padding == "same":
            return self.valid_input_shape(min_output)
        shape = []
        for axis, want in enumerate(int(w) for w in min_output):
            n = self.nearest_valid_sizes(want, axis)[1]  # the output is never larger than the input
            while n is not None and self._output_size(n, axis) < want:
                n = self.nearest_valid_sizes(n + 1, axis)[1]
            if n is None:
                raise ValueError(f"no valid input size found for an output of {want}")
            shape.append(n)
        return tuple(shape)

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            axes = ", ".join("DHW"[3 - self.spatial_dims:])
            raise ValueError(f"expected input of shape (N, {self.in_channels}, {axes}) for this "
                             f"{self.spatial_dims}D U-Net with {self.in_channels} input "
                             f"channel(s), got {tuple(x.shape)}")
        self.check_input_shape(x.shape[2:])

    def encoder_input_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial shape the encoder sees for an input shape.

        A "same" network zero-pads its input along every axis to a multiple of that axis'
        :attr:`total_strides` (2**depth for an isotropic network) and crops the output back; a
        "valid" network takes the input as it is.
        """
        if self.padding != "same":
            return tuple(int(n) for n in input_shape)
        return tuple(math.ceil(int(n) / multiple) * multiple
                     for n, multiple in zip(input_shape, self.total_strides, strict=True))

    def _pad_to_multiple(self, x: torch.Tensor) -> tuple[torch.Tensor, list[slice]]:
        """Zero-pad a "same" input to :meth:`encoder_input_shape`.

        Returns:
            The padded (N, C, *P) tensor and the slices that cut the original region back out.
        """
        pads: list[tuple[int, int]] = []
        region = [slice(None), slice(None)]
        for n, p in zip(x.shape[2:], self.encoder_input_shape(x.shape[2:]), strict=True):
            total = p - n
            before = total // 2
            pads.append((before, total - before))
            region.append(slice(before, before + n))
        return pad_spatial(x, pads), region

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment a batch.

        Args:
            x: (N, in_channels, *S), S a valid input shape.

        Returns:
            Logits (N, out_channels, *output_shape(S)). With deep supervision while training,
            a list: those logits first, then one (N, out_channels, *T_l) output per lower
            decoder level l = 1 … depth − 1.
        """
        self._check_input(x)
        region = None
        if self.padding == "same":
            x, region = self._pad_to_multiple(x)    # (N, C_in, *P), P multiple of total_strides
        features = self.encoder(x)                  # [(N, C_l, *S_l)] for l = 0 … depth
        decoded = self.decoder(features)            # [(N, D_l, *T_l)] for l = 0 … depth − 1
        logits = self.head(decoded[0])              # (N, out_channels, *T_0)
        if region is not None:
            logits = logits[tuple(region)]          # (N, out_channels, *S)
        if not (self.deep_supervision and self.training):
            return logits
        aux = [head(level) for head, level in zip(self.aux_heads, decoded[1:], strict=True)]
        return [logits, *aux]

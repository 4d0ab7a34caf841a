"""Training-step speed and memory: our U-Net against nnU-Net's PlainConvUNet and MONAI's DynUNet.

Sections (--sections picks them, run in the order given; all by default): "networks",
"augmentation", "loader" and "fit" (the last three: scripts/benchmark_train_data.py's
docstring).

Section "networks" times whole optimizer steps of three networks of the same architecture, in
one process, on the same random batch: ours (`segmentation.UNet` as
configs/model/unet3d_plain.yaml builds it: nnU-Net 3d_fullres "plain",
strided-convolution downsampling, transposed-convolution upsampling,
instance norm, leaky ReLU, deep supervision), nnU-Net's `PlainConvUNet` from
dynamic_network_architectures (optional: without it its line says "skipped") and MONAI's
`DynUNet`. A step is zero_grad, forward, loss, backward, gradient clipping at norm 12 and an
SGD step (nnU-Net's: lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5); the loss is the
project's `SegmentationLoss` (Dice + cross-entropy with nnU-Net's deep-supervision weights) on
the same five resolutions for all three (DynUNet's auxiliary outputs are taken before its
forward upsamples them to full size, see `DynUNetNativeOutputs`). Each network runs eagerly
and, with --compile, as `torch.compile(network)` (nnU-Net compiles the network alone; the
compilation happens in the first, untimed, warm-up step, whose length is reported;
"compile_seconds" is that step less a median step). Compile times depend on order and on
inductor's caches: a tiny network is compiled first ("compiler_warmup_seconds", about 10 s of
one-off costs on the CPU), but the first network still compiles kernels that later ones reuse
(inductor caches generated code by its source, in memory and in /tmp/torchinductor_$USER or
$TORCHINDUCTOR_CACHE_DIR). On two CPU cores at toy sizes with an empty cache the first network
took 60–75 s, the later ones 26–38 s; with a warm cache 3–4 s each.

Every measurement is one JSON line on stdout ("benchmark": "train_step") with the median
seconds per step over --steps timed steps after --warmup untimed ones, steps per second, peak
memory, the parameter count with its breakdown (convolution weights, convolution biases,
normalisation affines) and the convolution TFLOP of one step (forward and backward, counted
by torch.utils.flop_counter in the first eager warm-up step; norms, activations and the loss
are not counted). A final "ratio" line gives our steps/s over each peer's, eager and compiled,
and how the parameter counts differ: ours and PlainConvUNet are equal; DynUNet has no bias in
its 3×3 convolutions (2·Σfeatures + 2·Σfeatures[:-1] parameters, 3840 at nnU-Net's sizes; a
bias before instance norm is cancelled by its mean subtraction, so the networks compute the
same family of functions).

GPU reference settings (the defaults on CUDA: patch 128³, batch 2, 3 classes, features
32..320, bf16 autocast, 10 warm-up and 50 timed steps, eager and compiled):
    python scripts/benchmark.py train --device cuda
CPU defaults (patch 64×64×32, batch 2, features 8..128 in the same six stages, fp32, eager
only, 2 warm-up and 5 timed steps, one thread) finish the networks section in about a minute
on two cores:
    python scripts/benchmark.py train          # or python scripts/benchmark_train.py
One intra-op thread by default on the CPU: on a machine shared with another busy process, two
OpenMP threads wait on each other at every barrier whenever one loses its core, and steps
became 10× slower than with one thread (13–17 s instead of 1.3 s at these sizes) and erratic;
on an idle machine --threads 2 halves the step time. "step_seconds_range" shows such stalls.
Peak memory: torch.cuda.max_memory_allocated per network and variant on a GPU (the peak
counters are reset after the previous network is freed); on the CPU the process's peak
resident set size so far (it only grows, so read it as an upper bound for each network).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml
from torch import nn

from segmentation import UNet
from segmentation.training.losses import SegmentationLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_train_data import (  # noqa: E402  (scripts/ is no package)
    add_arguments as add_data_arguments,
)
from benchmark_train_data import (  # noqa: E402
    augmentation_section,
    fit_section,
    synthetic_dataset,
)
from benchmark_train_data import (  # noqa: E402
    fill_defaults as fill_data_defaults,
)
from benchmark_train_data import loader_section as data_loader_section  # noqa: E402

PLAIN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "unet3d_plain.yaml"
BENCH_HINT = "pip install -e '.[bench]'"
OURS, NNUNET, DYNUNET = "segmentation_unet", "nnunet_plain_conv_unet", "monai_dynunet"
SECTIONS = ("networks", "augmentation", "loader", "fit")
# What configs/model/unet3d_plain.yaml must say for the peers below to be the same network.
PLAIN_SETTINGS = {"spatial_dims": 3, "padding": "same", "encoder_block": "plain",
                  "downsample": "conv", "upsample": "transpose", "norm": "instance",
                  "act": "leakyrelu", "deep_supervision": True}
SGD = {"lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}  # nnU-Net's
CLIP_NORM = 12.0


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


# ------------------------------------------------------------------------- the three networks
def plain_init_args(features: Sequence[int] | None = None, in_channels: int | None = None,
                    out_channels: int | None = None, config: Path = PLAIN_CONFIG) -> dict:
    """The init_args of configs/model/unet3d_plain.yaml, with the given sizes overridden.

    Raises:
        ValueError: if the config no longer describes the network the peers rebuild.
    """
    init_args = dict(yaml.safe_load(config.read_text())["init_args"])
    for name, value in (("features", features), ("in_channels", in_channels),
                        ("out_channels", out_channels)):
        if value is not None:
            init_args[name] = list(value) if name == "features" else int(value)
    differing = {k: init_args.get(k) for k, v in PLAIN_SETTINGS.items() if init_args.get(k) != v}
    differing.update({k: init_args[k] for k in ("kernel_sizes", "strides", "decoder_features")
                      if init_args.get(k) is not None})
    if not init_args.get("long_skips", True) or init_args.get("dropout", 0.0):
        differing.update(long_skips=init_args.get("long_skips"), dropout=init_args.get("dropout"))
    if differing:
        raise ValueError(f"{config} sets {differing}; the nnU-Net and DynUNet peers of this "
                         f"benchmark implement {PLAIN_SETTINGS} with one kernel size and "
                         "stride 2 everywhere; update benchmark_train.py's peers first")
    return init_args


def _stage_counts(init_args: dict) -> tuple[int, list[int], list[int], int]:
    stages = len(init_args["features"])
    convs = init_args.get("convs_per_level", 2)
    encoder = [convs] * stages if isinstance(convs, int) else list(convs)
    decoder = [init_args.get("decoder_convs_per_level", 2)] * (stages - 1)
    return stages, encoder, decoder, init_args.get("kernel_size", 3)


def build_ours(init_args: dict) -> nn.Module:
    return UNet(**init_args)


def build_nnunet(init_args: dict) -> nn.Module:
    """nnU-Net's PlainConvUNet as its 3d_fullres plans build it; ImportError without it."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    stages, encoder, decoder, kernel = _stage_counts(init_args)
    return PlainConvUNet(
        input_channels=init_args["in_channels"], n_stages=stages,
        features_per_stage=list(init_args["features"]), conv_op=nn.Conv3d, kernel_sizes=kernel,
        strides=[1] + [2] * (stages - 1), n_conv_per_stage=encoder,
        num_classes=init_args["out_channels"], n_conv_per_stage_decoder=decoder,
        conv_bias=init_args.get("bias", True), norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=True)


class DynUNetNativeOutputs(nn.Module):
    """MONAI's DynUNet, returning its deep-supervision outputs at their own resolutions.

    In training, ``DynUNet.forward`` upsamples every auxiliary output to the full size and
    stacks them, (B, 1 + deep_supr_num, K, *S), so a loss would compare four more full-size
    maps with the full label. nnU-Net and ours return ``[(B, K, *S), (B, K, *S/2), …]``. This
    runs DynUNet's own layers (``skip_layers``, ``output_block``) and returns the main output
    and the raw super-head outputs DynUNet keeps in ``heads`` (finest first), so all three
    networks give the loss the same resolutions and nothing else is computed.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        main = self.net.output_block(self.net.skip_layers(x))
        if not (self.training and self.net.deep_supervision):
            return main
        return [main, *self.net.heads]


def build_dynunet(init_args: dict) -> nn.Module:
    """MONAI's DynUNet of the same architecture (its convolutions cannot take a bias)."""
    from monai.networks.nets import DynUNet

    stages, encoder, decoder, kernel = _stage_counts(init_args)
    if set(encoder) != {2} or set(decoder) != {2}:
        raise ValueError("DynUNet has two convolutions per block; convs_per_level and "
                         f"decoder_convs_per_level are {encoder} and {decoder}")
    net = DynUNet(
        spatial_dims=3, in_channels=init_args["in_channels"],
        out_channels=init_args["out_channels"], kernel_size=[kernel] * stages,
        strides=[1] + [2] * (stages - 1), upsample_kernel_size=[2] * (stages - 1),
        filters=list(init_args["features"]),
        # MONAI's "instance" alone is InstanceNorm without affine parameters; nnU-Net's and
        # ours have them.
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        # nnU-Net: one head per decoder level (stages − 1 outputs, main included); DynUNet's
        # main output plus deep_supr_num heads on the levels below: stages − 2 of them gives the
        # same 5 outputs at 6 stages, at the same resolutions, and the same head parameters
        # (the largest deep_supr_num DynUNet allows).
        deep_supervision=True, deep_supr_num=stages - 2,
        # Its transposed convolutions take a bias if asked (ours and nnU-Net's have one); its
        # 3×3 convolutions never do (get_conv_layer's bias=False).
        trans_bias=True)
    return DynUNetNativeOutputs(net)


BUILDERS: dict[str, Callable[[dict], nn.Module]] = {
    OURS: build_ours, NNUNET: build_nnunet, DYNUNET: build_dynunet}


def network_factories(init_args: dict) -> dict[str, Callable[[], nn.Module] | str]:
    """A builder per network, or the reason it is skipped (nnU-Net's missing package)."""
    factories: dict[str, Callable[[], nn.Module] | str] = {}
    for name, build in BUILDERS.items():
        if name == NNUNET:
            try:
                import dynamic_network_architectures  # noqa: F401
            except ImportError as error:
                factories[name] = f"{error}; {BENCH_HINT}"
                continue
        factories[name] = lambda build=build: build(init_args)
    return factories


def parameter_breakdown(net: nn.Module) -> dict[str, int]:
    """Parameters by kind: convolution weights and biases, normalisation affines, the rest."""
    counts = {"conv_weights": 0, "conv_biases": 0, "norm_affine": 0, "other": 0}
    for module in net.modules():
        direct = list(module.named_parameters(recurse=False))
        for name, parameter in direct:
            if isinstance(module, nn.modules.conv._ConvNd):
                counts["conv_weights" if name == "weight" else "conv_biases"] += parameter.numel()
            elif isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
                counts["norm_affine"] += parameter.numel()
            else:
                counts["other"] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def explain_difference(ours: dict[str, int], peer: dict[str, int]) -> str:
    difference = ours["total"] - peer["total"]
    if difference == 0 and ours == peer:
        return "equal in every kind"
    if (all(ours[k] == peer[k] for k in ("conv_weights", "norm_affine", "other"))
            and ours["conv_biases"] - peer["conv_biases"] == difference):
        return (f"{difference} conv biases ours has and the peer lacks; weights and norm "
                "affines equal (a bias before instance norm is cancelled by it)")
    return f"differs by {difference}: {ours} vs {peer}"


def dynunet_missing_biases(features: Sequence[int], convs: int = 2) -> int:
    """Bias parameters of the 3×3 convolutions: ours has them, DynUNet's have none."""
    return convs * sum(features) + convs * sum(features[:-1])


# ------------------------------------------------------------------------- timing
def check_patch(patch: Sequence[int], stages: int) -> None:
    """Patches the three networks treat alike: no padding, a bottleneck of > 1 voxel.

    Ours pads an input to a multiple of 2**depth where the peers cannot take it, and
    instance norm needs more than one voxel at the bottleneck while training.
    """
    multiple = 2 ** (stages - 1)
    if any(p % multiple for p in patch) or math.prod(p // multiple for p in patch) < 2:
        raise ValueError(f"patch {list(patch)}: every axis must be a multiple of {multiple} "
                         f"(2**depth for {stages} stages) and one at least {2 * multiple}, so "
                         "that no network pads and the bottleneck has more than one voxel")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def warm_up_compiler(device: torch.device, dtype: str) -> float:
    """Seconds to compile and run a tiny conv–norm–activation net, forward and backward.

    The first torch.compile in a process pays one-off costs (importing inductor, starting its
    compile workers, the C++/Triton toolchain), which would otherwise land on the first network.
    """
    tiny = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.InstanceNorm3d(2, affine=True),
                         nn.LeakyReLU(inplace=True), nn.ConvTranspose3d(2, 2, 2, 2)).to(device)
    compiled = torch.compile(tiny)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    _sync(device)
    start = time.perf_counter()
    with autocast:
        output = compiled(torch.randn(1, 1, 8, 8, 8, device=device))
    output.float().mean().backward()
    _sync(device)
    return time.perf_counter() - start


def time_training_steps(net: nn.Module, image: torch.Tensor, label: torch.Tensor, *,
                        steps: int, warmup: int, dtype: str, count_flops: bool = False) -> dict:
    """Median step time of ``net`` (already on the device) and what the steps showed."""
    device = image.device
    parameters = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, **SGD)
    loss_fn = SegmentationLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    net.train()
    shapes: list[list[int]] = []

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            outputs = net(image)
            loss = loss_fn(outputs, label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, CLIP_NORM)
        optimizer.step()
        if not shapes:
            shapes.extend(list(o.shape) for o in (outputs if isinstance(outputs, list)
                                                  else [outputs]))
        return loss.detach()

    flops = None
    first = None
    for index in range(warmup):
        _sync(device)
        start = time.perf_counter()
        if index == 0 and count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        else:
            step()
        _sync(device)
        if index == 0:
            first = time.perf_counter() - start
    times = []
    loss = None
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {"median_step_seconds": _significant(median),
              "steps_per_second": _significant(1 / median),
              "step_seconds_range": [_significant(min(times)), _significant(max(times))],
              "first_warmup_step_seconds": None if first is None else _significant(first),
              "peak_memory_mb": round(peak_memory_mb(device), 1),
              "final_loss": None if loss is None else _significant(float(loss)),
              "output_shapes": shapes}
    if flops is not None:
        result["tflop_per_step"] = _significant(flops / 1e12)
    return result


def network_step_rates(device: torch.device, *, patch: Sequence[int] = (128, 128, 128),
                       batch_size: int = 2, features: Sequence[int] | None = None,
                       in_channels: int | None = None, out_channels: int | None = None,
                       steps: int = 50, warmup: int = 10, dtype: str = "bf16",
                       compile: bool = False, common: dict | None = None,
                       report: Callable[[dict], None] = emit) -> list[dict]:
    """Time training steps of ours, nnU-Net's PlainConvUNet and MONAI's DynUNet alike.

    Every network starts from the seed 0 on the same random batch; each variant (eager, and
    compiled with ``compile``) gets a fresh network and optimizer. Every record is passed to
    ``report`` (one JSON line each by default) and returned, the "ratio" record last.
    """
    if warmup < 1 or steps < 1:
        raise ValueError(f"warmup={warmup}, steps={steps}: both must be at least 1 (the first "
                         "warm-up step compiles, tunes kernels and counts FLOPs)")
    torch.backends.cudnn.benchmark = True  # for every network alike, as nnU-Net trains
    init_args = plain_init_args(features, in_channels, out_channels)
    check_patch(patch, len(init_args["features"]))
    common = {**(common or {}), "features": list(init_args["features"]),
              "in_channels": init_args["in_channels"], "classes": init_args["out_channels"],
              "optimizer": "SGD(lr=1e-2, momentum=0.99, nesterov, weight_decay=3e-5)",
              "loss": "SegmentationLoss(DiceCE, nnU-Net deep-supervision weights)",
              "steps": steps, "warmup": warmup}
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, init_args["in_channels"], *patch,
                        generator=generator).to(device)
    label = torch.randint(0, init_args["out_channels"], (batch_size, 1, *patch),
                          generator=generator).to(device)
    variants = ["eager", *(["compiled"] if compile else [])]
    compiler_warmup = _significant(warm_up_compiler(device, dtype)) if compile else None
    records: list[dict] = []
    measured: dict[str, dict[str, dict]] = {}
    breakdowns: dict[str, dict[str, int]] = {}
    for name, factory in network_factories(init_args).items():
        if isinstance(factory, str):
            record = {"benchmark": "train_step", "method": name, "skipped": factory, **common}
            records.append(record)
            report(record)
            continue
        flops = None
        for variant in variants:
            _release(device)
            torch.manual_seed(0)
            net = factory().to(device)
            breakdowns[name] = parameter_breakdown(net)
            runner = torch.compile(net) if variant == "compiled" else net
            result = time_training_steps(runner, image, label, steps=steps, warmup=warmup,
                                         dtype=dtype, count_flops=variant == "eager")
            flops = result.pop("tflop_per_step", flops)
            measured.setdefault(name, {})[variant] = result
            record = {"benchmark": "train_step", "method": name, "variant": variant,
                      "parameters": breakdowns[name]["total"],
                      "parameter_breakdown": breakdowns[name], **result}
            if flops is not None:
                record["tflop_per_step"] = flops
                record["achieved_tflops"] = _significant(flops * result["steps_per_second"])
            if variant == "compiled":
                record["compile_seconds"] = _significant(
                    result["first_warmup_step_seconds"] - result["median_step_seconds"])
                record["compiler_warmup_seconds"] = compiler_warmup  # paid once, before all
            record.update(common)
            records.append(record)
            report(record)
            del net, runner
        _release(device)
    ours = measured.get(OURS, {})
    peers = [name for name in measured if name != OURS]
    ratio = {"benchmark": "train_step", "method": "ratio",
             "steps_per_second_ratio": {
                 variant: {peer: _significant(ours[variant]["steps_per_second"]
                                              / measured[peer][variant]["steps_per_second"])
                           for peer in peers}
                 for variant in variants},
             "parameter_difference": {peer: breakdowns[OURS]["total"] - breakdowns[peer]["total"]
                                      for peer in peers},
             "parameter_difference_explained": {
                 peer: explain_difference(breakdowns[OURS], breakdowns[peer]) for peer in peers},
             "same_output_shapes": {peer: measured[peer]["eager"]["output_shapes"]
                                    == ours["eager"]["output_shapes"] for peer in peers},
             **common}
    records.append(ratio)
    report(ratio)
    return records


# ------------------------------------------------------------------------- sections
def networks_section(args: argparse.Namespace, device: torch.device, common: dict) -> None:
    network_step_rates(device, patch=args.patch, batch_size=args.batch_size,
                       features=args.features, in_channels=args.in_channels,
                       out_channels=args.classes, steps=args.steps, warmup=args.warmup,
                       dtype=args.dtype, compile=args.compile, common=common)


def _dataset(args: argparse.Namespace) -> Path:
    """--data, or synthetic --scan-sized volumes written once per run into a temporary folder."""
    if args.data:
        return Path(args.data)
    if getattr(args, "_synthetic", None) is None:
        args._synthetic = tempfile.TemporaryDirectory()
        synthetic_dataset(Path(args._synthetic.name), args.scan, args.cases)
    return Path(args._synthetic.name)


def augmentation_only_section(args: argparse.Namespace, device: torch.device, common: dict
                              ) -> None:
    augmentation_section(args, device, common, emit)


def loader_section(args: argparse.Namespace, device: torch.device, common: dict) -> None:
    data_loader_section(args, device, common, emit, _dataset(args))


def fit_throughput_section(args: argparse.Namespace, device: torch.device, common: dict
                           ) -> None:
    root = _dataset(args)
    classes = len(json.loads((root / "dataset.json").read_text())["labels"])
    init_args = plain_init_args(args.features, args.in_channels, classes)
    fit_section(args, device, {**common, "features": init_args["features"], "classes": classes},
                emit, root, lambda: build_ours(init_args))


SECTION_RUNNERS: dict[str, Callable[[argparse.Namespace, torch.device, dict], None]] = {
    "networks": networks_section, "augmentation": augmentation_only_section,
    "loader": loader_section, "fit": fit_throughput_section}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections, run in this order (of {SECTIONS})")
    parser.add_argument("--patch", type=int, nargs=3, default=None,
                        help="training patch (default 128 128 128 on a GPU, 64 64 32 on the CPU)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--features", type=int, nargs="+", default=None,
                        help="channels per stage (default the config's 32..320 on a GPU, "
                             "8 16 32 64 128 128 on the CPU)")
    parser.add_argument("--in-channels", type=int, default=None,
                        help="image channels (default the config's, 1)")
    parser.add_argument("--classes", type=int, default=None,
                        help="output classes, background included (default the config's, 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default 50 on a GPU, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 10 on a GPU, 2 on the CPU)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast or fp32 (default bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile(network) (default on a GPU only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: intra-op threads (default 1; see the module docstring)")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    fill_data_defaults(args, gpu)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTION_RUNNERS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTION_RUNNERS)}")
    args.patch = tuple(args.patch or ((128, 128, 128) if gpu else (64, 64, 32)))
    if args.features is None and not gpu:
        args.features = [8, 16, 32, 64, 128, 128]
    args.steps = args.steps or (50 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.compile = gpu if args.compile is None else args.compile
    args.threads = args.threads or (None if gpu else 1)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = True  # for every network alike, as nnU-Net trains
    common = {"device": str(torch.cuda.get_device_name(device) if gpu else "cpu"),
              "torch": torch.__version__, "dtype": args.dtype, "patch": list(args.patch),
              "batch_size": args.batch_size,
              "peak_memory": ("torch.cuda.max_memory_allocated" if gpu
                              else "process max RSS so far (upper bound)")}
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not gpu:
        common["cpu_threads"] = torch.get_num_threads()
    try:
        for section in args.sections:
            SECTION_RUNNERS[section](args, device, common)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test session
        if getattr(args, "_synthetic", None) is not None:
            args._synthetic.cleanup()


if __name__ == "__main__":
    main()

"""Whole-volume inference speed and memory: our Predictor against MONAI's sliding window.

Both run in the same process on the same network, volume, window, overlap (0.5) and Gaussian
blending, and every measurement is one JSON line on stdout; a "ratio" line per variant of ours
gives its speed-up over MONAI's and the largest logit difference between the two. Variants:
"segmentation_predictor" (the network as given), with --compile "segmentation_predictor_compiled"
(torch.compile of the network with static shapes, as `segmentation infer --compile` runs it;
compilation happens in the untimed warm-up run) and, with --channels-last,
"segmentation_predictor_channels_last" (a copy of the network converted to channels-last
memory format, windows fed channels-last; on an H100 channels_last_3d has made bf16 U-Nets
slower, so it is off unless asked for). Further lines
time the overlap-tile path of a "valid"-convolution U-Net (MONAI has no peer for it) with tiles
of the training patch and with the larger inference tiles, and their ratio.

--large runs `segmentation infer`'s whole path (load, preprocess, predict, invert, write) on a
CT-sized 512×512×400 scan at its native spacing, and reports seconds and peak memory: on a GPU
the stitching buffers move to the CPU when they would not fit, so a 16 GB card is enough.

GPU reference settings (the figure to compare with: MONAI 0.33 s per volume on one H100 with
the nnU-Net-sized plain network, bf16 autocast):
    python scripts/benchmark.py --device cuda --volume 256 256 256 --roi 128 128 128 \
        --dtype bf16 --repeats 5 --compile
CPU defaults (volume 96³, windows 64³, fp32, one timed repeat after a warm-up) finish in about
two minutes on two cores; --large on the CPU takes about six minutes more (294 windows of 128³).
Peak memory: torch.cuda.max_memory_allocated per method on a GPU; on
the CPU the process's peak resident set size so far (it only grows, so read it as an upper
bound for each method).

--gradient-flow times training instead of inference: steps of the quickstart-sized 3D U-Net
(8..64 channels, deep supervision, 48×48×32 patches, batch 2, AdamW, clipping at 12) in a plain
Lightning Trainer fit without and with the GradientFlow callback at the interval samples=200
gives for the benchmarked length (every step for fewer than 400 steps), and the time spent in
the callback per record, from which the overhead at any interval follows:
overhead = record cost / (every_n_steps × step time). About 2 minutes on two CPU cores:
    python scripts/benchmark.py --gradient-flow [--gradient-flow-steps 12]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from segmentation import UNet
from segmentation.data.layout import Case
from segmentation.data.preprocessing import Preprocessing
from segmentation.inference.checkpoint import CheckpointRecord, write_network_checkpoint
from segmentation.inference.predictor import Predictor
from segmentation.inference.segmenter import Segmenter
from segmentation.inference.tiling import inference_tile


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(run: Callable[[], torch.Tensor], device: torch.device, repeats: int
          ) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``repeats`` runs after one warm-up run, and the warm-up's output."""
    output = run()  # warm-up (cuDNN autotuning, oneDNN primitives, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times, output


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    if sys.argv[1:2] == ["train"]:  # training-step speed: scripts/benchmark_train.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from benchmark_train import main as train_main
        return train_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--volume", type=int, nargs=3, default=None)
    parser.add_argument("--roi", type=int, nargs=3, default=None)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=None,
                        help="windows per forward pass (default 4 on a GPU, 2 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs after the warm-up (default 3 on a GPU, 1 on the CPU)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    parser.add_argument("--channels-last", action="store_true",
                        help="also time ours with a channels-last network")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with torch.compile(net) (compiled in the warm-up)")
    parser.add_argument("--large", action="store_true",
                        help="also run infer's whole path on a 512×512×400 CT-sized scan")
    parser.add_argument("--large-scan", type=int, nargs=3, default=(512, 512, 400),
                        help="--large: the scan's shape (default 512 512 400)")
    parser.add_argument("--gpu-memory-gb", type=float, default=16.0,
                        help="--large on a GPU: cap this process's GPU memory (default 16)")
    parser.add_argument("--valid", action=argparse.BooleanOptionalAction, default=True,
                        help="also time overlap-tile with a valid network trained on --roi "
                             "patches (3 poolings on a GPU, 2 on the CPU)")
    parser.add_argument("--gradient-flow", action="store_true",
                        help="instead of inference, time training steps without and with the "
                             "GradientFlow callback and report its cost per record")
    parser.add_argument("--gradient-flow-steps", type=int, default=12,
                        help="--gradient-flow: optimizer steps per timed fit (default 12)")
    parser.add_argument("--gradient-flow-patch", type=int, nargs=3, default=(48, 48, 32),
                        help="--gradient-flow: training patch (default 48 48 32, the quickstart's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = True  # for both methods alike, as `segmentation infer` does
    if args.gradient_flow:
        gradient_flow_overhead(device, args.gradient_flow_steps, tuple(args.gradient_flow_patch),
                               dtype=args.dtype or ("bf16" if gpu else "fp32"))
        return
    volume = tuple(args.volume or ((256,) * 3 if gpu else (96,) * 3))
    roi = tuple(args.roi or ((128,) * 3 if gpu else (64,) * 3))
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    repeats = args.repeats or (3 if gpu else 1)
    sw_batch_size = args.sw_batch_size or (4 if gpu else 2)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    common = {"device": str(torch.cuda.get_device_name(device) if gpu else "cpu"),
              "volume": volume, "roi": roi, "overlap": args.overlap, "dtype": dtype,
              "sw_batch_size": sw_batch_size, "torch": torch.__version__}

    # nnU-Net 3d_fullres "plain" sizes (32..320 channels, strided downsampling).
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, features=[32, 64, 128, 256, 320, 320],
               downsample="conv").to(device).eval()
    image = torch.randn(1, 1, *volume, device=device)

    def monai_run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return sliding_window_inference(image, roi, sw_batch_size, net,
                                            overlap=args.overlap, mode="gaussian")

    variants = {"segmentation_predictor": (net, False)}
    if args.channels_last:
        converted = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
        variants["segmentation_predictor_channels_last"] = (converted, True)
    if args.compile:
        variants["segmentation_predictor_compiled"] = (torch.compile(net, dynamic=False), False)
    runs: dict[str, Callable[[], torch.Tensor]] = {"monai_sliding_window": monai_run}
    for name, (variant_net, channels_last) in variants.items():
        predictor = Predictor(variant_net, roi, overlap=args.overlap, batch_size=sw_batch_size,
                              precision=dtype, channels_last=channels_last,
                              fixed_batch=name == "segmentation_predictor_compiled")

        def ours_run(predictor: Predictor = predictor) -> torch.Tensor:
            with torch.inference_mode():
                return predictor(image)

        runs[name] = ours_run

    results, outputs = {}, {}
    for name, run in runs.items():
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times, outputs[name] = timed(run, device, repeats)
        results[name] = statistics.median(times)
        emit({"benchmark": "same_padding_whole_volume", "method": name,
              "seconds_per_volume": round(results[name], 4), "runs": [round(t, 4) for t in times],
              "peak_memory_mb": round(peak_memory_mb(device), 1), **common})
    for name in variants:
        difference = (outputs["monai_sliding_window"].float()
                      - outputs[name].float()).abs().max().item()
        emit({"benchmark": "same_padding_whole_volume", "method": "ratio", "variant": name,
              "speedup_vs_monai": round(results["monai_sliding_window"] / results[name], 3),
              "max_abs_logit_difference": difference, **common})
    del outputs

    if args.valid:
        valid_overlap_tile(image, roi, sw_batch_size, autocast, repeats, common)
    if args.large:
        large_volume(device, tuple(args.large_scan), args.overlap, dtype, sw_batch_size, common,
                     args.gpu_memory_gb)


def valid_overlap_tile(image: torch.Tensor, roi: tuple[int, ...], sw_batch_size: int,
                       autocast: torch.autocast, repeats: int, common: dict) -> None:
    """Overlap-tile on a valid-convolution U-Net: training-patch tiles against inference tiles.

    MONAI has no peer for this path; the peer is our own overlap-tile with tiles of the training
    patch (``tile_scale=1``), against tiles grown up to 4 training patches (the default).
    """
    device, gpu = image.device, image.device.type == "cuda"
    features = [32, 64, 128, 256] if gpu else [32, 64, 128]
    valid = UNet(spatial_dims=3, in_channels=1, out_channels=3, features=features,
                 padding="valid", norm="batch").to(device).eval()
    patch = valid.valid_input_shape(roi)  # the "training patch"
    seconds, outputs = {}, {}
    for name, scale in (("overlap_tile_training_patch", 1.0), ("overlap_tile_inference_tile", 4.0)):
        predictor = Predictor(valid, patch, batch_size=sw_batch_size, tile_scale=scale)

        def tile_run(predictor: Predictor = predictor) -> torch.Tensor:
            with torch.inference_mode(), autocast:
                return predictor(image)

        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times, outputs[name] = timed(tile_run, device, repeats)
        seconds[name] = statistics.median(times)
        tile = inference_tile(valid, patch, image.shape[2:], scale)
        emit({"benchmark": "valid_padding_overlap_tile", "method": name, "features": features,
              "input_tile": tile, "output_tile": valid.output_shape(tile),
              "seconds_per_volume": round(seconds[name], 4),
              "peak_memory_mb": round(peak_memory_mb(device), 1), **common})
    emit({"benchmark": "valid_padding_overlap_tile", "method": "ratio",
          "speedup_vs_training_patch": round(seconds["overlap_tile_training_patch"]
                                             / seconds["overlap_tile_inference_tile"], 3),
          "max_abs_logit_difference": (outputs["overlap_tile_training_patch"]
                                       - outputs["overlap_tile_inference_tile"]
                                       ).abs().max().item(), **common})


def large_volume(device: torch.device, shape: tuple[int, ...], overlap: float, dtype: str,
                 sw_batch_size: int, common: dict, gpu_memory_gb: float | None = None) -> None:
    """`segmentation infer`'s path on a CT-sized scan, in a fresh process (clean peak)."""
    context = torch.multiprocessing.get_context("spawn")
    child = context.Process(target=_large_volume_child,
                            args=(str(device), shape, overlap, dtype, sw_batch_size, common,
                                  gpu_memory_gb))
    child.start()
    child.join()
    if child.exitcode != 0:
        emit({"benchmark": "large_volume_infer", "error": f"exit code {child.exitcode}",
              **common})


def _large_volume_child(device_name: str, shape: tuple[int, ...], overlap: float, dtype: str,
                        sw_batch_size: int, common: dict, gpu_memory_gb: float | None) -> None:
    device = torch.device(device_name)
    gpu = device.type == "cuda"
    if gpu and gpu_memory_gb:  # behave like a smaller card
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(gpu_memory_gb * 2**30 / total, 1.0),
                                                   device)
    spacing, window = (0.78, 0.78, 1.25), (128, 128, 128)
    # nnU-Net-sized plain network on a GPU; the quickstart's on the CPU (same memory path)
    features = [32, 64, 128, 256, 320, 320] if gpu else [8, 16, 32, 64]
    net = UNet(spatial_dims=3, in_channels=1, out_channels=4, features=features,
               downsample="conv" if gpu else "maxpool")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_network_checkpoint(root / "model.ckpt", net, CheckpointRecord(
            net=net.config, preprocessing=Preprocessing(spacing=None, normalization="zscore"),
            label_names={0: "background", 1: "liver", 2: "kidney", 3: "tumour"},
            patch_size=window, overlap=overlap, batch_size=sw_batch_size))
        # an LPS CT volume (as DICOM converters write it): HU-like smooth noise
        rng = np.random.default_rng(0)
        volume = rng.integers(-1000, 1500, size=shape, dtype=np.int16)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        scan = root / "ct_0000.nii"
        nib.save(nib.Nifti1Image(volume, affine), scan)
        del volume
        segmenter = Segmenter(root / "model.ckpt", device=str(device), precision=dtype,
                              note=lambda message: emit({"note": message}))
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        (root / "out").mkdir()
        written = segmenter.segment(Case("ct", (scan,), None), root / "out")
        seconds = time.perf_counter() - start
        mask = nib.load(str(written[0]))
        emit({"benchmark": "large_volume_infer", "method": "segmentation_infer",
              "scan": shape, "spacing": spacing, "window": window, "features": features,
              "seconds": round(seconds, 2),
              "peak_process_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                           / 1024, 1),
              "peak_gpu_memory_mb": round(peak_memory_mb(device), 1) if gpu else None,
              "gpu_memory_cap_gb": gpu_memory_gb if gpu else None,
              "output_shape_matches": tuple(mask.shape) == shape,
              "output_affine_matches": bool(np.allclose(mask.affine, affine)),
              **{**common, "roi": window, "volume": shape}})


# Runs of this length, and the interval GradientFlow's default samples=200 gives them.
REFERENCE_RUNS = {"quickstart (1000 steps)": 1000, "nnU-Net (250000 steps)": 250_000}


def gradient_flow_overhead(device: torch.device, steps: int, patch: tuple[int, ...], *,
                           dtype: str = "fp32", batch_size: int = 2, samples: int = 200,
                           features: tuple[int, ...] = (8, 16, 32, 64)) -> None:
    """Training-step time without and with GradientFlow, and the callback's cost per record.

    Both fits start from the same weights on the same random patches, after an untimed
    warm-up fit. A step's time is the interval between consecutive batch starts (forward,
    backward, optimizer, every hook), median over the steps after the first. The record cost
    is the time spent in the callback's hooks per record (measured in them, so it does not
    drown in the step time's noise); the npz write, once per epoch, is reported apart.
    """
    import pytorch_lightning as pl

    from segmentation.training.gradient_flow import GradientFlow, record_interval
    from segmentation.training.module import SegmentationModule

    class StepClock(pl.Callback):
        """perf_counter at every batch start."""

        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, *args: object) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.starts.append(time.perf_counter())

        def median_step(self) -> float:
            return float(np.median(np.diff(self.starts)[1:]))  # the first step warms up

    class TimedGradientFlow(GradientFlow):
        """GradientFlow that times its own hooks."""

        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.record_seconds: list[float] = []
            self.write_seconds: list[float] = []
            self._started = 0.0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            start = time.perf_counter()
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self._started = time.perf_counter() - start  # what the after-step hook adds to

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            recorded = len(self._rows)
            start = time.perf_counter()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if len(self._rows) > recorded:  # a record was completed
                self.record_seconds.append(self._started + time.perf_counter() - start)

        def _write(self, summary: bool = False) -> None:
            start = time.perf_counter()
            super()._write(summary)
            self.write_seconds.append(time.perf_counter() - start)

    generator = torch.Generator().manual_seed(0)
    pool = [{"image": torch.randn(1, *patch, generator=generator),
             "label": torch.randint(0, 4, (1, *patch), generator=generator)} for _ in range(4)]
    precision = "bf16-mixed" if dtype == "bf16" else "32-true"

    def timed_fit(fit_steps: int, callback: GradientFlow | None, root: str) -> StepClock:
        torch.manual_seed(0)
        net = UNet(spatial_dims=3, in_channels=1, out_channels=4, features=list(features),
                   deep_supervision=True)
        module = SegmentationModule(net, optimizer=lambda params: torch.optim.AdamW(
            params, lr=3e-3, weight_decay=1e-4))
        clock = StepClock()
        trainer = pl.Trainer(accelerator=device.type, devices=1, precision=precision,
                             max_steps=fit_steps, gradient_clip_val=12, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0,
                             default_root_dir=root,
                             callbacks=[clock, *([callback] if callback else [])])
        data = [pool[i % len(pool)] for i in range(fit_steps * batch_size)]
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(
            data, batch_size=batch_size))
        return clock

    interval = record_interval(steps, samples)
    with tempfile.TemporaryDirectory() as root:
        timed_fit(2, None, root)  # warm-up: allocator, oneDNN/cuDNN kernels
        without = timed_fit(steps, None, root).median_step()
        flow = TimedGradientFlow(samples=samples)
        with_flow = timed_fit(steps, flow, root).median_step()
    common = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
              "features": list(features), "patch": list(patch), "batch_size": batch_size,
              "optimizer": "AdamW", "dtype": dtype, "steps": steps, "torch": torch.__version__}
    emit({"benchmark": "gradient_flow_training_step", "method": "without_gradient_flow",
          "median_step_seconds": round(without, 4), **common})
    emit({"benchmark": "gradient_flow_training_step", "method": "with_gradient_flow",
          "every_n_steps": interval, "records": len(flow.record_seconds),
          "median_step_seconds": round(with_flow, 4), **common})
    record = float(np.median(flow.record_seconds))
    at_interval = {f"every {n} steps": n for n in (interval, 5, 50, 1250)}
    emit({"benchmark": "gradient_flow_training_step", "method": "overhead",
          "record_seconds": round(record, 5),
          "write_seconds": round(float(np.median(flow.write_seconds)), 5),
          "step_seconds": round(without, 4),
          "measured_step_overhead_percent": round(100 * (with_flow - without) / without, 2),
          "overhead_percent": {name: round(100 * record / (n * without), 4)
                               for name, n in at_interval.items()},
          "default_interval": {name: record_interval(length, samples)
                               for name, length in REFERENCE_RUNS.items()},
          **common})


if __name__ == "__main__":
    main()

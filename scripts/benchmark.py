"""Whole-volume inference speed and memory: our Predictor against MONAI's sliding window.

Both run in the same process on the same network, volume, window, overlap and blending, and
every measurement is one JSON line on stdout, with the ratio against the peer.

GPU reference settings (the figure to compare with: MONAI 0.33 s per volume on one H100 with
the nnU-Net-sized plain network, bf16):
    python scripts/benchmark.py --device cuda --volume 256 256 256 --roi 128 128 128 --dtype bf16
CPU defaults (96³ volume, 64³ windows) are small: a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable

import torch
from monai.inferers import sliding_window_inference

from segmentation import UNet
from segmentation.inference.predictor import Predictor
from segmentation.inference.tiling import overlap_tile


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(run: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> list[float]:
    run()  # warm-up (cuDNN autotuning, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--volume", type=int, nargs=3, default=None)
    parser.add_argument("--roi", type=int, nargs=3, default=None)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    parser.add_argument("--valid", action=argparse.BooleanOptionalAction, default=None,
                        help="also time overlap-tile with a valid network (default: on a GPU; "
                             "its 156³ tiles take minutes on a CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    volume = tuple(args.volume or ((256,) * 3 if gpu else (96,) * 3))
    roi = tuple(args.roi or ((128,) * 3 if gpu else (64,) * 3))
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    common = {"device": str(torch.cuda.get_device_name(device) if gpu else "cpu"),
              "volume": volume, "roi": roi, "overlap": args.overlap, "dtype": dtype,
              "sw_batch_size": args.sw_batch_size, "torch": torch.__version__}

    # nnU-Net 3d_fullres "plain" sizes (32..320 channels, strided downsampling).
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, features=[32, 64, 128, 256, 320, 320],
               downsample="conv").to(device).eval()
    image = torch.randn(1, 1, *volume, device=device)

    def monai_run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return sliding_window_inference(image, roi, args.sw_batch_size, net,
                                            overlap=args.overlap, mode="gaussian")

    predictor = Predictor(net, roi, overlap=args.overlap, batch_size=args.sw_batch_size)

    def ours_run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return predictor(image)

    with torch.inference_mode(), autocast:
        difference = (monai_run().float() - ours_run().float()).abs().max().item()
    results = {}
    for name, run in (("monai_sliding_window", monai_run), ("segmentation_predictor", ours_run)):
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times = timed(run, device, args.repeats)
        results[name] = statistics.median(times)
        emit({"benchmark": "same_padding_whole_volume", "method": name,
              "seconds_per_volume": round(results[name], 4), "runs": [round(t, 4) for t in times],
              "peak_memory_mb": round(peak_memory_mb(device), 1), **common})
    emit({"benchmark": "same_padding_whole_volume", "method": "ratio",
          "speedup_vs_monai": round(results["monai_sliding_window"]
                                    / results["segmentation_predictor"], 3),
          "max_abs_logit_difference": difference, **common})

    if not (gpu if args.valid is None else args.valid):
        return
    # A valid-convolution network (3D U-Net-like, 3 poolings), run by overlap-tile; MONAI has
    # no peer for it. Its tiles are as large as needed for an output of the window size.
    valid = UNet(spatial_dims=3, in_channels=1, out_channels=3, features=[32, 64, 128, 256],
                 padding="valid", norm="batch").to(device).eval()
    tile = valid.input_shape_for_output(roi)
    out_tile = valid.output_shape(tile)

    def tile_run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return overlap_tile(valid, image, tile, out_tile, valid.depth,
                                batch_size=args.sw_batch_size)

    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(tile_run, device, args.repeats)
    emit({"benchmark": "valid_padding_overlap_tile", "method": "segmentation_overlap_tile",
          "input_tile": tile, "output_tile": out_tile,
          "seconds_per_volume": round(statistics.median(times), 4),
          "peak_memory_mb": round(peak_memory_mb(device), 1), **common})


if __name__ == "__main__":
    main()

"""Whole-volume inference speed and memory: our Predictor against MONAI's sliding window.

Both run in the same process on the same network, volume, window, overlap (0.5) and Gaussian
blending, and every measurement is one JSON line on stdout; a "ratio" line gives the speed-up of
ours over MONAI's and the largest logit difference between the two. A last line times the
overlap-tile path on a "valid"-convolution U-Net (MONAI has no peer for it).

GPU reference settings (the figure to compare with: MONAI 0.33 s per volume on one H100 with
the nnU-Net-sized plain network, bf16 autocast):
    python scripts/benchmark.py --device cuda --volume 256 256 256 --roi 128 128 128 \
        --dtype bf16 --repeats 5
CPU defaults (volume 96³, windows 64³, fp32, one timed repeat after a warm-up) finish in about
two minutes on two cores. Peak memory: torch.cuda.max_memory_allocated per method on a GPU; on
the CPU the process's peak resident set size so far (it only grows, so read it as an upper
bound for each method).
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
    parser.add_argument("--valid", action=argparse.BooleanOptionalAction, default=True,
                        help="also time overlap-tile with a valid network (3 poolings on a GPU, "
                             "2 on the CPU, where 156³ tiles would take minutes)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
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

    predictor = Predictor(net, roi, overlap=args.overlap, batch_size=sw_batch_size)

    def ours_run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return predictor(image)

    results, outputs = {}, {}
    for name, run in (("monai_sliding_window", monai_run), ("segmentation_predictor", ours_run)):
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times, outputs[name] = timed(run, device, repeats)
        results[name] = statistics.median(times)
        emit({"benchmark": "same_padding_whole_volume", "method": name,
              "seconds_per_volume": round(results[name], 4), "runs": [round(t, 4) for t in times],
              "peak_memory_mb": round(peak_memory_mb(device), 1), **common})
    difference = (outputs["monai_sliding_window"].float()
                  - outputs["segmentation_predictor"].float()).abs().max().item()
    emit({"benchmark": "same_padding_whole_volume", "method": "ratio",
          "speedup_vs_monai": round(results["monai_sliding_window"]
                                    / results["segmentation_predictor"], 3),
          "max_abs_logit_difference": difference, **common})
    del outputs

    if not args.valid:
        return
    # A valid-convolution network (3D U-Net-like), run by overlap-tile; MONAI has no peer for
    # it. Its tiles are as large as needed for an output of the window size.
    features = [32, 64, 128, 256] if gpu else [32, 64, 128]
    valid = UNet(spatial_dims=3, in_channels=1, out_channels=3, features=features,
                 padding="valid", norm="batch").to(device).eval()
    tile = valid.input_shape_for_output(roi)
    out_tile = valid.output_shape(tile)

    def tile_run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return overlap_tile(valid, image, tile, out_tile, valid.depth,
                                batch_size=sw_batch_size)

    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times, _ = timed(tile_run, device, repeats)
    emit({"benchmark": "valid_padding_overlap_tile", "method": "segmentation_overlap_tile",
          "features": features, "input_tile": tile, "output_tile": out_tile,
          "seconds_per_volume": round(statistics.median(times), 4),
          "peak_memory_mb": round(peak_memory_mb(device), 1), **common})


if __name__ == "__main__":
    main()

"""Sections "augmentation", "loader" and "fit" of `scripts/benchmark.py train`: does the data
pipeline keep up?

"augmentation": the augmentation alone, MONAI's chain per patch (as the CPU workers run it)
against the batched path (as the device runs it), same settings, same device, no loading.

"loader": patches/s of the real training DataLoader (SegmentationDataModule on a synthetic
dataset of --scan-sized volumes, or --data), with the per-sample CPU chain (MONAI's transforms
in the workers) and with device augmentation (workers cut windows, the batch is augmented on
--device after transfer), for each --workers count; a "ratio" line per count gives device over
CPU. Each rate includes the copy to the device and, for the device path, its augmentation, and
starts after --loader-warmup batches (worker start-up, allocator).

"fit": end-to-end `Trainer.fit` throughput (patches/s over real steps with augmentation) of
our U-Net on that data, as a fraction of its pure step rate: the same fit on one batch already
on the device (no loading, no augmentation). Lightning's per-step work is in both, so the
fraction is what the data pipeline costs. With --sync-debug on CUDA each fit also reports
every host-device synchronisation by the line that caused it (a training step should have
none; the timings of such a run include the warnings' cost).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytorch_lightning as pl
import torch

from segmentation.data.datamodule import SegmentationDataModule
from segmentation.data.synth import generate_dataset


def synthetic_dataset(root: Path, scan: Sequence[int], cases: int) -> Path:
    """--cases synthetic volumes of --scan voxels (organ, vessel, lesion) under ``root``."""
    generate_dataset(root, cases=cases, test_cases=0, seed=0, shape=tuple(scan))
    return root


def data_module(root: Path, cache_dir: Path, patch: Sequence[int], batch_size: int,
                workers: int, augment_on: str, patches: int,
                network: torch.nn.Module | None = None) -> SegmentationDataModule:
    """The training data module as `segmentation fit` builds it, every case for training."""
    dm = SegmentationDataModule(str(root), fold="all", patch_size=tuple(patch),
                                batch_size=batch_size, patches_per_epoch=patches,
                                num_workers=workers, cache="memory", cache_dir=str(cache_dir),
                                augment=True, augment_on=augment_on, check=False,
                                network=network)
    dm.setup("fit")
    return dm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(dm: SegmentationDataModule, device: torch.device, batches: int,
                warmup: int) -> tuple[float, float]:
    """Patches/s delivered to ``device`` (augmented), in steady state, and the mean voxels of
    what the workers cut, relative to the patch.

    The workers fill a queue of ``2 × workers`` batches (PyTorch's prefetch) while they start;
    those are taken first, with ``warmup`` more, and at least ``4 × workers`` batches are
    timed, so the rate is the workers' production rate, not the emptying of a full queue.
    """
    workers = dm.num_workers
    warmup += 2 * workers
    batches = max(batches, 4 * workers)
    from pytorch_lightning.plugins.precision import Precision

    dm.trainer = SimpleNamespace(training=True, global_rank=0, precision_plugin=Precision(),
                                 strategy=SimpleNamespace(root_device=device))
    loader = dm.train_dataloader()
    iterator = iter(loader)
    patches, start, window_voxels = 0, 0.0, []
    for index in range(warmup + batches):
        if index == warmup:
            _sync(device)
            start = time.perf_counter()
        batch = dm.on_before_batch_transfer(next(iterator), 0)      # as Lightning does
        window_voxels += [x.shape[1:].numel() for x in batch["image"]]
        batch = {k: _to(v, device) for k, v in batch.items()}
        batch = dm.on_after_batch_transfer(batch, 0)
        if index >= warmup:
            patches += batch["image"].shape[0]
    _sync(device)
    seconds = time.perf_counter() - start
    del iterator, loader
    patch_voxels = float(np.prod(dm.input_size))
    return patches / seconds, float(np.mean(window_voxels)) / patch_voxels


def _to(value: torch.Tensor | list[torch.Tensor], device: torch.device
        ) -> torch.Tensor | list[torch.Tensor]:
    if isinstance(value, list):
        return [v.to(device, non_blocking=True) for v in value]
    return value.to(device, non_blocking=True)


def loader_section(args: argparse.Namespace, device: torch.device, common: dict,
                   emit: Callable[[dict], None], root: Path) -> None:
    """Patches/s of the CPU chain and of device augmentation for each worker count."""
    batch = args.batch_size
    info = {**common, "scan": list(args.scan), "workers_tested": list(args.workers)}
    for workers in args.workers:
        length = batch * (args.loader_warmup + max(args.loader_batches, 4 * workers)
                          + 2 * workers + 2)
        rates = {}
        for augment_on in ("cpu", "device"):
            with tempfile.TemporaryDirectory() as cache:
                dm = data_module(root, Path(cache), args.patch, batch, workers, augment_on,
                                 length)
                rates[augment_on], cut = loader_rate(dm, device, args.loader_batches,
                                                     args.loader_warmup)
            emit({"benchmark": "train_loader", "method": f"augment_on_{augment_on}",
                  "workers": workers, "patches_per_second": round(rates[augment_on], 2),
                  "cut_voxels_over_patch": round(cut, 3), **info})
        emit({"benchmark": "train_loader", "method": "ratio", "workers": workers,
              "device_over_cpu": round(rates["device"] / rates["cpu"], 3), **info})


def augmentation_section(args: argparse.Namespace, device: torch.device, common: dict,
                         emit: Callable[[dict], None]) -> None:
    """Augmentation alone: MONAI's chain per patch against the batched path, same settings.

    Both start from random intensities and labels already cut (the patch for the chain; for
    the batched path each patch's window with its rotation and scaling, as the loader delivers
    them) on --device; no loading.
    """
    from monai.transforms import Compose

    from segmentation.data.augmentation_settings import (
        AugmentationSettings,
        draw_spatial,
        sample_window,
        spatial_matrices,
    )
    from segmentation.data.batch_augmentation import BatchAugmentation
    from segmentation.data.patches import intensity_augmentation, spatial_augmentation

    settings, patch, batch = AugmentationSettings(), tuple(args.patch), args.batch_size
    count = args.augmentation_patches
    chain = Compose([*spatial_augmentation(3, settings), *intensity_augmentation(3, settings)])
    chain.set_random_state(0)
    image = torch.randn(1, *patch, device=device)
    label = torch.randint(0, 4, (1, *patch), device=device)
    chain({"image": image.clone(), "label": label.clone()})                 # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(count):
        chain({"image": image.clone(), "label": label.clone()})
    _sync(device)
    per_patch = count / (time.perf_counter() - start)
    batched = BatchAugmentation(settings, patch, patch, seed=0)
    rng = np.random.default_rng(0)
    rounds = max(1, count // batch)
    batches = []  # as the loader delivers them: each patch's window, its rotation and scaling
    for _ in range(rounds + 1):
        rows = draw_spatial(settings, rng, 3, batch)
        matrices = spatial_matrices(rows, 3)
        sizes = [sample_window(m if r[0] > 0.5 or r[1] > 0.5 else None, patch, patch)
                 for r, m in zip(rows, matrices, strict=True)]
        batches.append(([torch.randn(1, *s, device=device) for s in sizes],
                         [torch.randint(0, 4, (1, *s), device=device, dtype=torch.uint8)
                          for s in sizes], rows))
    batched(*batches[0][:2], spatial=batches[0][2])                        # warm-up
    _sync(device)
    start = time.perf_counter()
    for images, labels, rows in batches[1:]:
        batched(images, labels, spatial=rows)
    _sync(device)
    batched_rate = rounds * batch / (time.perf_counter() - start)
    info = {**common, "patches": count}
    emit({"benchmark": "augmentation", "method": "monai_chain_per_patch",
          "patches_per_second": round(per_patch, 2), **info})
    emit({"benchmark": "augmentation", "method": "batched",
          "patches_per_second": round(batched_rate, 2), **info})
    emit({"benchmark": "augmentation", "method": "ratio",
          "batched_over_per_patch": round(batched_rate / per_patch, 3), **info})


class StepClock(pl.Callback):
    """perf_counter at every training batch start (after a device synchronisation)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.starts = device, []

    def on_train_batch_start(self, *args: object) -> None:
        _sync(self.device)
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: object) -> None:
        _sync(self.device)
        self.starts.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> float:
        """Mean seconds per step after ``warmup`` steps (stalls count: mean, not median)."""
        times = np.asarray(self.starts[warmup:])
        return float((times[-1] - times[0]) / (len(times) - 1))


def fit_section(args: argparse.Namespace, device: torch.device, common: dict,
                emit: Callable[[dict], None], root: Path,
                make_network: Callable[[], torch.nn.Module]) -> None:
    """Real fit throughput vs the pure step rate, for each --fit-augment-on."""
    from segmentation.training.module import SegmentationModule

    precision = "bf16-mixed" if args.dtype == "bf16" else "32-true"
    steps, warmup = args.steps, args.warmup

    def fit(module: SegmentationModule, label: str, **data: object) -> float:
        clock = StepClock(device)
        trainer = pl.Trainer(accelerator=device.type, devices=1, precision=precision,
                             max_steps=warmup + steps, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0,
                             gradient_clip_val=12, callbacks=[clock],
                             default_root_dir=str(cache_root))
        if not (args.sync_debug and device.type == "cuda"):
            trainer.fit(module, **data)
            return clock.seconds_per_step(warmup)
        # every host-device synchronisation of the whole fit, by the line that caused it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.fit(module, **data)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        places = Counter(f"{w.filename}:{w.lineno}" for w in caught
                         if "synchroniz" in str(w.message))
        emit({"benchmark": "train_fit", "method": f"synchronisations_{label}",
              "steps": warmup + steps, "total": sum(places.values()),
              "by_place": dict(places.most_common(12)), **common})
        return clock.seconds_per_step(warmup)

    with tempfile.TemporaryDirectory() as folder:
        cache_root = Path(folder)
        torch.manual_seed(0)
        net = make_network()
        module = SegmentationModule(net, patch_size=tuple(args.patch))
        dm = data_module(root, cache_root / "cache", args.patch, args.batch_size, 0, "cpu",
                         args.batch_size, network=net)
        batch = next(iter(dm.train_dataloader()))                    # one augmented batch
        resident = {k: v.to(device) for k, v in batch.items()}
        # batch_size=None: the loader hands out the resident batch itself, no collation
        pure = fit(module, "one_batch_on_device", train_dataloaders=torch.utils.data.DataLoader(
            [resident] * (warmup + steps + 1), batch_size=None))
        emit({"benchmark": "train_fit", "method": "one_batch_on_device",
              "seconds_per_step": round(pure, 4),
              "patches_per_second": round(args.batch_size / pure, 2), **common})
        for augment_on in args.fit_augment_on:
            torch.manual_seed(0)
            net = make_network()
            module = SegmentationModule(net, patch_size=tuple(args.patch))
            length = args.batch_size * (warmup + steps + 1)
            dm = data_module(root, cache_root / f"cache_{augment_on}", args.patch,
                             args.batch_size, args.fit_workers, augment_on, length, network=net)
            real = fit(module, f"augment_on_{augment_on}", datamodule=dm)
            emit({"benchmark": "train_fit", "method": f"augment_on_{augment_on}",
                  "workers": args.fit_workers, "seconds_per_step": round(real, 4),
                  "patches_per_second": round(args.batch_size / real, 2),
                  "fraction_of_pure_step_rate": round(pure / real, 3),
                  "scan": list(args.scan), **common})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The loader and fit sections' options."""
    parser.add_argument("--data", default=None,
                        help="dataset folder (MSD / nnU-Net layout); default: synthetic "
                             "volumes of --scan voxels in a temporary folder")
    parser.add_argument("--scan", type=int, nargs=3, default=None,
                        help="synthetic scan size (default 256³ on a GPU, 128 128 96 on the CPU)")
    parser.add_argument("--cases", type=int, default=4, help="synthetic cases (default 4)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8],
                        help="loader: worker counts to time (default 0 2 4 8)")
    parser.add_argument("--loader-batches", type=int, default=None,
                        help="loader: timed batches per run (default 20 on a GPU, 8 on the CPU)")
    parser.add_argument("--loader-warmup", type=int, default=2,
                        help="loader: untimed batches first (default 2)")
    parser.add_argument("--fit-workers", type=int, default=None,
                        help="fit: loader workers (default 8 on a GPU, 2 on the CPU)")
    parser.add_argument("--fit-augment-on", nargs="+", default=None,
                        choices=("cpu", "device"),
                        help="fit: where augmentation runs (default: device, cpu)")
    parser.add_argument("--augmentation-patches", type=int, default=None,
                        help="augmentation: patches per path (default 200 on a GPU, 40 on "
                             "the CPU)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="fit on CUDA: count host-device synchronisations per source line "
                             "(torch.cuda.set_sync_debug_mode; the timing then includes the "
                             "warnings' cost)")


def fill_defaults(args: argparse.Namespace, gpu: bool) -> None:
    """Device-dependent defaults of the loader and fit options."""
    args.scan = tuple(args.scan or ((256, 256, 256) if gpu else (128, 128, 96)))
    args.loader_batches = args.loader_batches or (20 if gpu else 8)
    args.augmentation_patches = args.augmentation_patches or (200 if gpu else 40)
    args.fit_workers = args.fit_workers if args.fit_workers is not None else (8 if gpu else 2)
    args.fit_augment_on = args.fit_augment_on or ["device", "cpu"]

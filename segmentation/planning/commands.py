"""``segmentation plan DATASET``: fingerprint a dataset, plan networks, write training configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from segmentation.planning.config_writer import write_configs
from segmentation.planning.fingerprint import extract_fingerprint
from segmentation.planning.memory import REFERENCE_GB
from segmentation.planning.rules import check_gpu_memory, plan_dataset
from segmentation.planning.table import plan_table

DEFAULT_OUT = Path("configs/plans")
DEFAULT_CACHE_DIR = ".cache/segmentation"  # the data module's default data.cache_dir


def add_plan_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plan``; it sets ``func`` returning an exit code."""
    plan = subparsers.add_parser(
        "plan", help="plan a 3D and a 2D U-Net for a dataset and a GPU (nnU-Net's rules)",
        description="Read a dataset's spacings and shapes once and plan, with nnU-Net v2's "
                    "default rules, a 3D and a 2D U-Net (target spacing, patch, batch, levels, "
                    "kernels, strides) that fit the GPU memory; write one training config per "
                    "network (OUT/<dataset>_3d.yaml and _2d.yaml) for `segmentation fit "
                    "--config FILE`, and print the plans.")
    plan.add_argument("dataset", type=Path, help="dataset folder (nnU-Net or MSD layout)")
    plan.add_argument("--gpu-memory", type=str, default=str(REFERENCE_GB), metavar="GB",
                      help=f"GPU memory to plan for, in GB (default {REFERENCE_GB:g}, nnU-Net's "
                           "reference)")
    plan.add_argument("--out", type=Path, default=DEFAULT_OUT,
                      help=f"folder for the configs (default {DEFAULT_OUT})")
    plan.add_argument("--overwrite", action="store_true", help="replace existing configs")
    plan.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                      help="where the dataset's fingerprint is stored, so planning again reads "
                           f"no scan (default {DEFAULT_CACHE_DIR}, the data module's)")
    plan.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """``segmentation plan``: validate, fingerprint, plan, write the configs, print the table.

    Raises:
        ValueError: one line naming what to change (a missing dataset, a bad ``--gpu-memory``,
            an existing config without ``--overwrite``); the CLI prints it as ``error: ...``.
    """
    gpu_memory = check_gpu_memory(args.gpu_memory)  # before any scan is read
    if not args.dataset.is_dir():
        raise ValueError(f"{args.dataset}: no such dataset folder; give the folder that holds "
                         "dataset.json, imagesTr/ and labelsTr/")
    fingerprint = extract_fingerprint(args.dataset, args.cache_dir)
    plan = plan_dataset(fingerprint, gpu_memory)
    cache_dir = None if args.cache_dir == DEFAULT_CACHE_DIR else str(args.cache_dir)
    paths = write_configs(plan, args.out, args.dataset, overwrite=args.overwrite,
                          cache_dir=cache_dir)
    Console().print(plan_table(plan))
    for note in plan.notes:
        print(f"note: {note}")
    for path in paths:
        print(f"wrote {path}")
    folds = min(5, plan.num_training)
    if folds > 1:
        rest = "fold 1" if folds == 2 else f"folds 1 to {folds - 1}"
        print(f"train with: segmentation fit --config {paths[0]} --data.fold 0 (then {rest})")
    else:
        print(f"train with: segmentation fit --config {paths[0]} (one case: fold all)")
    return 0

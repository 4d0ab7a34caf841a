"""A plan as a training config that ``segmentation fit --config FILE`` takes as it is.

One self-contained YAML file per configuration (no reference to ``configs/trainer/`` or
``configs/model/``, so the file works from any folder), every planned number commented with
the rule it comes from. The network is :class:`segmentation.UNet` as nnU-Net's plain U-Net
(``configs/model/unet3d_plain.yaml``) with the planned ``features``, ``kernel_sizes`` and
``strides``; the data module gets the planned patch, batch and target spacing (explicitly,
so the preprocessing fitted to each fold resamples to the plan's spacing instead of the
median of that fold's cases).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from segmentation.atomic import write_text_atomic
from segmentation.planning.rules import (
    CROP_THRESHOLD,
    ITERATIONS_PER_EPOCH,
    MAX_DATASET_COVERED,
    MAX_FEATURES,
    ConfigurationPlan,
    DatasetPlan,
)

SW_BATCH_SIZE = {3: 4, 2: 16}  # sliding-window batch of validation and inference
NUM_WORKERS = 8
N_FOLDS = 5  # nnU-Net's cross-validation


def config_path(out_dir: Path, plan: DatasetPlan, configuration: ConfigurationPlan) -> Path:
    """``out_dir/<dataset>_<configuration>.yaml``."""
    return Path(out_dir) / f"{plan.name}_{configuration.name}.yaml"


def _flow(values: object) -> str:
    """A (nested) sequence of numbers in YAML flow style: ``[[1, 3, 3], [3, 3, 3]]``."""
    if isinstance(values, list | tuple):
        return "[" + ", ".join(_flow(v) for v in values) + "]"
    if isinstance(values, float):
        return f"{values:.6g}"
    return str(values)


def _shape(values: Sequence[float]) -> str:
    return " × ".join(f"{v:g}" for v in values)


def format_gb(gb: float) -> str:
    """``6.9 GB``; small plans with two significant digits (``0.031 GB``)."""
    return f"{gb:.1f} GB" if gb >= 1 else f"{gb:.2g} GB"


def _fold_lines(cases: int) -> list[str]:
    """nnU-Net's 5-fold cross-validation; fewer folds for fewer cases, fold "all" for one."""
    if cases < 2:
        return ["  fold: all   # one case: train on it without validation (nnU-Net's fold all)",
                "  n_folds: 5"]
    folds = min(N_FOLDS, cases)
    why = "" if folds == N_FOLDS else f"   # {cases} cases: {folds} folds of one case or more"
    return ["  fold: 0", f"  n_folds: {folds}{why}"]


def render_config(plan: DatasetPlan, configuration: ConfigurationPlan, dataset_root: str,
                  cache_dir: str | None = None, path: str | Path = "<this file>") -> str:
    """The YAML text of one configuration of ``plan``.

    Args:
        plan: the dataset's plan.
        configuration: one of ``plan.configurations``.
        dataset_root: ``data.root`` as it should appear in the file.
        cache_dir: ``data.cache_dir``, when not the data module's default.
        path: where the file goes, for the command in its header.
    """
    c = configuration
    dims = c.spatial_dims
    volume_axes = ", ".join(("left-right", "posterior-anterior", "inferior-superior")
                            [: len(plan.spacing)])
    network_axes = ("the volume's axes without axis "
                    f"{c.slice_axis}" if c.slice_axis is not None else "the volume's axes")
    kind = "3d_fullres" if c.name == "3d" else "2d"
    crop_note = ("crop to the non-zero region, normalise inside it" if plan.crop_foreground
                 else "no crop")
    crop_why = (f"the median case keeps {'less than' if plan.crop_foreground else 'at least'} "
                f"{CROP_THRESHOLD:.0%} of its voxels in its non-zero box (nnU-Net's rule)")
    if plan.num_training >= 2:
        folds = min(N_FOLDS, plan.num_training)
        rest = "fold 1" if folds == 2 else f"folds 1 to {folds - 1}"
        train = [f"# Train fold 0 of the {folds}-fold cross-validation, then {rest}:",
                 f"#   segmentation fit --config {path} --data.fold 0"]
    else:
        train = ["# Train on the one case (fold all):",
                 f"#   segmentation fit --config {path}"]
    lines = [
        f"# Planned by `segmentation plan` with nnU-Net v2's default rules ({kind}) for "
        f"{plan.name}",
        f"# and a GPU with {plan.gpu_memory_gb:g} GB.",
        *train,
        f"# Dataset: {plan.num_training} training cases, {plan.in_channels} channel(s), "
        f"{plan.out_channels} labels incl. background;",
        f"# median shape after resampling {_shape(plan.median_shape)} voxels at "
        f"{_shape(plan.spacing)} mm",
        f"# (axes after reorientation to RAS: {volume_axes}).",
        f"# Network: {c.levels} levels, {c.parameters:,} parameters. Estimated GPU memory of a "
        f"training step:",
        f"# {format_gb(c.estimated_gb)} (bf16-mixed; {c.feature_map_elements:,} feature-map "
        "elements per patch",
        "# at nnU-Net's calibration, see segmentation/planning/memory.py).",
    ]
    for note in plan.notes:
        lines.append(f"# Note: {note}")
    lines += [
        f"name: {plan.name}_{c.name}",
        "seed_everything: 0",
        "trainer:",
        "  # one GPU, nnU-Net's schedule: bf16 mixed precision, 1000 epochs of "
        f"{ITERATIONS_PER_EPOCH} batches,",
        "  # validation every 50 epochs, gradient norm clipped at 12",
        "  accelerator: gpu",
        "  devices: 1",
        "  precision: bf16-mixed",
        "  max_epochs: 1000",
        "  check_val_every_n_epoch: 50",
        "  gradient_clip_val: 12",
        "model:",
        "  # loss, optimizer and schedule are the model's defaults, nnU-Net's: Dice + CE with deep",
        "  # supervision, SGD (Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5), poly decay",
        "  net:",
        "    # nnU-Net's plain U-Net (as configs/model/unet3d_plain.yaml) with the planned levels",
        "    class_path: segmentation.UNet",
        "    init_args:",
        f"      spatial_dims: {dims}",
        f"      in_channels: {plan.in_channels}   # fit takes channels and labels from "
        "dataset.json",
        f"      out_channels: {plan.out_channels}",
        f"      # channels per level: doubling from 32, capped at {MAX_FEATURES[dims]}",
        f"      features: {_flow(c.features)}",
        f"      # per level and axis ({network_axes}): 3, or 1 across an axis",
        "      # more than 2× coarser than the finest",
        f"      kernel_sizes: {_flow(c.kernel_sizes)}",
        "      # per downsampling and axis: 2 while the axis' spacing is within 2× of the finest "
        "and its",
        "      # feature map stays ≥ 4 voxels (≥ 12 when it is the only axis left), else 1",
        f"      strides: {_flow(c.strides)}",
        "      convs_per_level: 2",
        "      decoder_convs_per_level: 2",
        "      padding: same",
        "      encoder_block: plain",
        "      downsample: conv",
        "      upsample: transpose",
        "      norm: instance",
        "      act: leakyrelu",
        "      deep_supervision: true",
        f"  sw_batch_size: {SW_BATCH_SIZE[dims]}",
        "data:",
        f"  root: {dataset_root}",
        *_fold_lines(plan.num_training),
        "  # the planned target spacing in mm, RAS axis order: the median spacing (the 10th "
        "percentile",
        "  # on a strongly anisotropic coarse axis), given explicitly so every fold resamples "
        "alike",
        f"  spacing: {_flow(list(plan.spacing))}",
        f"  normalization: {plan.normalization}   # from dataset.json's channel names, "
        "as nnU-Net",
        f"  # {crop_why}",
        f"  crop_foreground: {'true' if plan.crop_foreground else 'false'}   # {crop_note}",
    ]
    if c.slice_axis is not None:
        lines.append(f"  slice_axis: {c.slice_axis}   # 2D slices across the coarsest axis "
                     "(nnU-Net's 2d configuration)")
    lines += [
        f"  # patch: the median shape's aspect, shrunk to fit {plan.gpu_memory_gb:g} GB at "
        "batch 2",
        f"  patch_size: {_flow(list(c.patch_size))}",
        f"  # batch: fills the budget, ≥ 2, one batch ≤ {MAX_DATASET_COVERED:.0%} of the "
        "dataset's voxels",
        f"  batch_size: {c.batch_size}",
        f"  patches_per_epoch: {ITERATIONS_PER_EPOCH * c.batch_size}   # "
        f"{ITERATIONS_PER_EPOCH} batches",
        f"  num_workers: {NUM_WORKERS}",
        "  cache: disk",
    ]
    if cache_dir is not None:
        lines.append(f"  cache_dir: {cache_dir}")
    return "\n".join(lines) + "\n"


def data_root_text(dataset: str | Path) -> str:
    """``data.root`` as written: the path as given, normalised.

    A relative path is read from the folder ``fit`` runs in; the text is quoted where YAML
    would not read it back as the same string.
    """
    text = os.path.normpath(str(dataset))
    if any(ch in text for ch in ":#{}[],&*!|>'\"%@`") or text != text.strip():
        text = "'" + text.replace("'", "''") + "'"
    return text


def write_configs(plan: DatasetPlan, out_dir: str | Path, dataset_root: str | Path, *,
                  overwrite: bool = False, cache_dir: str | None = None) -> list[Path]:
    """Write every configuration of ``plan`` to ``out_dir`` (created if missing).

    Nothing is written unless every file may be: an existing file is refused without
    ``overwrite``. Each file is written atomically (a reader never sees half of it).

    Raises:
        ValueError: naming the existing file and ``--overwrite``, or a folder that cannot be
            written.
    """
    out_dir = Path(out_dir)
    paths = [config_path(out_dir, plan, c) for c in plan.configurations]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise ValueError(f"{path} exists; pass --overwrite to replace it, or --out to "
                                 "write the plans elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        root = data_root_text(dataset_root)
        for path, configuration in zip(paths, plan.configurations, strict=True):
            write_text_atomic(render_config(plan, configuration, root, cache_dir, path), path)
    except OSError as error:
        raise ValueError(f"--out {out_dir}: cannot write there ({error.strerror or error})"
                         ) from error
    return paths


#!/usr/bin/env python
"""Plan synthetic datasets with nnU-Net v2's default planner and with ours; print both.

Needs nnunetv2 (the optional extra ``bench``), which brings many packages of its own, so use a
separate virtual environment:

    python3 -m venv /tmp/nnunet-venv
    /tmp/nnunet-venv/bin/pip install -e '.[bench]'
    /tmp/nnunet-venv/bin/python scripts/compare_nnunet_plans.py [--work DIR] [--gpu-memory 8]

For each dataset spec below it writes an nnU-Net raw dataset (NIfTI files whose headers carry
the shapes and spacings; the voxels are a constant 1, non-zero everywhere so that nnU-Net's
crop to the non-zero region keeps every voxel, with a small labelled cube, so they compress to
almost nothing), runs nnU-Net's fingerprint extraction and ``ExperimentPlanner`` (3d_fullres
and 2d) with nnUNet_raw / nnUNet_preprocessed in a temporary folder, runs ``segmentation
plan``'s fingerprint and rules on the same folder, and prints both plans side by side in our
axis order (RAS; nnU-Net's are mapped back from its transposed z, y, x order). Exit code 1
when a spacing, kernel or stride differs or a patch differs by more than one pooling step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Spec:
    """A synthetic dataset: per case a spacing and a shape, in RAS (x, y, z) order."""

    name: str
    spacings: list[tuple[float, float, float]]
    shapes: list[tuple[int, int, int]]
    channel: str = "MRI"


def specs() -> list[Spec]:
    """Isotropic, 3× and 6× anisotropic, cine-like, CT-sized and small datasets."""
    return [
        Spec("Iso1mm", [(1.0, 1.0, 1.0)] * 8,
             [(128, 144, 112), (120, 150, 110), (132, 140, 118), (126, 146, 114)] * 2),
        Spec("Aniso3x", [(1.0, 1.0, 3.0), (0.9, 0.9, 3.0)] * 4, [(160, 160, 48)] * 8),
        Spec("Prostate6x", [((0.625 if i % 2 else 0.6),) * 2 + ((4.0 if i < 2 else 3.6),)
                            for i in range(8)],
             [(256, 256, 20) if i % 4 == 0 else (320, 320, 20) for i in range(8)]),
        Spec("Cine10mm", [(1.5, 1.5, 10.0)] * 7 + [(1.5, 1.5, 5.0)] * 3,
             [(320, 320, 10)] * 7 + [(320, 320, 20)] * 3, channel="cineMRI"),
        Spec("CT5mm", [(0.8, 0.8, 5.0), (0.75, 0.75, 5.0)] * 3, [(512, 512, 60)] * 6,
             channel="CT"),
        Spec("SmallRect", [(0.5, 0.7, 2.0)] * 6, [(96, 64, 24), (90, 70, 26), (100, 60, 22)] * 2),
    ]


def write_dataset(raw: Path, index: int, spec: Spec) -> Path:
    """nnU-Net raw dataset ``DatasetNNN_<name>``: imagesTr, labelsTr, dataset.json."""
    folder = raw / f"Dataset{index:03d}_{spec.name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    for case, (spacing, shape) in enumerate(zip(spec.spacings, spec.shapes, strict=True)):
        affine = np.diag([*spacing, 1.0])
        image = np.ones(shape, dtype=np.uint8)
        label = np.zeros(shape, dtype=np.uint8)
        label[tuple(slice(n // 2 - 2, n // 2 + 2) for n in shape)] = 1
        for data, path in ((image, folder / "imagesTr" / f"case{case:03d}_0000.nii.gz"),
                           (label, folder / "labelsTr" / f"case{case:03d}.nii.gz")):
            nifti = nib.Nifti1Image(data, affine)
            nifti.set_qform(affine, code=1)
            nifti.set_sform(affine, code=1)
            nib.save(nifti, str(path))
    meta = {"name": spec.name, "channel_names": {"0": spec.channel},
            "labels": {"background": 0, "structure": 1}, "numTraining": len(spec.shapes),
            "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    return folder


def nnunet_plan(index: int, gpu_memory: float) -> dict:
    """nnU-Net's fingerprint and default ExperimentPlanner for dataset ``index``."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every configuration
        extractor = DatasetFingerprintExtractor(index, num_processes=2)
        extractor.show_progress_bar = False
        extractor.run()
        return ExperimentPlanner(index, gpu_memory_target_in_gb=gpu_memory).plan_experiment()


def nnunet_elements(plans: dict, key: str) -> int:
    """nnU-Net's own feature-map count of its planned network at its patch (its VRAM proxy)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    config = plans["configurations"][key]
    architecture = config["architecture"]
    net = get_network_from_plans(architecture["network_class_name"],
                                 architecture["arch_kwargs"],
                                 architecture["_kw_requires_import"], 1, 2, allow_init=False)
    return int(net.compute_conv_feature_map_size(config["patch_size"]))


def to_ras(values: list, axes: list[int]) -> tuple:
    """Per-axis values of nnU-Net's plan axes → our axes in ascending order.

    ``axes[p]`` is our (RAS) axis of nnU-Net's plan axis ``p``.
    """
    by_axis = dict(zip(axes, values, strict=True))
    return tuple(by_axis[a] for a in sorted(by_axis))


def nnunet_in_our_order(plans: dict) -> dict[str, dict]:
    """nnU-Net's 3d_fullres and 2d configurations with every per-axis value in RAS order.

    Our axis of nnU-Net's original axis a is 2 − a (SimpleITK's z, y, x is the reverse of the
    voxel axes, which are RAS for the diagonal affines written here); plan axis p is original
    axis ``transpose_forward[p]``.
    """
    forward = plans["transpose_forward"]
    out = {}
    for name, key, first in (("3d", "3d_fullres", 0), ("2d", "2d", 1)):
        config = plans["configurations"].get(key)
        if config is None:
            continue
        axes = [2 - forward[p] for p in range(first, 3)]
        arch = config["architecture"]["arch_kwargs"]

        def convert(values, axes=axes):
            return to_ras(list(values), axes)

        out[name] = {
            "spacing": tuple(round(float(s), 5) for s in convert(config["spacing"])),
            "patch": convert(config["patch_size"]),
            "batch": config["batch_size"],
            "features": tuple(arch["features_per_stage"]),
            "kernels": tuple(convert(k) for k in arch["kernel_sizes"]),
            "strides": tuple(convert(s) for s in arch["strides"][1:]),  # no leading [1, 1, 1]
            "slice axis": 2 - forward[0] if name == "2d" else None,
            "elements": nnunet_elements(plans, key),
        }
    return out


def ours(folder: Path, gpu_memory: float) -> dict[str, dict]:
    """Our plan of the same folder, in the same form."""
    from segmentation.planning.fingerprint import extract_fingerprint
    from segmentation.planning.memory import feature_map_elements
    from segmentation.planning.rules import plan_dataset

    plan = plan_dataset(extract_fingerprint(folder), gpu_memory)
    return {c.name: {"spacing": tuple(round(s, 5) for s in c.spacing), "patch": c.patch_size,
                     "batch": c.batch_size, "features": c.features, "kernels": c.kernel_sizes,
                     "strides": c.strides, "slice axis": c.slice_axis,
                     # the count for nnU-Net's 2 outputs, as nnunet_elements builds its network
                     "elements": feature_map_elements(c.patch_size, c.features, c.strides, 2)}
            for c in plan.configurations}


def show(value: object) -> str:
    """A plan field as text; per-level lists as the plan table writes them."""
    from segmentation.planning.table import runs

    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return runs(value)  # the plan table's notation: ``1×3×3 ×2, 3×3×3 ×5``
    if isinstance(value, int) and value > 100_000:
        return f"{value:,}"
    if isinstance(value, tuple):
        return "×".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "-" if value is None else str(value)


def verdict(field: str, theirs: dict, mine: dict) -> str:
    """= for equal; for a patch, ≈ when within one pooling step per axis; else ≠."""
    a, b = theirs[field], mine[field]
    if field == "spacing":
        return "=" if np.allclose(a, b, rtol=1e-4) else "≠"
    if a == b:
        return "="
    if field == "patch":
        steps = [int(np.prod([s[axis] for s in mine["strides"]])) for axis in range(len(b))]
        return "≈" if all(abs(x - y) <= s for x, y, s in zip(a, b, steps, strict=True)) else "≠"
    return "≠"


FIELDS = ("spacing", "patch", "batch", "features", "kernels", "strides", "slice axis",
          "elements")
REQUIRED = ("spacing", "kernels", "strides")  # must be identical; patch within one step


def main() -> int:
    """Write the datasets, plan them both ways, print the table; 1 on a disagreement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for nnUNet_raw / nnUNet_preprocessed (default: temporary)")
    parser.add_argument("--gpu-memory", type=float, default=8.0, help="GB (default 8)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nnunet-compare-"))
    raw, preprocessed = work / "nnUNet_raw", work / "nnUNet_preprocessed"
    os.environ.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed),
                      nnUNet_results=str(work / "nnUNet_results"))
    raw.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version  # nnunetv2.paths reads the variables on import

    print(f"nnU-Net v2 {version('nnunetv2')} default planner vs segmentation plan, "
          f"{args.gpu_memory:g} GB, axes in RAS order (x, y, z); work folder {work}\n")
    print("| dataset | config | field | nnU-Net | ours | |")
    print("|---|---|---|---|---|---|")
    failures = 0
    for index, spec in enumerate(specs(), start=1):
        folder = write_dataset(raw, index, spec)
        theirs = nnunet_in_our_order(nnunet_plan(index, args.gpu_memory))
        mine = ours(folder, args.gpu_memory)
        for name in ("3d", "2d"):
            for field in FIELDS:
                mark = verdict(field, theirs[name], mine[name])
                if mark == "≠" and (field in REQUIRED or field == "patch"):
                    failures += 1
                print(f"| {spec.name} | {name} | {field} | {show(theirs[name][field])} | "
                      f"{show(mine[name][field])} | {mark} |")
        sys.stdout.flush()
    print(f"\n{failures} required field(s) differ (spacing, kernels, strides must be equal, "
          "patches within one pooling step per axis)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

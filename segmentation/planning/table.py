"""The plan as a short table: one column per configuration."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from segmentation.planning.config_writer import format_gb
from segmentation.planning.rules import DatasetPlan


def _per_axis(values: Sequence[object]) -> str:
    return " × ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def runs(entries: Sequence[Sequence[int]]) -> str:
    """Per-level lists, equal neighbours merged: ``1×3×3 ×2, 3×3×3 ×5``."""
    parts: list[str] = []
    previous, count = None, 0
    for entry in list(entries) + [None]:
        if entry is not None and entry == previous:
            count += 1
            continue
        if previous is not None:
            text = "×".join(str(v) for v in previous)
            parts.append(f"{text} ×{count}" if count > 1 else text)
        previous, count = entry, 1
    return ", ".join(parts)


def plan_table(plan: DatasetPlan) -> Table:
    """Spacing, median shape, patch, batch, levels, kernels, strides, parameters, memory."""
    table = Table(title=f"{plan.name}: plans for {plan.gpu_memory_gb:g} GB of GPU memory "
                        f"({plan.num_training} cases)")
    table.add_column("")
    for configuration in plan.configurations:
        axis = (f" (slices across axis {configuration.slice_axis})"
                if configuration.slice_axis is not None else "")
        table.add_column(configuration.name + axis)
    rows = [
        ("spacing (mm)", lambda c: _per_axis(tuple(round(s, 4) for s in c.spacing))),
        ("median shape", lambda c: _per_axis(tuple(round(m, 1) for m in c.median_shape))),
        ("patch", lambda c: _per_axis(c.patch_size)),
        ("batch", lambda c: str(c.batch_size)),
        ("levels", lambda c: f"{c.levels} ({c.features[0]}…{c.features[-1]} channels)"),
        ("kernels", lambda c: runs(c.kernel_sizes)),
        ("strides", lambda c: runs(c.strides)),
        ("parameters", lambda c: f"{c.parameters:,}"),
        ("est. memory", lambda c: format_gb(c.estimated_gb)),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(c) for c in plan.configurations))
    table.caption = (f"axes in RAS order; normalization {plan.normalization}, crop to non-zero "
                     f"{'on' if plan.crop_foreground else 'off'}")
    return table

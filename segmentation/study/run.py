"""What ``segmentation study run`` and ``study report`` do: check, plan, run, report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from segmentation.study.folders import cell_state
from segmentation.study.local import LocalPool, Slot, available_gpus, make_slots
from segmentation.study.plan import (
    Plan,
    StudyError,
    fresh_directory,
    make_plan,
    mixed_settings,
    write_plan,
)
from segmentation.study.report import write_report
from segmentation.study.results import collect
from segmentation.study.spec import load_study

MIXED_SHOWN = 10  # runs named when settings changed


def plan_table(plan: Plan, slots: Sequence[Slot] | None) -> Table:
    """The plan as a table: every run with the slot it would start on and its state."""
    table = Table(title=f"study {plan.spec.name}: {len(plan.cells)} runs in {plan.directory}")
    for column in ("variant", "seed", "fold", "device", "state", "params"):
        table.add_column(column, justify="right" if column in ("seed", "fold", "params")
                         else "left")
    waiting = 0
    for cell in plan.cells:
        state = cell_state(cell, plan.record(cell)["settings"])
        device = "—"
        if state != "done" and slots:
            device = slots[waiting % len(slots)].name
            waiting += 1
        params = plan.variants[cell.variant].size.params
        table.add_row(cell.variant, str(cell.seed), str(cell.fold), device, state,
                      f"{params:,}")
    return table


def variants_table(plan: Plan) -> Table:
    """Per variant: parameters, FLOPs per patch, widened decoder (if capacity-matched)."""
    table = Table(title="variants")
    for column in ("variant", "params", "vs its reference", "GFLOP/patch", "decoder widths"):
        table.add_column(column)
    references = plan.spec.references()
    for name, variant in plan.variants.items():
        reference = plan.variants[references.get(name, name)].size.params
        table.add_row(name, f"{variant.size.params:,}",
                      f"{variant.size.params / reference - 1:+.1%}",
                      f"{variant.size.flops_per_patch / 1e9:.3g}",
                      "encoder's" if variant.decoder_features is None
                      else str(variant.decoder_features))
    return table


def run_study(args: argparse.Namespace) -> int:
    """``segmentation study run``: check everything, then run what is not done, then report.

    Returns:
        0 when every run is done; 1 when a run failed (the others still ran).
    """
    console = Console()
    spec = load_study(args.study)
    plan = make_plan(spec, Path(args.output) if args.output else None,
                     require_data=not args.dry_run)
    mixed = mixed_settings(plan)
    if mixed and args.fresh:
        plan = make_plan(spec, fresh_directory(plan.directory), require_data=not args.dry_run)
        mixed = []
    if mixed:
        shown = ", ".join(mixed[:MIXED_SHOWN]) + (" …" if len(mixed) > MIXED_SHOWN else "")
        raise StudyError(f"{plan.directory}: {len(mixed)} run(s) were made with other settings "
                         f"than {spec.path} now gives ({shown}); restore the study file, or "
                         "pass --fresh to start a new study folder")
    devices = None if args.devices is None else [d for d in args.devices.split(",") if d]
    slots = None
    if args.executor == "local":
        slots = make_slots(devices, available_gpus(), gpus_per_run=spec.gpus_per_run,
                           runs_per_device=args.runs_per_device)
    console.print(variants_table(plan))
    if args.dry_run:
        console.print(plan_table(plan, slots))
        return 0
    write_plan(plan)
    todo = [c for c in plan.cells if cell_state(c, plan.record(c)["settings"]) != "done"]
    console.print(f"{len(plan.cells) - len(todo)} of {len(plan.cells)} runs done; running "
                  f"{len(todo)} on {args.executor}", highlight=False)
    failed = 0
    if todo and args.executor == "local":
        outcomes = LocalPool(slots or []).run(todo)
        failed = sum(1 for o in outcomes if o.exit_code != 0)
    elif todo:
        from segmentation.study.slurm import run_on_slurm

        failed = run_on_slurm(plan, todo, args, console)
        if failed is None:  # submitted without waiting
            return 0
    if spec.landscape is not None:
        from segmentation.study.dynamics import first_cells, measure_landscapes

        cells = first_cells(plan.directory, [v.name for v in spec.variants], spec.seeds,
                            plan.folds)
        measure_landscapes(cells, plan.directory, spec.landscape,
                           say=lambda message: console.print(message, markup=False,
                                                             highlight=False))
    report_study(plan.directory, console, resamples=args.resamples)
    if failed:
        console.print(f"{failed} run(s) failed; fix the cause and run the same command again "
                      "(finished runs are kept, interrupted ones resume)", style="red")
    return 1 if failed else 0


def report_study(directory: Path, console: Console, *, resamples: int = 10_000) -> None:
    """Gather the runs' scores and write and print the report."""
    states = collect(directory)
    report = write_report(directory, resamples=resamples)
    report.print(console)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    console.print(f"runs: {summary}; report: {directory / 'report.md'}", highlight=False)


def report_command(args: argparse.Namespace) -> int:
    """``segmentation study report``."""
    report_study(Path(args.study_dir), Console(), resamples=args.resamples)
    return 0

"""``segmentation landscape``: loss-landscape slices around a checkpoint, or a path between two.

Everything that would stop the run is checked before anything is written: the options, the
checkpoint(s), the dataset and its training cases, the loss, an existing ``landscape.npz`` of
other settings. The grid is saved atomically every few points, so a rerun with the same
settings continues where an interrupted one stopped; other settings are refused unless
``--overwrite``.

torch, MONAI and Lightning are imported inside the handler: ``segmentation`` builds every
subcommand's parser at start-up.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from torch import nn

    from segmentation.instruments.fixed_patches import PatchSet
    from segmentation.instruments.landscape import Landscape

NPZ, PATCHES, SUMMARY = "landscape.npz", "patches.pt", "landscape_summary.json"
DEFAULT_RANGE, DEFAULT_MARGIN = 1.0, 0.5
NOT_COMPARED = ("device", "batch_size")  # change speed, not the losses: a resume may differ


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad option values, one line each, before anything is read.

    Raises:
        ValueError: naming the option and what to choose.
    """
    if args.to is not None:
        for option, value in (("--dims", args.dims), ("--range", args.range)):
            if value is not None:
                raise ValueError(f"{option} does not apply to --to (a path between two "
                                 "checkpoints); use --steps and --margin")
    elif args.margin is not None:
        raise ValueError("--margin applies to --to only; --range sets the extent of the grid")
    if args.dims is not None and args.dims not in (1, 2):
        raise ValueError(f"--dims {args.dims}: choose 1 or 2 directions")
    if args.range is not None and not args.range > 0:
        raise ValueError(f"--range {args.range:g}: choose a positive range (e.g. 1.0)")
    if args.margin is not None and not args.margin >= 0:
        raise ValueError(f"--margin {args.margin:g}: choose 0 or more (0.5 gives t in "
                         "[-0.5, 1.5])")
    if args.steps < 3:
        raise ValueError(f"--steps {args.steps}: choose at least 3 points per axis")
    if args.patches < 1:
        raise ValueError(f"--patches {args.patches}: choose at least 1 patch")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: choose at least 1")


def compared(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed grid must share with the stored one."""
    return {k: v for k, v in settings.items() if k not in NOT_COMPARED}


def resume_point(out: Path, settings: dict[str, Any], overwrite: bool) -> Landscape | None:
    """The stored partial landscape to continue, None to start afresh.

    Raises:
        ValueError: if ``out`` is a file, or holds a landscape of other settings (or an
            unreadable one) and ``overwrite`` is off.
    """
    from segmentation.instruments.landscape import Landscape

    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out}: is a file; choose a folder")
    if overwrite or not (out / NPZ).exists():
        return None
    stored = Landscape.load(out / NPZ)
    old, new = compared(stored.settings), compared(settings)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ValueError(f"{out / NPZ}: computed with other settings ({key}: "
                             f"{old.get(key)!r} there, {new.get(key)!r} now); pass --overwrite "
                             "to start again, or --output for another folder")
    return stored


def patches_for(out: Path, resume: bool, expected: dict[str, Any], make: Callable[[], PatchSet]
                ) -> tuple[PatchSet, bool]:
    """The patches to measure on: stored ones when resuming, else ``make()``.

    A resumed grid reuses its ``patches.pt`` when it was made with ``expected`` settings:
    exactly the tensors its earlier points were measured on.

    Returns the patches and whether they are new (still to be written).
    """
    from segmentation.instruments.fixed_patches import PatchSet

    if resume and (out / PATCHES).is_file():
        try:
            stored = PatchSet.load(out / PATCHES)
        except ValueError:
            stored = None
        if stored is not None and stored.settings == expected:
            return stored, False
    return make(), True


def say(console: Console, message: str) -> None:
    """Print one line as it is (no markup, never wrapped)."""
    console.print(message, markup=False, highlight=False)


@dataclass
class LandscapeJob:
    """Everything a landscape run needs, prepared and checked before anything is written."""

    net: nn.Module
    net_b: nn.Module | None
    patches: PatchSet
    patches_new: bool
    loss_fn: nn.Module
    settings: dict[str, Any]
    out: Path
    resume: Landscape | None
    device: torch.device
    batch_size: int


def prepare(args: argparse.Namespace, console: Console) -> LandscapeJob:
    """Read and check the checkpoint(s), dataset, loss and output folder; write nothing.

    Raises:
        ValueError: one line naming the file or option at fault (CheckpointError for an
            unusable checkpoint).
    """
    from segmentation.inference.checkpoint import load_trained_network
    from segmentation.inference.devices import resolve_device
    from segmentation.inference.provenance import sha256
    from segmentation.instruments.landscape import (
        EVALUATION,
        INTERPOLATION_BUFFERS,
        check_same_architecture,
        grid_axis,
    )
    from segmentation.instruments.training_run import training_inputs

    device = resolve_device(args.device)
    inputs = training_inputs(args.checkpoint, args.data)
    path, record = inputs.checkpoint, inputs.record
    net_b = None
    if args.to is not None:
        net_b, record_b = load_trained_network(args.to)
        check_same_architecture(inputs.net, net_b, (str(path), str(args.to)))
        if record_b.preprocessing != record.preprocessing:
            say(console, f"note: {args.to} was trained with another preprocessing; both are "
                         f"measured on the patches of {path}")
    directions = args.to is None
    dims = args.dims or 1
    range_ = args.range if args.range is not None else DEFAULT_RANGE
    steps = len(grid_axis(args.steps, range_)) if directions else args.steps
    if directions and steps != args.steps:
        say(console, f"note: --steps {args.steps} has no centre point; using {steps} so the "
                     "checkpoint itself is the middle of the grid")
    default_out = "landscape" if directions else f"landscape_to_{Path(args.to).stem}"
    out = Path(args.output) if args.output else path.parent / default_out
    batch_size = args.batch_size or record.batch_size
    settings: dict[str, Any] = {
        "kind": "directions" if directions else "interpolation",
        "checkpoint": str(path.resolve()), "checkpoint_sha256": sha256(path),
        "patches": args.patches, "patch_seed": args.seed,
        "data": str(inputs.data_root.resolve()), "cases": inputs.cases_source,
        "patch_size": list(record.patch_size), "output_size": list(inputs.output_size),
        "slice_axis": record.slice_axis, "loss": inputs.loss_name, "evaluation": EVALUATION,
        "device": str(device), "batch_size": batch_size}
    if directions:
        settings.update(dims=dims, steps=steps, range=float(range_), seed=args.seed)
    else:
        margin = args.margin if args.margin is not None else DEFAULT_MARGIN
        settings.update(to=str(Path(args.to).resolve()), to_sha256=sha256(args.to), steps=steps,
                        margin=float(margin), buffers=INTERPOLATION_BUFFERS)
    settings = json.loads(json.dumps(settings))  # as a stored landscape reads it back
    resume = resume_point(out, settings, args.overwrite)
    patches, new = patches_for(out, resume is not None,
                               inputs.patch_settings(args.patches, args.seed),
                               lambda: inputs.patches(args.patches, args.seed))
    return LandscapeJob(inputs.net, net_b, patches, new, inputs.loss_fn, settings, out, resume,
                        device, batch_size)


def measure(job: LandscapeJob, console: Console) -> Landscape:
    """Evaluate the grid (what is not computed yet), saving ``landscape.npz`` as it goes."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from segmentation.instruments.landscape import compute_landscape, interpolate_landscape

    if job.resume is not None and job.resume.complete:
        say(console, f"note: {job.out / NPZ} is complete; drawing its figures and summary again")
        return job.resume
    job.out.mkdir(parents=True, exist_ok=True)
    if job.patches_new:
        job.patches.save(job.out / PATCHES)
    if job.resume is not None:
        done = int(job.resume.computed.sum())
        say(console, f"note: continuing {job.out / NPZ} ({done} of "
                     f"{job.resume.computed.size} points computed)")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    common: dict[str, Any] = {
        "device": job.device, "batch_size": job.batch_size, "resume_from": job.resume,
        "save": lambda landscape: landscape.save(job.out / NPZ), "settings": job.settings}
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("grid points", total=None)
        common["progress"] = lambda done, total: progress.update(task, completed=done,
                                                                 total=total)
        settings = job.settings
        if job.net_b is None:
            return compute_landscape(job.net, job.patches, job.loss_fn, dims=settings["dims"],
                                     steps=settings["steps"], range_=settings["range"],
                                     seed=settings["seed"], **common)
        return interpolate_landscape(job.net, job.net_b, job.patches, job.loss_fn,
                                     steps=settings["steps"], margin=settings["margin"],
                                     **common)


def report(job: LandscapeJob, landscape: Landscape) -> list[Path]:
    """Draw the figures, write ``landscape_summary.json`` and print the summary."""
    from segmentation.atomic import write_text_atomic
    from segmentation.instruments.landscape_figures import plot_landscape
    from segmentation.instruments.landscape_summary import path_summary, sharpness_summary

    directions = landscape.seed is not None
    summary = sharpness_summary(landscape) if directions else path_summary(landscape)
    document = {"summary": summary, "settings": landscape.settings}
    files = [job.out / NPZ, *plot_landscape(landscape, job.out),
             write_text_atomic(json.dumps(document, indent=2) + "\n", job.out / SUMMARY)]
    for line in summary_lines(landscape, summary):
        print(line)
    print(f"wrote {', '.join(str(f) for f in files)}")
    return files


def summary_lines(landscape: Landscape, summary: dict[str, Any]) -> list[str]:
    """The summary as the terminal shows it."""
    settings = landscape.settings
    lines = [f"loss: {settings['loss']}", f"evaluation: {settings['evaluation']}"]
    if landscape.seed is None:
        return lines + [
            f"path from {settings['checkpoint']} (t = 0) to {settings['to']} (t = 1)",
            f"loss at A: {_show(summary['loss_a'])}, at B: {_show(summary['loss_b'])}",
            f"highest loss between them: {_show(summary['max_loss_between'])} at t = "
            f"{summary['t_of_max']:g} (barrier {_show(summary['barrier'])})"]
    grid = " × ".join([str(len(landscape.alphas))] * landscape.dims)
    increase = ", ".join(f"±{offset}: {_show(value)}"
                         for offset, value in summary["loss_increase"].items())
    lines += [f"{landscape.dims}D landscape of {settings['checkpoint']}: {grid} points over "
              f"±{settings['range']:g}, directions' seed {landscape.seed}, "
              f"{settings['patches']} patches",
              f"centre loss: {_show(summary['centre_loss'])}",
              f"loss increase at α = {increase} ({summary['loss_increase_note']})"]
    if landscape.dims == 2:
        eigenvalues = ", ".join(_show(e) for e in summary["eigenvalues"])
        lines.append(f"curvature ratio at the centre: {_show(summary['curvature_ratio'])} "
                     f"(Hessian eigenvalues {eigenvalues}; {summary['curvature_note']})")
    return lines


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def run_landscape(args: argparse.Namespace) -> int:
    """Handler of ``segmentation landscape``; a refusal raises ValueError (one line)."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    check_options(args)
    job = prepare(args, console)
    landscape = measure(job, console)
    report(job, landscape)
    return 0


def add_landscape_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``segmentation landscape``."""
    parser = subparsers.add_parser(
        "landscape", help="loss-landscape slices around a checkpoint (Li et al. 2018)",
        description="The training loss around a trained network on a fixed set of training "
                    "patches: along 1 or 2 filter-normalised random directions (Li et al. 2018), "
                    "or with --to along the straight path to another checkpoint (Goodfellow "
                    "et al. 2015). Writes landscape.npz, figures and landscape_summary.json; "
                    "an interrupted run continues when started again with the same settings.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by fit")
    parser.add_argument("--to", default=None, metavar="B.ckpt",
                        help="a checkpoint of the same network: the loss along (1-t)·A + t·B")
    parser.add_argument("--dims", type=int, default=None,
                        help="1 or 2 random directions (default 1)")
    parser.add_argument("--steps", type=int, default=25,
                        help="points per axis, at least 3; an even number gets one more so the "
                             "checkpoint is the centre (with --to: points on [0, 1])")
    parser.add_argument("--range", type=float, default=None,
                        help=f"the grid spans ±RANGE filter-normalised steps (default "
                             f"{DEFAULT_RANGE:g})")
    parser.add_argument("--margin", type=float, default=None,
                        help=f"with --to: t also runs MARGIN beyond 0 and 1 (default "
                             f"{DEFAULT_MARGIN:g}: t in [-0.5, 1.5])")
    parser.add_argument("--patches", type=int, default=16,
                        help="fixed training patches the loss is measured on (default 16)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the directions and of the patches' positions (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="patches per forward pass (default: the checkpoint's)")
    parser.add_argument("--output", default=None,
                        help="output folder (default: <checkpoint folder>/landscape, with --to "
                             "<checkpoint folder>/landscape_to_<B>)")
    parser.add_argument("--data", default=None,
                        help="dataset folder (default: the data.root the checkpoint's run "
                             "recorded)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again, replacing a landscape of other settings")
    parser.set_defaults(func=run_landscape)

"""The ``segmentation data`` subcommands: ``synth`` (write the synthetic dataset), ``check``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from segmentation.data.check import check_dataset, format_report
from segmentation.data.splits import SPLITS_JSON
from segmentation.data.synth import (
    DEFAULT_SHAPE,
    SYNTHETIC_NAME,
    SynthArgumentError,
    check_arguments,
    generate_dataset,
)

# What `synth --force` removes from an existing folder before writing: the dataset layout only.
SYNTH_OWNED = ("dataset.json", SPLITS_JSON, "imagesTr", "labelsTr", "imagesTs", "labelsTs")


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data synth`` and ``data check``; each sets ``func`` returning an exit code."""
    data = subparsers.add_parser("data", help="create or check datasets",
                                 description="Create or check datasets in the nnU-Net/MSD layout.")
    data.set_defaults(func=lambda _args: _print_help(data))
    commands = data.add_subparsers(title="data commands", metavar="COMMAND")

    synth = commands.add_parser(
        "synth", help="write the synthetic MRI-like dataset",
        description="Write the synthetic dataset (nnU-Net v2 layout) used by the demo and tests.")
    synth.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    synth.add_argument("--cases", type=int, default=32, help="training cases (default 32)")
    synth.add_argument("--test-cases", type=int, default=4,
                       help="extra cases in imagesTs, labels in labelsTs (default 4)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--shape", type=int, nargs="+", default=None,
                       help="voxels per axis (default 64 64 40 in 3D, 128 128 in 2D)")
    synth.add_argument("--dims", type=int, choices=(2, 3), default=3, help="2D or 3D images")
    synth.add_argument("--force", action="store_true",
                       help="replace the dataset in a non-empty folder")
    synth.set_defaults(func=run_synth)

    check = commands.add_parser(
        "check", help="check a dataset folder's integrity",
        description="Check a dataset folder: dataset.json, every file readable, labels matching "
                    "their images. Exit code 1 when there are errors.")
    check.add_argument("dataset", type=Path, help="dataset folder")
    check.set_defaults(func=run_check)


def run_synth(args: argparse.Namespace) -> int:
    """``data synth``: validate the arguments, refuse a non-empty folder unless --force, generate.

    Nothing is created or removed before every argument has been checked.

    Returns:
        0 on success; 1 after one ``error: ...`` line on stderr (naming the option, e.g.
        ``--seed``, or the folder).
    """
    out: Path = args.out
    try:
        check_arguments(cases=args.cases, test_cases=args.test_cases, seed=args.seed,
                        shape=args.shape, dims=args.dims)
    except SynthArgumentError as error:
        return _error(f"{_option(error.argument)} {_shown(error.value)}: {error.problem}")
    if out.exists() and not out.is_dir():
        return _error(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.force:
            return _error(f"{out} is not empty; use --force to replace the dataset in it")
        foreign = foreign_dataset(out)
        if foreign:
            return _error(foreign)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # written into a hidden sibling folder and moved in once complete: an interrupted
        # synth leaves no partial dataset, and --force keeps the old one until then
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.synth-"))
    except OSError as error:
        return _error(f"{out}: cannot write there ({error.strerror or error})")
    try:
        info = generate_dataset(staging, cases=args.cases, seed=args.seed, shape=args.shape,
                                dims=args.dims, test_cases=args.test_cases)
        out.mkdir(exist_ok=True)
        for name in SYNTH_OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for entry in staging.iterdir():
            os.replace(entry, out / entry.name)
    except (ValueError, OSError) as error:
        return _error(str(error))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shape = "×".join(str(s) for s in (args.shape or DEFAULT_SHAPE[args.dims]))
    print(f"wrote {len(info.training)} training case(s) (imagesTr, labelsTr) and "
          f"{len(info.test)} test case(s) (imagesTs, labelsTs) of {shape} voxels to {out}")
    print(f"labels: {', '.join(f'{v}={n}' for v, n in info.label_names.items())}")
    return 0


def foreign_dataset(out: Path) -> str | None:
    """Why ``synth --force`` must not replace the dataset in ``out`` (one line), or None.

    ``--force`` replaces only a dataset that ``data synth`` wrote (dataset.json named
    "synthetic"); a real dataset pointed at by mistake is never deleted.
    """
    owned = [out / name for name in SYNTH_OWNED if (out / name).exists()]
    if not owned:
        return None
    meta = out / "dataset.json"
    try:
        name = json.loads(meta.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    if name == SYNTHETIC_NAME:
        return None
    return (f"{out} holds a dataset that data synth did not write ({owned[0].name}; dataset.json "
            f"is not named {SYNTHETIC_NAME!r}); --force replaces only synthetic datasets, so "
            "choose an empty or new folder")


def _option(argument: str) -> str:
    """The command-line option of a generate_dataset argument: test_cases → --test-cases."""
    return "--" + argument.replace("_", "-")


def _shown(value: object) -> str:
    """A value as typed on the command line: (20, 20, 16) → 20 20 16."""
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value)
    return str(value)


def _error(message: str) -> int:
    """Print ``error: message`` on stderr; return the exit code 1."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def run_check(args: argparse.Namespace) -> int:
    """``data check``: print the report; exit code 1 when there are errors (warnings allowed)."""
    try:
        report = check_dataset(args.dataset)
    except Exception as error:  # never a traceback for a broken dataset
        return _error(f"{args.dataset}: the check failed unexpectedly "
                      f"({type(error).__name__}: {error})")
    print(format_report(report))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``data`` subcommands alone, e.g. ``main(["data", "check", "DIR"])``."""
    parser = argparse.ArgumentParser(prog="segmentation")
    add_data_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2

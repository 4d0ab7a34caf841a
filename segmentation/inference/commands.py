"""``segmentation infer``: segment NIfTI scans with a checkpoint alone."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from segmentation.data.layout import Case, find_case_files
from segmentation.inference.ensemble import resolve_checkpoints
from segmentation.inference.outputs import check_outputs, prepare_output_dir
from segmentation.inference.predictor import PRECISIONS
from segmentation.inference.provenance import (
    CaseResult,
    ProvenanceError,
    append_run,
    read_runs,
    run_record,
)
from segmentation.inference.segmenter import Segmenter


def run_infer(args: argparse.Namespace) -> int:
    """Segment every case; a failing case is reported and skipped. Exit 1 if any failed.

    Everything that would stop the run is checked before the first scan: the checkpoint, the
    inputs, the output folder, every output path and an existing provenance.json.
    """
    console = Console(stderr=True, soft_wrap=True)  # one line per message, never wrapped

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    started = time.time()
    output_dir = Path(args.output)
    try:
        checkpoints = resolve_checkpoints(args.checkpoint, note=lambda m: say(f"note: {m}"))
        segmenter = Segmenter(checkpoints, overlap=args.overlap, tta=args.tta, device=args.device,
                              batch_size=args.batch_size, precision=args.precision,
                              compile=args.compile, note=lambda message: say(f"note: {message}"))
        cases = find_case_files(args.input, n_channels=segmenter.in_channels)
    except ValueError as err:  # a bad checkpoint, setting or input list: one line
        say(f"error: {err}")
        return 1
    if len(checkpoints) > 1:
        say(f"ensemble of {len(checkpoints)} checkpoints: "
            + ", ".join(str(p) for p in checkpoints))
    problem = prepare_output_dir(output_dir)
    if problem:
        say(f"error: {problem}")
        return 1
    try:
        read_runs(output_dir)  # an unreadable provenance.json would be lost at the end
    except ProvenanceError as err:
        say(f"error: {err}")
        return 1
    problems = check_outputs(cases, output_dir, save_probabilities=args.save_probabilities,
                             overwrite=args.overwrite)
    for problem in problems:
        say(f"error: {problem}")
    if problems:
        return 1

    results: list[CaseResult] = []
    settings = {"overlap": segmenter.overlap, "tta": args.tta, "device": str(segmenter.device),
                "batch_size": segmenter.batch_size, "precision": segmenter.precision,
                "compile": args.compile,
                "save_probabilities": args.save_probabilities, "overwrite": args.overwrite}
    try:
        segment_all(segmenter, cases, output_dir, args.save_probabilities, results, console)
    except BaseException:  # interrupted: still record what was written
        if results:
            append_run(output_dir, {**run_record(checkpoints, settings, results, started),
                                    "interrupted": True})
        raise
    append_run(output_dir, run_record(checkpoints, settings, results, started))
    failed = [r for r in results if r.error]
    console.print(f"wrote {len(results) - len(failed)} segmentation(s) to {output_dir}"
                  + (f"; {len(failed)} scan(s) failed" if failed else ""), highlight=False)
    return 1 if failed else 0


def segment_all(segmenter: Segmenter, cases: list[Case], output_dir: Path,
                save_probabilities: bool, results: list[CaseResult], console: Console) -> None:
    """Segment the cases one by one with progress bars, appending to ``results`` as they end."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        scans = progress.add_task("scans", total=len(cases))
        windows = progress.add_task("windows", total=None, visible=False)

        def on_windows(done: int, total: int) -> None:
            progress.update(windows, completed=done, total=total, visible=True)

        for case in cases:
            result = CaseResult(case.case_id, [str(p) for p in case.images])
            tick = time.monotonic()
            progress.update(scans, description=f"scans ({case.case_id})")
            try:
                written = segmenter.segment(case, output_dir,
                                            save_probabilities=save_probabilities,
                                            progress=on_windows)
                result.outputs = [str(p) for p in written]
            except Exception as err:  # one bad scan must not stop the others
                cause = root_cause(err)
                result.error = str(cause)
                if not result.error.startswith(str(case.images[0])):  # name the file once
                    result.error = f"{case.images[0]}: {type(cause).__name__}: {cause}"
                progress.console.print(f"error: {result.error}", markup=False,
                                       highlight=False)
            result.seconds = round(time.monotonic() - tick, 3)
            results.append(result)
            progress.update(windows, visible=False)
            progress.advance(scans)


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: the reason, not MONAI's "applying transform" wrap."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def add_infer_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``segmentation infer``."""
    parser = subparsers.add_parser(
        "infer", help="segment NIfTI scans with a trained checkpoint",
        description="Segment scans with a checkpoint alone: network, preprocessing and label "
                    "names come from it. Several checkpoints (e.g. the cross-validation folds) "
                    "segment as an ensemble: their probabilities are averaged. Writes "
                    "CASE.nii.gz label maps with each scan's exact geometry; provenance.json "
                    "records every run into the folder.")
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="checkpoint(s) written by fit, or run folders: runs/NAME (the best "
                             "checkpoint of every fold run under it) or runs/NAME/version_N")
    parser.add_argument("--input", required=True, nargs="+",
                        help="scans (.nii/.nii.gz) or folders; CASE_0000, CASE_0001, ... are "
                             "the channels of one case")
    parser.add_argument("--output", required=True, help="folder for the segmentations")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap (default: as trained, 0.5)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                        help="network arithmetic: auto = bf16 on a GPU that supports it, fp16 on "
                             "older GPUs, fp32 on the CPU (logits are blended in float32)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network: the first window of each shape compiles "
                             "(a minute or so on a GPU), the rest run faster; for many scans")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write CASE_probabilities.nii.gz (classes on the last axis)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(func=run_infer)

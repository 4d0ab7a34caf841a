"""``segmentation study run|report``: the command line of the ablation study.

The parser only; the work (which needs the training code) is imported when a study command
runs, so ``segmentation infer`` and ``evaluate`` start without it.
"""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from segmentation.study.run import run_study

    return run_study(args)


def _report(args: argparse.Namespace) -> int:
    from segmentation.study.run import report_command

    return report_command(args)


def add_study_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``segmentation study run|report``."""
    study = subparsers.add_parser(
        "study", help="ablation study: variants × seeds × folds, run and reported",
        description="Run a study of variants × seeds × folds (cross-validation) and report "
                    "per-case Dice with paired statistics against a reference variant.")
    commands = study.add_subparsers(title="study commands", metavar="COMMAND")
    run = commands.add_parser(
        "run", help="plan, run (or resume) and report a study YAML",
        description="Check the study YAML and every variant's config, run every run not yet "
                    "done (resuming interrupted ones), then write the report. Re-running the "
                    "same command does only what is left.")
    run.add_argument("study", help="study YAML, e.g. configs/study/quick.yaml")
    run.add_argument("--dry-run", action="store_true",
                     help="print the plan (variant, seed, fold, device, state, params); start "
                          "nothing")
    run.add_argument("--executor", choices=("local", "slurm"), default="local",
                     help="local: a pool over this machine's GPUs (or CPU); slurm: a submitit "
                          "job array (pip install 'segmentation[cluster]')")
    run.add_argument("--devices", default=None,
                     help="GPU ids to use, e.g. 0,1,2,3, or cpu (default: every visible GPU, "
                          "else the CPU)")
    run.add_argument("--runs-per-device", type=int, default=1,
                     help="runs sharing one GPU (or the CPU) at once")
    run.add_argument("--fresh", action="store_true",
                     help="when the study file changed after runs exist, start a new study "
                          "folder (DIR-2, ...) instead of refusing")
    run.add_argument("--output", default=None,
                     help="study folder (default: <runs_dir>/<name> of the study file)")
    run.add_argument("--resamples", type=int, default=10_000,
                     help="bootstrap resamples of the report")
    run.add_argument("--no-wait", action="store_true",
                     help="slurm: submit and return; run `study report` when the jobs end")
    for key in ("partition", "timeout_min", "cpus_per_task", "mem_gb", "array_parallelism"):
        run.add_argument(f"--slurm-{key.replace('_', '-')}", dest=f"slurm_{key}",
                         type=str if key == "partition" else int, default=None,
                         help=f"slurm: {key} (overrides the study file's slurm section)")
    run.set_defaults(func=_run)
    report = commands.add_parser(
        "report", help="write and print the report of a study folder",
        description="Gather the finished runs of a study folder into results.csv and write "
                    "report.md, the summary tables and the plots.")
    report.add_argument("study_dir", help="the study folder, e.g. runs/study/quick")
    report.add_argument("--resamples", type=int, default=10_000,
                        help="bootstrap resamples (≥ 10,000 for a paper)")
    report.set_defaults(func=_report)
    study.set_defaults(func=lambda _: (study.print_help(), 2)[1])

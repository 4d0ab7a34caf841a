"""The SLURM executor: one job array through submitit, one run per array task.

submitit (``pip install 'segmentation[cluster]'``) writes the sbatch script, submits the array
(at most ``array_parallelism`` tasks at once), and owns requeueing: on preemption or time-out
SLURM signals the task ahead of time, submitit calls :meth:`CellJob.checkpoint`, which stops
the training process (its ``last.ckpt`` stays) and hands back the same run, and submitit
requeues it; the requeued task finds ``last.ckpt`` and resumes. Time-outs are requeued up to
submitit's limit (3), preemptions always. Lightning's own SLURM requeueing is switched off: the
training process is started without SLURM's job variables (see ``cell.fit_environment``), so
only one of the two ever requeues.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from segmentation.study.cell import run_cell
from segmentation.study.plan import Cell, Plan

STOP_SECONDS = 60  # SLURM signals 90 s before the end (submitit's default): time to stop
DEFAULTS = {"timeout_min": 24 * 60, "cpus_per_task": 8, "mem_gb": 64, "array_parallelism": 64}


class CellJob:
    """What one array task runs: :func:`run_cell` for one run folder, checkpointable."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    def __call__(self, cell_dir: str) -> dict[str, Any]:
        """Finish the run in ``cell_dir`` (train or resume, score, mark done)."""
        return run_cell(cell_dir, on_start=self._remember)

    def _remember(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process

    def checkpoint(self, cell_dir: str) -> Any:
        """Stop the training process and return this run for submitit to requeue."""
        from submitit.helpers import DelayedSubmission

        process = self._process
        if process is not None and process.returncode is None:
            try:
                process.send_signal(signal.SIGTERM)  # Lightning stops; last.ckpt stays
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
            except (ProcessLookupError, ChildProcessError):
                pass
        return DelayedSubmission(CellJob(), cell_dir)


def slurm_parameters(study: Mapping[str, Any], args: argparse.Namespace | None,
                     gpus_per_run: int, name: str) -> dict[str, Any]:
    """The submitit parameters from the study's ``slurm:`` section and ``--slurm-*`` options."""
    settings = {**DEFAULTS, **study}
    for key in ("partition", "timeout_min", "cpus_per_task", "mem_gb", "array_parallelism"):
        value = getattr(args, f"slurm_{key}", None) if args is not None else None
        if value is not None:
            settings[key] = value
    parameters: dict[str, Any] = {
        "name": f"study-{name}", "nodes": 1, "tasks_per_node": 1,
        "gpus_per_node": gpus_per_run, "timeout_min": int(settings["timeout_min"]),
        "cpus_per_task": int(settings["cpus_per_task"]), "mem_gb": settings["mem_gb"],
        "slurm_array_parallelism": int(settings["array_parallelism"]),
    }
    for key in ("partition", "account", "qos", "constraint"):
        if settings.get(key):
            parameters[f"slurm_{key}"] = settings[key]
    if settings.get("additional_parameters"):
        parameters["slurm_additional_parameters"] = dict(settings["additional_parameters"])
    return parameters


def make_executor(folder: Path, parameters: Mapping[str, Any], cluster: str | None = None
                  ) -> Any:
    """A submitit executor (SLURM when sbatch exists, ``cluster`` forces one, e.g. "slurm")."""
    try:
        import submitit
    except ImportError:
        raise ValueError("--executor slurm needs submitit: pip install "
                         "'segmentation[cluster]'") from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(**parameters)
    return executor


def submit(plan: Plan, cells: Sequence[Cell], args: argparse.Namespace | None = None,
           cluster: str | None = "slurm") -> list[Any]:
    """Submit one array task per run; returns the submitit jobs (in the order of ``cells``)."""
    parameters = slurm_parameters(plan.spec.slurm, args, plan.spec.gpus_per_run,
                                  plan.spec.name)
    executor = make_executor(plan.directory / "slurm", parameters, cluster)
    return executor.map_array(CellJob(), [str(cell.directory) for cell in cells])


def run_on_slurm(plan: Plan, cells: Sequence[Cell], args: argparse.Namespace,
                 console: Console) -> int | None:
    """Submit the runs, then (unless ``--no-wait``) wait; the number of failed runs or None."""
    jobs = submit(plan, cells, args)
    array = str(jobs[0].job_id).split("_")[0] if jobs else "?"
    console.print(f"submitted job array {array} ({len(jobs)} runs); logs in "
                  f"{plan.directory / 'slurm'} and each run's run.log", highlight=False)
    if args.no_wait:
        console.print(f"when the jobs end: segmentation study report {plan.directory}",
                      highlight=False)
        return None
    failed = 0
    pending = dict(zip(jobs, cells, strict=True))
    while pending:
        for job in [j for j in pending if j.done()]:
            cell = pending.pop(job)
            error = job.exception()
            if error is None:
                console.print(f"done: {cell.label}", markup=False, highlight=False)
            else:
                failed += 1
                console.print(f"failed: {cell.label} (job {job.job_id}): "
                              f"{str(error).strip().splitlines()[-1:]}", markup=False,
                              highlight=False)
        time.sleep(5 if pending else 0)
    return failed

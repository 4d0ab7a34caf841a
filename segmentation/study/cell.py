"""One study run, start to finish: ``segmentation fit`` (resumed if interrupted), then scoring.

Both executors run this: the local pool as ``python -m segmentation.study.cell RUN_DIR`` in a
process of its own, pinned to its GPUs with ``CUDA_VISIBLE_DEVICES``; SLURM inside the array
task. Training is the ordinary fit command in a child process, so DDP over several GPUs
(``gpus_per_run``) works as it does for any run. Files, in the order they are written:
``run.log`` (appended), ``trained.json`` when the fit ends, ``scores.csv``, and ``done.json``
last; ``failed.json`` when an attempt fails (removed when the next one starts).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from segmentation.atomic import write_text_atomic
from segmentation.inference.checkpoint import last_checkpoint_of_run
from segmentation.study.folders import (
    ATTEMPTS_JSON,
    CELL_JSON,
    DONE_JSON,
    FAILED_JSON,
    LOG_FILE,
    SCORES_CSV,
    TRAINED_JSON,
    read_json,
)
from segmentation.study.scoring import score_run, write_scores

LOG_TAIL = 15  # lines of the run's log quoted when it fails


class RunFailed(RuntimeError):
    """A study run that did not finish; the message names it and quotes its log."""


def device_args(environ: Mapping[str, str], gpus_per_run: int, cuda_available: bool
                ) -> tuple[list[str], str]:
    """The fit arguments that put a run on its devices, and how to name them.

    The GPUs are those ``CUDA_VISIBLE_DEVICES`` leaves visible (the local pool pins every run
    this way; SLURM does it for its tasks); an empty value or no CUDA means the CPU.
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if cuda_available and visible != "":
        count = len(visible.split(",")) if visible else gpus_per_run
        name = f"cuda:{visible}" if visible else f"{count} GPU(s)"
        return ["--trainer.accelerator=gpu", f"--trainer.devices={count}"], name
    return ["--trainer.accelerator=cpu", "--trainer.devices=1"], "cpu"


def fit_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The training process's environment: this one without SLURM's job variables.

    Requeueing belongs to submitit (see ``segmentation.study.slurm``). Lightning, seeing a
    SLURM job, would install its own requeue handler and use SLURM's task layout for DDP;
    without the variables it runs the task's GPUs as on a workstation, DDP included.
    """
    return {k: v for k, v in environ.items() if not k.startswith("SLURM_")}


def train(directory: Path, record: Mapping[str, Any], *, python: str = sys.executable,
          on_start: Callable[[subprocess.Popen[bytes]], None] | None = None) -> dict[str, Any]:
    """Run (or resume from the newest last.ckpt) the fit of one run; returns trained.json.

    Raises:
        RunFailed: if the fit exits with a non-zero code.
    """
    import torch

    arguments, device = device_args(os.environ, int(record.get("gpus_per_run", 1)),
                                    torch.cuda.is_available())
    command = [python, "-m", "segmentation.cli", "fit", *record["fit_args"], *arguments]
    if any(directory.glob("version_*/checkpoints/last*.ckpt")):
        command.append("--ckpt_path=last")
    previous = read_json(directory / ATTEMPTS_JSON).get("attempts", [])
    start = time.monotonic()
    with open(directory / LOG_FILE, "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env=fit_environment(os.environ))
        if on_start is not None:
            on_start(process)
        _, status, usage = os.wait4(process.pid, 0)  # its own peak memory, not the pool's
        process.returncode = os.waitstatus_to_exitcode(status)
    attempt = {"seconds": round(time.monotonic() - start, 1), "exit_code": process.returncode,
               "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "device": device}
    attempts = [*previous, attempt]
    write_text_atomic(json.dumps({"attempts": attempts}, indent=2) + "\n",
                      directory / ATTEMPTS_JSON)
    if process.returncode != 0:
        raise RunFailed(f"training exited with code {process.returncode}")
    return {"train_seconds": round(sum(a["seconds"] for a in attempts), 1),
            "peak_rss_mb": max(a["peak_rss_mb"] for a in attempts),
            "peak_gpu_mb": peak_gpu_mb(directory), "device": device,
            "attempts": len(attempts)}


def peak_gpu_mb(directory: Path) -> float | None:
    """The largest ``memory/peak_gib`` logged by any version of the run, in MiB (None on CPU)."""
    peaks = []
    for metrics in directory.glob("version_*/metrics.csv"):
        with open(metrics, newline="") as handle:
            peaks += [float(row["memory/peak_gib"]) for row in csv.DictReader(handle)
                      if row.get("memory/peak_gib")]
    return round(max(peaks) * 1024, 1) if peaks else None


def run_cell(directory: str | Path, *, python: str = sys.executable,
             say: Callable[[str], None] = print,
             on_start: Callable[[subprocess.Popen[bytes]], None] | None = None
             ) -> dict[str, Any]:
    """Finish one run: train unless trained, score unless done; returns its done.json.

    Raises:
        RunFailed: naming the run, with the last lines of its log; failed.json is written.
    """
    directory = Path(directory)
    record = read_json(directory / CELL_JSON)
    if not record:
        raise RunFailed(f"{directory}: no readable {CELL_JSON}; plan the study again")
    done = read_json(directory / DONE_JSON)
    if done.get("settings") == record["settings"]:
        return done
    (directory / FAILED_JSON).unlink(missing_ok=True)
    try:
        trained = read_json(directory / TRAINED_JSON)
        if not trained:
            trained = train(directory, record, python=python, on_start=on_start)
            write_text_atomic(json.dumps(trained, indent=2) + "\n", directory / TRAINED_JSON)
        checkpoint = last_checkpoint_of_run(directory)
        say(f"scoring {checkpoint}")
        rows = score_run(checkpoint, Path(record["data_root"]), int(record["n_folds"]),
                         int(record["fold"]), directory / "predictions",
                         split_seed=int(record["split_seed"]), say=say)
        write_scores(directory / SCORES_CSV, rows)
    except Exception as error:
        message = (f"{record['variant']} seed {record['seed']} fold {record['fold']} failed: "
                   f"{error}")
        tail = log_tail(directory / LOG_FILE)
        write_text_atomic(json.dumps({"error": str(error), "log_tail": tail}, indent=2) + "\n",
                          directory / FAILED_JSON)
        raise RunFailed(message + ("\n" + "\n".join(tail) if tail else "")) from error
    done = {**{k: record[k] for k in ("variant", "seed", "fold", "settings", "params",
                                       "flops_per_patch")},
            **trained, "checkpoint": str(checkpoint.relative_to(directory)),
            "cases_scored": len({(r["split"], r["case"]) for r in rows}),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_text_atomic(json.dumps(done, indent=2) + "\n", directory / DONE_JSON)
    return done


def log_tail(path: Path, lines: int = LOG_TAIL) -> list[str]:
    """The last non-empty lines of a log file (none if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def main(argv: list[str] | None = None) -> int:
    """``python -m segmentation.study.cell RUN_DIR``: exit 0 when done, 1 after one message."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m segmentation.study.cell RUN_DIR", file=sys.stderr)
        return 2
    try:
        run_cell(args[0])
    except RunFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The local executor: a pool of slots over this machine's GPUs (or its CPU), one run per slot.

A slot is a group of ``gpus_per_run`` GPUs (or the CPU); every GPU group appears
``runs_per_device`` times. Each slot runs one study run at a time as its own process, pinned to
the slot's GPUs with ``CUDA_VISIBLE_DEVICES``, so never more runs are alive than there are
slots, and runs alive at once never share a GPU unless ``runs_per_device`` > 1 asks for it.
This is a loop over ``subprocess``, not a scheduler: SLURM (``segmentation.study.slurm``) does
the distributing across machines. Ctrl-C stops every run the pool started (their process
groups) and leaves finished runs as they are.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from segmentation.study.cell import log_tail
from segmentation.study.folders import FAILED_JSON, LOG_FILE, Cell, read_json

STOP_GRACE_SECONDS = 10.0  # after SIGTERM, before SIGKILL


@dataclass(frozen=True)
class Slot:
    """Where one run goes: a group of GPU ids as CUDA_VISIBLE_DEVICES names them, or the CPU."""

    gpus: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``cuda:0``, ``cuda:0,1`` or ``cpu``."""
        return f"cuda:{','.join(self.gpus)}" if self.gpus else "cpu"


def available_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids a run may be pinned to: CUDA_VISIBLE_DEVICES's list, else every GPU."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def make_slots(devices: Sequence[str] | None, available: Sequence[str], *, gpus_per_run: int = 1,
               runs_per_device: int = 1) -> list[Slot]:
    """The pool's slots.

    Args:
        devices: GPU ids to use (``--devices 0,1``), ``["cpu"]``, or None for every GPU
            available (the CPU when there is none).
        available: the GPU ids of this machine (see :func:`available_gpus`).
        gpus_per_run: GPUs of one run (Lightning DDP inside the run when > 1).
        runs_per_device: runs sharing a GPU group (or the CPU) at once.

    Raises:
        ValueError: naming a device that does not exist, a device given twice, fewer GPUs than
            one run needs, or a ``runs_per_device`` below 1.
    """
    if runs_per_device < 1:
        raise ValueError(f"--runs-per-device {runs_per_device}: give 1 or more")
    if devices is None:
        devices = list(available) or ["cpu"]
    devices = [str(d).strip() for d in devices]
    if devices == ["cpu"]:
        return [Slot()] * runs_per_device
    for device in devices:
        if device not in available:
            have = ", ".join(available) if available else "none"
            raise ValueError(f"--devices: GPU {device} does not exist (GPUs here: {have}); "
                             "pass existing ids or cpu")
    repeated = sorted({d for d in devices if devices.count(d) > 1})
    if repeated:
        raise ValueError(f"--devices: GPU {repeated[0]} is listed twice; use --runs-per-device "
                         "to run several runs on one GPU")
    if len(devices) < gpus_per_run:
        raise ValueError(f"gpus_per_run is {gpus_per_run} but only {len(devices)} GPU(s) are "
                         "given")
    groups = [tuple(devices[i:i + gpus_per_run])
              for i in range(0, len(devices) - gpus_per_run + 1, gpus_per_run)]
    return [Slot(group) for _ in range(runs_per_device) for group in groups]


def slot_environment(slot: Slot, cpu_slots: int, environ: Mapping[str, str] | None = None
                     ) -> dict[str, str]:
    """A run's environment: pinned to its GPUs; on the CPU, its share of the cores."""
    environ = dict(os.environ if environ is None else environ)
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)  # "" hides every GPU
    if not slot.gpus:
        threads = max(1, (os.cpu_count() or 1) // max(cpu_slots, 1))
        environ["OMP_NUM_THREADS"] = environ["MKL_NUM_THREADS"] = str(threads)
    return environ


def cell_command(cell: Cell) -> list[str]:
    """The command that finishes one run (train, score, mark done)."""
    return [sys.executable, "-m", "segmentation.study.cell", str(cell.directory)]


@dataclass
class Outcome:
    """How a run of the pool ended."""

    cell: Cell
    slot: Slot
    exit_code: int
    message: str = ""


@dataclass
class LocalPool:
    """Runs cells on slots, one process per cell, at most one per slot at a time."""

    slots: list[Slot]
    command: Callable[[Cell], list[str]] = cell_command
    console: Console = field(default_factory=lambda: Console(stderr=True))

    def run(self, cells: Sequence[Cell]) -> list[Outcome]:
        """Run every cell; returns the outcomes in the order the runs ended.

        A failed run is reported (its name and the last lines of its log) and the others go
        on. KeyboardInterrupt (or any exception in the waiting thread) stops every running
        process group, waits for the workers, and is raised again.
        """
        pending: queue.Queue[Cell] = queue.Queue()
        for cell in cells:
            pending.put(cell)
        stop = threading.Event()
        running: dict[int, subprocess.Popen[bytes]] = {}
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        cpu_slots = sum(1 for s in self.slots if not s.gpus)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(f"study runs on {len(self.slots)} slot(s)",
                                     total=len(cells))

            def work(slot: Slot) -> None:
                while not stop.is_set():
                    try:
                        cell = pending.get_nowait()
                    except queue.Empty:
                        return
                    outcome = self._run_one(cell, slot, cpu_slots, running, lock, stop)
                    if outcome is None:  # stopped
                        return
                    with lock:
                        outcomes.append(outcome)
                    self._report(progress, outcome)
                    progress.advance(task)

            threads = [threading.Thread(target=work, args=(slot,), daemon=True)
                       for slot in self.slots]
            for thread in threads:
                thread.start()
            try:
                while any(thread.is_alive() for thread in threads):
                    time.sleep(0.2)
            except BaseException:
                stop.set()
                self._stop_all(running, lock)
                for thread in threads:
                    thread.join(timeout=STOP_GRACE_SECONDS + 5)
                raise
        return outcomes

    def _run_one(self, cell: Cell, slot: Slot, cpu_slots: int,
                 running: dict[int, subprocess.Popen[bytes]], lock: threading.Lock,
                 stop: threading.Event) -> Outcome | None:
        """Run one cell on a slot; None if the pool was stopped before it could start."""
        cell.directory.mkdir(parents=True, exist_ok=True)
        with lock:
            if stop.is_set():
                return None
            with open(cell.directory / LOG_FILE, "ab") as log:
                process = subprocess.Popen(self.command(cell), stdout=log,
                                           stderr=subprocess.STDOUT,
                                           env=slot_environment(slot, cpu_slots),
                                           start_new_session=True)  # its own process group
            running[process.pid] = process
        code = process.wait()
        with lock:
            running.pop(process.pid, None)
        if stop.is_set():
            return None
        message = ""
        if code != 0:
            failed = read_json(cell.directory / FAILED_JSON)
            tail = failed.get("log_tail") or log_tail(cell.directory / LOG_FILE)
            message = "\n".join(tail)
        return Outcome(cell, slot, code, message)

    def _report(self, progress: Progress, outcome: Outcome) -> None:
        """One line per finished run; a failure with the last lines of its log."""
        cell = outcome.cell
        if outcome.exit_code == 0:
            progress.console.print(f"done: {cell.label} ({outcome.slot.name})", markup=False,
                                   highlight=False)
            return
        progress.console.print(f"failed: {cell.label} ({outcome.slot.name}, exit code "
                               f"{outcome.exit_code}); log {cell.directory / LOG_FILE}:",
                               markup=False, highlight=False)
        for line in outcome.message.splitlines():
            progress.console.print(f"    {line}", markup=False, highlight=False)

    @staticmethod
    def _stop_all(running: dict[int, subprocess.Popen[bytes]], lock: threading.Lock) -> None:
        """SIGTERM every running process group, then SIGKILL what is left after a grace."""
        with lock:
            processes = list(running.values())
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send a signal to a process's group (the run and its training process)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


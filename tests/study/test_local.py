"""The local pool: slots over fake GPU lists, never more runs than slots, Ctrl-C stops all."""

from __future__ import annotations

import _thread
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from segmentation.study.folders import Cell
from segmentation.study.local import LocalPool, Slot, available_gpus, make_slots

# Stand-in for a study run: records its CUDA_VISIBLE_DEVICES, pid and start/end times.
STAND_IN = """
import json, os, subprocess, sys, time
out = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
record = {"cvd": os.environ["CUDA_VISIBLE_DEVICES"], "pid": os.getpid(), "child": child.pid,
          "threads": os.environ.get("OMP_NUM_THREADS"), "start": time.time()}
with open(out + ".start", "w") as f:
    json.dump(record, f)
time.sleep(float(sys.argv[2]))
child.kill()
record["end"] = time.time()
with open(out, "w") as f:
    json.dump(record, f)
sys.exit(int(sys.argv[3]))
"""


def stand_in(seconds: float, fail: set[str] = frozenset()):
    def command(cell: Cell) -> list[str]:
        code = "1" if cell.variant in fail else "0"
        return [sys.executable, "-c", STAND_IN, str(cell.directory / "record.json"),
                str(seconds), code]
    return command


def cells(tmp_path: Path, n: int, variants=("a",)) -> list[Cell]:
    return [Cell(v, seed, 0, tmp_path / v / f"seed{seed}-fold0") for seed in range(n)
            for v in variants]


def max_overlap(records: list[dict]) -> int:
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    alive = most = 0
    for _, step in events:
        alive += step
        most = max(most, alive)
    return most


def test_slots_from_devices():
    assert make_slots(None, ["0", "1"]) == [Slot(("0",)), Slot(("1",))]
    assert make_slots(None, []) == [Slot()]  # no GPU: the CPU
    assert make_slots(["cpu"], ["0"], runs_per_device=2) == [Slot(), Slot()]
    assert make_slots(["0", "1", "2", "3"], ["0", "1", "2", "3"], gpus_per_run=2,
                      runs_per_device=2) == [Slot(("0", "1")), Slot(("2", "3"))] * 2
    for devices, message in (([7], "GPU 7 does not exist"), (["0", "0"], "listed twice")):
        with pytest.raises(ValueError, match=message):
            make_slots([str(d) for d in devices], ["0", "1"])
    with pytest.raises(ValueError, match="only 1 GPU"):
        make_slots(["0"], ["0", "1"], gpus_per_run=2)
    with pytest.raises(ValueError, match="--runs-per-device 0"):
        make_slots(None, ["0"], runs_per_device=0)
    assert available_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]


@pytest.mark.parametrize(("devices", "gpus_per_run", "per_device"), [
    (["0", "1", "2"], 1, 1), (["0", "1", "2", "3"], 2, 2), (["cpu"], 1, 2)])
def test_pool_never_runs_more_than_slots_and_pins_distinct_gpus(tmp_path, devices, gpus_per_run,
                                                                per_device):
    slots = make_slots(devices, ["0", "1", "2", "3"], gpus_per_run=gpus_per_run,
                       runs_per_device=per_device)
    todo = cells(tmp_path, 7)
    outcomes = LocalPool(slots, command=stand_in(0.6)).run(todo)
    assert sorted(o.cell.seed for o in outcomes) == list(range(7))
    records = [json.loads((c.directory / "record.json").read_text()) for c in todo]
    assert max_overlap(records) <= len(slots)
    assert max_overlap(records) >= min(2, len(slots))  # it does run them side by side
    for r in records:
        assert r["cvd"] == ("" if devices == ["cpu"] else r["cvd"])
        if devices == ["cpu"]:
            assert r["threads"] == str(max(1, (os.cpu_count() or 1) // len(slots)))
        else:
            assert len(r["cvd"].split(",")) == gpus_per_run
    # at no moment do more runs hold one GPU than runs_per_device allows (a long run may
    # overlap two that followed each other in a slot: count runs alive at once, not pairs)
    for gpu in {g for r in records if r["cvd"] for g in r["cvd"].split(",")}:
        holding = [r for r in records if gpu in r["cvd"].split(",")]
        assert max_overlap(holding) <= per_device


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, capsys):
    todo = cells(tmp_path, 2, variants=("good", "bad"))
    outcomes = LocalPool([Slot()], command=stand_in(0.0, fail={"bad"})).run(todo)
    codes = {(o.cell.variant, o.cell.seed): o.exit_code for o in outcomes}
    assert codes == {("good", 0): 0, ("bad", 0): 1, ("good", 1): 0, ("bad", 1): 1}
    assert "failed: bad seed 0 fold 0 (cpu, exit code 1)" in capsys.readouterr().err


def test_ctrl_c_stops_every_run_it_started(tmp_path):
    todo = cells(tmp_path, 4)
    slots = make_slots(None, ["0", "1"])
    threading.Timer(3.0, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt):
        LocalPool(slots, command=stand_in(60)).run(todo)
    started = [json.loads(p.read_text()) for p in tmp_path.glob("*/*/record.json.start")]
    assert len(started) == 2  # the other two never started
    time.sleep(0.5)
    for record in started:
        for pid in (record["pid"], record["child"]):  # the run and its training process
            assert not alive(pid)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"

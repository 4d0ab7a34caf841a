"""The SLURM executor without a cluster: the sbatch script submitit writes, requeue handling."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from segmentation.cli import main  # noqa: E402
from segmentation.study.cell import device_args, fit_environment  # noqa: E402
from segmentation.study.plan import make_plan, write_plan  # noqa: E402
from segmentation.study.slurm import CellJob, slurm_parameters, submit  # noqa: E402
from segmentation.study.spec import load_study  # noqa: E402


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """``srun`` and an ``sbatch`` that records its script and answers with job 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_one_array_task_per_run_with_the_study_settings(write_study, fake_slurm):
    path = write_study(seeds=[0, 1, 2], slurm={"partition": "gpu", "array_parallelism": 4,
                                               "timeout_min": 600})
    plan = make_plan(load_study(path))
    write_plan(plan)
    args = argparse.Namespace(slurm_partition=None, slurm_timeout_min=None,
                              slurm_cpus_per_task=3, slurm_mem_gb=None,
                              slurm_array_parallelism=None)
    jobs = submit(plan, plan.cells, args)
    script = (fake_slurm / "submitted.sh").read_text()
    n = len(plan.cells)
    assert f"#SBATCH --array=0-{n - 1}%4" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=600" in script
    assert "#SBATCH --cpus-per-task=3" in script  # the command line wins
    assert "#SBATCH --gpus-per-node=1" in script and "#SBATCH --ntasks-per-node=1" in script
    assert re.search(r"#SBATCH --signal=USR2@\d+", script)  # submitit's requeue signal
    assert "-m submitit.core._submit" in script
    assert [j.job_id for j in jobs] == [f"4242_{i}" for i in range(n)]
    submissions = [j.submission() for j in jobs]
    assert all(isinstance(s.function, CellJob) for s in submissions)
    assert [s.args for s in submissions] == [(str(c.directory),) for c in plan.cells]


def test_study_run_on_slurm_submits_and_returns_without_waiting(write_study, fake_slurm,
                                                                capsys):
    path = write_study()
    assert main(["study", "run", str(path), "--executor", "slurm", "--no-wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted job array 4242 (4 runs)" in out
    assert "segmentation study report" in out


def test_parameters_default_and_override():
    parameters = slurm_parameters({"qos": "high"}, None, gpus_per_run=2, name="s")
    assert parameters["gpus_per_node"] == 2 and parameters["slurm_qos"] == "high"
    assert parameters["name"] == "study-s" and parameters["tasks_per_node"] == 1


def test_checkpoint_stops_training_and_hands_back_the_same_run(tmp_path):
    job = CellJob()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    job._remember(process)
    delayed = job.checkpoint(str(tmp_path))
    assert process.poll() is not None  # stopped, so the requeued task can resume
    assert isinstance(delayed.function, CellJob) and delayed.args == (str(tmp_path),)


def test_training_runs_without_slurm_variables_so_lightning_does_not_requeue():
    environ = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "PATH": "/bin",
               "CUDA_VISIBLE_DEVICES": "3"}
    assert fit_environment(environ) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3"}


def test_device_arguments_follow_the_visible_gpus():
    assert device_args({"CUDA_VISIBLE_DEVICES": "2,3"}, 2, True)[0] == [
        "--trainer.accelerator=gpu", "--trainer.devices=2"]
    assert device_args({"CUDA_VISIBLE_DEVICES": ""}, 1, True)[0][0] == \
        "--trainer.accelerator=cpu"
    assert device_args({}, 1, False)[1] == "cpu"

"""A micro study end to end: plan, run on two CPU slots, report, resume, refuse mixed settings."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from segmentation.cli import main
from segmentation.data.layout import read_dataset
from segmentation.study.plan import make_plan, write_plan
from segmentation.study.spec import load_study


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _mtimes(study_dir):
    return {p: p.stat().st_mtime_ns for p in study_dir.glob("*/seed*-fold*/done.json")}


def test_micro_study_runs_resumes_and_reports(write_study, micro_data, tmp_path, capsys):
    path = write_study()
    study_dir = tmp_path / "runs" / "micro"
    # A run killed after its first epoch: its folder holds version_0 with last.ckpt only.
    plan = make_plan(load_study(path))
    write_plan(plan)
    killed = next(c for c in plan.cells if c.variant == "none" and c.seed == 1)
    fit = [sys.executable, "-m", "segmentation.cli", "fit", *plan.record(killed)["fit_args"],
           "--trainer.max_epochs=1", "--trainer.accelerator=cpu"]
    subprocess.run(fit, check=True, capture_output=True)
    assert (killed.directory / "version_0" / "checkpoints" / "last.ckpt").is_file()

    assert main(["study", "run", str(path), "--runs-per-device", "2",
                 "--resamples", "1000"]) == 0
    out = capsys.readouterr().out
    assert "runs: 4 done" in out

    # every validation case of fold 0 once per run and class, the test case too
    info = read_dataset(micro_data)
    val = set(json.loads((micro_data / "splits.json").read_text())[0]["val"])
    rows = _rows(study_dir / "results.csv")
    for variant in ("all", "none"):
        for seed in ("0", "1"):
            mine = [r for r in rows if (r["variant"], r["seed"], r["fold"]) == (variant, seed, "0")]
            assert sorted(r["case"] for r in mine if r["split"] == "val") == \
                sorted(c for c in val for _ in range(3))
            assert {r["case"] for r in mine if r["split"] == "test"} == \
                {c.case_id for c in info.test}
    assert {r["state"] for r in _rows(study_dir / "runs.csv")} == {"done"}
    assert (study_dir / "report.md").is_file() and (study_dir / "summary.csv").is_file()

    # the killed run resumed from its last.ckpt: a second version, trained to max_epochs
    log = (killed.directory / "run.log").read_text()
    assert "--ckpt_path=last" in log
    assert (killed.directory / "version_1").is_dir()

    # running again does nothing
    before = _mtimes(study_dir)
    versions = sorted(study_dir.glob("*/seed*-fold*/version_*"))
    assert main(["study", "run", str(path), "--resamples", "1000"]) == 0
    assert "4 of 4 runs done; running 0" in capsys.readouterr().out
    assert _mtimes(study_dir) == before
    assert sorted(study_dir.glob("*/seed*-fold*/version_*")) == versions

    # deleting one run's marker re-runs that run only (scoring; it was trained)
    target = next(iter(before))
    target.unlink()
    assert main(["study", "run", str(path), "--resamples", "1000"]) == 0
    after = _mtimes(study_dir)
    assert target in after and after[target] != before[target]
    assert {p: t for p, t in after.items() if p != target} == \
        {p: t for p, t in before.items() if p != target}
    assert sorted(study_dir.glob("*/seed*-fold*/version_*")) == versions

    # a changed variant is refused with the runs it would mix, unless --fresh
    changed = write_study(variants={"all": {}, "none": {"model.net.init_args.long_skips": False,
                                                         "trainer.max_epochs": 3}})
    assert main(["study", "run", str(changed), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "2 run(s) were made with other settings" in err and "none seed 0 fold 0" in err
    assert main(["study", "run", str(changed), "--dry-run", "--fresh"]) == 0
    assert "runs/micro-2" in capsys.readouterr().out.replace("\n", "")


def test_a_failing_run_is_reported_and_the_report_lists_it(write_study, tmp_path, capsys):
    path = write_study(variants={"broken": {"model.optimizer.init_args.lr": -1.0}},
                       reference="broken", seeds=[0])
    assert main(["study", "run", str(path), "--resamples", "1000"]) == 1
    captured = capsys.readouterr()
    assert "failed: broken seed 0 fold 0 (cpu, exit code 1)" in captured.err
    assert "Invalid learning rate" in captured.err  # the end of its log
    assert "1 run(s) failed" in captured.out
    study_dir = tmp_path / "runs" / "micro"
    runs = _rows(study_dir / "runs.csv")
    assert [(r["variant"], r["state"]) for r in runs] == [("broken", "failed")]
    assert "broken" in (study_dir / "report.md").read_text().split("Missing runs")[1]

"""scripts/benchmark.py runs end to end at toy sizes and reports what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_benchmark_reports_both_methods_their_ratio_and_the_large_scan():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--volume", "72", "64", "64",
         "--roi", "64", "64", "64", "--large", "--large-scan", "130", "120", "100"],
        capture_output=True, text=True, timeout=300, check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    by_method = {(r["benchmark"], r.get("method")): r for r in lines if r.get("method") != "ratio"}

    same = "same_padding_whole_volume"
    for method in ("monai_sliding_window", "segmentation_predictor"):
        assert by_method[(same, method)]["seconds_per_volume"] > 0
    ratio = next(r for r in lines if r["benchmark"] == same and r["method"] == "ratio")
    assert ratio["speedup_vs_monai"] > 0 and ratio["max_abs_logit_difference"] < 1e-4

    valid = [r for r in lines if r["benchmark"] == "valid_padding_overlap_tile"]
    tiles = {r["method"]: r for r in valid}
    assert (tiles["overlap_tile_inference_tile"]["input_tile"]
            > tiles["overlap_tile_training_patch"]["input_tile"])
    assert tiles["ratio"]["max_abs_logit_difference"] < 1e-4

    large = next(r for r in lines if r["benchmark"] == "large_volume_infer")
    assert large["scan"] == [130, 120, 100] and large["peak_process_rss_mb"] > 0
    assert large["output_shape_matches"] and large["output_affine_matches"]


def test_gradient_flow_section_times_steps_and_the_cost_per_record(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--device", "cpu", "--gradient-flow",
                                      "--gradient-flow-steps", "3",
                                      "--gradient-flow-patch", "16", "16", "16"])
    benchmark.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    assert {r["benchmark"] for r in lines} == {"gradient_flow_training_step"}  # nothing else
    by_method = {r["method"]: r for r in lines}
    assert by_method["without_gradient_flow"]["median_step_seconds"] > 0
    with_flow = by_method["with_gradient_flow"]
    assert with_flow["every_n_steps"] == 1 and with_flow["records"] == 3  # samples=200 > 3
    overhead = by_method["overhead"]
    assert overhead["record_seconds"] > 0 and overhead["write_seconds"] > 0
    assert overhead["default_interval"]["nnU-Net (250000 steps)"] == 1250
    assert overhead["overhead_percent"]["every 1250 steps"] < overhead["overhead_percent"][
        "every 1 steps"]

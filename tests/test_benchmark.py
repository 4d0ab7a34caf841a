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

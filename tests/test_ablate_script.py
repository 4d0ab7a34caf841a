"""scripts/ablate_long_skips.sh: the full study's plan on this machine's devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_plans_the_full_study_and_starts_nothing(tmp_path):
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                     f"{os.environ['PATH']}", "COLUMNS": "200"}
    result = subprocess.run([str(ROOT / "scripts" / "ablate_long_skips.sh"), "--dry-run",
                             "--output", str(tmp_path / "study")],
                            capture_output=True, text=True, env=environ, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "study long_skips: 150 runs" in result.stdout
    for variant in ("none-matched", "resenc-no-top", "resenc-top-only"):
        assert variant in result.stdout
    assert not (tmp_path / "study").exists()

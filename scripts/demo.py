"""The demo behind `make demo`: synthetic data → check → train → segment held-out scans → Dice.

Every step is a `segmentation` command, printed before it runs, so the demo doubles as a
walk-through of the command line.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "synthetic"
RUNS = ROOT / "runs"


def run(*args: str) -> None:
    """Print ``$ segmentation ARGS`` and run that command, as the command line would.

    The commands run in this process, one after the other, so torch, MONAI and Lightning are
    imported once rather than once per command (seconds each on a 2-core machine).

    Args:
        *args: the arguments of the ``segmentation`` command, e.g. ("data", "check", "DIR").

    Raises:
        SystemExit: with the command's exit code, if it is not 0.
    """
    from segmentation.cli import main as segmentation

    print(f"\n$ segmentation {' '.join(args)}", flush=True)
    code = segmentation(list(args))
    if code:
        raise SystemExit(code)


def newest_run(name: str) -> Path:
    """The run folder ``runs/NAME/version_N`` with the highest N.

    Args:
        name: the experiment name, a folder under ``runs/``.

    Returns:
        The newest version folder.

    Raises:
        FileNotFoundError: if ``runs/NAME`` holds no ``version_N`` folder.
    """
    versions = sorted((p for p in (RUNS / name).glob("version_*")
                       if p.name.split("_")[1].isdigit()),
                      key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"{RUNS / name}: no version_N run folder")
    return versions[-1]


def main() -> int:
    start = time.monotonic()
    os.chdir(ROOT)  # the commands' relative paths are the project's
    if not (DATA / "dataset.json").exists():
        run("data", "synth", "--out", str(DATA.relative_to(ROOT)))
    run("data", "check", str(DATA.relative_to(ROOT)))
    run("fit", "--config", "configs/quickstart.yaml")
    run_dir = newest_run("quickstart")
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))[-1]
    predictions = run_dir / "predictions"
    if predictions.exists():
        shutil.rmtree(predictions)
    run("infer", "--checkpoint", str(best.relative_to(ROOT)), "--input",
        str((DATA / "imagesTs").relative_to(ROOT)), "--output", str(predictions.relative_to(ROOT)))

    from segmentation.plots import plot_learning_curves

    curves = plot_learning_curves(run_dir / "metrics.csv", run_dir / "learning_curves.png")
    print(f"\nrun folder:      {run_dir.relative_to(ROOT)}")
    print(f"config:          {(run_dir / 'config.yaml').relative_to(ROOT)}")
    print(f"checkpoint:      {best.relative_to(ROOT)}")
    print(f"predictions:     {predictions.relative_to(ROOT)}")
    print(f"learning curves: {curves.relative_to(ROOT)} "
          f"(live: .venv/bin/tensorboard --logdir runs)")
    print(f"time:            {time.monotonic() - start:.0f} s")
    print("\nDice of the held-out scans (data/synthetic/imagesTs vs labelsTs):", flush=True)
    run("evaluate", "--predictions", str(predictions.relative_to(ROOT)), "--labels",
        str((DATA / "labelsTs").relative_to(ROOT)), "--dataset", str(DATA.relative_to(ROOT)),
        "--csv", str((run_dir / "heldout_dice.csv").relative_to(ROOT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Learning curves from a run's CSV log."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def plot_learning_curves(metrics_csv: str | Path, out: str | Path) -> Path:
    """Plot training and validation loss and validation Dice per epoch into a PNG.

    ``metrics_csv`` is Lightning CSVLogger's ``metrics.csv``. The PNG at ``out`` (returned as a
    Path) has two panels against the epoch: loss (``train/loss_epoch``, ``val/loss``) and
    validation Dice (every ``val/dice*`` column).

    Raises:
        OSError: if the CSV file cannot be read or the PNG file cannot be written.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv) as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):  # e.g. learning-rate rows, logged per step only
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or not value:
                    continue
                series.setdefault(key, []).append((float(row["epoch"]), float(value)))
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train/loss_epoch", "train loss"), ("val/loss", "val loss")):
        if key in series:
            xs, ys = zip(*series[key], strict=True)
            loss_ax.plot(xs, ys, label=label, alpha=0.8,
                         marker="o" if key == "val/loss" else None)  # validations may be few
    loss_ax.set_xlabel("epoch")
    loss_ax.set_title("loss")
    loss_ax.legend()
    for key in sorted(k for k in series if k.startswith("val/dice")):
        xs, ys = zip(*series[key], strict=True)
        dice_ax.plot(xs, ys, marker="o", label=key.removeprefix("val/"),
                     linewidth=2.5 if key == "val/dice" else 1.0)
    dice_ax.set_xlabel("epoch")
    dice_ax.set_xlim(loss_ax.get_xlim())  # one epoch axis for both panels
    dice_ax.set_ylim(0, 1)
    dice_ax.set_title("validation Dice")
    dice_ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

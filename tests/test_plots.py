"""Learning curves drawn from a run's CSV log."""

from __future__ import annotations

from segmentation.plots import plot_learning_curves


def test_learning_curves_are_drawn_from_the_csv_log(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,lr-SGD,step,train/loss_epoch,val/dice,val/dice_organ,val/loss\n"
                       ",0.01,0,,,,\n0,,9,1.5,,,\n0,,9,,0.4,0.5,1.2\n1,,19,1.1,,,\n"
                       "1,,19,,0.6,0.7,0.9\n")
    out = plot_learning_curves(metrics, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000

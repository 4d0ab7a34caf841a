"""The report's training-dynamics section: gradient flow of every run, landscapes per variant."""

from __future__ import annotations

import numpy as np

from segmentation.instruments.landscape import Landscape, grid_axis
from segmentation.study.dynamics import dynamics_section, first_cells
from segmentation.study.report import write_report
from segmentation.training.gradient_flow_summary import GradientFlowRecord, write_gradient_flow
from tests.study.fake_study import FOLDS, SEEDS, VARIANTS, write_study

LAYERS = ("enc0.conv1", "bottleneck.conv1", "dec0.conv1", "head")
PARTS = ("encoder", "bottleneck", "decoder", "head")


def flow(scale: float) -> GradientFlowRecord:
    records = 6
    grad = np.tile(np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32) * scale, (records, 1))
    return GradientFlowRecord(
        layers=LAYERS, levels=np.array([0, 1, 0, 0]), parts=PARTS,
        steps=np.arange(records) * 5, grad_norm=grad, weight_norm=np.ones_like(grad),
        rel_update=np.full_like(grad, 1e-3), total_grad_norm=grad.sum(1))


def bowl(curvature: float, variant: str) -> Landscape:
    axis = grid_axis(5, 1.0)
    losses = 1.0 + curvature * (axis[:, None] ** 2 + axis[None, :] ** 2)
    return Landscape(axis, axis, losses, np.ones_like(losses, dtype=bool), 0,
                     {"seed": 0, "patches": 4, "range": 1.0, "steps": 5, "variant": variant})


def test_report_shows_gradient_flow_and_landscapes_per_variant(tmp_path):
    study = write_study(tmp_path)
    cells = first_cells(study, VARIANTS, SEEDS, FOLDS)
    for number, (variant, cell) in enumerate(cells.items()):
        (cell.directory / "version_0").mkdir(parents=True)
        (cell.directory / "done.json").write_text("{}")
        write_gradient_flow(cell.directory / "version_0" / "gradient_flow.npz", flow(number + 1))
        path = study / "landscapes" / variant / "landscape.npz"
        path.parent.mkdir(parents=True)
        bowl(number + 1.0, variant).save(path)
    report = write_report(study, resamples=500)
    text = (study / "report.md").read_text()
    assert "## Training dynamics" in text and "### Gradient flow" in text
    for variant in VARIANTS:
        # first encoder conv (1.0) over the last decoder conv before the head (3.0)
        assert f"| {variant} | 1 | 0.333 | 0.333 | 0.333 | 0 |" in text
    assert {p.name for p in report.files} >= {"gradient_flow.png", "gradient_flow_levels.png",
                                               "landscapes.png"}
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| 1.0000 |" in line]
    assert len(rows) == len(VARIANTS)  # every bowl has its minimum, 1.0, at the centre
    rises = [float(line.split("|")[3]) for line in rows]
    assert rises == sorted(rises) and rises[0] > 0  # steeper bowls rise faster


def test_no_records_no_section(tmp_path):
    study = write_study(tmp_path)
    assert dynamics_section(study, VARIANTS, SEEDS, FOLDS).lines == []
    assert "Training dynamics" not in (study / "report.md").read_text() \
        if (study / "report.md").exists() else True

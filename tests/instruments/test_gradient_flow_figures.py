"""``segmentation plot gradient-flow``: shared-scale heatmaps, level curves, refusals."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import numpy as np
import pytest

from segmentation.instruments import plot_command
from segmentation.instruments.gradient_flow_figures import (
    draw_gradient_flow,
    draw_level_updates,
)
from segmentation.instruments.plot_command import HEATMAP_FILE, LEVELS_FILE, add_plot_command
from segmentation.training.gradient_flow_summary import (
    RECORD_FILE,
    GradientFlowRecord,
    read_gradient_flow,
    write_gradient_flow,
)

LAYERS = ("enc0.conv1", "enc1.conv1", "bottleneck.conv1", "dec1.up", "dec1.conv1", "dec0.up",
          "dec0.conv1", "head")
PARTS = ("encoder", "encoder", "bottleneck", "decoder", "decoder", "decoder", "decoder", "head")
LEVELS = (0, 1, 2, 1, 1, 0, 0, 0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, scale: float, records: int = 5) -> Path:
    """A version folder whose relative updates span [scale, 100·scale], one zero among them."""
    steps = np.arange(records) * 10
    update = np.geomspace(scale, 100 * scale, records * len(LAYERS), dtype=np.float32)
    update = update.reshape(records, len(LAYERS))
    update[0, 2] = 0.0  # a layer that did not move: masked on the log scale
    folder.mkdir(parents=True)
    write_gradient_flow(folder / RECORD_FILE, GradientFlowRecord(
        layers=LAYERS, levels=np.array(LEVELS), parts=PARTS, steps=steps,
        grad_norm=update * 10, weight_norm=np.ones_like(update), rel_update=update,
        total_grad_norm=np.full(records, 3.0), clip_val=1.0))
    return folder


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    return (write_run(tmp_path / "skips" / "version_0", 1e-4),
            write_run(tmp_path / "noskips" / "version_0", 1e-2))


def run_command(*args: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="segmentation")
    add_plot_command(parser.add_subparsers())
    parsed = parser.parse_args(["plot", "gradient-flow", *map(str, args)])
    return parsed.func(parsed)


def test_heatmaps_of_two_runs_share_one_colour_scale(two_runs):
    runs = [(str(folder), read_gradient_flow(folder)) for folder in two_runs]
    figure = draw_gradient_flow(runs)
    images = [image for ax in figure.axes for image in ax.get_images()]
    assert len(images) == 2
    norms = [(image.norm.vmin, image.norm.vmax) for image in images]
    assert norms[0] == norms[1] == pytest.approx((1e-4, 1.0), rel=1e-5)  # both runs' range
    assert images[0].get_array().mask[2, 0]  # the zero is masked, not put at the bottom
    assert len(figure.axes) == 3  # two panels, one colour bar
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert labels == list(LAYERS)
    lines = [line.get_ydata()[0] for line in figure.axes[0].get_lines()]
    assert lines == [1.5, 2.5, 6.5]  # encoder | bottleneck | decoder | head


def test_level_curves_follow_the_u(two_runs):
    figure = draw_level_updates([("a", read_gradient_flow(two_runs[0]))])
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["enc0", "enc1", "bottleneck", "dec1", "dec0", "heads"]


def test_command_writes_both_pngs_and_prints_each_runs_summary(two_runs, tmp_path, capsys):
    out = tmp_path / "figures"
    assert run_command(*two_runs, "--output", out, "--quantity", "grad_norm") == 0
    for name in (HEATMAP_FILE, LEVELS_FILE):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    for folder in two_runs:
        assert f"{folder}: 5 records (steps 0–40), 8 layers" in printed
    assert "gradient norm enc0.conv1 / dec0.conv1: early" in printed
    assert "above the clipping value 1 in 100% of records" in printed
    # by default the PNGs go to the first run folder
    assert run_command(two_runs[0].parent) == 0
    assert (two_runs[0].parent / HEATMAP_FILE).is_file()


def test_existing_png_is_replaced_only_with_overwrite(two_runs):
    assert run_command(two_runs[0]) == 0
    heatmap = two_runs[0] / HEATMAP_FILE
    heatmap.write_bytes(b"keep me")
    with pytest.raises(ValueError, match=f"^{heatmap}: exists; pass --overwrite to replace it$"):
        run_command(*two_runs)
    assert heatmap.read_bytes() == b"keep me"
    assert run_command(*two_runs, "--overwrite") == 0
    assert heatmap.read_bytes().startswith(PNG_MAGIC)


def test_a_folder_without_records_is_refused_in_one_line(two_runs, tmp_path):
    empty = tmp_path / "empty" / "version_0"
    empty.mkdir(parents=True)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        run_command(two_runs[0], empty.parent, "--output", out)
    message = str(error.value)
    assert message.startswith(f"{empty.parent}: no gradient_flow.npz; train with ")
    assert "\n" not in message and not out.exists()  # refused before anything was written
    with pytest.raises(ValueError, match="missing: no such folder"):
        run_command(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file: not a folder"):
        run_command(two_runs[0], "--output", tmp_path / "file")


def test_the_parser_module_imports_no_plotting_torch_or_lightning():
    """segmentation/cli.py builds every subparser at start-up: registering must stay cheap."""
    tree = ast.parse(Path(plot_command.__file__).read_text())
    top_level = [alias.name for node in tree.body if isinstance(node, ast.Import)
                 for alias in node.names]
    top_level += [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert set(top_level) <= {"__future__", "argparse", "collections.abc", "pathlib", "typing"}

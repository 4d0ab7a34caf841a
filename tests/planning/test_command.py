"""``segmentation plan`` on a tiny synthetic dataset: configs, refusal, table, and fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from segmentation import UNet
from segmentation.cli import main
from segmentation.data.synth import generate_dataset
from segmentation.planning import fingerprint as fingerprint_module
from segmentation.planning.fingerprint import extract_fingerprint

CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision",
       "32-true"]
SMALL_GPU = "0.05"  # GB: a plan small enough to train a step on a CPU


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """5 training cases of 32 × 28 × 16 voxels at about 0.8 × 0.8 × 2 mm (rotated)."""
    root = tmp_path_factory.mktemp("plan") / "Dataset900_Tiny"
    generate_dataset(root, cases=5, test_cases=0, seed=2, shape=(32, 28, 16))
    return root


@pytest.fixture(scope="module")
def planned(dataset, tmp_path_factory) -> tuple[Path, Path, str]:
    """``segmentation plan`` run once: (configs folder, cache folder, its stdout)."""
    work = tmp_path_factory.mktemp("planned")
    out, cache = work / "plans", work / "cache"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    stdout = io.StringIO()
    capture.setattr(sys, "stdout", stdout)
    try:
        code = main(["plan", str(dataset), "--out", str(out), "--cache-dir", str(cache),
                     "--gpu-memory", SMALL_GPU])
    finally:
        capture.undo()
    assert code == 0
    return out, cache, stdout.getvalue()


def test_plan_writes_a_3d_and_a_2d_config_and_prints_the_table(planned):
    out, _, printed = planned
    assert sorted(p.name for p in out.iterdir()) == ["Dataset900_Tiny_2d.yaml",
                                                     "Dataset900_Tiny_3d.yaml"]
    for row in ("spacing (mm)", "median shape", "patch", "batch", "levels", "kernels",
                "strides", "parameters", "est. memory", "2d (slices across axis 2)"):
        assert row in printed
    assert f"wrote {out / 'Dataset900_Tiny_3d.yaml'}" in printed
    config = yaml.safe_load((out / "Dataset900_Tiny_3d.yaml").read_text())
    net = config["model"]["net"]["init_args"]
    assert net["spatial_dims"] == 3 and net["downsample"] == "conv"
    assert len(net["kernel_sizes"]) == len(net["features"]) == len(net["strides"]) + 1
    assert config["data"]["n_folds"] == 5 and config["data"]["batch_size"] >= 2
    assert len(config["data"]["spacing"]) == 3
    flat = yaml.safe_load((out / "Dataset900_Tiny_2d.yaml").read_text())
    assert flat["data"]["slice_axis"] == 2 and flat["model"]["net"]["init_args"][
        "spatial_dims"] == 2
    assert flat["data"]["spacing"] == config["data"]["spacing"]  # volumes resampled alike


def test_plan_refuses_to_overwrite_without_overwrite(planned, dataset, capsys):
    out, cache, _ = planned
    config = out / "Dataset900_Tiny_3d.yaml"
    before = config.read_text()
    config.write_text(before + "# edited by hand\n")
    args = ["plan", str(dataset), "--out", str(out), "--cache-dir", str(cache), "--gpu-memory",
            SMALL_GPU]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {config} exists; pass --overwrite") and error.count("\n") == 1
    assert config.read_text().endswith("# edited by hand\n")  # untouched
    assert main([*args, "--overwrite"]) == 0
    assert config.read_text() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize(("args", "message"), [
    (["plan", "no/such/dataset"], "error: no/such/dataset: no such dataset folder"),
    (["plan", "{dataset}", "--gpu-memory", "0"], "error: --gpu-memory 0: give the GPU memory"),
    (["plan", "{dataset}", "--gpu-memory", "lots"], "error: --gpu-memory lots: give"),
])
def test_user_errors_are_one_line(args, message, dataset, tmp_path, capsys):
    args = [a.format(dataset=dataset) for a in args] + ["--out", str(tmp_path / "plans")]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert error.startswith(message) and error.count("\n") == 1
    assert not (tmp_path / "plans").exists()


def test_the_fingerprint_is_stored_and_read_back_without_decoding_a_scan(planned, dataset,
                                                                        monkeypatch):
    _, cache, _ = planned
    stored = list((cache / "plan_fingerprints").glob("Dataset900_Tiny-*.json"))
    assert len(stored) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("a scan was read")

    monkeypatch.setattr(fingerprint_module, "case_fingerprint", no_reading)
    fingerprint = extract_fingerprint(dataset, cache)
    assert len(fingerprint.cases) == 5 and fingerprint.num_classes == 4


def test_a_changed_image_is_fingerprinted_again(dataset, tmp_path):
    copy = Path(shutil.copytree(dataset, tmp_path / "Dataset900_Tiny"))
    first = extract_fingerprint(copy, tmp_path / "cache")
    image = sorted((copy / "imagesTr").iterdir())[0]
    import nibabel as nib
    import numpy as np

    nifti = nib.load(str(image))
    data = np.asanyarray(nifti.dataobj)
    nib.save(nib.Nifti1Image(data[:-4], nifti.affine, nifti.header), str(image))
    label = copy / "labelsTr" / image.name.replace("_0000", "")
    label_nifti = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asanyarray(label_nifti.dataobj)[:-4], label_nifti.affine,
                             label_nifti.header), str(label))
    second = extract_fingerprint(copy, tmp_path / "cache")
    assert second.cases[0].shape != first.cases[0].shape
    assert len(list((tmp_path / "cache" / "plan_fingerprints").iterdir())) == 2


def test_the_fingerprint_reads_headers_in_preprocessing_axis_order(dataset):
    """Spacing and shape per case as preprocessing will see them: reoriented to RAS."""
    from segmentation.data.layout import read_dataset
    from segmentation.data.preprocessing import fit_preprocessing

    fingerprint = extract_fingerprint(dataset)
    info = read_dataset(dataset)
    median = fit_preprocessing(info.training, spatial_dims=3).spacing
    import numpy as np

    assert np.allclose(np.median([c.spacing for c in fingerprint.cases], axis=0), median,
                       atol=1e-5)
    assert all(sorted(c.shape) == sorted((32, 28, 16)) for c in fingerprint.cases)


def check_planned(cli, path: Path, dims: int) -> None:
    """The fit command's network and data module are the ones the config plans."""
    planned_args = yaml.safe_load(path.read_text())
    net, data = cli.model.net, cli.datamodule
    assert isinstance(net, UNet) and net.spatial_dims == dims
    init = planned_args["model"]["net"]["init_args"]
    assert [list(k) for k in net.kernel_sizes] == init["kernel_sizes"]
    assert [list(s) for s in net.strides] == init["strides"]
    assert list(data.input_size) == planned_args["data"]["patch_size"]
    assert data.batch_size == planned_args["data"]["batch_size"]
    assert list(data.spacing) == planned_args["data"]["spacing"]


def test_the_planned_2d_config_parses_with_the_fit_parser(planned, tmp_path):
    from segmentation.training.cli import SegmentationCLI

    path = planned[0] / "Dataset900_Tiny_2d.yaml"
    cli = SegmentationCLI(args=["--config", str(path), *CPU, "--runs_dir", str(tmp_path),
                                "--data.cache_dir", str(tmp_path / "cache")], run=False)
    check_planned(cli, path, 2)
    assert cli.datamodule.slice_axis == 2


def test_fit_trains_a_step_on_the_planned_3d_config(planned, dataset, tmp_path):
    from segmentation.training.cli import SegmentationCLI

    path = planned[0] / "Dataset900_Tiny_3d.yaml"
    root = shutil.copytree(dataset, tmp_path / "Dataset900_Tiny")  # fit writes splits.json
    cli = SegmentationCLI(args=[
        "fit", "--config", str(path), *CPU,
        "--data.root", str(root), "--data.num_workers", "0", "--data.cache", "none",
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.fast_dev_run", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--runs_dir", str(tmp_path / "runs")])
    check_planned(cli, path, 3)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1

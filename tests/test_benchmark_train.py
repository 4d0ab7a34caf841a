"""scripts/benchmark_train.py times the three networks alike and reports what it promises."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_train.py"
TOY_FEATURES = [2, 4, 8, 8, 8, 8]  # six stages, as the nnU-Net-sized network
TOY_PATCH = [64, 32, 32]  # the smallest six-stage patch: bottleneck 2×1×1
HAS_NNUNET = importlib.util.find_spec("dynamic_network_architectures") is not None


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script()


def test_networks_section_times_every_network_and_reports_the_ratio(bench, capsys):
    threads = torch.get_num_threads()
    bench.main(["--device", "cpu", "--patch", *map(str, TOY_PATCH),
                "--features", *map(str, TOY_FEATURES), "--steps", "2", "--warmup", "1",
                "--no-compile", "--sections", "networks"])
    assert torch.get_num_threads() == threads  # restored for the rest of the session
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    for record in lines:
        assert record["benchmark"] == "train_step"
        assert record["device"] == "cpu" and record["torch"] == torch.__version__
        assert record["dtype"] == "fp32" and record["patch"] == TOY_PATCH
        assert record["batch_size"] == 2 and record["features"] == TOY_FEATURES
    by_method = {r["method"]: r for r in lines}
    assert list(by_method) == [bench.OURS, bench.NNUNET, bench.DYNUNET, "ratio"]  # in order

    measured = [bench.OURS, bench.DYNUNET] + ([bench.NNUNET] if HAS_NNUNET else [])
    for name in measured:
        record = by_method[name]
        assert record["variant"] == "eager"
        assert record["steps_per_second"] > 0 and record["median_step_seconds"] > 0
        assert record["peak_memory_mb"] > 0 and record["tflop_per_step"] > 0
        assert record["parameters"] == record["parameter_breakdown"]["total"] > 0
        assert len(record["output_shapes"]) == 5  # main output + 4 deep-supervision outputs
    ours, dynunet = by_method[bench.OURS], by_method[bench.DYNUNET]
    # DynUNet's 3×3 convolutions have no bias: exactly those parameters are missing.
    missing = bench.dynunet_missing_biases(TOY_FEATURES)
    assert ours["parameters"] - dynunet["parameters"] == missing
    assert ours["tflop_per_step"] == dynunet["tflop_per_step"]  # biases add no conv FLOPs

    ratio = by_method["ratio"]
    assert ratio["parameter_difference"][bench.DYNUNET] == missing
    assert ratio["steps_per_second_ratio"]["eager"][bench.DYNUNET] > 0
    assert ratio["same_output_shapes"][bench.DYNUNET]
    if HAS_NNUNET:
        nnunet = by_method[bench.NNUNET]
        assert nnunet["parameters"] == ours["parameters"]
        assert nnunet["parameter_breakdown"] == ours["parameter_breakdown"]
        assert nnunet["tflop_per_step"] == ours["tflop_per_step"]
        assert ratio["parameter_difference"][bench.NNUNET] == 0
        assert ratio["steps_per_second_ratio"]["eager"][bench.NNUNET] > 0
        assert ratio["same_output_shapes"][bench.NNUNET]
    else:
        assert "pip install -e '.[bench]'" in by_method[bench.NNUNET]["skipped"]
        assert bench.NNUNET not in ratio["steps_per_second_ratio"]["eager"]


def deep_supervision_shapes(net: torch.nn.Module) -> list[tuple[int, ...]]:
    torch.manual_seed(0)
    outputs = net.train()(torch.randn(2, 1, *TOY_PATCH))
    return [tuple(o.shape) for o in outputs]


def test_dynunet_gives_the_loss_our_deep_supervision_resolutions(bench):
    init_args = bench.plain_init_args(TOY_FEATURES)
    ours = deep_supervision_shapes(bench.build_ours(init_args))
    assert ours == [(2, 3, 64 // 2**level, 32 // 2**level, 32 // 2**level)
                    for level in range(5)]
    assert deep_supervision_shapes(bench.build_dynunet(init_args)) == ours


def test_plain_conv_unet_is_our_network(bench):
    pytest.importorskip("dynamic_network_architectures")
    init_args = bench.plain_init_args(TOY_FEATURES)
    ours, nnunet = bench.build_ours(init_args), bench.build_nnunet(init_args)
    assert deep_supervision_shapes(nnunet) == deep_supervision_shapes(ours)
    assert bench.parameter_breakdown(nnunet) == bench.parameter_breakdown(ours)


def test_missing_nnunet_package_is_skipped_with_the_install_hint(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "dynamic_network_architectures", None)  # import fails
    factories = bench.network_factories(bench.plain_init_args(TOY_FEATURES))
    assert "pip install -e '.[bench]'" in factories[bench.NNUNET]
    assert callable(factories[bench.OURS]) and callable(factories[bench.DYNUNET])


def test_patches_that_a_network_would_pad_are_refused(bench):
    with pytest.raises(ValueError, match="multiple of 32"):
        bench.check_patch((48, 32, 32), stages=6)
    with pytest.raises(ValueError, match="more than one voxel"):
        bench.check_patch((32, 32, 32), stages=6)
    bench.check_patch(tuple(TOY_PATCH), stages=6)


def test_data_sections_time_both_augmentation_paths(bench, capsys):
    bench.main(["--device", "cpu", "--sections", "augmentation,loader,fit",
                "--augmentation-patches", "4", "--patch", "32", "32", "32",
                "--features", "4", "8", "16", "--scan", "40", "40", "36", "--cases", "2",
                "--workers", "0", "1", "--loader-batches", "2", "--loader-warmup", "1",
                "--steps", "2", "--warmup", "1", "--fit-workers", "0"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    augmentation = {r["method"]: r for r in lines if r["benchmark"] == "augmentation"}
    assert augmentation["ratio"]["batched_over_per_patch"] == pytest.approx(
        augmentation["batched"]["patches_per_second"]
        / augmentation["monai_chain_per_patch"]["patches_per_second"], rel=0.01)
    loader = [r for r in lines if r["benchmark"] == "train_loader"]
    for workers in (0, 1):
        rows = {r["method"]: r for r in loader if r["workers"] == workers}
        cpu, device = rows["augment_on_cpu"], rows["augment_on_device"]
        assert cpu["patches_per_second"] > 0 and device["patches_per_second"] > 0
        assert cpu["cut_voxels_over_patch"] == 1.0
        assert device["cut_voxels_over_patch"] >= 1.0  # moved patches carry a margin
        assert rows["ratio"]["device_over_cpu"] == pytest.approx(
            device["patches_per_second"] / cpu["patches_per_second"], rel=0.01)
    fit = {r["method"]: r for r in lines if r["benchmark"] == "train_fit"}
    assert fit["one_batch_on_device"]["seconds_per_step"] > 0
    for method in ("augment_on_device", "augment_on_cpu"):
        assert fit[method]["fraction_of_pure_step_rate"] == pytest.approx(
            fit["one_batch_on_device"]["seconds_per_step"] / fit[method]["seconds_per_step"],
            rel=0.01)
        assert fit[method]["classes"] == 4  # the synthetic dataset's labels

"""The synthetic dataset: determinism, labels, geometry, 2D mode and argument checks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from segmentation.data.check import check_dataset
from segmentation.data.commands import main
from segmentation.data.preprocessing import reader_affine, voxel_spacing
from segmentation.data.synth import LABELS, SynthArgumentError, generate_dataset, synth_case

SHAPE = (24, 24, 16)


def load(path):
    image = nib.load(str(path))
    return image, np.asanyarray(image.dataobj)


def test_same_seed_same_arrays_other_seed_or_case_differs():
    a, b = synth_case(1, seed=5, shape=SHAPE), synth_case(1, seed=5, shape=SHAPE)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    other_seed = synth_case(1, seed=6, shape=SHAPE)
    other_case = synth_case(2, seed=5, shape=SHAPE)
    for other in (other_seed, other_case):
        assert not np.array_equal(a.label, other.label)
        assert not np.allclose(a.affine, other.affine)


def test_written_files_are_deterministic(tmp_path):
    first = generate_dataset(tmp_path / "a", cases=2, seed=1, shape=SHAPE, test_cases=0)
    second = generate_dataset(tmp_path / "b", cases=2, seed=1, shape=SHAPE, test_cases=0)
    for x, y in zip(first.training, second.training, strict=True):
        assert np.array_equal(load(x.images[0])[1], load(y.images[0])[1])
        assert np.array_equal(load(x.label)[1], load(y.label)[1])


def test_dataset_content_and_geometry(synth_source):
    meta = json.loads((synth_source / "dataset.json").read_text())
    assert meta["name"] == "synthetic" and meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == LABELS and meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 9
    assert [p.name for p in (synth_source / "imagesTs").iterdir()] == ["synth_009_0000.nii.gz"]
    assert [p.name for p in (synth_source / "labelsTs").iterdir()] == ["synth_009.nii.gz"]

    orientations = set()
    for k in range(10):
        folder = "Tr" if k < 9 else "Ts"
        image, data = load(synth_source / f"images{folder}" / f"synth_{k:03d}_0000.nii.gz")
        label, values = load(synth_source / f"labels{folder}" / f"synth_{k:03d}.nii.gz")
        assert data.shape == values.shape == (20, 20, 16)  # conftest.SYNTH_SHAPE
        assert data.dtype == np.float32 and values.dtype == np.uint8
        assert np.all(np.isfinite(data)) and data.max() > 100  # MRI-like scale
        # every declared class, and only those, in every case
        assert set(np.unique(values)) == set(LABELS.values())
        # structures have distinct mean intensities: organ > vessel > lesion > background
        means = [data[values == v].mean() for v in (1, 2, 3, 0)]
        assert means == sorted(means, reverse=True)
        # image and label share the geometry exactly; it is not the identity
        assert np.array_equal(image.affine, label.affine)
        assert np.array_equal(image.header.get_qform(), label.header.get_qform())
        assert image.header.get_zooms() == label.header.get_zooms()
        assert int(image.header["sform_code"]) > 0 and int(image.header["qform_code"]) > 0
        assert not np.allclose(image.affine[:3, :3], np.diag(np.diag(image.affine[:3, :3])))
        assert np.linalg.norm(image.affine[:3, 3]) > 1
        zooms = image.header.get_zooms()
        assert zooms[2] > 1.5 * zooms[0]  # anisotropic: thick slices
        orientations.add(nib.aff2axcodes(image.affine))
    assert {("R", "A", "S"), ("L", "P", "S")} <= orientations
    spacings = {load(synth_source / "imagesTr" / f"synth_{k:03d}_0000.nii.gz")[0]
                .header.get_zooms() for k in range(3)}
    assert len(spacings) == 3  # spacing varies between cases


def test_two_dimensional_mode(tmp_path):
    info = generate_dataset(tmp_path / "d2", cases=2, dims=2, shape=(40, 32), test_cases=1)
    assert len(info.training) == 2 and len(info.test) == 1
    image, data = load(info.training[0].images[0])
    label, values = load(info.training[0].label)
    assert data.shape == values.shape == (40, 32)
    assert len(image.header.get_zooms()) == 2
    assert image.affine.shape == (4, 4)
    assert set(np.unique(values)) == set(LABELS.values())


def test_two_dimensional_affines_rotate_in_plane_and_pass_the_check(tmp_path):
    info = generate_dataset(tmp_path / "d2", cases=4, dims=2, shape=(40, 32), test_cases=1)
    for case in info.training + info.test:
        image = nib.load(str(case.images[0]))
        affine = image.affine
        # rotated about z only: the image plane stays the xy plane
        assert np.allclose(affine[2, :2], 0) and np.allclose(affine[:2, 2], 0)
        assert not np.allclose(affine[:2, :2], np.diag(np.diag(affine[:2, :2])))  # rotated
        assert np.allclose(voxel_spacing(affine, 2), image.header.get_zooms()[:2], rtol=1e-5)
        assert np.allclose(reader_affine(image), affine)  # preprocessing reads the same affine
    report = check_dataset(info.root)
    assert report.ok and report.errors == [], report.errors
    # nothing about any file; only the note that RAS and LPS cases alternate on purpose
    assert [w for w in report.warnings if not w.startswith("cases have different")] == []
    assert main(["data", "check", str(info.root)]) == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"dims": 4}, "dims=4"),
    ({"shape": (32, 32)}, "has 2 entries but dims=3"),
    ({"shape": (8, 32, 32)}, "too small"),
    ({"cases": 0}, "cases=0: must be an integer >= 1"),
    ({"test_cases": -1}, "test_cases=-1: must be an integer >= 0"),
    ({"seed": -1}, "seed=-1: must be an integer >= 0"),
    ({"seed": 1.5}, "seed=1.5"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(SynthArgumentError, match=message):
        generate_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs, argument", [
    ({"index": -1}, "index"), ({"index": 0, "seed": -3}, "seed"),
    ({"index": 0, "shape": (20, 20, 20, 20)}, "shape"),
])
def test_synth_case_refuses_bad_arguments(kwargs, argument):
    with pytest.raises(SynthArgumentError) as caught:
        synth_case(**kwargs)
    assert caught.value.argument == argument

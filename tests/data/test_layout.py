"""Reading nnU-Net v2 and MSD dataset folders; grouping loose files into cases."""

from __future__ import annotations

import json

import pytest

from segmentation.data.layout import Case, DatasetError, find_case_files, read_dataset

# ------------------------------------------------------------------ read_dataset


def test_nnunet_multichannel_dataset_is_read(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds")
    (root / "imagesTr" / "notes.txt").write_text("not an image: ignored")
    info = read_dataset(root)
    assert info.convention == "nnunet"
    assert info.name == "Tiny"
    assert info.channel_names == ("T1", "T2")
    assert info.labels == {"background": 0, "liver": 1, "tumour": 2}
    assert info.label_names == {0: "background", 1: "liver", 2: "tumour"}
    assert info.foreground_labels == (1, 2)
    assert info.network_channels() == {"in_channels": 2, "out_channels": 3}
    assert info.file_ending == ".nii.gz"
    assert info.num_training == 3
    assert [c.case_id for c in info.training] == ["case_a", "case_b", "case_c"]
    first = info.training[0]
    assert first.images == (root / "imagesTr" / "case_a_0000.nii.gz",
                            root / "imagesTr" / "case_a_0001.nii.gz")
    assert first.label == root / "labelsTr" / "case_a.nii.gz"
    assert info.test == (Case("new_a", (root / "imagesTs" / "new_a_0000.nii.gz",
                                        root / "imagesTs" / "new_a_0001.nii.gz"), None),)


def test_nnunet_case_without_label_file_is_still_listed(tmp_path, make_nnunet):
    root = make_nnunet(tmp_path / "ds")
    (root / "labelsTr" / "case_b.nii.gz").unlink()
    info = read_dataset(root)
    case_b = next(c for c in info.training if c.case_id == "case_b")
    assert case_b.label == root / "labelsTr" / "case_b.nii.gz"
    assert not case_b.label.exists()


def test_msd_dataset_with_4d_images_is_read(tmp_path, make_msd):
    root = make_msd(tmp_path / "ds")
    info = read_dataset(root)
    assert info.convention == "msd"
    assert info.channel_names == ("FLAIR", "T1w")
    assert info.labels == {"background": 0, "edema": 1, "tumour": 2}  # value → name reversed
    assert info.foreground_labels == (1, 2)
    assert info.file_ending == ".nii.gz"
    assert [c.case_id for c in info.training] == ["brain_1", "brain_2"]  # sorted
    assert info.training[0].images == (root / "imagesTr" / "brain_1.nii.gz",)
    assert info.training[0].label == root / "labelsTr" / "brain_1.nii.gz"
    assert [(c.case_id, c.label) for c in info.test] == [("brain_9", None)]


def test_msd_without_test_list_reads_imagests_folder(tmp_path, make_msd):
    root = make_msd(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    del meta["test"]
    (root / "dataset.json").write_text(json.dumps(meta))
    assert [c.case_id for c in read_dataset(root).test] == ["brain_9"]


@pytest.mark.parametrize("problem, message", [
    ("missing", r"dataset\.json: missing"),
    ("invalid", r"dataset\.json: invalid JSON"),
    ("no_file_ending", r"dataset\.json: missing required key\(s\) file_ending"),
    ("msd_no_training", r"dataset\.json: missing required key\(s\) training"),
    ("region_labels", r"dataset\.json: label 'liver' has value \[1, 2\]"),
    ("no_background", r"dataset\.json: labels must include background"),
    ("gap_in_labels", r"dataset\.json: label values must be consecutive, 0 to 2 .*got \[0, 1, 3\]"),
])
def test_bad_dataset_json_raises_naming_the_file(tmp_path, make_nnunet, make_msd, problem,
                                                 message):
    root = (make_msd if problem.startswith("msd") else make_nnunet)(tmp_path / "ds")
    path = root / "dataset.json"
    meta = json.loads(path.read_text())
    if problem == "missing":
        path.unlink()
    elif problem == "invalid":
        path.write_text("{not json")
    elif problem == "no_file_ending":
        del meta["file_ending"]
    elif problem == "msd_no_training":
        del meta["training"]
    elif problem == "region_labels":
        meta["labels"]["liver"] = [1, 2]
    elif problem == "no_background":
        del meta["labels"]["background"]
    elif problem == "gap_in_labels":
        meta["labels"]["tumour"] = 3
    if problem not in ("missing", "invalid"):
        path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=message):
        read_dataset(root)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder does not exist"):
        read_dataset(tmp_path / "nowhere")


# ------------------------------------------------------------------ find_case_files


def test_find_case_files_groups_channels_and_singles(tmp_path, write_nifti):
    for name in ("p1_0000.nii.gz", "p1_0001.nii.gz", "p2_0000.nii.gz", "p2_0001.nii.gz",
                 "scan.nii", "readme.txt"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"")  # grouping only looks at names
    extra = write_nifti(tmp_path / "other" / "lone.nii.gz", [[0]])
    cases = find_case_files([tmp_path / "in", extra])
    assert [c.case_id for c in cases] == ["lone", "p1", "p2", "scan"]
    folder = tmp_path / "in"
    assert cases[1].images == (folder / "p1_0000.nii.gz", folder / "p1_0001.nii.gz")
    assert cases[3].images == (tmp_path / "in" / "scan.nii",)
    assert all(c.label is None for c in cases)


def test_find_case_files_single_channel_consumer_keeps_files_apart(tmp_path):
    for name in ("a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases = find_case_files([tmp_path], n_channels=1)
    assert [c.case_id for c in cases] == ["a", "b_0000", "b_0001"]
    assert all(len(c.images) == 1 for c in cases)


def test_find_case_files_errors(tmp_path):
    for name in ("a_0000.nii.gz", "a_0002.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DatasetError, match="case a lacks channel file\\(s\\) a_0001"):
        find_case_files([tmp_path])
    (tmp_path / "a_0001.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="case a has 3 channel file\\(s\\) but 2 are expected"):
        find_case_files([tmp_path], n_channels=2)
    with pytest.raises(DatasetError, match="does not exist"):
        find_case_files([tmp_path / "missing.nii.gz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        find_case_files([tmp_path / "empty"])

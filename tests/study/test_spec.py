"""Study YAMLs: what is accepted, and each refusal in one line before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from segmentation.cli import main
from segmentation.study.spec import StudyError, load_study

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_shipped_full_study_has_every_arm_with_both_encoders():
    spec = load_study(CONFIGS / "study" / "long_skips.yaml")
    names = [v.name for v in spec.variants]
    arms = ["all", "none", "none-matched", "no-top", "top-only"]
    assert names == arms + [f"resenc-{a}" for a in arms]
    assert spec.seeds == (0, 1, 2) and spec.folds is None  # every fold of data.n_folds
    references = spec.references()
    assert references["none"] == "all" and references["resenc-none"] == "resenc-all"
    assert spec.variant("resenc-none-matched").match_parameters == "resenc-all"
    assert spec.variant("resenc-none").overrides["model.net.init_args.encoder_block"] == \
        "residual"  # merged from the anchor


def test_quick_study_compares_all_none_and_no_top_with_two_seeds():
    spec = load_study(CONFIGS / "study" / "quick.yaml")
    assert {"all", "none", "no-top"} <= {v.name for v in spec.variants}
    assert len(spec.seeds) == 2 and spec.reference == "all"


@pytest.mark.parametrize(("text", "message"), [
    ("variants: {a: {}, a: {}}", "duplicate key 'a'"),
    ("variants: {a: {}}\nreference: b", "reference 'b' is not a variant"),
    ("variants: {a: {}, b: {match_parameters: c}}", "match_parameters 'c' is not a variant"),
    ("variants: {a: {}, b: {reference: b}}", "its reference is the variant itself"),
    ("variants: {}", "give at least one"),
    ("variants: {a: {}}\nseeds: []", "seeds must be a non-empty list"),
    ("variants: {a: {}}\nfolds: [0, 0]", "folds lists 0 twice"),
    ("variants: {a: {}}\ngpus_per_run: 0", "gpus_per_run must be an integer ≥ 1"),
    ("variants: {a: {}}\nslurm: {partitoin: gpu}", "slurm: unknown key 'partitoin'"),
    ("variants: {a: {}}\nlandscape: {stepz: 3}", "landscape: unknown key 'stepz'"),
    ("variants: {a: {}}\nvariantz: {}", "unknown key 'variantz'"),
    ("variants: {'a/b': {}}", "must be usable as a folder name"),
    ("variants: [a, b", "at line"),
])
def test_bad_study_files_are_refused_naming_the_problem(tmp_path, text, message):
    config = CONFIGS / "quickstart.yaml"
    path = tmp_path / "study.yaml"
    path.write_text(f"configs: [{config}]\n{text}\n")
    with pytest.raises(StudyError, match=message) as error:
        load_study(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_a_missing_base_config_is_named(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("configs: [nowhere.yaml]\nvariants: {a: {}}\n")
    with pytest.raises(StudyError, match="config 'nowhere.yaml' does not exist"):
        load_study(path)


@pytest.mark.parametrize(("keys", "args", "message"), [
    ({"variants": {"all": {}, "typo": {"model.net.init_args.long_skipz": False}}}, [],
     "variant 'typo': .*long_skipz"),
    ({"variants": {"all": {}, "none": {}, }, "reference": "missing"}, [],
     "reference 'missing' is not a variant"),
    ({"folds": [0, 2]}, [], "fold 2 is beyond data.n_folds 2"),
    ({}, ["--devices", "7"], "GPU 7 does not exist"),
    ({"seeds": []}, [], "seeds must be a non-empty list"),
])
def test_study_run_refuses_in_one_line_and_starts_nothing(write_study, tmp_path, capsys, keys,
                                                          args, message):
    path = write_study(**keys)
    assert main(["study", "run", str(path), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "runs").exists()  # no study folder, no run


def test_study_report_refuses_a_folder_without_a_study(tmp_path, capsys):
    assert main(["study", "report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: not a study folder (no study.json and plan.json); " \
                  "`segmentation study run STUDY.yaml` makes one"


def test_unreadable_study_files_are_one_line_through_the_command(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["study", "run", str(missing)]) == 1
    assert capsys.readouterr().err.strip() == \
        f"error: {missing}: cannot be read (No such file or directory)"
    twice = tmp_path / "twice.yaml"
    twice.write_text("variants: {a: {}, a: {}}\n")
    assert main(["study", "run", str(twice)]) == 1
    assert capsys.readouterr().err.strip() == \
        f"error: {twice}: duplicate key 'a' (a variant name or config key given twice) at line 1"

"""The study report on small fake study folders."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from rich.console import Console

from segmentation.study import figures
from segmentation.study.analysis import Comparison
from segmentation.study.console import short_verdict
from segmentation.study.inputs import MEAN_CLASS
from segmentation.study.report import write_report
from tests.study.fake_study import (
    CLASSES,
    COPY,
    FOLDS,
    LOWER,
    PARTIAL,
    REFERENCE,
    SEEDS,
    TO_DO,
    VARIANTS,
    read_csv,
    write_family_study,
    write_study,
)

RESAMPLES = 2000


def _row(rows: list[dict[str, str]], variant: str, cls: str) -> dict[str, str]:
    (row,) = [r for r in rows if r["variant"] == variant and r["class"] == cls
              and r["split"] == "val"]
    return row


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    root = write_study(tmp_path_factory.mktemp("study") / "fake")
    return root, write_report(root, resamples=RESAMPLES)


def test_files_are_written(study) -> None:
    root, report = study
    for name in ("report.md", "summary.csv", "comparisons.csv", "costs.csv", "dice_per_case.png",
                 "paired_differences.png", "validation_curves.png"):
        assert (root / name).stat().st_size > 0, name
        assert root / name in report.files
    markdown = (root / "report.md").read_text()
    assert markdown.startswith("# Long-skip ablation study: fake")
    assert f"segmentation study report {root}" in markdown
    assert "Holm–Bonferroni-adjusted over all 6 comparisons" in markdown
    for image in ("dice_per_case.png", "paired_differences.png", "validation_curves.png"):
        assert f"]({image})" in markdown
    assert "### Each variant against its reference (validation folds)" in markdown
    assert "| variant | reference | class | n pairs |" in markdown
    assert "| no_skips | all_skips | liver | 16 |" in markdown
    assert "here the study reference `all_skips` for every compared variant" in markdown


def test_summary_has_every_class_and_the_mean(study) -> None:
    root, _ = study
    rows = read_csv(root / "summary.csv")
    assert [(r["variant"], r["class"]) for r in rows] == [
        (v, c) for v in VARIANTS for c in [*CLASSES, MEAN_CLASS]]
    reference = _row(rows, REFERENCE, MEAN_CLASS)
    assert reference["n_cases"] == "16"
    assert float(reference["ci_low"]) < float(reference["mean_dice"]) < float(reference["ci_high"])
    lower = _row(rows, LOWER, "liver")
    assert float(reference["mean_dice"]) - float(_row(rows, LOWER, MEAN_CLASS)["mean_dice"]) \
        == pytest.approx(0.1, abs=0.02)
    assert lower["sd_over_seeds"] != ""
    liver = _row(rows, REFERENCE, "liver")
    assert (liver["hd95_inf"], liver["hd95_nan"]) == ("1", "0")
    assert _row(rows, REFERENCE, "tumour")["hd95_nan"] == "1"
    costs = read_csv(root / "costs.csv")
    assert costs[0]["params_min"] == "1940000"
    assert costs[2]["runs_done"] == "3"


def test_lower_variant_is_significantly_lower(study) -> None:
    root, _ = study
    rows = read_csv(root / "comparisons.csv")
    for cls in [*CLASSES, MEAN_CLASS]:
        row = _row(rows, LOWER, cls)
        assert row["n_pairs"] == "16"
        assert float(row["ci_high"]) < 0
        assert float(row["mean_difference"]) == pytest.approx(-0.1, abs=0.02)
        assert float(row["holm_p"]) < 0.05
        assert row["verdict"].startswith("lower, significant")
        assert (row["wins"], row["losses"]) == ("0", "16")


def test_identical_variant_has_no_detectable_difference(study) -> None:
    root, _ = study
    for cls in [*CLASSES, MEAN_CLASS]:
        row = _row(read_csv(root / "comparisons.csv"), COPY, cls)
        assert row["verdict"] == "no detectable difference"
        assert (float(row["ci_low"]), float(row["ci_high"])) == (0.0, 0.0)
        assert float(row["wilcoxon_p"]) == 1.0


def test_missing_run_is_listed_and_left_out_of_pairs(study) -> None:
    root, report = study
    states = {(r.variant, r.seed, r.fold): r.state for r in report.missing_runs}
    assert states == {TO_DO: "to do", PARTIAL: "partial"}
    markdown = (root / "report.md").read_text()
    assert "## Missing runs" in markdown
    assert "| copy | 1 | 1 | to do |" in markdown
    assert "Results of `no_skips` seed 0 fold 1 are left out: the run is partial." in markdown
    # the partial run's junk Dice of 0 would pull the difference far below -0.1
    lower = _row(read_csv(root / "comparisons.csv"), LOWER, "liver")
    assert float(lower["mean_difference"]) > -0.12


def test_report_is_deterministic(study, tmp_path: Path) -> None:
    root, _ = study
    again = write_study(tmp_path / "again")
    write_report(again, resamples=RESAMPLES, plots=False)
    for name in ("summary.csv", "comparisons.csv", "costs.csv"):
        assert (again / name).read_bytes() == (root / name).read_bytes(), name
    before = (again / "report.md").read_bytes()
    write_report(again, resamples=RESAMPLES, plots=False)
    assert (again / "report.md").read_bytes() == before


def test_unequal_case_sets_are_flagged(tmp_path: Path) -> None:
    root = write_study(tmp_path / "unequal", failed=frozenset({(LOWER, 1, 1)}))
    report = write_report(root, resamples=500, plots=False)
    markdown = (root / "report.md").read_text()
    assert ("`no_skips` has results for 8 cases, the reference `all_skips` for 16; comparisons "
            "pair only the 8 cases both have.") in markdown
    assert "| no_skips | 1 | 1 | failed | CUDA out of memory |" in markdown
    summary = _row(read_csv(root / "summary.csv"), LOWER, "liver")
    assert summary["n_cases"] == "8"
    assert summary["note"] == "n cases differ from its reference all_skips (16)"
    assert _row(read_csv(root / "comparisons.csv"), LOWER, "liver")["n_pairs"] == "8"
    assert len(report.missing_runs) == 3


def test_variant_without_results(tmp_path: Path) -> None:
    root = write_study(tmp_path / "no_copy", failed=frozenset({(COPY, s, f) for s in SEEDS
                                                                 for f in FOLDS}))
    write_report(root, resamples=500, plots=False)
    markdown = (root / "report.md").read_text()
    assert "| copy | – | 0 | – | – | – | – | – | no results yet |" in markdown
    row = _row(read_csv(root / "comparisons.csv"), COPY, MEAN_CLASS)
    assert (row["verdict"], row["n_pairs"], row["holm_p"]) == ("no results yet", "0", "")
    assert "Holm–Bonferroni-adjusted over all 3 comparisons" in markdown


def test_study_without_results(tmp_path: Path) -> None:
    root = write_study(tmp_path / "empty", results=False)
    (root / "curves.csv").write_text("")
    report = write_report(root, resamples=500)
    markdown = (root / "report.md").read_text()
    assert "**No results yet:**" in markdown
    assert not report.has_results
    assert not any((root / name).exists() for name in (
        "dice_per_case.png", "paired_differences.png", "validation_curves.png"))
    assert all(row["note"] == "no results yet" for row in read_csv(root / "summary.csv"))
    report.print(Console(record=True))


def test_test_split_averages_folds(tmp_path: Path) -> None:
    root = write_study(tmp_path / "with_test")
    extra = []
    for variant in VARIANTS:
        for seed in SEEDS:
            for fold in FOLDS:
                if (variant, seed, fold) in (TO_DO, PARTIAL):
                    continue
                for case in ("test_a", "test_b", "test_c"):
                    value = 0.8 + 0.01 * fold - 0.1 * (variant == LOWER)
                    extra.append([variant, seed, fold, "test", case, "liver", value, 2.0])
    with open(root / "results.csv", "a", newline="") as handle:
        csv.writer(handle).writerows(extra)
    report = write_report(root, resamples=500, plots=False)
    assert report.holm_family == {"val": 6, "test": 4}  # no test tumour rows: no pairs
    row = [r for r in read_csv(root / "summary.csv")
           if r["split"] == "test" and r["variant"] == REFERENCE and r["class"] == "liver"][0]
    assert float(row["mean_dice"]) == pytest.approx(0.805)
    assert "## Results: held-out test set" in (root / "report.md").read_text()
    console = Console(record=True, width=100)
    report.print(console)
    assert "Δ Dice against its reference, held-out test set (Holm over 4)" in console.export_text()


def _comparison(low: float, high: float, holm_p: float, verdict: str) -> Comparison:
    return Comparison("val", "b", "a", "liver", 8, (low + high) / 2, low, high, holm_p, holm_p,
                      0, 0, 8, verdict)


def test_short_verdicts() -> None:
    assert short_verdict(_comparison(-0.2, -0.1, 0.01, "lower, significant (Holm p < 0.05)")) \
        == "lower (Holm p<0.05)"
    assert short_verdict(_comparison(-0.2, -0.1, 0.2, "lower, not significant (Holm p ≥ 0.05)")) \
        == "lower (n.s.)"
    assert short_verdict(_comparison(0.1, 0.2, 0.2, "higher, not significant (Holm p ≥ 0.05)")) \
        == "higher (n.s.)"
    for text in ("no detectable difference", "no results yet", "reference has no results",
                 "no pairs"):
        assert short_verdict(_comparison(-0.1, 0.1, 1.0, text)) == text


def test_console_tables_fit_100_columns(study) -> None:
    _, report = study
    console = Console(record=True, width=200)
    report.print(console)
    text = console.export_text()
    assert "Δ Dice against its reference, validation folds (Holm over 6)" in text
    assert "vs all_skips" in text
    assert "lower (Holm p<0.05)" in text and "no detectable difference" in text
    assert "missing runs (2)" in text and "training cost" in text
    tables = text[:text.index("note:")]
    assert max(len(line.rstrip()) for line in tables.splitlines()) <= 100


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory):
    root = write_family_study(tmp_path_factory.mktemp("families") / "families")
    return root, write_report(root, resamples=500, plots=False)


def test_families_use_each_variant_reference(families) -> None:
    root, report = families
    rows = read_csv(root / "comparisons.csv")
    assert [(r["variant"], r["reference"]) for r in rows if r["class"] == MEAN_CLASS] == [
        ("b", "a"), ("c", "a"), ("d", "c")]
    d = [r for r in rows if r["variant"] == "d"]
    assert all(float(r["mean_difference"]) == pytest.approx(-0.02, abs=0.005) for r in d)
    assert report.holm_family == {"val": 9}
    markdown = (root / "report.md").read_text()
    assert "(`b` against `a`; `c` against `a`; `d` against `c`)" in markdown
    assert "| d | c | liver | 12 |" in markdown
    console = Console(record=True, width=120)
    report.print(console)
    assert "vs c" in console.export_text()


def test_dice_plot_joins_each_variant_to_its_reference(
        families, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = families
    joined: set[tuple[float, float]] = set()

    def capture(fig, out):
        for ax in fig.axes[:1]:
            for line in ax.get_lines():
                xs = line.get_xdata()
                if len(xs) == 2 and line.get_color() == "0.7":
                    joined.add((round(xs[0]), round(xs[1])))
        figures.plt.close(fig)
        return Path(out)

    monkeypatch.setattr(figures, "_save", capture)
    write_report(root, resamples=50)
    assert joined == {(0, 1), (0, 2), (2, 3)}  # a → b, a → c, c → d


def test_unknown_reference_is_refused(tmp_path: Path) -> None:
    root = write_family_study(tmp_path / "bad", references={"b": "a", "d": "e"})
    with pytest.raises(ValueError, match="study.json.*'e' of 'd'"):
        write_report(root, resamples=50, plots=False)


def test_long_variant_names_fit_100_columns(tmp_path: Path) -> None:
    names = ["reference-long-name1", "variant-long-name-02", "variant-long-name-03"]
    root = write_family_study(tmp_path / "long", variants=names,
                              references={names[1]: names[0], names[2]: names[1]},
                              offsets=dict(zip(names, (0.0, -0.1, 0.001), strict=True)))
    (root / "study.json").write_text((root / "study.json").read_text().replace(
        '"classes": ["liver", "tumour"]', '"classes": ["liver", "tumour", "vessel"]'))
    report = write_report(root, resamples=50, plots=False)
    console = Console(record=True, width=200)
    report.print(console)
    text = console.export_text()
    tables = text[:text.index("wrote ")]
    assert max(len(line.rstrip()) for line in tables.splitlines()) <= 100

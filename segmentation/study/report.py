"""The report of a long-skip ablation study: :func:`write_report` and its :class:`StudyReport`.

Reads a study folder (:mod:`segmentation.study.inputs`), analyses it per split
(:mod:`segmentation.study.analysis`) and writes ``report.md``
(:mod:`segmentation.study.markdown`), ``summary.csv``, ``comparisons.csv``, ``costs.csv``
(:mod:`segmentation.study.tables`) and the plots (:mod:`segmentation.study.figures`) into the
folder, with a training-dynamics section (gradient flow, loss landscapes) where the runs
recorded them (:mod:`segmentation.study.dynamics`). :meth:`StudyReport.print` shows compact
tables on the console (:mod:`segmentation.study.console`).

Only the results of runs that ``runs.csv`` marks ``done`` are used (a run missing from
``runs.csv`` counts as done if it has results). Each variant is compared with its own reference
(``references`` of ``study.json``; without it, with the study's ``reference``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from segmentation.study import figures
from segmentation.study.analysis import (
    Comparison,
    Cost,
    SummaryRow,
    compare,
    coverage_notes,
    curve_bands,
    excluded_notes,
    ignored_notes,
    missing_runs,
    run_costs,
    summarise,
)
from segmentation.study.console import (
    compact_comparisons,
    compact_costs,
    compact_missing,
    compact_summary,
)
from segmentation.study.dynamics import dynamics_section
from segmentation.study.inputs import (
    CURVES_FILE,
    DONE,
    RESULTS_FILE,
    RUNS_FILE,
    SPLIT_TITLES,
    SPLITS,
    STUDY_FILE,
    Run,
    SplitScores,
    StudyPlan,
    read_curves,
    read_results,
    read_runs,
    split_scores,
)
from segmentation.study.markdown import render_markdown
from segmentation.study.statistics import case_means
from segmentation.study.tables import (
    write_comparisons_csv,
    write_costs_csv,
    write_summary_csv,
)

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.csv"
COMPARISONS_FILE = "comparisons.csv"
COSTS_FILE = "costs.csv"
DICE_PLOT = "dice_per_case.png"
DIFFERENCES_PLOT = "paired_differences.png"
CURVES_PLOT = "validation_curves.png"


@dataclass
class StudyReport:
    """What :func:`write_report` computed and wrote.

    Attributes:
        study_dir: the study folder.
        plan: the contents of ``study.json``.
        summary: per split, variant and class (``mean`` included): Dice, CI, HD95.
        comparisons: per split, compared variant (against its reference) and class.
        costs: per variant, from the ``done`` runs of ``runs.csv``.
        missing_runs: planned runs that are not ``done`` (state ``not in runs.csv`` for a
            planned run that ``runs.csv`` does not list).
        notes: coverage warnings (unequal case sets, excluded results, ...).
        holm_family: per split, the number of comparisons in its Holm family.
        files: the files written, in writing order.
    """

    study_dir: Path
    plan: StudyPlan
    summary: list[SummaryRow]
    comparisons: list[Comparison]
    costs: list[Cost]
    missing_runs: list[Run]
    notes: list[str]
    holm_family: dict[str, int]
    files: list[Path] = field(default_factory=list)

    @property
    def has_results(self) -> bool:
        """Whether any variant has any result."""
        return any(row.n_cases > 0 for row in self.summary)

    def print(self, console: Console | None = None) -> None:
        """Print compact tables (costs, per split Dice and comparisons, missing runs), notes.

        The tables aim at about 100 columns; ``report.md`` holds the full ones.
        """
        console = console or Console()
        if not self.has_results:
            console.print(f"no results yet: {RESULTS_FILE} holds no result of a done run",
                          markup=False, highlight=False)
        console.print(compact_costs(self.costs))
        for split, family in self.holm_family.items():
            title = SPLIT_TITLES.get(split, split)
            summary = [row for row in self.summary if row.split == split]
            if not any(row.n_cases for row in summary):
                continue
            console.print(compact_summary(summary, self.plan, f"Dice, {title}"))
            console.print(compact_comparisons(
                [c for c in self.comparisons if c.split == split],
                f"Δ Dice against its reference, {title} (Holm over {family})"))
        if self.missing_runs:
            console.print(compact_missing(self.missing_runs))
        for note in self.notes:
            console.print(f"note: {note}", markup=False, highlight=False)
        console.print(f"wrote {', '.join(path.name for path in self.files)} to {self.study_dir}",
                      markup=False, highlight=False)


def _plots(study_dir: Path, plan: StudyPlan, splits: dict[str, SplitScores],
           comparisons: Sequence[Comparison], bands: dict[str, figures.CurveBand]
           ) -> dict[str, list[str]]:
    """Write the plots; returns the image names per section (split or ``curves``)."""
    images: dict[str, list[str]] = defaultdict(list)
    val = splits.get("val")
    if val is not None and any(val.has_results(v) for v in plan.variants):
        per_case = {key: case_means(matrix) for key, matrix in val.dice.items()}
        figures.plot_dice_per_case(per_case, plan.variants, dict(plan.pairs()),
                                   plan.classes_with_mean, study_dir / DICE_PLOT)
        images["val"].append(DICE_PLOT)
    panels = {SPLIT_TITLES[split]: [(f"{c.variant} vs {c.reference} · {c.cls}", c.difference,
                                     c.low, c.high)
                                    for c in comparisons if c.split == split and c.n_pairs]
              for split in splits}
    if any(panels.values()):
        figures.plot_paired_differences(panels, study_dir / DIFFERENCES_PLOT)
        images["val" if panels.get(SPLIT_TITLES["val"]) else "test"].append(DIFFERENCES_PLOT)
    if bands:
        figures.plot_validation_curves(bands, study_dir / CURVES_PLOT)
        images["curves"].append(CURVES_PLOT)
    return images


def write_report(study_dir: str | Path, *, resamples: int = 10_000, seed: int = 0,
                 plots: bool = True) -> StudyReport:
    """Read a study folder, compute its statistics and write the report files into it.

    Writes ``report.md``, ``summary.csv``, ``comparisons.csv``, ``costs.csv`` and (with
    ``plots``) ``dice_per_case.png``, ``paired_differences.png`` and, when ``curves.csv`` has
    rows, ``validation_curves.png``. The same inputs, resamples and seed give byte-identical
    CSV and Markdown files.

    Args:
        study_dir: the folder with ``study.json``, ``results.csv``, ``runs.csv`` and
            ``curves.csv`` (all but ``study.json`` may be missing).
        resamples: bootstrap resamples of every confidence interval.
        seed: seed of every bootstrap.
        plots: write the PNG plots.

    Returns:
        The computed tables, the missing runs and the files written.

    Raises:
        OSError: if ``study.json`` cannot be read or a file cannot be written.
        ValueError: if ``study.json`` is invalid (e.g. a reference that names no variant), or
            a CSV row lacks a column or has a non-integer seed or fold.
    """
    study_dir = Path(study_dir)
    plan = StudyPlan.load(study_dir / STUDY_FILE)
    runs = read_runs(study_dir / RUNS_FILE)
    all_scores = read_results(study_dir / RESULTS_FILE)
    excluded = {run.key for run in runs if run.state != DONE}
    scores = [s for s in all_scores if s.run not in excluded]
    splits = {split: split_scores(scores, plan, split) for split in SPLITS
              if split == "val" or any(s.split == split for s in scores)}
    summary, comparisons, holm_family, notes = [], [], {}, []
    for split, split_data in splits.items():
        summary += summarise(split_data, plan, resamples=resamples, seed=seed)
        compared = compare(split_data, plan, resamples=resamples, seed=seed)
        comparisons += compared
        holm_family[split] = sum(1 for c in compared if not math.isnan(c.p))
        notes += coverage_notes(split_data, plan)
    notes += excluded_notes(all_scores, runs) + ignored_notes(all_scores, plan)
    report = StudyReport(study_dir=study_dir, plan=plan, summary=summary,
                         comparisons=comparisons, costs=run_costs(plan, runs),
                         missing_runs=missing_runs(plan, runs, scores), notes=notes,
                         holm_family=holm_family)
    report.files += [write_summary_csv(study_dir / SUMMARY_FILE, summary),
                     write_comparisons_csv(study_dir / COMPARISONS_FILE, comparisons),
                     write_costs_csv(study_dir / COSTS_FILE, report.costs)]
    images: dict[str, list[str]] = {}
    if plots:
        bands = curve_bands(read_curves(study_dir / CURVES_FILE), plan, excluded)
        images = _plots(study_dir, plan, splits, comparisons, bands)
        report.files += [study_dir / name for names in images.values() for name in names]
    markdown = render_markdown(report, resamples=resamples, seed=seed, images=images)
    dynamics = dynamics_section(study_dir, plan.variants, plan.seeds, plan.folds, plots=plots)
    if dynamics.lines:
        markdown = markdown.rstrip("\n") + "\n\n" + "\n".join(dynamics.lines).rstrip() + "\n"
        report.files += dynamics.files
    (study_dir / REPORT_FILE).write_text(markdown)
    report.files.append(study_dir / REPORT_FILE)
    return report

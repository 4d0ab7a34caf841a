"""The text of ``report.md``: method, missing runs, costs, per-split results, plots.

:func:`render_markdown` turns a computed :class:`~segmentation.study.report.StudyReport` into
Markdown, with the full tables of :mod:`segmentation.study.tables`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from segmentation.study.analysis import ALPHA, TIE, Comparison, SummaryRow
from segmentation.study.inputs import MEAN_CLASS, RESULTS_FILE, SPLIT_TITLES, StudyPlan
from segmentation.study.tables import (
    comparison_table,
    cost_table,
    markdown_table,
    missing_table,
    summary_table,
)

if TYPE_CHECKING:
    from segmentation.study.report import StudyReport


def _references(plan: StudyPlan) -> str:
    """Which variant is compared with which, as a phrase."""
    pairs = plan.pairs()
    if not pairs:
        return "no variant has a reference"
    if all(reference == plan.reference for _, reference in pairs):
        return f"here the study reference `{plan.reference}` for every compared variant"
    return "; ".join(f"`{variant}` against `{reference}`" for variant, reference in pairs)


def _method(plan: StudyPlan, holm_family: dict[str, int], resamples: int, seed: int) -> str:
    seeds = ", ".join(map(str, plan.seeds))
    family = holm_family.get("val", 0)
    text = (
        f"{len(plan.variants)} variants, each trained with {len(plan.seeds)} seeds ({seeds}) "
        f"× {len(plan.folds)}-fold cross-validation; every training case is scored once per "
        "seed, by the run whose validation fold holds it. Dice of a class absent from both the "
        f"prediction and the reference is left out of means (nnU-Net); `{MEAN_CLASS}` is, per "
        "run and case, the mean Dice over the foreground classes. Mean Dice: mean over cases of "
        "each case's mean over seeds, 95% CI from a nested percentile bootstrap (cases, then "
        f"seeds within each case; {resamples:,} resamples, seed {seed}); SD over seeds: of the "
        "per-seed mean Dice. Comparisons: each variant against its reference, named in every "
        f"row of the comparison tables ({_references(plan)}): per case, the Dice difference "
        "variant − reference averaged over the seeds both have (cases without such a seed are "
        "left out), 95% CI from a case bootstrap of the mean difference (same resamples and "
        "seed, seeds not resampled again), two-sided Wilcoxon signed-rank test on these "
        "seed-averaged per-case differences (zero differences kept, zsplit), p-values "
        f"Holm–Bonferroni-adjusted over all {family} comparisons of the validation folds (every "
        f"compared variant × every class, `{MEAN_CLASS}` included). Verdict: \"no detectable "
        "difference\" when the CI includes 0, otherwise higher or lower than the reference, "
        f"significant only when the Holm p is below {ALPHA:g}. Wins / ties / losses count cases "
        f"with a difference above, within or below ±{TIE:g}.")
    if "test" in holm_family:
        text += (
            " Held-out test set: every run scores the same test cases; per case and seed the "
            "Dice is first averaged over that seed's fold models, then analysed as above, with "
            f"its own Holm family of {holm_family['test']} comparisons.")
    return text


def _split_section(split: str, summary: Sequence[SummaryRow], comparisons: Sequence[Comparison],
                   plan: StudyPlan, images: Sequence[str]) -> list[str]:
    title = SPLIT_TITLES.get(split, split)
    lines = [f"## Results: {title}", ""]
    mine = [row for row in summary if row.split == split]
    if not any(row.n_cases for row in mine):
        return [*lines, f"No results yet ({title}).", ""]
    lines += [f"### Dice per variant and class ({title})", "",
              *markdown_table(*summary_table(mine, plan)), ""]
    lines += [f"### Each variant against its reference ({title})", "",
              *markdown_table(*comparison_table([c for c in comparisons if c.split == split])),
              ""]
    for image in images:
        lines += [f"![{image}]({image})", ""]
    return lines


def render_markdown(report: StudyReport, *, resamples: int, seed: int,
                    images: dict[str, list[str]]) -> str:
    """The text of ``report.md``.

    Args:
        report: what the report computed.
        resamples: bootstrap resamples (for the method text).
        seed: bootstrap seed (for the method text).
        images: per section (a split, or ``curves``) the PNG files to show in it.
    """
    plan = report.plan
    lines = [f"# Long-skip ablation study: {plan.name}", "",
             f"Reproduce with `segmentation study report {report.study_dir}`.", "",
             "## Method", "", _method(plan, report.holm_family, resamples, seed), ""]
    if not report.has_results:
        lines += [f"**No results yet:** `{RESULTS_FILE}` holds no result of a done run.", ""]
    lines += ["## Missing runs", ""]
    if report.missing_runs:
        lines += [f"{len(report.missing_runs)} of the {len(plan.run_keys())} planned runs are "
                  "not done; their results are left out of the tables and pairs.", "",
                  *markdown_table(*missing_table(report.missing_runs)), ""]
    else:
        lines += ["None: every planned run is done.", ""]
    lines += [f"- {note}" for note in report.notes]
    lines += [""] if report.notes else []
    lines += ["## Training cost", "", *markdown_table(*cost_table(report.costs)), ""]
    for split in report.holm_family:
        lines += _split_section(split, report.summary, report.comparisons, plan,
                                images.get(split, []))
    if images.get("curves"):
        lines += ["## Validation curves", ""]
        for image in images["curves"]:
            lines += [f"![{image}]({image})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"

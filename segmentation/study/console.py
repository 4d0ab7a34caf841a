"""Compact console tables of a study report, to fit a terminal of about 100 columns.

``report.md`` holds the full tables (:mod:`segmentation.study.tables`); the console shows per
split one Dice table (:func:`compact_summary`) and one comparison table
(:func:`compact_comparisons`, with :func:`short_verdict`), and the costs
(:func:`compact_costs`) and missing runs (:func:`compact_missing`). Every cell is a
:class:`rich.text.Text`, so names with brackets are not read as markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

from rich import box
from rich.table import Table
from rich.text import Text

from segmentation.study.analysis import ALPHA, NO_RESULTS, Comparison, Cost, SummaryRow
from segmentation.study.inputs import Run, StudyPlan
from segmentation.study.tables import (
    DASH,
    duration,
    fixed,
    gflops,
    interval,
    memory,
    p_value,
    signed,
    span,
)

_RIGHT = "right"
_WRAP = ("variant", "verdict", "devices", "state")


def _table(title: str, headers: Sequence[str], right: Sequence[str] = ()) -> Table:
    """An empty compact table: a rule under the header, no outer or inner borders.

    Columns in ``right`` are right-aligned; only the text columns in ``_WRAP`` may wrap, so
    that a narrow console breaks verdicts and names, not numbers.
    """
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1), collapse_padding=True)
    for header in headers:
        table.add_column(header, justify=_RIGHT if header in right else "left",
                         no_wrap=header not in _WRAP)
    return table


def short_verdict(comparison: Comparison) -> str:
    """The verdict in a few words: ``lower (Holm p<0.05)``, ``higher (n.s.)``, ...

    Verdicts without a direction ("no detectable difference", "no results yet", ...) are kept.
    """
    if not comparison.verdict.startswith(("higher", "lower")):
        return comparison.verdict
    direction = "higher" if comparison.low > 0.0 else "lower"
    return f"{direction} (Holm p<{ALPHA:g})" if comparison.holm_p < ALPHA else f"{direction} (n.s.)"


def _verdict_style(comparison: Comparison) -> str:
    if not comparison.verdict.startswith(("higher", "lower")) or comparison.holm_p >= ALPHA:
        return ""
    return "green" if comparison.low > 0.0 else "red"


def _estimate(estimate: float, low: float, high: float, with_sign: bool = False) -> str:
    """``estimate [low, high]``; a dash without an estimate."""
    show = signed(estimate) if with_sign else fixed(estimate)
    return DASH if show == DASH else f"{show} {interval(low, high, with_sign=with_sign)}"


def compact_summary(rows: Sequence[SummaryRow], plan: StudyPlan, title: str) -> Table:
    """Mean Dice [95% CI], SD over seeds and median HD95 per variant and class of one split.

    The variant is named on its first row only; a variant without results is one row.
    """
    table = _table(title, ["variant", "class", "n", "mean Dice [95% CI]", "SD seeds",
                           "HD95"], right=["n", "SD seeds", "HD95"])
    for variant in plan.variants:
        mine = [row for row in rows if row.variant == variant]
        if mine and mine[0].note == NO_RESULTS:
            table.add_row(Text(variant), DASH, "0", Text(NO_RESULTS), DASH, DASH)
            continue
        for i, row in enumerate(mine):
            table.add_row(Text(variant if i == 0 else ""), Text(row.cls), str(row.n_cases),
                          _estimate(row.mean, row.low, row.high), fixed(row.sd_seeds),
                          fixed(row.hd95_median, 2))
    return table


def compact_comparisons(rows: Sequence[Comparison], title: str) -> Table:
    """Δ Dice [95% CI], Holm p, wins/ties/losses and :func:`short_verdict` per comparison.

    The rows of one variant are grouped: its first row names the variant, its second row
    (``vs <reference>``) the reference it is compared with.
    """
    table = _table(title, ["variant", "class", "Δ Dice [95% CI]", "Holm p", "W/T/L",
                           "verdict"], right=["Holm p", "W/T/L"])
    for (variant, reference), group in groupby(rows, key=lambda c: (c.variant, c.reference)):
        mine = list(group)
        names = ([Text(variant), Text(f"vs {reference}", style="dim")] if len(mine) > 1
                 else [Text(f"{variant} vs {reference}")])
        for i, row in enumerate(mine):
            table.add_row(names[i] if i < len(names) else "", Text(row.cls),
                          _estimate(row.difference, row.low, row.high, with_sign=True),
                          p_value(row.holm_p), f"{row.wins}/{row.ties}/{row.losses}",
                          Text(short_verdict(row), style=_verdict_style(row)))
    return table


def compact_costs(costs: Sequence[Cost]) -> Table:
    """Runs done, parameters, GFLOP per patch, mean train time, peak memory, devices."""
    table = _table("training cost", ["variant", "runs", "params", "GFLOP/patch", "train time",
                                     "peak mem", "devices"],
                   right=["runs", "params", "GFLOP/patch", "train time", "peak mem"])
    for cost in costs:
        table.add_row(Text(cost.variant), f"{cost.runs_done}/{cost.runs_planned}",
                      span(cost.params, "{:,.0f}"), gflops(cost),
                      duration(cost.mean_train_seconds), memory(cost),
                      Text(", ".join(cost.devices) or DASH))
    return table


def compact_missing(runs: Sequence[Run]) -> Table:
    """The planned runs that are not done, with the error cut to one line."""
    table = _table(f"missing runs ({len(runs)})", ["variant", "seed", "fold", "state"],
                   right=["seed", "fold"])
    table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=48)
    for run in runs:
        table.add_row(Text(run.variant), str(run.seed), str(run.fold), Text(run.state),
                      Text(" ".join(run.error.split()) or DASH))
    return table

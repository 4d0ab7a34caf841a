"""The tables of a study report: number formatting, table rows, Markdown tables, CSV files.

* Formatting: :func:`fixed`, :func:`signed`, :func:`interval`, :func:`p_value`, :func:`span`,
  :func:`duration`, :func:`gflops`, :func:`memory`, :func:`csv_number` (``–``, or an empty CSV
  cell, where there is no number).
* Full tables as (headers, rows) of text, for ``report.md``: :func:`summary_table`,
  :func:`comparison_table`, :func:`cost_table`, :func:`missing_table`; :func:`markdown_table`
  renders one.
* CSV files: :func:`write_summary_csv`, :func:`write_comparisons_csv`, :func:`write_costs_csv`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from segmentation.atomic import write_csv_atomic
from segmentation.study.analysis import NO_RESULTS, Comparison, Cost, SummaryRow
from segmentation.study.inputs import Run, StudyPlan

DASH = "–"

TextTable = tuple[list[str], list[list[str]]]
"""Headers and rows of a table, as text."""


def fixed(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; a dash for None or NaN."""
    return DASH if value is None or math.isnan(value) else f"{value:.{digits}f}"


def signed(value: float, digits: int = 3) -> str:
    """``value`` with its sign and ``digits`` decimals; a dash for NaN."""
    return DASH if math.isnan(value) else f"{value:+.{digits}f}"


def interval(low: float, high: float, with_sign: bool = False) -> str:
    """``[low, high]`` with 3 decimals (signed with ``with_sign``); a dash if either is NaN."""
    if math.isnan(low) or math.isnan(high):
        return DASH
    show = signed if with_sign else fixed
    return f"[{show(low)}, {show(high)}]"


def p_value(p: float) -> str:
    """A p-value with 3 decimals, ``<0.001`` below that; a dash for NaN."""
    if math.isnan(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def span(values: tuple[float, float] | None, show: str) -> str:
    """``min–max`` formatted with ``show`` (one number if they look the same); dash for None."""
    if values is None:
        return DASH
    low, high = (show.format(v) for v in values)
    return low if low == high else f"{low}–{high}"


def duration(seconds: float | None) -> str:
    """``h:mm:ss``; a dash for None."""
    if seconds is None:
        return DASH
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def gflops(cost: Cost) -> str:
    """The GFLOP per patch of a variant's runs (``min–max``); a dash if none reports it."""
    flops = cost.flops_per_patch
    return span(None if flops is None else (flops[0] / 1e9, flops[1] / 1e9), "{:.2f}")


def memory(cost: Cost) -> str:
    """The maximum peak memory of a variant's runs in MB; a dash if none reports it."""
    return DASH if cost.max_peak_memory_mb is None else f"{cost.max_peak_memory_mb:,.0f} MB"


def csv_number(value: float | None, spec: str = ".6f") -> str:
    """A number for a CSV cell: empty for None or NaN, ``inf`` for infinity."""
    if value is None or math.isnan(value):
        return ""
    return "inf" if math.isinf(value) else format(value, spec)


def summary_table(rows: Sequence[SummaryRow], plan: StudyPlan) -> TextTable:
    """Headers and rows of the Dice table; a variant without results is one row."""
    headers = ["variant", "class", "n cases", "mean Dice", "95% CI", "SD over seeds",
               "median HD95", "HD95 inf / nan", "note"]
    lines = []
    for variant in plan.variants:
        mine = [row for row in rows if row.variant == variant]
        if mine and mine[0].note == NO_RESULTS:
            lines.append([variant, DASH, "0", DASH, DASH, DASH, DASH, DASH, NO_RESULTS])
            continue
        for row in mine:
            lines.append([row.variant, row.cls, str(row.n_cases), fixed(row.mean),
                          interval(row.low, row.high), fixed(row.sd_seeds),
                          fixed(row.hd95_median, 2), f"{row.hd95_inf} / {row.hd95_nan}",
                          row.note])
    return headers, lines


def comparison_table(rows: Sequence[Comparison]) -> TextTable:
    """Headers and rows of the comparison table: each variant against its reference."""
    headers = ["variant", "reference", "class", "n pairs", "Δ Dice", "95% CI", "Wilcoxon p",
               "Holm p", "wins / ties / losses", "verdict"]
    lines = [[row.variant, row.reference, row.cls, str(row.n_pairs), signed(row.difference),
              interval(row.low, row.high, with_sign=True), p_value(row.p), p_value(row.holm_p),
              f"{row.wins} / {row.ties} / {row.losses}", row.verdict] for row in rows]
    return headers, lines


def cost_table(costs: Sequence[Cost]) -> TextTable:
    """Headers and rows of the training-cost table."""
    headers = ["variant", "runs done", "parameters", "GFLOP per patch",
               "mean train time (h:mm:ss)", "max peak memory", "devices"]
    lines = [[cost.variant, f"{cost.runs_done} / {cost.runs_planned}",
              span(cost.params, "{:,.0f}"), gflops(cost), duration(cost.mean_train_seconds),
              memory(cost), ", ".join(cost.devices) or DASH] for cost in costs]
    return headers, lines


def missing_table(runs: Sequence[Run]) -> TextTable:
    """Headers and rows of the missing-runs table."""
    headers = ["variant", "seed", "fold", "state", "error"]
    return headers, [[run.variant, str(run.seed), str(run.fold), run.state, run.error or DASH]
                     for run in runs]


def _markdown_cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split()) or " "


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown pipe table as lines."""
    lines = ["| " + " | ".join(map(_markdown_cell, headers)) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in rows]
    return lines


SUMMARY_COLUMNS = ("split", "variant", "class", "n_cases", "mean_dice", "ci_low", "ci_high",
                   "sd_over_seeds", "median_hd95", "hd95_inf", "hd95_nan", "note")
COMPARISON_COLUMNS = ("split", "variant", "reference", "class", "n_pairs", "mean_difference",
                      "ci_low", "ci_high", "wilcoxon_p", "holm_p", "wins", "ties", "losses",
                      "verdict")
COST_COLUMNS = ("variant", "runs_done", "runs_planned", "params_min", "params_max",
                "flops_per_patch_min", "flops_per_patch_max", "mean_train_seconds",
                "max_peak_memory_mb", "devices")


def write_summary_csv(path: Path, rows: Sequence[SummaryRow]) -> Path:
    """``summary.csv``: one row per split, variant and class."""
    return write_csv_atomic(path, SUMMARY_COLUMNS, (
        [r.split, r.variant, r.cls, r.n_cases, csv_number(r.mean), csv_number(r.low),
         csv_number(r.high), csv_number(r.sd_seeds), csv_number(r.hd95_median, ".4f"),
         r.hd95_inf, r.hd95_nan, r.note] for r in rows))


def write_comparisons_csv(path: Path, rows: Sequence[Comparison]) -> Path:
    """``comparisons.csv``: one row per split, compared variant (with its reference) and class."""
    return write_csv_atomic(path, COMPARISON_COLUMNS, (
        [r.split, r.variant, r.reference, r.cls, r.n_pairs, csv_number(r.difference),
         csv_number(r.low), csv_number(r.high), csv_number(r.p, ".6g"),
         csv_number(r.holm_p, ".6g"), r.wins, r.ties, r.losses, r.verdict] for r in rows))


def write_costs_csv(path: Path, costs: Sequence[Cost]) -> Path:
    """``costs.csv``: one row per variant (parameters and FLOPs as min and max over runs)."""
    def ends(values: tuple[float, float] | None) -> list[str]:
        return ["", ""] if values is None else [csv_number(v, ".0f") for v in values]

    return write_csv_atomic(path, COST_COLUMNS, (
        [c.variant, c.runs_done, c.runs_planned, *ends(c.params), *ends(c.flops_per_patch),
         csv_number(c.mean_train_seconds, ".1f"), csv_number(c.max_peak_memory_mb, ".1f"),
         ";".join(c.devices)] for c in costs))

"""Scoring a study run as nnU-Net scores a fold: its validation cases, exported and evaluated.

The run's final checkpoint (``last.ckpt``, as nnU-Net's ``checkpoint_final``: choosing the
"best" epoch on the cases being scored would flatter every variant) segments the fold's
validation scans through the same path as ``segmentation infer`` (preprocessing, sliding
window, the scan's own geometry), and ``evaluate``'s Dice and HD95 compare the written label
maps with the original label files. Test cases (``imagesTs`` with ``labelsTs``) are scored the
same way, as a separate split.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from segmentation.atomic import write_csv_atomic
from segmentation.data.layout import Case, DatasetInfo, read_dataset
from segmentation.data.splits import fold_cases, load_or_create_splits
from segmentation.evaluation.commands import evaluate_folder, foreground_values
from segmentation.inference.segmenter import Segmenter

SCORE_COLUMNS = ("split", "case", "class", "dice", "hd95")


def validation_cases(info: DatasetInfo, n_folds: int, fold: int, split_seed: int = 0
                     ) -> list[Case]:
    """The training cases in the validation set of ``fold`` (splits.json of the dataset)."""
    by_id = {case.case_id: case for case in info.training}
    splits = load_or_create_splits(info.root, list(by_id), n_folds, split_seed)
    return [by_id[case_id] for case_id in fold_cases(splits, fold)[1]]


def score_cases(segmenter: Segmenter, cases: Sequence[Case], output_dir: Path,
                info: DatasetInfo, split: str, say: Callable[[str], None] = print
                ) -> list[dict[str, object]]:
    """Segment ``cases`` into ``output_dir`` and score them against their label files.

    Returns:
        One row per case and foreground class: {"split", "case", "class", "dice", "hd95"}.

    Raises:
        ValueError: if a case has no label file, or a scan cannot be segmented (naming it).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    for index, case in enumerate(cases, 1):
        if case.label is None or not case.label.is_file():
            raise ValueError(f"{case.case_id}: no label file to score against")
        segmenter.segment(case, output_dir)
        say(f"{split}: segmented {case.case_id} ({index}/{len(cases)})")
    if not cases:
        return []
    references = {case.label.parent for case in cases if case.label is not None}
    rows: list[dict[str, object]] = []
    names = info.label_names
    classes = [names[v] for v in foreground_values(names)]
    for folder in sorted(references):
        ids = [c.case_id for c in cases if c.label is not None and c.label.parent == folder]
        for row in evaluate_folder(output_dir, folder, names, case_ids=ids, hd95=True):
            for name, dice, hd95 in zip(classes, row["dice"], row["hd95"], strict=True):
                rows.append({"split": split, "case": row["case_id"], "class": name,
                             "dice": dice, "hd95": hd95})
    return rows


def score_run(checkpoint: Path, data_root: Path, n_folds: int, fold: int, output_dir: Path, *,
              split_seed: int = 0, device: str = "auto", say: Callable[[str], None] = print
              ) -> list[dict[str, object]]:
    """Score a run's checkpoint on its fold's validation cases and the labelled test cases.

    Predictions go to ``output_dir/val`` and ``output_dir/test``.
    """
    info = read_dataset(data_root)
    segmenter = Segmenter(checkpoint, device=device, note=say)
    rows = score_cases(segmenter, validation_cases(info, n_folds, fold, split_seed),
                       output_dir / "val", info, "val", say)
    rows += score_cases(segmenter, labelled_test_cases(info), output_dir / "test", info, "test",
                        say)
    return rows


def labelled_test_cases(info: DatasetInfo) -> list[Case]:
    """Test cases whose label file lies in ``labelsTs/`` (the layout lists test scans only)."""
    folder = info.root / "labelsTs"
    if not folder.is_dir():
        return []
    cases = []
    for case in info.test:
        label = folder / f"{case.case_id}{info.file_ending}"
        if label.is_file():
            cases.append(Case(case.case_id, case.images, label))
    return cases


def write_scores(path: Path, rows: Sequence[dict[str, object]]) -> Path:
    """The rows of :func:`score_run` as CSV (atomically)."""
    return write_csv_atomic(path, SCORE_COLUMNS, ([row[c] for c in SCORE_COLUMNS] for row in rows))


def read_scores(path: Path) -> list[dict[str, str]]:
    """The rows of a scores.csv as strings."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))

"""Which checkpoints an ensemble uses, and whether they can be averaged.

``segmentation infer --checkpoint`` takes checkpoint files and run folders. A run folder is
``runs/NAME`` (every fold run under it, ``version_N`` each, as ``fit --data.fold K --name
NAME`` writes them) or one ``runs/NAME/version_N``; each version contributes its best
checkpoint (``best-*.ckpt``, the highest epoch), or ``last.ckpt`` where there is none (fold
"all" keeps no best). Two versions of one fold (a repeated run) would count that fold twice;
the newest of them is used, and a note says so.

Averaging probabilities is only meaningful for models that read scans the same way and
predict the same classes: :func:`check_compatible` refuses any other combination before
anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from segmentation.inference.checkpoint import CheckpointError, CheckpointRecord

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def _version_number(folder: Path) -> int:
    found = re.fullmatch(r"version_(\d+)", folder.name)
    return int(found.group(1)) if found else -1


def checkpoint_of_version(version: Path) -> Path | None:
    """A fold run's checkpoint: its best (highest epoch), else its last; None without one."""
    best = sorted(version.glob("checkpoints/best-*.ckpt"), key=lambda p: (len(p.name), p.name))
    if best:
        return best[-1]
    last = version / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def fold_of_version(version: Path) -> str | None:
    """``data.fold`` of a run, from its config.yaml (None if it cannot be read)."""
    try:
        config = yaml.safe_load((version / "config.yaml").read_text(encoding="utf-8"))
        return str(config["data"]["fold"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def resolve_checkpoints(entries: Sequence[str | Path],
                        note: Callable[[str], None] | None = None) -> list[Path]:
    """The checkpoint files that ``entries`` (files and run folders) name, in order.

    Raises:
        CheckpointError: naming the entry, if it does not exist, a folder holds no
            checkpoint, or one checkpoint is named twice.
    """
    note = note or (lambda message: None)
    found: list[Path] = []
    for entry in (Path(e) for e in entries):
        if entry.is_file():
            found.append(entry)
        elif (entry / "checkpoints").is_dir():       # one run: runs/NAME/version_N
            checkpoint = checkpoint_of_version(entry)
            if checkpoint is None:
                raise CheckpointError(f"{entry}: no best-*.ckpt or last.ckpt under "
                                      f"{entry / 'checkpoints'}")
            found.append(checkpoint)
        elif entry.is_dir():                         # every fold run: runs/NAME
            found += _fold_checkpoints(entry, note)
        else:
            raise CheckpointError(f"{entry}: no such checkpoint file or run folder")
    seen: dict[Path, Path] = {}
    for path in found:
        key = path.resolve()
        if key in seen:
            raise CheckpointError(f"{path}: named twice (also as {seen[key]}); an ensemble "
                                  "would count that model twice")
        seen[key] = path
    return found


def _fold_checkpoints(run: Path, note: Callable[[str], None]) -> list[Path]:
    """The newest version's checkpoint of every fold under ``runs/NAME``."""
    versions = sorted((v for v in run.glob("version_*") if v.is_dir()), key=_version_number)
    by_fold: dict[str, tuple[Path, Path]] = {}
    for version in versions:
        checkpoint = checkpoint_of_version(version)
        if checkpoint is None:  # e.g. a validate/test/predict run, or an interrupted one
            continue
        fold = fold_of_version(version) or version.name  # unknown fold: its own member
        if fold in by_fold:
            note(f"{run}: {by_fold[fold][0].name} and {version.name} both trained fold {fold}; "
                 f"using the newer, {version.name}")
        by_fold[fold] = (version, checkpoint)
    if not by_fold:
        raise CheckpointError(f"{run}: no run under it holds a checkpoint "
                              "(version_*/checkpoints/best-*.ckpt or last.ckpt)")
    return [checkpoint for _, checkpoint in by_fold.values()]


def _channels(record: CheckpointRecord) -> tuple[object, object]:
    init_args = record.net.get("init_args") or {}
    return init_args.get("in_channels"), init_args.get("out_channels")


def check_compatible(records: Sequence[tuple[Path, CheckpointRecord]]) -> None:
    """Refuse models whose probabilities cannot be averaged.

    They must agree on label names, input channels and classes, the preprocessing (the
    grid the probabilities live on, and the intensities the networks expect) and, for 2D
    networks on 3D scans, the slice axis. Patch sizes and architectures may differ.

    Raises:
        CheckpointError: naming the first two checkpoints that disagree and the difference.
    """
    first_path, first = records[0]
    for path, record in records[1:]:
        for what, mine, theirs in (
                ("label names", dict(first.label_names or {}), dict(record.label_names or {})),
                ("input channels and classes", _channels(first), _channels(record)),
                ("preprocessing", first.preprocessing.as_dict() if first.preprocessing else None,
                 record.preprocessing.as_dict() if record.preprocessing else None),
                ("slice axis", first.slice_axis, record.slice_axis)):
            if mine != theirs:
                raise CheckpointError(f"{first_path} and {path} disagree on their {what} "
                                      f"({_difference(mine, theirs)}); an ensemble averages "
                                      "models of the same labels, channels and preprocessing")


def _difference(mine: object, theirs: object) -> str:
    """The first differing key of two dicts, or both values."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in sorted(set(mine) | set(theirs), key=str):
            if mine.get(key) != theirs.get(key):
                return f"{key}: {mine.get(key)!r} vs {theirs.get(key)!r}"
    return f"{mine!r} vs {theirs!r}"

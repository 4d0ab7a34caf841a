"""The plan of a study: every variant's config checked, one run per variant × seed × fold.

The plan is written to the study folder (study.json, plan.json and each run's cell.json, see
``segmentation.study.folders``) before any run starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segmentation.atomic import write_text_atomic
from segmentation.data.layout import read_dataset
from segmentation.data.splits import SPLITS_JSON
from segmentation.nets.capacity import count_parameters, match_decoder_width
from segmentation.study.configs import (
    NetworkSize,
    config_paths,
    net_init_args,
    network_size,
    override_args,
    parse_fit_config,
    settings_hash,
)
from segmentation.study.folders import CELL_JSON, PLAN_JSON, STUDY_JSON, Cell, read_json
from segmentation.study.spec import StudyError, StudySpec, Variant


@dataclass
class VariantPlan:
    """A variant's resolved fit arguments, settings hash and network size."""

    name: str
    fit_args: list[str]
    settings: str
    size: NetworkSize
    decoder_features: list[int] | None = None


@dataclass
class Plan:
    """Every run of a study, in the order they start (seed, fold, then variant)."""

    spec: StudySpec
    directory: Path
    data_root: Path
    n_folds: int
    split_seed: int
    folds: tuple[int, ...]
    classes: list[str]
    variants: dict[str, VariantPlan]
    cells: list[Cell] = field(default_factory=list)

    def record(self, cell: Cell) -> dict[str, Any]:
        """What ``cell.json`` says: the run, its settings hash and its fit arguments."""
        variant = self.variants[cell.variant]
        return {
            "study": self.spec.name, "variant": cell.variant, "seed": cell.seed,
            "fold": cell.fold, "settings": run_hash(variant.settings, cell.seed, cell.fold),
            "fit_args": [*variant.fit_args, f"--seed_everything={cell.seed}",
                         f"--data.fold={cell.fold}", f"--runs_dir={cell.directory.parent}",
                         f"--name={cell.directory.name}"],
            "data_root": str(self.data_root), "n_folds": self.n_folds,
            "split_seed": self.split_seed, "gpus_per_run": self.spec.gpus_per_run,
            "params": variant.size.params, "flops_per_patch": variant.size.flops_per_patch,
        }


def run_hash(settings: str, seed: int, fold: int) -> str:
    """The hash of one run: its variant's settings, seed and fold."""
    return hashlib.sha256(f"{settings}/{seed}/{fold}".encode()).hexdigest()[:16]


def make_plan(spec: StudySpec, directory: Path | None = None, *, require_data: bool = True
              ) -> Plan:
    """Check every variant's config by parsing it and lay out the runs.

    Without ``require_data`` (a dry run) a missing dataset leaves the class names unknown
    instead of refusing the plan.

    Raises:
        StudyError: naming the study file: a variant's config is refused by the fit parser
            (e.g. an unknown override key), variants disagree on the data or its split, a fold
            lies beyond ``data.n_folds`` or the existing splits.json, the dataset is missing,
            capacity matching fails, or the plan is empty.
    """
    configs = {v.name: _parse(spec, v, []) for v in spec.variants}
    data = {name: (c["data"]["root"], c["data"]["n_folds"], c["data"].get("split_seed", 0))
            for name, c in configs.items()}
    if len(set(data.values())) > 1:
        listed = "; ".join(f"{n}: root {d[0]}, n_folds {d[1]}, split_seed {d[2]}"
                           for n, d in data.items())
        raise StudyError(f"{spec.path}: every variant must train on the same data and split "
                         f"(data.root, data.n_folds, data.split_seed), got {listed}")
    root, n_folds, split_seed = next(iter(data.values()))
    folds = spec.folds if spec.folds is not None else tuple(range(n_folds))
    _check_folds(spec, Path(root), n_folds, folds)
    try:
        info = read_dataset(root)
        classes = [info.label_names[v] for v in info.foreground_labels]
    except (OSError, ValueError) as error:
        if require_data:
            raise StudyError(f"{spec.path}: data.root: {error}; create the dataset "
                             "first (e.g. segmentation data synth --out data/synthetic)") from None
        classes = []
    variants = {}
    for variant in spec.variants:
        config = configs[variant.name]
        widths = None
        if variant.match_parameters is not None:
            widths = _matched_widths(spec, variant, config, configs[variant.match_parameters])
            config = _parse(spec, variant, ["--model.net.init_args.decoder_features="
                                            + json.dumps(widths)])
        args = _fit_args(spec, variant, widths)
        try:
            size = network_size(config)
        except (ValueError, RuntimeError) as error:
            raise StudyError(f"{spec.path}: variant {variant.name!r}: the network does not "
                             f"take a patch of data.patch_size: {error}") from None
        variants[variant.name] = VariantPlan(variant.name, args, settings_hash(config), size,
                                             widths)
    directory = directory or spec.runs_dir / spec.name
    cells = [Cell(v.name, seed, fold, directory / v.name / f"seed{seed}-fold{fold}")
             for seed in spec.seeds for fold in folds for v in spec.variants]
    if not cells:
        raise StudyError(f"{spec.path}: the plan is empty")
    return Plan(spec, directory, Path(root), n_folds, split_seed, tuple(folds), classes,
                variants, cells)


def _fit_args(spec: StudySpec, variant: Variant, widths: list[int] | None) -> list[str]:
    """``segmentation fit`` arguments of a variant (without seed, fold and folder)."""
    extra = {} if widths is None else {"model.net.init_args.decoder_features": widths}
    return [*config_paths(spec.configs), *override_args(spec.overrides),
            *override_args({**variant.overrides, **extra})]


def _parse(spec: StudySpec, variant: Variant, extra: list[str]) -> dict[str, Any]:
    """A variant's parsed config; the parser's refusal is reported with the variant's name."""
    args = _fit_args(spec, variant, None) + extra + [f"--seed_everything={spec.seeds[0]}"]
    try:
        return parse_fit_config(args)
    except ValueError as error:
        raise StudyError(f"{spec.path}: variant {variant.name!r}: {error}") from None


def _check_folds(spec: StudySpec, root: Path, n_folds: int, folds: Iterable[int]) -> None:
    """Folds must exist in data.n_folds and in the dataset's splits.json (if written)."""
    beyond = sorted(f for f in folds if f >= n_folds)
    if beyond:
        raise StudyError(f"{spec.path}: fold {beyond[0]} is beyond data.n_folds {n_folds} "
                         f"(folds 0–{n_folds - 1})")
    splits = root / SPLITS_JSON
    if splits.is_file():
        try:
            written = len(json.loads(splits.read_text()))
        except (OSError, ValueError, TypeError):
            return  # the data module names what is wrong with it
        if written != n_folds:
            raise StudyError(f"{spec.path}: {splits} has {written} folds but data.n_folds is "
                             f"{n_folds}; use n_folds {written} or another data.root")


def _matched_widths(spec: StudySpec, variant: Variant, config: dict[str, Any],
                    target_config: dict[str, Any]) -> list[int]:
    """Decoder widths giving ``variant`` the parameters of its ``match_parameters`` variant."""
    try:
        target = count_parameters(net_init_args(target_config))
        return match_decoder_width(net_init_args(config), target)
    except ValueError as error:
        raise StudyError(f"{spec.path}: variant {variant.name!r}: {error}") from None


def mixed_settings(plan: Plan) -> list[str]:
    """Runs already in the study folder whose recorded settings differ from the plan's."""
    mixed = []
    for cell in plan.cells:
        path = cell.directory / CELL_JSON
        if path.is_file() and read_json(path).get("settings") != plan.record(cell)["settings"]:
            mixed.append(cell.label)
    return mixed


def fresh_directory(directory: Path) -> Path:
    """``DIR-2``, ``DIR-3``, … : the first that does not exist."""
    n = 2
    while directory.with_name(f"{directory.name}-{n}").exists():
        n += 1
    return directory.with_name(f"{directory.name}-{n}")


def write_plan(plan: Plan) -> None:
    """Write study.json, plan.json and every run's cell.json (kept where already written)."""
    plan.directory.mkdir(parents=True, exist_ok=True)
    spec = plan.spec
    study = {"name": spec.name, "study_file": str(spec.path), "reference": spec.reference,
             "references": spec.references(),
             "variants": [v.name for v in spec.variants], "seeds": list(spec.seeds),
             "folds": list(plan.folds), "classes": plan.classes,
             "data_root": str(plan.data_root), "n_folds": plan.n_folds}
    write_text_atomic(json.dumps(study, indent=2) + "\n", plan.directory / STUDY_JSON)
    runs = [{**plan.record(c), "directory": str(c.directory.relative_to(plan.directory))}
            for c in plan.cells]
    variants = {name: {"settings": v.settings, "params": v.size.params,
                       "flops_per_patch": v.size.flops_per_patch,
                       "decoder_features": v.decoder_features}
                for name, v in plan.variants.items()}
    write_text_atomic(json.dumps({"variants": variants, "runs": runs}, indent=2) + "\n",
                      plan.directory / PLAN_JSON)
    for cell in plan.cells:
        cell.directory.mkdir(parents=True, exist_ok=True)
        if not (cell.directory / CELL_JSON).is_file():
            write_text_atomic(json.dumps(plan.record(cell), indent=2) + "\n",
                              cell.directory / CELL_JSON)



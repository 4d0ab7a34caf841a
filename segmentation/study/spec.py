"""A study YAML: base fit configs, named variants as overrides, seeds, folds, where to run.

Example (``configs/study/quick.yaml``)::

    name: quick
    configs: [../quickstart.yaml]          # any fit config chain, relative to this file
    overrides: {trainer.max_epochs: 12}    # every run
    variants:                              # name → LightningCLI overrides
      all: {}
      none: {model.net.init_args.long_skips: false}
      none-matched:                        # as "none", decoder widened to the params of "all"
        model.net.init_args.long_skips: false
        match_parameters: all
      resenc-none:                         # compared with its own reference, not "all"
        model.net.init_args.encoder_block: residual
        model.net.init_args.long_skips: false
        reference: resenc-all
    reference: all                         # the variant the others are compared with
    seeds: [0, 1]
    folds: [0, 1, 2, 3, 4]                 # default: every fold of data.n_folds
    gpus_per_run: 1                        # >1: each run trains with Lightning DDP
    slurm: {partition: gpu, timeout_min: 1440, cpus_per_task: 8, mem_gb: 64}
    landscape: {dims: 2, steps: 9, patches: 4}  # loss landscapes of seed 0, fold 0 (optional)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MATCH_KEY, REFERENCE_KEY = "match_parameters", "reference"  # in a variant: not config keys
TOP_LEVEL_KEYS = ("name", "description", "configs", "overrides", "variants", "reference",
                  "seeds", "folds", "gpus_per_run", "runs_dir", "slurm", "landscape")
LANDSCAPE_KEYS = ("dims", "steps", "range", "patches", "seed")
SLURM_KEYS = ("partition", "timeout_min", "cpus_per_task", "mem_gb", "array_parallelism",
              "account", "qos", "constraint", "additional_parameters")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a variant name is a folder name


class StudyError(ValueError):
    """A study YAML that cannot be run; the message names the file and what to change."""


@dataclass(frozen=True)
class Variant:
    """One arm of the study.

    Attributes:
        name: folder name of its runs.
        overrides: dotted config key → value, as on the ``segmentation fit`` command line.
        match_parameters: the variant whose parameter count the decoder is widened to, or None.
        reference: the variant it is compared with, when not the study's reference.
    """

    name: str
    overrides: dict[str, Any]
    match_parameters: str | None = None
    reference: str | None = None


@dataclass(frozen=True)
class StudySpec:
    """A parsed and checked study YAML (see the module docstring for the format)."""

    path: Path
    name: str
    configs: tuple[Path, ...]
    overrides: dict[str, Any]
    variants: tuple[Variant, ...]
    reference: str
    seeds: tuple[int, ...]
    folds: tuple[int, ...] | None
    gpus_per_run: int = 1
    runs_dir: Path = Path("runs/study")
    slurm: dict[str, Any] = field(default_factory=dict)
    landscape: dict[str, Any] | None = None

    def variant(self, name: str) -> Variant:
        """The variant called ``name``."""
        return next(v for v in self.variants if v.name == name)

    def references(self) -> dict[str, str]:
        """Variant → the variant it is compared with; the study's reference is not compared."""
        return {v.name: v.reference or self.reference for v in self.variants
                if v.name != self.reference}


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in a mapping is an error.

    PyYAML keeps the last of duplicate keys, so two variants of one name would silently
    become one.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" (checked by PyYAML)
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (a variant name or config key given "
                    "twice)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_study(path: str | Path) -> StudySpec:
    """Read and check a study YAML.

    Raises:
        StudyError: naming the file and the problem: unreadable YAML, unknown keys, no
            variants, duplicate or unusable variant names, a reference or ``match_parameters``
            that names no variant, bad seeds, folds or ``gpus_per_run``, missing configs.
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (safe loader)
    except OSError as error:
        raise StudyError(f"{path}: cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise StudyError(f"{path}: {problem}{line}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study is a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")

    def fail(problem: str) -> StudyError:
        return StudyError(f"{path}: {problem}")

    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; a study has {', '.join(TOP_LEVEL_KEYS)}")
    configs = _configs(raw.get("configs"), path, fail)
    overrides = _overrides(raw.get("overrides") or {}, "overrides", fail)
    variants = _variants(raw.get("variants"), fail)
    names = [v.name for v in variants]
    reference = raw.get("reference", names[0])
    if reference not in names:
        raise fail(f"reference {reference!r} is not a variant (variants: {', '.join(names)})")
    for variant in variants:
        if variant.match_parameters is not None and variant.match_parameters not in names:
            raise fail(f"variant {variant.name!r}: {MATCH_KEY} {variant.match_parameters!r} is "
                       f"not a variant (variants: {', '.join(names)})")
        if variant.match_parameters == variant.name:
            raise fail(f"variant {variant.name!r}: {MATCH_KEY} names the variant itself")
        if variant.reference is not None and variant.reference not in names:
            raise fail(f"variant {variant.name!r}: reference {variant.reference!r} is not a "
                       f"variant (variants: {', '.join(names)})")
        if variant.reference == variant.name:
            raise fail(f"variant {variant.name!r}: its reference is the variant itself")
    seeds = _integers(raw.get("seeds", [0]), "seeds", fail)
    folds = None if raw.get("folds") is None else _integers(raw["folds"], "folds", fail)
    gpus = raw.get("gpus_per_run", 1)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise fail(f"gpus_per_run must be an integer ≥ 1, got {gpus!r}")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise fail("slurm must be a mapping, e.g. {partition: gpu, timeout_min: 1440}")
    bad = sorted(set(slurm) - set(SLURM_KEYS))
    if bad:
        raise fail(f"slurm: unknown key {bad[0]!r}; known: {', '.join(SLURM_KEYS)}")
    landscape = raw.get("landscape")
    if landscape is not None:
        if not isinstance(landscape, dict):
            raise fail("landscape must be a mapping, e.g. {dims: 2, steps: 9, patches: 4}")
        bad = sorted(set(landscape) - set(LANDSCAPE_KEYS))
        if bad:
            raise fail(f"landscape: unknown key {bad[0]!r}; known: {', '.join(LANDSCAPE_KEYS)}")
    name = str(raw.get("name") or path.stem)
    if not _NAME.match(name):
        raise fail(f"name {name!r} must be usable as a folder name (letters, digits, _.+-)")
    return StudySpec(path=path, name=name, configs=configs, overrides=overrides,
                     variants=variants, reference=reference, seeds=seeds, folds=folds,
                     gpus_per_run=gpus, runs_dir=Path(raw.get("runs_dir") or "runs/study"),
                     slurm=dict(slurm), landscape=landscape)


def _configs(value: Any, path: Path, fail: Any) -> tuple[Path, ...]:
    """The fit config chain, resolved relative to the study file; each must exist."""
    if isinstance(value, str):
        value = [value]
    if not value or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail("configs must name one or more fit configs, e.g. [../quickstart.yaml]")
    configs = tuple((path.parent / v).resolve() if not Path(v).is_absolute() else Path(v)
                    for v in value)
    for config, given in zip(configs, value, strict=True):
        if not config.is_file():
            raise fail(f"config {given!r} does not exist ({config}; paths are relative to "
                       "the study file)")
    return configs


def _overrides(value: Any, where: str, fail: Any) -> dict[str, Any]:
    """Dotted keys → values; refuses anything but a mapping with string keys."""
    if not isinstance(value, Mapping):
        raise fail(f"{where} must be a mapping of config keys to values, e.g. "
                   "{model.net.init_args.long_skips: false}")
    for key in value:
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise fail(f"{where}: {key!r} is not a config key (write e.g. trainer.max_epochs)")
    return dict(value)


def _variants(value: Any, fail: Any) -> tuple[Variant, ...]:
    """The variants in file order; names unique and usable as folder names."""
    if not isinstance(value, dict) or not value:
        raise fail("variants: give at least one, as name → overrides, e.g. {all: {}, none: "
                   "{model.net.init_args.long_skips: false}}")
    variants = []
    for name, overrides in value.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise fail(f"variant name {name!r} must be usable as a folder name "
                       "(letters, digits, _.+-)")
        overrides = dict(_overrides(overrides or {}, f"variant {name!r}", fail))
        match = overrides.pop(MATCH_KEY, None)
        reference = overrides.pop(REFERENCE_KEY, None)
        variants.append(Variant(name, overrides, None if match is None else str(match),
                                None if reference is None else str(reference)))
    return tuple(variants)


def _integers(value: Any, key: str, fail: Any) -> tuple[int, ...]:
    """A non-empty list of distinct integers ≥ 0 (a single int is a list of one)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in value)):
        raise fail(f"{key} must be a non-empty list of integers ≥ 0, got {value!r}")
    if len(set(value)) != len(value):
        raise fail(f"{key} lists {sorted({v for v in value if value.count(v) > 1})[0]} twice")
    return tuple(value)

"""The package's layers point one way: nets ← data ← inference, evaluation, planning ←
training ← instruments ← study ← cli."""

from __future__ import annotations

import ast
from pathlib import Path

import segmentation

PACKAGE = Path(segmentation.__file__).parent

# Top-level module or sub-package → layer; a module may import its own layer and those below.
LAYERS = {
    "__init__": 1, "atomic": 0, "config": 0,
    "nets": 1,
    "data": 2,
    "inference": 3, "evaluation": 3, "planning": 3,
    "training": 4,
    "instruments": 5,
    "study": 6,
    "cli": 7, "summary": 7, "plots": 7,
}
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")


def top_level(module: str) -> str:
    """"segmentation.inference.predictor" → "inference"; "segmentation" → "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in a file, also those inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def modules() -> list[tuple[str, Path]]:
    return [(".".join(("segmentation", *path.relative_to(PACKAGE).with_suffix("").parts)), path)
            for path in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_has_a_layer():
    assert {top_level(name) for name, _ in modules()} <= set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for name, path in modules():
        layer = LAYERS[top_level(name)]
        for line, target in imports(path):
            if target.split(".")[0] == "segmentation" and LAYERS[top_level(target)] > layer:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


PLANNING_MAY_IMPORT = {"planning", "nets", "data", "atomic", "config"}


def test_planning_imports_only_nets_data_atomic_config_and_only_the_cli_imports_it():
    """planning sits beside inference but uses neither inference nor evaluation, and no layer
    but the command line uses it: training and the rest never depend on a plan."""
    found = []
    for name, path in modules():
        for line, target in imports(path):
            if target.split(".")[0] != "segmentation":
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if top_level(name) == "planning" and top_level(target) not in PLANNING_MAY_IMPORT:
                found.append(where)
            if top_level(target) == "planning" and top_level(name) not in ("planning", "cli"):
                found.append(where)
    assert not found, "\n".join(found)


def test_inference_and_evaluation_import_no_lightning():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
             for name, path in modules() if LAYERS[top_level(name)] <= LAYERS["inference"]
             and top_level(name) != "data"
             for line, target in imports(path) if target.split(".")[0] in LIGHTNING]
    assert not found, "\n".join(found)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: an inference module importing training is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from segmentation.training.module import SegmentationModule\n")
    assert imports(bad) == [(2, "segmentation.training.module")]
    assert LAYERS[top_level("segmentation.training.module")] > LAYERS["inference"]

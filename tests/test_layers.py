"""The house, one floor per stage: data flows one way, and no stage imports the floor above it.

    configs, model, data  ->  train  ->  eval, convert, quantize, adapt, scaling  ->  launch (the `heft` command, planning)

Every import in every module (at the top or inside a function) is read with `ast`.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What each stage may import from heft, besides itself.
ALLOWED = {
    "configs": set(),
    "model": set(),
    "data": set(),
    "train": {"model", "data", "configs"},
    "eval": {"configs", "model", "data", "train"},
    "convert": {"configs", "model", "data", "train"},
    "quantize": {"configs", "model", "data", "train"},
    "adapt": {"configs", "model", "data", "train"},
    "scaling": {"configs", "model", "data", "train"},
    "launch": {"configs", "model", "data", "train", "eval", "convert", "quantize", "adapt", "scaling"},
}


def heft_imports(path: pathlib.Path) -> set[str]:
    """The heft stages a module imports: `heft.X...` -> X."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found |= {n.split(".")[1] for n in names if n.startswith("heft.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_a_stage_imports_only_the_stages_below_it(stage):
    bad = {}
    for path in sorted((ROOT / stage).rglob("*.py")):
        upward = heft_imports(path) - ALLOWED[stage] - {stage}
        if upward:
            bad[str(path.relative_to(ROOT))] = sorted(upward)
    assert not bad, f"imports from a floor above: {bad}"

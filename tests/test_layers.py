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


def module_graph() -> dict[str, set[str]]:
    """{module: the heft modules it imports}, every import counted (at the top or inside a function)."""
    modules = {}
    for stage in ALLOWED:
        for path in (ROOT / stage).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(("heft",) + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                imported |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: each strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others():
    found = cycles(module_graph())
    assert not found, f"import cycles (each a set of modules that import each other): {found}"


def test_the_cycle_finder_sees_imports_inside_functions_and_finds_only_cycles():
    graph = module_graph()
    assert "heft.launch.checkpoints" in graph["heft.launch.verbs.eval"]  # imported inside main()
    assert "heft.train.checkpoint.facts" in graph["heft.train.checkpoint.load"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []

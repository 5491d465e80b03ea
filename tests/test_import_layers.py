"""Imports flow one way: every module of src/layerfold belongs to a layer, and none imports from a higher one.

    models, data (and the helpers io, config, env, tracking, runtime)        0
    capture, execution, surgery                                              1
    scoring                                                                  2
    methods, recovery, compensate, evaluation, export                       3
    api, compression (the compress stage's work), runs (run lists, queues, collection), validation, layer_major_coverage, stage, sweep, root   4
    report (reads every stage's outputs and the runs; nothing imports it)   5

An import inside a function counts as much as one at the top of the file (it runs the same code). Besides
the direction, no two top-level packages may import each other, directly or through others (a cycle between
packages, e.g. methods -> compensate -> methods). The counts are printed (``pytest -s``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "layerfold"

LAYERS = {
    "models": 0, "data": 0, "io": 0, "config": 0, "env": 0, "tracking": 0, "runtime": 0,
    "capture": 1, "execution": 1, "surgery": 1,
    "scoring": 2,
    "methods": 3, "recovery": 3, "compensate": 3, "evaluation": 3, "export": 3,
    "api": 4, "compression": 4, "runs": 4, "validation": 4, "layer_major_coverage": 4, "stage": 4, "sweep": 4, "__init__": 4,
    "report": 5,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _top(module: str) -> str:
    """The top-level package (or module) of ``layerfold.x.y``: ``x``; the package root is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imported(module: str, path: Path) -> list[str]:
    """The layerfold modules ``module`` imports (``from layerfold import x`` names module ``layerfold.x`` when there is one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "layerfold"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "layerfold":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append(candidate if candidate in MODULES else base)
    return found


EDGES = sorted({(module, target) for module, path in MODULES.items() for target in _imported(module, path) if _top(target) != _top(module)})

# Imports that run upward today, each a debt to pay (move the code to the layer it belongs to). Listed exactly: the test
# fails on a new one and on one that was fixed (then delete its line), so the list only shrinks.
UNRESOLVED_UPWARD: set[str] = set()
# Cycles between top-level packages that exist today (none: keep it that way).
UNRESOLVED_CYCLES: list[list[str]] = []


def test_every_module_has_a_layer():
    unplaced = sorted({_top(m) for m in MODULES} - set(LAYERS))
    assert not unplaced, f"top-level packages without a layer: {unplaced}; add them to LAYERS in this test"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = sorted(f"{m} (layer {LAYERS[_top(m)]}) imports {t} (layer {LAYERS[_top(t)]})"
                    for m, t in EDGES if LAYERS[_top(t)] > LAYERS[_top(m)])
    print(f"\n{len(MODULES)} modules, {len(EDGES)} imports between top-level packages, {len(upward)} running upward")
    new, fixed = sorted(set(upward) - UNRESOLVED_UPWARD), sorted(UNRESOLVED_UPWARD - set(upward))
    assert not new, "imports running from a lower layer to a higher one:\n  " + "\n  ".join(new)
    assert not fixed, f"fixed, delete from UNRESOLVED_UPWARD: {fixed}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_top_level_packages():
    graph: dict[str, set[str]] = {}
    for m, t in EDGES:
        graph.setdefault(_top(m), set()).add(_top(t))
    cycles = _cycles(graph)
    print(f"\n{len(graph)} top-level packages, {sum(len(v) for v in graph.values())} package-to-package edges, {len(cycles)} cycles")
    assert cycles == UNRESOLVED_CYCLES, f"top-level packages that import each other: {cycles} (known: {UNRESOLVED_CYCLES})"


@pytest.mark.parametrize("source, expected", [("from layerfold import execution", ["layerfold.execution"]),
                                              ("from layerfold.methods import compress", ["layerfold.methods"]),
                                              ("from layerfold import compress", ["layerfold"])])
def test_imports_are_read_as_the_module_they_name(source, expected, tmp_path):
    """The reader itself: a name imported from a package is the submodule when one exists, else the package."""
    path = SRC / "scoring" / "probe.py"  # a path inside the tree, never written: only its name places the module
    tree_text = source
    original = Path.read_text
    try:
        Path.read_text = lambda self, encoding=None: tree_text if self == path else original(self, encoding=encoding)  # type: ignore[method-assign]
        assert _imported("layerfold.scoring.probe", path) == expected
    finally:
        Path.read_text = original  # type: ignore[method-assign]

"""The package's import graph: no cycles, and imports point one way (scripts -> training glue -> model / data ->
geometry). Read with `ast` from the sources, so imports made inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "transformers_cim"
SCRIPTS = ("run_pretraining.py", "run_image_classification.py", "run_semantic_segmentation.py")

# Lower layers never import higher ones. Modules not listed are still checked for cycles.
LAYERS = {
    "geometry": ["pretext", "_pretext_reference"],
    "model and data": ["__init__", "configuration_cim", "modeling_cim", "pretext_metrics", "checkpoints", "data",
                       "knn", "modelcard", "features", "seeding", "errors", "segmentation_metrics"],
    "training glue": ["training_utils", "streaming", "trainer", "finetune", "transfer", "export", "visualization",
                      "script_args", "convert_cim_original_to_hf", "segmentation"],
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules that `path` (module `name`) imports explicitly, at any depth of its code."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` only the module
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, name, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int | None:
    local = module.removeprefix(PACKAGE).lstrip(".") or "__init__"
    for rank, members in enumerate(LAYERS.values()):
        if local in members or local.split(".")[0] in members:
            return rank
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert f"{PACKAGE}.data.decoding" in graph[f"{PACKAGE}.data.transforms"]  # from .decoding import to_rgb
    assert f"{PACKAGE}.data.collate" in graph[f"{PACKAGE}.streaming"]  # from .data.collate import ...
    assert f"{PACKAGE}.modeling_cim" in graph[f"{PACKAGE}.pretext_metrics"]  # imported inside a function


def test_no_import_cycle_in_package():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("name", sorted(import_graph()))
def test_imports_point_down(name):
    rank = layer_of(name)
    if rank is None:
        pytest.skip(f"{name} has no layer in LAYERS")
    upward = sorted(m for m in import_graph()[name] if (layer_of(m) or 0) > rank)
    assert not upward, f"{name} ({list(LAYERS)[rank]}) imports a higher layer: {upward}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_not_imported_by_the_package(script):
    stem = Path(script).stem
    for name, path in package_modules().items():
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert stem not in names, f"{name} imports the script {script}"

"""The package's import graph: no cycles, and imports point one way (scripts -> training glue -> training data ->
library -> geometry), and the library (`transformers_cim/`) never imports `transformers_cim.training`. Read with
`ast` from the sources, so imports made inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "transformers_cim"
SCRIPTS = ("run_pretraining.py", "run_image_classification.py", "run_semantic_segmentation.py")

# Lower layers never import higher ones. Modules not listed are still checked for cycles. A dotted entry names a
# module or package and everything under it.
LAYERS = {
    "geometry": ["pretext", "exemplar_augmentation", "prior", "_pretext_reference"],
    "library": [
        "__init__",
        "configuration_cim",
        "modeling_cim",
        "pretext_metrics",
        "features",
        "errors",
        "image_processing",
        "hub_card",
        "resnet_checkpointing",
        "checkpoint_loading",
        "encoder_loading",
        "transfer",
        "export",
        "visualization",
        "convert_cim_original_to_hf",
        "original_checkpoint",
        "_deprecation",
    ],
    "training data": [
        "training.seeding",
        "training.data",
        "training.checkpoints",
        "training.knn",
        "training.modelcard",
        "training.metrics",
        "training.segmentation_metrics",
    ],
    "training glue": ["training"],
}
LIBRARY_LAYERS = ("geometry", "library")
# Old import paths kept for one release: each only calls `_deprecation.alias_module` with the new path as a string.
DEPRECATED_ALIASES = [
    "trainer",
    "finetune",
    "segmentation",
    "segmentation_metrics",
    "checkpoints",
    "streaming",
    "training_utils",
    "script_args",
    "modelcard",
    "knn",
    "seeding",
    "data",
]


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
                return path[path.index(nxt) :] + [nxt]
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
    """Rank of the layer whose entry is `module` or a package above it (the longest such entry wins)."""
    local = module.removeprefix(PACKAGE).lstrip(".") or "__init__"
    best: tuple[int, int] | None = None  # (entry length, rank)
    for rank, members in enumerate(LAYERS.values()):
        for entry in members:
            if (local == entry or local.startswith(entry + ".")) and (best is None or len(entry) > best[0]):
                best = (len(entry), rank)
    return None if best is None else best[1]


def is_library_module(module: str) -> bool:
    rank = layer_of(module)
    return rank is not None and list(LAYERS)[rank] in LIBRARY_LAYERS


def training_imports(path: Path, name: str, known: set[str]) -> list[str]:
    """The `transformers_cim.training` modules that `path` (module `name`) imports, at any depth of its code."""
    return sorted(m for m in imported_modules(path, name, known) if m.startswith(f"{PACKAGE}.training"))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    training = f"{PACKAGE}.training"
    assert f"{training}.data.decoding" in graph[f"{training}.data.transforms"]  # from .decoding import to_rgb
    assert f"{training}.data.collate" in graph[f"{training}.streaming"]  # from .data.collate import ...
    assert f"{PACKAGE}.errors" in graph[f"{training}.data.columns"]  # from ...errors import UserValueError
    assert f"{PACKAGE}.modeling_cim" in graph[f"{PACKAGE}.pretext_metrics"]  # imported inside a function


def test_no_import_cycle_in_package():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("name", sorted(n for n in import_graph() if layer_of(n) is not None))
def test_imports_point_down(name):
    rank = layer_of(name)
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


def test_every_package_module_has_a_layer():
    """A new module must be placed in LAYERS (else the import-direction test would skip it)."""
    unplaced = sorted(
        name
        for name in import_graph()
        if layer_of(name) is None and name.removeprefix(f"{PACKAGE}.") not in DEPRECATED_ALIASES
    )
    assert not unplaced, f"modules without a layer in LAYERS: {unplaced}"


@pytest.mark.parametrize("name", sorted(n for n in import_graph() if is_library_module(n)))
def test_library_never_imports_training(name):
    modules = package_modules()
    found = training_imports(modules[name], name, set(modules))
    assert not found, f"library module {name} imports the training side: {found}"


def test_training_import_check_fails_on_a_planted_import(tmp_path):
    """The check above is not vacuous: a library module that imports training code, even lazily, is caught."""
    planted = tmp_path / "features.py"
    planted.write_text(
        "def f():\n    from .training.trainer import CIMTrainer\n    import transformers_cim.training.data\n"
    )
    modules = set(package_modules())
    found = training_imports(planted, f"{PACKAGE}.features", modules)
    assert found == [f"{PACKAGE}.training.data", f"{PACKAGE}.training.trainer"]


@pytest.mark.parametrize("alias", DEPRECATED_ALIASES)
def test_deprecated_aliases_only_alias(alias):
    """An old-path module holds one `alias_module(__name__, "<new path>", ...)` call and imports nothing else."""
    modules = package_modules()
    name = f"{PACKAGE}.{alias}"
    assert imported_modules(modules[name], name, set(modules)) == {f"{PACKAGE}._deprecation"}
    calls = [
        node
        for node in ast.walk(ast.parse(modules[name].read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "alias_module"
    ]
    assert len(calls) == 1
    targets = [arg.value for arg in calls[0].args[1:]]
    assert targets and all(target in modules for target in targets), targets

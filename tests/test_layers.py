"""The package's shape: imports point down the layers, no cycles, no module too large to read."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dailymae_jax"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its body (function-level imports included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from a.b import c` imports a.b, or the module a.b.c when c is one.
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                           else node.module for alias in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


# The layers, bottom first (docs/DESIGN.md). A module may import its own layer and the layers below it.
LAYERS = (
    ("foundation", ("errors", "files", "schedule", "guards")),
    ("data and on-device augmentation", ("data", "augment")),
    ("model", ("model",)),
    ("config", ("config",)),
    ("processes", ("distributed", "rendezvous")),
    ("outputs", ("checkpoint", "export", "pretrained", "report", "visualize")),
    ("train", ("train",)),
    ("entry point", ("main",)),
)


def layer_of(module: str) -> int:
    if module == "dailymae_jax":
        return len(LAYERS)  # the package's own __init__
    top = module.split(".")[1]
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add it there and to docs/DESIGN.md")


def test_imports_point_down_the_layers():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for name, targets in imports().items() for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, "\n".join(upward)


def test_data_and_model_never_import_train():
    for name, targets in imports().items():
        if name.startswith(("dailymae_jax.data", "dailymae_jax.model")):
            upward = sorted(t for t in targets if t.startswith("dailymae_jax.train"))
            assert not upward, f"{name} imports {upward}"


def test_no_import_cycle():
    graph = imports()
    # A package's __init__ re-exporting its modules is not an edge back up: drop package → own submodule.
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle check fails on a cycle (so its passing means something)."""
    import pytest

    package = tmp_path / "dailymae_jax"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from dailymae_jax import b\n")
    (package / "b.py").write_text("from dailymae_jax.a import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    with pytest.raises(AssertionError, match="import cycle: dailymae_jax.a → dailymae_jax.b → dailymae_jax.a"):
        test_no_import_cycle()


def test_no_library_module_is_too_long():
    lengths = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines: {too_long}"


def test_the_design_doc_names_every_module():
    import re

    design = (PACKAGE.parent / "docs" / "DESIGN.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", design))
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(modules - named)
    assert not missing, f"docs/DESIGN.md does not name {missing}"

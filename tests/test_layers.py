"""The package's layers and their import direction (README "Layout"), enforced on every import statement, lazy ones
inside functions included: history -> signals -> artifacts -> compose -> engine, and code that makes artifacts never
imports the server, the sync processes or the evaluation. No cycle between modules at module level."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "localpers"
BASE = {"names", "errors", "_cpu"}
# each layer may import itself, the base modules and the layers listed
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "engine": {"model"},
    "store": {"model", "engine"},
    "personalize": {"kernels", "model", "engine", "store"},
    "serve": {"kernels", "model", "engine", "store", "personalize"},
    "sync": {"model", "engine", "store", "personalize"},
    "eval": {"kernels", "model", "engine", "store", "personalize", "serve"},
    "cli": {"kernels", "model", "engine", "store", "personalize", "serve", "sync", "eval"},
}


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        yield path, ".".join(("localpers", *rel.with_suffix("").parts)).removesuffix(".__init__")


def imported(path: Path, module: str, top_level_only=False):
    """(line, imported localpers module) for each import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("localpers"):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("localpers"):
                continue
            for alias in node.names:  # `from localpers import names` imports a module
                yield node.lineno, f"{base}.{alias.name}" if base == "localpers" else base


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) == 1 or parts[1] in BASE or parts[1] in {"__init__", "__main__", "default_model_path",
                                                            "DEFAULT_MODEL_FILE", "__version__", "load_model"}:
        return None  # the base: allowed everywhere
    return parts[1]


def test_every_module_belongs_to_a_layer():
    """A new top-level module must be placed in a layer (or be one of the base modules)."""
    loose = [p.name for p in ROOT.glob("*.py") if p.stem not in BASE | {"__init__", "__main__"}]
    assert loose == [], f"modules outside every layer: {loose}"
    assert {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} == set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_import_direction(layer):
    """Every import of a localpers module from this layer goes to itself, the base or a layer below it."""
    bad = []
    for path, module in modules():
        if layer_of(module) != layer:
            continue
        for line, name in imported(path, module):
            target = layer_of(name)
            if target is not None and target != layer and target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}")
    assert bad == []


def test_base_imports_no_layer_at_module_level():
    """names and errors import nothing of localpers; the package's __init__ imports layers only lazily."""
    for stem in ("names", "errors", "__init__"):
        path = ROOT / f"{stem}.py"
        names = [n for _, n in imported(path, "localpers" if stem == "__init__" else f"localpers.{stem}",
                                         top_level_only=True)]
        assert [n for n in names if layer_of(n)] == [], stem


def test_no_import_cycle_between_modules():
    """Module-level imports form no cycle (a lazy import inside a function may go back to a dispatcher)."""
    graph = {}
    known = {m for _, m in modules()}
    for path, module in modules():
        deps = set()
        for _, name in imported(path, module, top_level_only=True):
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + ".") :
                deps.add(name)
        graph[module] = deps
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):  # packages' __init__ docstrings import nothing; modules are the nodes
            if state.get(d) == 1:
                cycle.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycle == []


def test_the_check_sees_a_violation(tmp_path):
    """The walker reports an upward import, lazy ones included (a check that cannot fail proves nothing)."""
    f = tmp_path / "editing.py"
    f.write_text("def f():\n    from localpers.serve.server import create_app\n    from localpers import names\n")
    found = [layer_of(n) for _, n in imported(f, "localpers.personalize.editing")]
    assert "serve" in found and "serve" not in ALLOWED["personalize"]

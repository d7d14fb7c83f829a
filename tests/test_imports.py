"""The layout's promises, read from the source with `ast`: no import cycle between trainrun's
modules, imports inside functions included (they run too, only later), and no import from a
lower layer into a higher one: the commands (trainrun.commands, and `python -m trainrun`)
on top, then the commands after training (trainrun.after), then the composition
(trainrun.composition, the only package that touches Hydra), then the core (the runner, the
loop and the components). Imports under `if TYPE_CHECKING:` never run and are left out.

A package and its modules are distinct modules here: `trainrun.data` is its __init__.py, and
`from trainrun.data import storage` imports the module trainrun.data.storage. A package may
import its own modules; a module that imports its own package's __init__ back is a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "trainrun"

# the layers, top first: a module imports only from its own layer or those below it
LAYERS = (("trainrun.__main__", "trainrun.commands"), ("trainrun.after",),
          ("trainrun.composition",))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def own_module(name: str) -> str | None:
    """The module of trainrun that importing `name` runs: the longest prefix that is one."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return None


def type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str) -> set[str]:
    """The modules of trainrun that `module` imports, wherever in it the import is."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(own_module(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(own_module(f"{base}.{alias.name}") or own_module(base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m is not None and m != module}


GRAPH = {module: imports(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def layer(module: str) -> int:
    """0 for the commands, 1, 2, ... below them; the core is the lowest."""
    for depth, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(f"{p}.") for p in prefixes):
            return depth
    return len(LAYERS)


def test_the_graph_is_read_with_imports_inside_functions():
    """The walk sees what it must: function-level imports, and modules of packages."""
    assert len(MODULES) > 50 and sum(map(len, GRAPH.values())) > 150
    assert "trainrun.runner" in GRAPH["trainrun.commands.lrfind"]  # inside main()
    assert "trainrun.data.storage" in GRAPH["trainrun.data"]  # from trainrun.data import storage
    assert "trainrun.models.gpt" not in GRAPH["trainrun.models.gpt_hf"]  # TYPE_CHECKING only


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_reference_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_lower_layer_into_a_higher_one(module):
    upward = sorted(m for m in GRAPH[module] if layer(m) < layer(module))
    assert not upward, f"{module} imports {', '.join(upward)}, a layer above it"


def test_every_console_script_is_a_door_in_the_commands_package():
    import tomllib

    scripts = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) == 10
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module.startswith("trainrun.commands."), name
        assert function in {n.name for n in ast.parse(MODULES[module].read_text()).body
                            if isinstance(n, ast.FunctionDef)}, name

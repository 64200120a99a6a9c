"""The package's import structure: no module imports itself through others, so any module can be
imported first and a refactor cannot reintroduce a half-initialised-module error."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "s2flash_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, counting every import statement: module level,
    under TYPE_CHECKING and inside functions (a lazy import is a cycle waiting for its caller)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
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
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_function_is_named_as_another_top_level_module():
    """`from s2flash_jax.pipeline import quantize` once meant uint8 rounding, beside the `quantize` module."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    clashes = [f"{module_name(path)}.{node.name}" for path in PACKAGE.rglob("*.py")
               for node in ast.parse(path.read_text()).body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in modules and node.name != path.stem]
    assert clashes == []


def test_recipes_do_not_import_each_other():
    """Shared pieces live in recipes/common.py: a recipe is one file that can be added or removed alone."""
    shared = {"s2flash_jax.recipes", "s2flash_jax.recipes.base", "s2flash_jax.recipes.common",
              "s2flash_jax.recipes.registry"}
    graph = import_graph()
    recipes = {m for m in graph if m.startswith("s2flash_jax.recipes.")} - shared
    assert {m: sorted(graph[m] & recipes) for m in recipes if graph[m] & recipes} == {}


def test_only_the_sana_backbone_names_its_classes():
    """The engine depends on the Backbone protocol (models/backbone.py): a second backbone needs no
    change outside its own files. conversion/ holds SANA's diffusers converters."""
    sana = {"SanaTransformer", "SanaConfig"}

    def names_sana(node) -> bool:
        return (isinstance(node, ast.Name) and node.id in sana or isinstance(node, ast.Attribute) and node.attr in sana
                or isinstance(node, ast.alias) and node.name in sana)

    naming = sorted(module_name(path) for path in PACKAGE.rglob("*.py") if module_name(path) != "s2flash_jax.models.sana"
                    and any(names_sana(node) for node in ast.walk(ast.parse(path.read_text()))))
    assert naming == []

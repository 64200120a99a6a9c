"""The one recipe registry: every module in recipes/ that defines `ENTRY` (a RecipeEntry) is a
recipe, and everything that lists recipes derives from here: config.RECIPES and the Config
section of each recipe's settings, the train-state builders, the teacher a run needs, the keys a
fork may change, the shapes demo's recipes and the CLI help. Adding a recipe is one file here
plus its config variants.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

# (run config, seeds [4] keys, teacher params or None) -> (Recipe, DistillState)
Builder = Callable[[Any, Any, Any], tuple[Any, Any]]

TEACHER_ROLES = ("frozen", "initialises", "none")


@dataclasses.dataclass(frozen=True)
class DemoEntry:
    """The recipe in the shapes demo (`s2flash demo --recipe NAME`): variant of configs/shapes.py; run:
    its run directory; label: of its rows; steps: the step counts its student is sampled at, one row
    each; prompts_only: it trains on captions alone (reads prompts/, not data/)."""

    name: str
    variant: str
    run: str
    label: str
    steps: tuple[int, ...] = (1, 2, 4)
    prompts_only: bool = False


@dataclasses.dataclass(frozen=True)
class RecipeEntry:
    """name: config.recipe's value and the name of the Config section holding `settings` (a frozen
    dataclass whose defaults are the recipe's published ones); build: the networks, recipe and
    initial state of a run; teacher: what config.teacher is to it, "frozen" (distilled from),
    "initialises" (only gives the student its weights) or "none"; summary: one phrase for help
    texts; forkable: its settings keys a fork may change; demo: its place in the shapes demo."""

    name: str
    settings: type
    build: Builder
    teacher: str
    summary: str
    forkable: tuple[str, ...] = ()
    demo: DemoEntry | None = None

    def __post_init__(self):
        if self.teacher not in TEACHER_ROLES:
            raise ValueError(f"recipe {self.name}: teacher={self.teacher!r}; expected one of {TEACHER_ROLES}")


@functools.cache
def recipe_entries() -> dict[str, RecipeEntry]:
    """{name: entry} of every recipe module, in alphabetical order of the names."""
    import s2flash_jax.recipes as package

    entries = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        entry = getattr(importlib.import_module(f"{package.__name__}.{module_info.name}"), "ENTRY", None)
        if isinstance(entry, RecipeEntry):
            if entry.name in entries:
                raise ValueError(f"two recipe modules register the name {entry.name!r}")
            entries[entry.name] = entry
    return dict(sorted(entries.items()))


def recipe_entry(name: str) -> RecipeEntry:
    entries = recipe_entries()
    if name not in entries:
        raise ValueError(f"recipe={name!r}; expected one of {tuple(entries)}")
    return entries[name]


def demo_entries() -> dict[str, DemoEntry]:
    """{demo name: entry} of the recipes the shapes demo can run, SANA-Sprint (its default) first."""
    demos = [e.demo for e in recipe_entries().values() if e.demo is not None]
    return {d.name: d for d in sorted(demos, key=lambda d: (d.name != "sana-sprint", d.name))}

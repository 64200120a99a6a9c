"""The recipe registry: one file in recipes/ is a whole recipe. A recipe module placed beside the
package's own (here: on the package's search path, in a fresh process) becomes a config section
with typed overrides, a train-state builder, a forkable key, a demo entry and CLI help, with no
other file touched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from s2flash_jax.config import RECIPES, Config, ConfigError, load_config
from s2flash_jax.recipes.registry import demo_entries, recipe_entries, recipe_entry
from tests.conftest import REPO

TOY_RECIPE = '''
import dataclasses

import jax.numpy as jnp
from flax import nnx

from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.recipes.base import Phase, Recipe
from s2flash_jax.recipes.common import product_optimizer
from s2flash_jax.recipes.registry import DemoEntry, RecipeEntry


@dataclasses.dataclass(frozen=True)
class ToySettings:
    scale: float = 1.0
    fork_me: int = 0


def build(config, seeds, teacher_params):
    graph, params = nnx.split(SanaTransformer(config.model, precision=config.precision, rngs=nnx.Rngs(seeds[0])))

    def loss(params, state, batch, key):
        x = batch["latents"]
        v = nnx.merge(graph, params)(x, jnp.full((x.shape[0],), 0.5), batch["caption"], batch["caption_mask"])
        value = config.toy.scale * jnp.mean((v - x) ** 2)
        return value, ({"toy/mean_square": value}, {})

    recipe = Recipe(name="toy", trains=("model",), frozen=(), phases={"only": Phase("only", "model", loss)},
                    cycle=("only",), optimizers={"model": product_optimizer(config)})
    return recipe, recipe.init_state({"model": params}, {})


ENTRY = RecipeEntry("toy", ToySettings, build, teacher="none", summary="a recipe the tests add",
                    forkable=("fork_me",), demo=DemoEntry("toy-demo", "", "student-toy", "toy student"))
'''

CHECK = '''
import sys

import jax
import jax.numpy as jnp

import s2flash_jax.recipes

s2flash_jax.recipes.__path__.append(sys.argv[1])

from s2flash_jax.cli import build_parser
from s2flash_jax.config import RECIPES, load_config
from s2flash_jax.demo import RECIPES as DEMO_RECIPES
from s2flash_jax.parallel.mesh import make_mesh
from s2flash_jax.train.loop import FORKABLE_KEYS
from s2flash_jax.train.state import create_train_state, needs_teacher_checkpoint

assert "toy" in RECIPES and "sana_sprint" in RECIPES, RECIPES
config = load_config("configs/tiny.py:teacher", ["recipe=toy", "toy.scale=2", "toy.fork_me=3"])
assert (config.toy.scale, config.toy.fork_me) == (2.0, 3), config.toy
assert "toy.fork_me" in FORKABLE_KEYS and DEMO_RECIPES["toy-demo"].run == "student-toy"
assert not needs_teacher_checkpoint(config)
demo_help = next(a.choices["demo"] for a in build_parser()._actions if getattr(a, "choices", None)).format_help()
assert "toy-demo (a recipe the tests add" in " ".join(demo_help.split()), demo_help
recipe, state, _ = create_train_state(config, make_mesh(config.mesh))
m = config.model
batch = {"latents": jnp.ones((2, m.sample_size, m.sample_size, m.in_channels)),
         "caption": jnp.ones((2, 8, m.caption_channels)), "caption_mask": jnp.ones((2, 8), jnp.int32)}
new, metrics = recipe.phase_update("only", state.distill, batch, jax.random.key(0))
assert int(new.step) == 1 and float(metrics["only/loss"]) == float(metrics["toy/mean_square"]) > 0
print("toy recipe registered")
'''


def test_a_recipe_file_is_the_whole_recipe(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "toy.py").write_text(TOY_RECIPE)
    (tmp_path / "check.py").write_text(CHECK)
    result = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path / "recipes")], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "toy recipe registered" in result.stdout


def test_every_recipe_is_a_config_section_with_its_settings():
    assert RECIPES == tuple(recipe_entries())
    defaults = Config.__dataclass_fields__
    for name, entry in recipe_entries().items():
        assert defaults[name].default == entry.settings()
    config = load_config("configs/tiny.py", ["recipe=tbcm"])
    assert config.recipe == "tbcm" and recipe_entry("tbcm").teacher == "frozen"
    assert recipe_entry("flow_matching").teacher == "none" and recipe_entry("twinflow").teacher == "initialises"
    assert list(demo_entries())[0] == "sana-sprint"


def test_an_unknown_recipe_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"recipe='sana-sprint'; expected one of \('flow_matching'"):
        load_config("configs/tiny.py", ["recipe=sana-sprint"])

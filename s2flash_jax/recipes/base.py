"""What a distillation recipe declares, and the one generic update every recipe shares.

A recipe names the networks it trains and the ones it keeps frozen, gives one loss per *phase*
(each phase trains exactly one network) and an update cycle over those phases. The engine jits
`phase_update` once per phase and calls `recipe.phase_at(step)` on the host to pick which.
Nothing here knows about sharding, data or a particular model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

Metrics = dict[str, jax.Array]


@struct.dataclass
class DistillState:
    """Everything a recipe's updates read and write, as one pytree.

    step: [] int32 global step (counts every phase update, as SANA-Sprint's warm-ups do)
    params: trained networks by name; frozen: frozen networks and constants by name
    stats: non-trained mutable state by network name (e.g. spectral-norm power-iteration vectors)
    opt_state: optimizer state by trained network name
    """

    step: jax.Array
    params: dict[str, Any]
    frozen: dict[str, Any]
    stats: dict[str, Any]
    opt_state: dict[str, Any]


# (trained params, state, batch, key) -> (loss, (metrics, new stats dict))
PhaseLoss = Callable[[Any, DistillState, Any, jax.Array], tuple[jax.Array, tuple[Metrics, dict[str, Any]]]]


# (state, key) -> (due [] bool, fresh params): whether the phase's network restarts before this update,
# and the parameters it restarts from (see Phase.restart).
RestartFn = Callable[[DistillState, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Phase:
    """name; trains: the network it updates; loss; restart: optional. When it says an update is due,
    the network is replaced by the fresh parameters and its optimizer state re-initialised before
    the gradient is taken (SD3.5-Flash's periodically refreshed discriminator)."""

    name: str
    trains: str
    loss: PhaseLoss
    restart: RestartFn | None = None


def stage_at(step, cycle: Sequence[str], stages: Sequence[tuple[int, Sequence[str]]]) -> tuple[int, Sequence[str]]:
    """(first step, cycle) of the stage holding global `step`: `cycle` from step 0, then each of
    `stages` (first step, cycle) from its first step on."""
    start = 0
    for first, later in stages:
        if step >= first:
            start, cycle = first, later
    return start, cycle


def phase_name_at(step: int, cycle: Sequence[str], stages: Sequence[tuple[int, Sequence[str]]] = ()) -> str:
    """The phase a staged schedule runs at global `step`; each stage's cycle restarts at its first step."""
    start, cycle = stage_at(step, cycle, stages)
    return cycle[(step - start) % len(cycle)]


def phase_count(steps: int, cycle: Sequence[str], phase: str,
                stages: Sequence[tuple[int, Sequence[str]]] = ()) -> int:
    """How many of global steps 0 … steps − 1 run `phase` (each stage rounded up, as an optimizer
    schedule's length)."""
    bounds = [0, *[min(first, steps) for first, _ in stages], steps]
    cycles = [cycle, *[later for _, later in stages]]
    return sum(math.ceil((end - begin) * list(c).count(phase) / len(c))
               for begin, end, c in zip(bounds, bounds[1:], cycles))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """name; trains / frozen: network names; phases: by name; cycle: phase names repeated forever
    (("generator", "discriminator") alternates one update each); stages: later cycles, each
    (first global step, cycle), replacing the one before from that step on; optimizers: one per trained network;
    product: the trained network the run is for (the one the config's `model` describes, kept as
    EMA, sampled and exported); None means the first trained network. needs_latents: False for a
    recipe whose batches are captions only (TBCM's image-free training)."""

    name: str
    trains: Sequence[str]
    frozen: Sequence[str]
    phases: Mapping[str, Phase]
    cycle: Sequence[str]
    optimizers: Mapping[str, optax.GradientTransformation]
    product: str | None = None
    needs_latents: bool = True
    stages: Sequence[tuple[int, Sequence[str]]] = ()

    def __post_init__(self):
        if self.product is None and self.trains:
            object.__setattr__(self, "product", self.trains[0])
        for cycle in (self.cycle, *[later for _, later in self.stages]):
            unknown = [p for p in cycle if p not in self.phases]
            if not cycle or unknown:
                raise ValueError(f"recipe {self.name}: cycle {list(cycle)} must be non-empty and name only "
                                 f"phases in {sorted(self.phases)}")
        firsts = [first for first, _ in self.stages]
        if any(f <= 0 for f in firsts) or firsts != sorted(set(firsts)):
            raise ValueError(f"recipe {self.name}: stages must begin at increasing global steps > 0, got {firsts}")
        for phase in self.phases.values():
            if phase.trains not in self.trains:
                raise ValueError(f"recipe {self.name}: phase {phase.name} trains {phase.trains!r}, "
                                 f"which is not among the trained networks {list(self.trains)}")
        if self.product not in self.trains:
            raise ValueError(f"recipe {self.name}: product {self.product!r} is not among the trained networks "
                             f"{list(self.trains)}")
        if set(self.optimizers) != set(self.trains):
            raise ValueError(f"recipe {self.name}: optimizers for {sorted(self.optimizers)} but it trains "
                             f"{sorted(self.trains)}")

    def phase_at(self, step: int) -> Phase:
        return self.phases[phase_name_at(step, self.cycle, self.stages)]

    def init_state(self, params: dict[str, Any], frozen: dict[str, Any],
                   stats: dict[str, Any] | None = None) -> DistillState:
        if set(params) != set(self.trains) or set(frozen) < set(self.frozen):
            raise ValueError(f"recipe {self.name} trains {sorted(self.trains)} and freezes {sorted(self.frozen)}; "
                             f"got trained {sorted(params)}, frozen {sorted(frozen)}")
        opt_state = {name: self.optimizers[name].init(p) for name, p in params.items()}
        return DistillState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, stats=stats or {},
                            opt_state=opt_state)

    def phase_update(self, phase_name: str, state: DistillState, batch: Any,
                     key: jax.Array) -> tuple[DistillState, Metrics]:
        """One optimizer step of the network `phase_name` trains; every other network is unchanged.

        Pure: jit it with phase_name static. Metrics gain "<phase>/grad_norm".
        """
        phase = self.phases[phase_name]
        name = phase.trains
        if phase.restart is not None:
            restart_key, key = jax.random.split(key)
            state = self._restarted(phase, state, restart_key)
        grad_fn = jax.value_and_grad(phase.loss, has_aux=True)
        (loss, (metrics, stats)), grads = grad_fn(state.params[name], state, batch, key)
        updates, opt_state = self.optimizers[name].update(grads, state.opt_state[name], state.params[name])
        state = state.replace(
            step=state.step + 1,
            params={**state.params, name: optax.apply_updates(state.params[name], updates)},
            opt_state={**state.opt_state, name: opt_state},
            stats={**state.stats, **stats})
        return state, {**metrics, f"{phase_name}/loss": loss, f"{phase_name}/grad_norm": optax.tree.norm(grads)}


    def _restarted(self, phase: Phase, state: DistillState, key: jax.Array) -> DistillState:
        """state with phase.trains replaced by phase.restart's fresh parameters and a fresh optimizer
        state where the restart is due; unchanged otherwise."""
        name = phase.trains
        due, fresh = phase.restart(state, key)
        fresh_opt = self.optimizers[name].init(fresh)

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(due, a, b), new, old)

        return state.replace(params={**state.params, name: pick(fresh, state.params[name])},
                             opt_state={**state.opt_state, name: pick(fresh_opt, state.opt_state[name])})


def distill_step(recipe: Recipe, state: DistillState, batch: Any, key: jax.Array,
                 step: int) -> tuple[DistillState, Metrics]:
    """The update the recipe's cycle schedules at host-side `step` (one data batch per update)."""
    return recipe.phase_update(recipe.phase_at(step).name, state, batch, key)

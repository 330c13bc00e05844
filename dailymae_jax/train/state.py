"""Train state, optimizers and the shardings the state is born with."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a pretraining step reads and writes; a checkpoint is exactly this pytree."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32 (2,): the run's one key; each step folds in ``step``
    params: PyTree
    opt_state: PyTree
    probe_params: PyTree
    probe_stats: PyTree  # BatchNorm running statistics of the probe
    probe_opt_state: PyTree


def weight_decay_mask(params: PyTree) -> PyTree:
    """True where AdamW applies weight decay: matrices and conv kernels only.

    Biases and LayerNorm scales/offsets (every 1-D parameter) are not decayed, as in MAE. The position tables
    are constants, not parameters, so they never reach the optimizer. The cls and mask tokens (1, 1, D) are
    decayed, as in the official recipe.
    """
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(*, learning_rate: Callable[[jax.Array], jax.Array], weight_decay: float,
                   b1: float, b2: float) -> optax.GradientTransformation:
    """AdamW with MAE's betas and decay mask; ``learning_rate`` is a per-step schedule."""
    return optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, weight_decay=weight_decay,
                       mask=weight_decay_mask)


def make_probe_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """The online probe's own Adam (DailyMAE: lr 1e-3, no schedule)."""
    return optax.adam(learning_rate)


def init_state(rng: jax.Array, *, model: Any, probe: Any, tx: optax.GradientTransformation,
               probe_tx: optax.GradientTransformation, resolution: int, mask_ratio: float) -> TrainState:
    """A fresh state: MAE and probe initialised from ``rng``, optimizers zeroed, step 0.

    Parameter shapes do not depend on the resolution (the position tables are not parameters), so one
    state serves every bucket of the schedule.
    """
    init_rng, probe_rng, run_rng = jax.random.split(rng, 3)
    grid = resolution // model.patch
    images = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
    params = model.init(init_rng, images, jnp.zeros((1, grid * grid)), mask_ratio)["params"]
    probe_vars = probe.init(probe_rng, jnp.zeros((2, model.width)), train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), rng=run_rng, params=params, opt_state=tx.init(params),
                      probe_params=probe_vars["params"], probe_stats=probe_vars["batch_stats"],
                      probe_opt_state=probe_tx.init(probe_vars["params"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_sharding(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Shardings for every leaf of the state: replicated over the data axis (pure data parallelism)."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def create_state(init_fn: Callable[[jax.Array], TrainState], rng: jax.Array,
                 mesh: Mesh) -> tuple[TrainState, TrainState]:
    """Runs ``init_fn`` under jit with explicit out_shardings, so parameters are born on their devices.

    Returns the state and its sharding pytree (reused for the compiled steps and for checkpoint restore).
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = state_sharding(abstract, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
    return state, shardings


def parameter_count(params: PyTree) -> int:
    return int(sum(jnp.size(p) for p in jax.tree.leaves(params)))

"""Train state, optimizers and the shardings the state is born with."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
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


# ---------------------------------------------------------------------------------------------------------
# Finetuning and linear probing.


@flax.struct.dataclass
class ClassifierState:
    """What a finetuning or linear-probing step reads and writes; a checkpoint is exactly this pytree.

    Finetuning trains ``params`` (the whole ViT); ``batch_stats`` and ``frozen`` are empty. Linear probing
    trains ``params`` (the probe's head), keeps the probe's BatchNorm statistics in ``batch_stats`` and the
    frozen encoder in ``frozen``, which the optimizer never sees.
    """

    step: jax.Array
    rng: jax.Array
    params: PyTree
    opt_state: PyTree
    batch_stats: PyTree
    frozen: PyTree


def vit_layer_id(path: tuple[str, ...], depth: int) -> int:
    """Which layer a ViT parameter belongs to, for layer-wise lr decay (MAE's ``get_layer_id_for_vit``).

    cls token and patch embedding are layer 0, ``blocks_i`` is layer i + 1, everything after the blocks
    (final norm, fc_norm, head) is layer depth + 1.
    """
    top = path[0]
    if top in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if top.startswith("blocks_"):
        return int(top.split("_")[1]) + 1
    return depth + 1


def layer_decay_scales(params: PyTree, *, depth: int, decay: float) -> PyTree:
    """Per-parameter lr multipliers ``decay ** (depth + 1 − layer_id)``: 1 for the head, ``decay^(depth+1)``
    for the patch embedding."""
    flat = traverse_util.flatten_dict(dict(params))
    scales = {path: decay ** (depth + 1 - vit_layer_id(path, depth)) for path in flat}
    return traverse_util.unflatten_dict(scales)


def finetune_decay_mask(params: PyTree) -> PyTree:
    """True where finetuning decays weights: matrices and kernels, not biases, norms or the cls token (MAE)."""
    flat = traverse_util.flatten_dict(dict(params))
    mask = {path: bool(p.ndim > 1 and path[0] not in ("cls_token", "pos_embed")) for path, p in flat.items()}
    return traverse_util.unflatten_dict(mask)


def scale_by_tree(scales: PyTree) -> optax.GradientTransformation:
    """Multiplies each update by a constant from a tree shaped like the params."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, s: u * s, updates, scales))


def make_finetune_optimizer(params: PyTree, *, learning_rate: Callable[[jax.Array], jax.Array],
                            weight_decay: float, b1: float, b2: float, layer_decay: float,
                            depth: int) -> optax.GradientTransformation:
    """AdamW with layer-wise lr decay: every update (Adam step and decoupled weight decay alike) is scaled by
    the parameter's layer multiplier, as a PyTorch param group with ``lr = lr · scale`` does."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
        optax.add_decayed_weights(weight_decay, mask=finetune_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
        scale_by_tree(layer_decay_scales(params, depth=depth, decay=layer_decay)),
    )


def make_lars_optimizer(*, learning_rate: Callable[[jax.Array], jax.Array], weight_decay: float = 0.0,
                        momentum: float = 0.9, trust_coefficient: float = 0.001) -> optax.GradientTransformation:
    """LARS as MAE's linear probe uses it: for parameters with more than one dimension, add ``wd · p`` and
    rescale the update to ``trust_coefficient · ‖p‖ / ‖update‖`` (left alone where either norm is 0); biases get
    neither. Momentum accumulates the rescaled updates *before* the learning rate is applied, so a changing
    rate acts on the whole step (PyTorch's ``mu = m·mu + g; p −= lr·mu``; optax.lars applies the rate first).
    """
    matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=matrices),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), matrices),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(learning_rate),
    )


def init_finetune_state(rng: jax.Array, *, model: Any, tx: optax.GradientTransformation,
                        resolution: int) -> ClassifierState:
    """A fresh classifier state (random weights; pretrained ones are loaded afterwards, on the host)."""
    init_rng, run_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, resolution, resolution, 3), jnp.float32))["params"]
    return ClassifierState(step=jnp.zeros((), jnp.int32), rng=run_rng, params=params, opt_state=tx.init(params),
                           batch_stats={}, frozen={})


def init_linprobe_state(rng: jax.Array, *, encoder: Any, probe: Any, tx: optax.GradientTransformation,
                        resolution: int) -> ClassifierState:
    """A fresh linear-probe state: a random encoder (pretrained weights are loaded afterwards, on the host) frozen
    outside the optimizer, and the probe with its BatchNorm statistics."""
    encoder_rng, probe_rng, run_rng = jax.random.split(rng, 3)
    frozen = encoder.init(encoder_rng, jnp.zeros((1, resolution, resolution, 3), jnp.float32))["params"]
    probe_vars = probe.init(probe_rng, jnp.zeros((2, encoder.width), jnp.float32), train=False)
    return ClassifierState(step=jnp.zeros((), jnp.int32), rng=run_rng, params=probe_vars["params"],
                           opt_state=tx.init(probe_vars["params"]), batch_stats=probe_vars["batch_stats"],
                           frozen=frozen)

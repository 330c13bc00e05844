"""The steps on real photographs: pretraining (optimizer masks, RNG folding, accumulation, compilation), finetuning
and linear probing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dailymae_jax.data.shard import make_mesh
from dailymae_jax.model.mae import MaskedAutoencoder
from dailymae_jax.model.probe import LinearProbe
from dailymae_jax.model.vit import VisionTransformer
from dailymae_jax.train import compile as compile_lib
from dailymae_jax.train import steps
from dailymae_jax.train.state import (create_state, init_finetune_state, init_linprobe_state, init_state,
                                      make_finetune_optimizer, make_lars_optimizer, make_optimizer,
                                      make_probe_optimizer)
from dailymae_jax.train.steps import PretrainStepConfig, make_pretrain_step

MODEL = MaskedAutoencoder(width=32, depth=2, heads=2, patch=16, decoder_width=32, decoder_depth=1,
                          decoder_heads=2)


def build(*, lr=1e-3, weight_decay=0.05, grad_accum_steps=1, mask_ratio=0.75, hflip=True,
          probe_on_full_image=False):
    probe = LinearProbe(num_classes=8)
    schedule = optax.constant_schedule(lr)
    tx = make_optimizer(learning_rate=schedule, weight_decay=weight_decay, b1=0.9, b2=0.95)
    probe_tx = make_probe_optimizer(1e-3)
    init = functools.partial(init_state, model=MODEL, probe=probe, tx=tx, probe_tx=probe_tx, resolution=64,
                             mask_ratio=mask_ratio)
    state, _ = create_state(init, jax.random.PRNGKey(0), make_mesh())
    step = make_pretrain_step(MODEL, probe, tx, probe_tx, schedule, PretrainStepConfig(
        mask_ratio=mask_ratio, patch=16, hflip=hflip, grad_accum_steps=grad_accum_steps,
        probe_on_full_image=probe_on_full_image))
    return state, jax.jit(step)


def test_weight_decay_skips_biases_and_norms(photo_batch):
    """With lr>0 and zero gradients AdamW changes only decayed leaves: kernels and tokens, never 1-D params."""
    probe = LinearProbe(num_classes=8)
    tx = make_optimizer(learning_rate=optax.constant_schedule(0.1), weight_decay=0.5, b1=0.9, b2=0.95)
    state = jax.jit(functools.partial(init_state, model=MODEL, probe=probe, tx=tx, probe_tx=optax.adam(1e-3),
                                      resolution=64, mask_ratio=0.75))(jax.random.PRNGKey(0))
    # Host numpy for the bookkeeping: eager jnp ops would compile a program per leaf shape.
    params = jax.tree.map(lambda p: np.asarray(p) + 1.0, state.params)  # biases/norms start at 0/1: show decay
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
    changed = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates))[0]
    for path, did_change in changed:
        name = jax.tree_util.keystr(path)
        leaf_is_1d = name.endswith("['bias']") or name.endswith("['scale']")
        assert did_change == (not leaf_is_1d), name
    assert any("cls_token" in jax.tree_util.keystr(p) and c for p, c in changed)


@pytest.fixture(scope="module")
def built():
    return build()


def test_step_trains_and_reports(photo_batch, built):
    state, step = built
    images, labels = jnp.asarray(photo_batch), jnp.arange(8, dtype=jnp.int32)
    losses = []
    for _ in range(15):
        state, metrics = step(state, images, labels)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 15
    assert set(metrics) == {"loss", "lr", "grad_norm", "probe_loss", "probe_accuracy"}
    assert float(metrics["lr"]) == pytest.approx(1e-3)
    assert np.isfinite(losses).all() and float(metrics["grad_norm"]) > 0
    assert np.mean(losses[-3:]) < losses[0]  # memorising 8 photographs: the loss falls


def test_rng_is_folded_by_step(photo_batch, built):
    """Same state → same result; the next step draws new masks (different loss on the same params)."""
    state, step = built
    images, labels = jnp.asarray(photo_batch), jnp.arange(8, dtype=jnp.int32)
    _, m1 = step(state, images, labels)
    _, m1_again = step(state, images, labels)
    assert float(m1["loss"]) == float(m1_again["loss"])
    later = state.replace(step=state.step + 1)
    _, m2 = step(later, images, labels)
    assert float(m2["loss"]) != float(m1["loss"])


@pytest.mark.slow  # compiles two more steps, one with a scan over micro-batches
def test_gradient_accumulation_matches_one_big_batch(photo_batch):
    """Two micro-batches give the loss and gradient of the whole batch.

    Parameters are not compared: Adam's first update is ±lr·sign(g), which flips on rounding noise where a
    gradient entry is ~0. The probe is not compared either (BatchNorm sees different batches).
    """
    images, labels = jnp.asarray(photo_batch), jnp.arange(8, dtype=jnp.int32)
    whole, step_whole = build(hflip=False)
    accum, step_accum = build(hflip=False, grad_accum_steps=2)
    whole, m_whole = step_whole(whole, images, labels)
    accum, m_accum = step_accum(accum, images, labels)
    assert float(m_accum["loss"]) == pytest.approx(float(m_whole["loss"]), rel=1e-5)
    assert float(m_accum["grad_norm"]) == pytest.approx(float(m_whole["grad_norm"]), rel=1e-4)
    # Adam's first moment after one step is (1 − b1)·g: the accumulated gradient itself, leaf by leaf.
    for a, b in zip(jax.tree.leaves(accum.opt_state[0].mu), jax.tree.leaves(whole.opt_state[0].mu)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow  # compiles another step
def test_probe_on_the_full_image_reads_other_features(photo_batch, built):
    """DailyMAE's probe (extra pass on the unmasked image) trains on different features than the free one."""
    images, labels = jnp.asarray(photo_batch), jnp.arange(8, dtype=jnp.int32)
    state, step_visible = built
    _, step_full = build(probe_on_full_image=True)
    after_visible, m_visible = step_visible(state, images, labels)
    after_full, m_full = step_full(state, images, labels)
    assert float(m_full["loss"]) == float(m_visible["loss"])  # the MAE step itself is unchanged
    assert float(m_full["probe_loss"]) != float(m_visible["probe_loss"])
    assert np.isfinite(float(m_full["probe_loss"]))


def test_compilation_counter_counts_new_executables_only():
    counter = compile_lib.CompilationCounter()
    f = jax.jit(lambda x: x * 3 + 1)
    x = jnp.ones((7, 5))
    with counter:
        f(x).block_until_ready()
        f(x).block_until_ready()  # cached
    assert counter.count == 1
    f(jnp.ones((9, 5)))  # outside the context: not counted
    assert counter.count == 1


# --- Finetuning and linear probing ---------------------------------------------------------------------------

DEPTH = 2  # drop path rates 0 and 0.1
VIT = VisionTransformer(width=32, depth=DEPTH, heads=2, patch=16, num_classes=5, global_pool=True, drop_path=0.1)


def test_finetune_step_trains_on_photos(photo_batch):
    shapes = jax.eval_shape(VIT.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    tx = make_finetune_optimizer(shapes, learning_rate=optax.constant_schedule(1e-3), weight_decay=0.05, b1=0.9,
                                 b2=0.999, layer_decay=0.75, depth=DEPTH)
    init = functools.partial(init_finetune_state, model=VIT, tx=tx, resolution=64)
    state, _ = create_state(init, jax.random.PRNGKey(0), make_mesh())
    cfg = steps.FinetuneStepConfig(num_classes=5, color_jitter=0.3, mix_groups=1)
    step = jax.jit(steps.make_finetune_step(VIT, tx, optax.constant_schedule(1e-3), cfg))
    images, labels = jnp.asarray(photo_batch), jnp.arange(8) % 5
    before = state.params
    state, metrics = step(state, images, labels)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, state.params)
    assert all(jax.tree.leaves(changed))  # every parameter, head and patch embedding alike, is trained
    # Different steps draw different augmentations (RNG folded by step): the same batch gives another loss.
    _, metrics2 = step(state, images, labels)
    assert float(metrics2["loss"]) != float(metrics["loss"])


def test_linprobe_step_leaves_the_encoder_alone(photo_batch):
    encoder = VisionTransformer(width=32, depth=2, heads=2, patch=16)
    probe = LinearProbe(num_classes=5)
    tx = make_lars_optimizer(learning_rate=optax.constant_schedule(1.0))
    state = jax.jit(functools.partial(init_linprobe_state, encoder=encoder, probe=probe, tx=tx,
                                      resolution=64))(jax.random.PRNGKey(0))
    step = jax.jit(steps.make_linprobe_step(encoder, probe, tx, optax.constant_schedule(1.0)))
    new, metrics = step(state, jnp.asarray(photo_batch), jnp.arange(8) % 5)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.all(np.asarray(a) == np.asarray(b))), state.frozen,
                                     new.frozen))
    assert bool(jnp.any(new.params["head"]["kernel"] != state.params["head"]["kernel"]))
    assert bool(jnp.any(new.batch_stats["bn"]["mean"] != state.batch_stats["bn"]["mean"]))
    assert np.isfinite(float(metrics["loss"]))

"""Optimizers and their masks: layer-wise lr decay against its formula, the finetuning decay mask, LARS against
MAE's update rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from dailymae_jax.model.vit import VisionTransformer
from dailymae_jax.train.state import finetune_decay_mask, layer_decay_scales, make_finetune_optimizer, \
    make_lars_optimizer, vit_layer_id

DEPTH = 3
VIT = VisionTransformer(width=32, depth=DEPTH, heads=2, patch=16, num_classes=5, global_pool=True, drop_path=0.1)


@pytest.fixture(scope="module")
def vit_params():
    return jax.jit(VIT.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]


def test_layer_decay_per_block_matches_formula(vit_params):
    decay = 0.65
    scales = traverse_util.flatten_dict(layer_decay_scales(vit_params, depth=DEPTH, decay=decay))
    # MAE: layer 0 = cls token and patch embedding, layer i + 1 = block i, layer depth + 1 = head and norms;
    # lr scale = decay ** (depth + 1 - layer).
    expected_layer = {"cls_token": 0, "patch_embed": 0, "blocks_0": 1, "blocks_1": 2, "blocks_2": 3,
                      "fc_norm": 4, "head": 4}
    assert {path[0] for path in scales} == set(expected_layer)
    for path, scale in scales.items():
        assert scale == pytest.approx(decay ** (DEPTH + 1 - expected_layer[path[0]])), path
    assert scales[("patch_embed", "proj", "kernel")] == pytest.approx(0.65 ** 4)
    assert scales[("blocks_2", "mlp", "fc2", "kernel")] == pytest.approx(0.65)
    assert scales[("head", "kernel")] == 1.0
    assert vit_layer_id(("blocks_11", "attn", "qkv", "kernel"), 12) == 12
    assert vit_layer_id(("norm", "scale"), 12) == 13


def _layer(path):
    if path[0] in ("cls_token", "patch_embed"):
        return 0
    return int(path[0].split("_")[1]) + 1 if path[0].startswith("blocks_") else DEPTH + 1


def test_finetune_optimizer_steps_are_lr_times_layer_scale(vit_params):
    lr, decay, wd = 0.01, 0.5, 0.05
    tx = make_finetune_optimizer(vit_params, learning_rate=optax.constant_schedule(lr), weight_decay=0.0,
                                 b1=0.9, b2=0.999, layer_decay=decay, depth=DEPTH)
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.3, np.float32), vit_params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(vit_params), vit_params)
    # Adam's first step is g / |g| (up to eps), so every element moves by −lr · scale.
    for path, update in traverse_util.flatten_dict(updates).items():
        np.testing.assert_allclose(np.asarray(update), -lr * decay ** (DEPTH + 1 - _layer(path)), rtol=1e-4)
    # With zero gradients only the decoupled weight decay acts, scaled like the rest: −lr · scale · wd · p.
    tx = make_finetune_optimizer(vit_params, learning_rate=optax.constant_schedule(lr), weight_decay=wd,
                                 b1=0.9, b2=0.999, layer_decay=decay, depth=DEPTH)
    params = jax.tree.map(lambda p: np.asarray(p) + 1.0, vit_params)
    updates, _ = jax.jit(tx.update)(jax.tree.map(np.zeros_like, params), jax.jit(tx.init)(params), params)
    mask = traverse_util.flatten_dict(finetune_decay_mask(params))
    flat_params = traverse_util.flatten_dict(params)
    for path, update in traverse_util.flatten_dict(updates).items():
        expected = -lr * decay ** (DEPTH + 1 - _layer(path)) * wd * np.asarray(flat_params[path]) * mask[path]
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-5, atol=1e-9)


def test_finetune_weight_decay_mask(vit_params):
    mask = traverse_util.flatten_dict(finetune_decay_mask(vit_params))
    assert mask[("cls_token",)] is False  # MAE's no_weight_decay list
    assert mask[("blocks_0", "attn", "qkv", "kernel")] and mask[("head", "kernel")]
    assert mask[("patch_embed", "proj", "kernel")]
    assert not any(v for k, v in mask.items() if k[-1] in ("bias", "scale"))


def mae_lars_reference(params, grads_per_step, lrs, *, weight_decay, momentum=0.9, trust=0.001):
    """MAE's util/lars.py update rule, in numpy: for p.ndim > 1, g += wd·p, g *= trust·‖p‖/‖g‖ (if both > 0);
    mu = m·mu + g; p −= lr·mu."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_per_step, lrs):
        for k, p in params.items():
            g = np.array(grads[k], np.float64)
            if p.ndim > 1:
                g = g + weight_decay * p
                pn, gn = np.linalg.norm(p), np.linalg.norm(g)
                if pn > 0 and gn > 0:
                    g = g * trust * pn / gn
            mu[k] = momentum * mu[k] + g
            params[k] = p - lr * mu[k]
    return params


def test_lars_matches_mae_update_rule_with_a_changing_rate():
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(6, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]
    lrs = [0.5, 2.0, 1.0, 0.25]
    schedule = lambda step: jnp.asarray(lrs)[step]
    tx = make_lars_optimizer(learning_rate=schedule, weight_decay=0.1, momentum=0.9)
    state, current = tx.init(params), {k: jnp.asarray(v) for k, v in params.items()}
    for g in grads:
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, current)
        current = optax.apply_updates(current, updates)
    expected = mae_lars_reference(params, grads, lrs, weight_decay=0.1)
    for k in params:
        np.testing.assert_allclose(np.asarray(current[k]), expected[k], rtol=1e-5, atol=1e-6)

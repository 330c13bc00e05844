"""Finetuning and linear-probing parts: layer-wise lr decay against its formula, LARS against MAE's update rule,
the steps on real photographs, and loading our pretraining checkpoints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from dailymae_jax import pretrained
from dailymae_jax.checkpoint import Checkpointer, DataPosition, restore_params
from dailymae_jax.model.mae import MaskedAutoencoder
from dailymae_jax.model.probe import LinearProbe
from dailymae_jax.model.vit import VisionTransformer
from dailymae_jax.train import steps
from dailymae_jax.train.state import (create_state, finetune_decay_mask, init_finetune_state,
                                      init_linprobe_state, init_state, layer_decay_scales,
                                      make_finetune_optimizer, make_lars_optimizer, make_optimizer,
                                      make_probe_optimizer, vit_layer_id)
from dailymae_jax.data.shard import make_mesh

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
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), vit_params)
    updates, _ = tx.update(grads, tx.init(vit_params), vit_params)
    # Adam's first step is g / |g| (up to eps), so every element moves by −lr · scale.
    for path, update in traverse_util.flatten_dict(updates).items():
        np.testing.assert_allclose(np.asarray(update), -lr * decay ** (DEPTH + 1 - _layer(path)), rtol=1e-4)
    # With zero gradients only the decoupled weight decay acts, scaled like the rest: −lr · scale · wd · p.
    tx = make_finetune_optimizer(vit_params, learning_rate=optax.constant_schedule(lr), weight_decay=wd,
                                 b1=0.9, b2=0.999, layer_decay=decay, depth=DEPTH)
    params = jax.tree.map(lambda p: p + 1.0, vit_params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
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
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, state.params)
    assert all(jax.tree.leaves(changed))  # every parameter, head and patch embedding alike, is trained
    # Different steps draw different augmentations (RNG folded by step): the same batch gives another loss.
    _, metrics2 = step(state, images, labels)
    assert float(metrics2["loss"]) != float(metrics["loss"])


def test_linprobe_step_leaves_the_encoder_alone(photo_batch):
    encoder = VisionTransformer(width=32, depth=2, heads=2, patch=16)
    probe = LinearProbe(num_classes=5)
    tx = make_lars_optimizer(learning_rate=optax.constant_schedule(1.0))
    state = init_linprobe_state(jax.random.PRNGKey(0), encoder=encoder, probe=probe, tx=tx, resolution=64)
    step = jax.jit(steps.make_linprobe_step(encoder, probe, tx, optax.constant_schedule(1.0)))
    new, metrics = step(state, jnp.asarray(photo_batch), jnp.arange(8) % 5)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.frozen, new.frozen))
    assert bool(jnp.any(new.params["head"]["kernel"] != state.params["head"]["kernel"]))
    assert bool(jnp.any(new.batch_stats["bn"]["mean"] != state.batch_stats["bn"]["mean"]))
    assert np.isfinite(float(metrics["loss"]))


@pytest.fixture(scope="module")
def pretrain_workdir(tmp_path_factory):
    """An orbax checkpoint of a small MAE pretraining state, as the pretrain task writes it."""
    mae = MaskedAutoencoder(width=32, depth=DEPTH, heads=2, patch=16, decoder_width=16, decoder_depth=1,
                            decoder_heads=2)
    tx = make_optimizer(learning_rate=optax.constant_schedule(1e-3), weight_decay=0.05, b1=0.9, b2=0.95)
    state = jax.jit(functools.partial(init_state, model=mae, probe=LinearProbe(num_classes=4), tx=tx,
                                      probe_tx=make_probe_optimizer(1e-3), resolution=64, mask_ratio=0.75))(
        jax.random.PRNGKey(1))
    workdir = tmp_path_factory.mktemp("pretrain")
    checkpointer = Checkpointer(workdir, keep=2)
    config = {"task": "pretrain", "schedule": {"resolution": 64},
              "model": {"size": "tiny", "width": 32, "depth": DEPTH, "heads": 2, "patch": 16, "decoder_width": 16,
                        "decoder_depth": 1, "decoder_heads": 2, "norm_pix_loss": True, "dtype": "float32"}}
    checkpointer.save(7, state, DataPosition(1, 0), config)
    checkpointer.close()
    return workdir, state.params


def test_init_from_our_pretraining_maps_the_encoder_and_keeps_a_fresh_head(pretrain_workdir, vit_params):
    workdir, mae_params = pretrain_workdir
    restored, step, _ = restore_params(workdir)
    assert step == 7
    flat_restored = traverse_util.flatten_dict(restored)
    for path, value in traverse_util.flatten_dict(mae_params).items():
        np.testing.assert_array_equal(flat_restored[path], np.asarray(value))
    config = _init_config(workdir)
    merged, report = pretrained.init_from_pretrained(config, vit_params)
    np.testing.assert_array_equal(merged["blocks_1"]["attn"]["qkv"]["kernel"],
                                  np.asarray(mae_params["blocks_1"]["attn"]["qkv"]["kernel"]))
    np.testing.assert_array_equal(merged["cls_token"], np.asarray(mae_params["cls_token"]))
    np.testing.assert_array_equal(merged["head"]["kernel"], np.asarray(vit_params["head"]["kernel"]))
    np.testing.assert_array_equal(merged["fc_norm"]["scale"], np.asarray(vit_params["fc_norm"]["scale"]))
    assert set(report["fresh"]) == {"head/kernel", "head/bias", "fc_norm/scale", "fc_norm/bias"}
    assert "norm.weight" in report["unused"] and not any(u.startswith("blocks.") for u in report["unused"])
    assert report["loaded"] == len(traverse_util.flatten_dict(vit_params)) - 4


def test_init_errors_are_one_line_and_name_the_key(pretrain_workdir, tmp_path):
    workdir, _ = pretrain_workdir
    wider = VisionTransformer(width=48, depth=DEPTH, heads=2, patch=16, num_classes=5, global_pool=True)
    params = jax.eval_shape(wider.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    with pytest.raises(pretrained.PretrainedError, match=r"^init.workdir .*: encoder checkpoint: .* has shape .*model.size/width"):
        pretrained.init_from_pretrained(_init_config(workdir), params)
    deeper = VisionTransformer(width=32, depth=DEPTH + 1, heads=2, patch=16, num_classes=5, global_pool=True)
    params = jax.eval_shape(deeper.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    with pytest.raises(pretrained.PretrainedError, match=r"^init.workdir .*: missing key blocks\.3\."):
        pretrained.init_from_pretrained(_init_config(workdir), params)
    with pytest.raises(pretrained.PretrainedError, match="^init.workdir: no checkpoint"):
        pretrained.init_from_pretrained(_init_config(tmp_path), params)
    with pytest.raises(pretrained.PretrainedError, match=r"^init.step: no checkpoint for step 3 .* available: 7$"):
        pretrained.init_from_pretrained(_init_config(workdir, step=3), params)


def _init_config(workdir, step=None):
    import ml_collections
    c = ml_collections.ConfigDict()
    c.init = ml_collections.ConfigDict({"source": "pretrain", "workdir": str(workdir), "path": "", "format": "mae"})
    c.init.step = ml_collections.config_dict.placeholder(int)
    c.init.step = step
    return c


@pytest.mark.parametrize("fmt", ["timm", "mae"])
def test_init_from_an_exported_pytorch_file_loads_the_encoder(pretrain_workdir, vit_params, tmp_path, fmt):
    from dailymae_jax import export

    _, mae_params = pretrain_workdir
    state = export.to_state_dict(jax.device_get(mae_params), fmt=fmt, width=32,
                                 decoder_width=16 if fmt == "mae" else None, grid=(4, 4))
    path = export.save_state_dict(state, tmp_path / f"{fmt}.safetensors", fmt=fmt)
    config = _init_config(tmp_path)
    config.init.source, config.init.path, config.init.format = "file", str(path), fmt
    config.schedule = {"resolution": 64}
    merged, report = pretrained.init_from_pretrained(config, vit_params)
    assert report["source"] == "file"
    np.testing.assert_array_equal(merged["blocks_1"]["attn"]["qkv"]["kernel"],
                                  np.asarray(mae_params["blocks_1"]["attn"]["qkv"]["kernel"]))
    np.testing.assert_array_equal(merged["head"]["kernel"], np.asarray(vit_params["head"]["kernel"]))
    config.init.path = str(tmp_path / "missing.pth")
    with pytest.raises(pretrained.PretrainedError, match="^init.path: no such file"):
        pretrained.init_from_pretrained(config, vit_params)

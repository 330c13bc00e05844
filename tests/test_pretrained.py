"""Importing pretrained weights: exact round trips JAX → PyTorch files → JAX, what an encoder load keeps and
ignores, one-line errors naming the key, and refusing learned position tables."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dailymae_jax import export
from dailymae_jax.model.mae import MaskedAutoencoder, encoder_params
from dailymae_jax.model.vit import VisionTransformer
from dailymae_jax.pretrained import load_encoder_weights, load_mae_weights

D, DEPTH, HEADS, P, DD = 64, 2, 4, 16, 32


def randomized(shapes, seed):
    """Random values everywhere, so that a transposition or a swapped name cannot pass by accident."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.2).astype(np.float32), shapes)


def mae_model(depth=DEPTH):
    return MaskedAutoencoder(width=D, depth=depth, heads=HEADS, patch=P, decoder_width=DD, decoder_depth=1,
                             decoder_heads=4)


def mae_params(model, seed):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                               jnp.zeros((1, 16)), 0.75))["params"]
    return randomized(shapes, seed)


def vit_params(vit, seed=7):
    """Stands in for a model's initial parameters (the head's, fc_norm's): random, of the model's shapes."""
    return randomized(jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"],
                      seed)


def assert_trees_equal(expected, actual):
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), expected, actual)


@pytest.fixture(scope="module")
def pretrained():
    model = mae_model()
    return model, mae_params(model, 1)


def mae_state(params):
    return export.to_state_dict(params, fmt="mae", width=D, decoder_width=DD, grid=(4, 4))


# ------------------------------------------------------------------------------------------------
# Round trips.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_mae_round_trip_through_a_file_is_exact(pretrained, tmp_path, suffix):
    model, params = pretrained
    path = export.save_state_dict(mae_state(params), tmp_path / f"mae{suffix}", fmt="mae")
    template = mae_params(model, 50)  # other values, same shapes
    assert_trees_equal(params, load_mae_weights(template, path))


def test_mae_load_accepts_abstract_params(pretrained):
    model, params = pretrained
    abstract = jax.eval_shape(lambda: params)
    assert_trees_equal(params, load_mae_weights(abstract, mae_state(params)))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_encoder_round_trip_through_a_timm_file_is_exact(pretrained, tmp_path, suffix):
    _, params = pretrained
    state = export.to_state_dict(params, fmt="timm", width=D, decoder_width=None, grid=(4, 4))
    path = export.save_state_dict(state, tmp_path / f"timm{suffix}", fmt="timm")
    vit = VisionTransformer(width=D, depth=DEPTH, heads=HEADS, patch=P)
    assert_trees_equal(encoder_params(params), load_encoder_weights(vit_params(vit), path))


def test_classifier_takes_the_encoder_and_keeps_its_head(pretrained):
    """MAE pretraining checkpoint → global-pool classifier: as the official finetuning script, the decoder and
    the final norm are unused and the head and fc_norm keep their initial values."""
    _, params = pretrained
    vit = VisionTransformer(width=D, depth=DEPTH, heads=HEADS, patch=P, num_classes=10, global_pool=True)
    initial = vit_params(vit)
    loaded = load_encoder_weights(initial, mae_state(params))
    assert_trees_equal(initial["head"], loaded["head"])
    assert_trees_equal(initial["fc_norm"], loaded["fc_norm"])
    expected = {k: v for k, v in encoder_params(params).items() if k != "norm"}
    assert_trees_equal(expected, {k: v for k, v in loaded.items() if k not in ("head", "fc_norm")})
    # The loaded classifier runs at the new resolution (its sin-cos table is computed for 96 px).
    assert vit.apply({"params": loaded}, jnp.zeros((2, 96, 96, 3))).shape == (2, 10)


def test_cls_token_classifier_takes_the_final_norm(pretrained):
    _, params = pretrained
    vit = VisionTransformer(width=D, depth=DEPTH, heads=HEADS, patch=P, num_classes=3)
    initial = vit_params(vit)
    loaded = load_encoder_weights(initial, mae_state(params))
    assert_trees_equal(params["norm"], loaded["norm"])
    assert_trees_equal(initial["head"], loaded["head"])


def test_official_training_checkpoint_with_optimizer_and_args(pretrained, tmp_path):
    """The official MAE training script saves {'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace};
    such a file loads with weights_only=True. A DistributedDataParallel 'module.' prefix is removed."""
    model, params = pretrained
    tensors = {f"module.{k}": torch.from_numpy(v) for k, v in mae_state(params).items()}
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": tensors, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_base_patch16")}, path)
    assert_trees_equal(params, load_mae_weights(mae_params(model, 60), path))


def test_bfloat16_tensors_are_read_as_float32(pretrained):
    _, params = pretrained
    state = {k: torch.from_numpy(v).bfloat16() for k, v in mae_state(params).items()}
    vit = VisionTransformer(width=D, depth=DEPTH, heads=HEADS, patch=P)
    loaded = load_encoder_weights(vit_params(vit), state)
    expected = torch.from_numpy(np.array(params["cls_token"])).bfloat16().float().numpy()
    np.testing.assert_array_equal(loaded["cls_token"], expected)
    assert loaded["cls_token"].dtype == np.float32


# ------------------------------------------------------------------------------------------------
# Errors: one line, naming the key.
# ------------------------------------------------------------------------------------------------

def test_missing_key_is_named(pretrained):
    _, params = pretrained
    state = mae_state(params)
    del state["blocks.1.mlp.fc2.bias"]
    vit = VisionTransformer(width=D, depth=DEPTH, heads=HEADS, patch=P)
    with pytest.raises(ValueError, match=r"^encoder checkpoint: missing key blocks\.1\.mlp\.fc2\.bias \(64,\)$"):
        load_encoder_weights(vit_params(vit), state)


def test_deeper_checkpoint_is_an_unexpected_key(pretrained):
    _, params = pretrained
    vit = VisionTransformer(width=D, depth=1, heads=HEADS, patch=P)
    with pytest.raises(ValueError, match=r"^encoder checkpoint: unexpected key blocks\.1\."):
        load_encoder_weights(vit_params(vit), mae_state(params))


def test_shape_mismatch_names_the_key_in_pytorch_layout(pretrained):
    _, params = pretrained
    vit = VisionTransformer(width=D, depth=DEPTH, heads=HEADS, patch=8)
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight has shape \(64, 3, 16, 16\) in the "
                                         r"checkpoint, the model expects \(64, 3, 8, 8\)"):
        load_encoder_weights(vit_params(vit), mae_state(params))


def test_encoder_only_checkpoint_is_not_an_mae(pretrained):
    model, params = pretrained
    state = export.to_state_dict(params, fmt="timm", width=D, decoder_width=None, grid=(4, 4))
    with pytest.raises(ValueError, match=r"MAE checkpoint: missing key decoder_"):
        load_mae_weights(params, state)


def test_learned_table_cannot_enter_a_fixed_table_model(pretrained):
    _, params = pretrained
    state = mae_state(params)
    state["pos_embed"] = state["pos_embed"] + 0.01
    vit = VisionTransformer(width=D, depth=DEPTH, heads=HEADS, patch=P)
    with pytest.raises(ValueError, match=r"^pos_embed: the checkpoint's position table is learned"):
        load_encoder_weights(vit_params(vit), state)
    with pytest.raises(ValueError, match=r"^pos_embed: .* is learned"):
        load_mae_weights(params, state)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mae_weights({}, tmp_path / "nope.pth")

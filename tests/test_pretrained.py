"""Importing pretrained weights: exact round trips JAX → PyTorch files → JAX, what an encoder load keeps and
ignores, one-line errors naming the key, refusing learned position tables, and where classifiers start
(``init_from_pretrained``: our pretraining checkpoints, PyTorch files)."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from dailymae_jax import export
from dailymae_jax import pretrained as pretrained_lib
from dailymae_jax.checkpoint import Checkpointer, DataPosition, restore_params
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


# ------------------------------------------------------------------------------------------------
# Where classifiers start (config.init).
# ------------------------------------------------------------------------------------------------

DEPTH_FT = 3
CLASSIFIER = VisionTransformer(width=32, depth=DEPTH_FT, heads=2, patch=16, num_classes=5, global_pool=True)


@pytest.fixture(scope="module")
def classifier_params():
    return jax.jit(CLASSIFIER.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]


@pytest.fixture(scope="module")
def pretrain_workdir(tmp_path_factory):
    """An orbax checkpoint of a small MAE pretraining state, as the pretrain task writes it (the optimizer state
    left out: only the parameters are read)."""
    mae = MaskedAutoencoder(width=32, depth=DEPTH_FT, heads=2, patch=16, decoder_width=16, decoder_depth=1,
                            decoder_heads=2)
    params = jax.jit(lambda key: mae.init(key, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 16)), 0.75))(
        jax.random.PRNGKey(1))["params"]
    state = {"step": np.int32(7), "params": params}
    workdir = tmp_path_factory.mktemp("pretrain")
    checkpointer = Checkpointer(workdir, keep=2)
    config = {"task": "pretrain", "schedule": {"resolution": 64},
              "model": {"size": "tiny", "width": 32, "depth": DEPTH_FT, "heads": 2, "patch": 16, "decoder_width": 16,
                        "decoder_depth": 1, "decoder_heads": 2, "norm_pix_loss": True, "dtype": "float32"}}
    checkpointer.save(7, state, DataPosition(1, 0), config)
    checkpointer.close()
    return workdir, params


def test_init_from_our_pretraining_maps_the_encoder_and_keeps_a_fresh_head(pretrain_workdir, classifier_params):
    workdir, mae_params = pretrain_workdir
    restored, step, _ = restore_params(workdir)
    assert step == 7
    flat_restored = traverse_util.flatten_dict(restored)
    for path, value in traverse_util.flatten_dict(mae_params).items():
        np.testing.assert_array_equal(flat_restored[path], np.asarray(value))
    config = _init_config(workdir)
    merged, report = pretrained_lib.init_from_pretrained(config, classifier_params)
    np.testing.assert_array_equal(merged["blocks_1"]["attn"]["qkv"]["kernel"],
                                  np.asarray(mae_params["blocks_1"]["attn"]["qkv"]["kernel"]))
    np.testing.assert_array_equal(merged["cls_token"], np.asarray(mae_params["cls_token"]))
    np.testing.assert_array_equal(merged["head"]["kernel"], np.asarray(classifier_params["head"]["kernel"]))
    np.testing.assert_array_equal(merged["fc_norm"]["scale"], np.asarray(classifier_params["fc_norm"]["scale"]))
    assert set(report["fresh"]) == {"head/kernel", "head/bias", "fc_norm/scale", "fc_norm/bias"}
    assert "norm.weight" in report["unused"] and not any(u.startswith("blocks.") for u in report["unused"])
    assert report["loaded"] == len(traverse_util.flatten_dict(classifier_params)) - 4


def test_init_errors_are_one_line_and_name_the_key(pretrain_workdir, tmp_path):
    workdir, _ = pretrain_workdir
    wider = VisionTransformer(width=48, depth=DEPTH_FT, heads=2, patch=16, num_classes=5, global_pool=True)
    params = jax.eval_shape(wider.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    with pytest.raises(pretrained_lib.PretrainedError, match=r"^init.workdir .*: encoder checkpoint: .* has shape .*model.size/width"):
        pretrained_lib.init_from_pretrained(_init_config(workdir), params)
    deeper = VisionTransformer(width=32, depth=DEPTH_FT + 1, heads=2, patch=16, num_classes=5, global_pool=True)
    params = jax.eval_shape(deeper.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    with pytest.raises(pretrained_lib.PretrainedError, match=r"^init.workdir .*: missing key blocks\.3\."):
        pretrained_lib.init_from_pretrained(_init_config(workdir), params)
    with pytest.raises(pretrained_lib.PretrainedError, match="^init.workdir: no checkpoint"):
        pretrained_lib.init_from_pretrained(_init_config(tmp_path), params)
    with pytest.raises(pretrained_lib.PretrainedError, match=r"^init.step: no checkpoint for step 3 .* available: 7$"):
        pretrained_lib.init_from_pretrained(_init_config(workdir, step=3), params)


def _init_config(workdir, step=None):
    import ml_collections
    c = ml_collections.ConfigDict()
    c.init = ml_collections.ConfigDict({"source": "pretrain", "workdir": str(workdir), "path": "", "format": "mae"})
    c.init.step = ml_collections.config_dict.placeholder(int)
    c.init.step = step
    return c


@pytest.mark.parametrize("fmt", ["timm", "mae"])
def test_init_from_an_exported_pytorch_file_loads_the_encoder(pretrain_workdir, classifier_params, tmp_path, fmt):
    from dailymae_jax import export

    _, mae_params = pretrain_workdir
    state = export.to_state_dict(jax.device_get(mae_params), fmt=fmt, width=32,
                                 decoder_width=16 if fmt == "mae" else None, grid=(4, 4))
    path = export.save_state_dict(state, tmp_path / f"{fmt}.safetensors", fmt=fmt)
    config = _init_config(tmp_path)
    config.init.source, config.init.path, config.init.format = "file", str(path), fmt
    config.schedule = {"resolution": 64}
    merged, report = pretrained_lib.init_from_pretrained(config, classifier_params)
    assert report["source"] == "file"
    np.testing.assert_array_equal(merged["blocks_1"]["attn"]["qkv"]["kernel"],
                                  np.asarray(mae_params["blocks_1"]["attn"]["qkv"]["kernel"]))
    np.testing.assert_array_equal(merged["head"]["kernel"], np.asarray(classifier_params["head"]["kernel"]))
    config.init.path = str(tmp_path / "missing.pth")
    with pytest.raises(pretrained_lib.PretrainedError, match="^init.path: no such file"):
        pretrained_lib.init_from_pretrained(config, classifier_params)


# ------------------------------------------------------------------------------------------------
# Files that must not load: every error one line naming the file and the reason.
# ------------------------------------------------------------------------------------------------

class NotATensor:
    """A pickled object of a type a weights-only load refuses to build."""


def _hostile_state(kind):
    good = {"cls_token": torch.zeros(1, 1, 4), "norm.weight": torch.ones(4)}
    if kind == "nan":
        return {**good, "norm.bias": torch.tensor([0.0, float("nan"), 0.0, 0.0])}
    if kind == "inf":
        return {**good, "norm.bias": torch.tensor([0.0, float("-inf"), 0.0, 0.0])}
    if kind == "bool":
        return {**good, "norm.bias": torch.ones(4, dtype=torch.bool)}
    if kind == "int":
        return {**good, "norm.bias": torch.ones(4, dtype=torch.int64)}
    if kind == "int-key":
        return {**good, 7: torch.ones(4)}
    return {**good, "norm.bias": NotATensor()}


@pytest.mark.parametrize("kind, reason", [
    ("nan", "'norm.bias' holds 1 non-finite value (NaN or infinity)"),
    ("inf", "'norm.bias' holds 1 non-finite value (NaN or infinity)"),
    ("bool", "'norm.bias' holds torch.bool values; weights must be floats"),
    ("int", "'norm.bias' holds torch.int64 values; weights must be floats"),
    ("int-key", "state dict key 7 (int) is not a parameter name"),
    ("pickled-object", "cannot be read (it holds a pickled test_pretrained.NotATensor object"),
])
def test_hostile_pth_files_are_refused_naming_the_file_and_key(tmp_path, kind, reason):
    path = tmp_path / "weights.pth"
    torch.save({"model": _hostile_state(kind)}, path)
    with pytest.raises(ValueError) as error:
        export.load_state_dict(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint file {path}") and reason in message, message
    assert "\n" not in message and "weights_only=False" not in message


@pytest.mark.parametrize("kind, reason", [
    ("nan", "'norm.bias' holds 1 non-finite value"),
    ("inf", "'norm.bias' holds 1 non-finite value"),
    ("bool", "'norm.bias' holds bool values; weights must be floats"),
    ("int", "'norm.bias' holds int64 values; weights must be floats"),
])
def test_hostile_safetensors_files_are_refused_naming_the_key(tmp_path, kind, reason):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file(_hostile_state(kind), str(path))
    with pytest.raises(ValueError, match=f"^checkpoint file {path}: .*{reason}"):
        export.load_state_dict(path)


@pytest.mark.parametrize("suffix, content", [
    (".pth", b"not a zip archive, not a pickle"),
    (".pth", None),  # a real file cut in half
    (".safetensors", b"\xff" * 64),
    (".safetensors", None),
])
def test_unreadable_files_are_one_line_naming_the_file(tmp_path, suffix, content):
    path = tmp_path / f"weights{suffix}"
    if content is None:
        export.save_state_dict({"norm.weight": np.ones(1000, np.float32)}, path, fmt="timm")
        content = path.read_bytes()[:len(path.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        export.load_state_dict(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint file {path}: cannot be read (") and "\n" not in message, message
    assert "weights_only=False" not in message


@pytest.mark.parametrize("bad", [np.float32("nan"), np.float32("inf")])
def test_an_export_with_non_finite_weights_writes_nothing(tmp_path, bad):
    state = {"norm.weight": np.ones(4, np.float32), "norm.bias": np.array([0, bad, 0, 0], np.float32)}
    with pytest.raises(ValueError, match=r"^state dict entry 'norm.bias' holds 1 non-finite value"):
        export.save_state_dict(state, tmp_path / "timm.safetensors", fmt="timm")
    with pytest.raises(ValueError, match=r"^export entry 'norm.bias': needs a name and a float tensor"):
        export.save_state_dict({"norm.bias": np.ones(4, np.int32)}, tmp_path / "timm.pth", fmt="timm")
    assert list(tmp_path.iterdir()) == []

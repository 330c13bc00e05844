"""Export to PyTorch layouts: the names and shapes of official MAE checkpoints (facebookresearch/mae) and of timm,
exact round trips, a plain PyTorch forward pass and timm's VisionTransformer (strict key check) reproducing our
encoder and classifier."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

from dailymae_jax import export
from dailymae_jax.augment import normalize
from dailymae_jax.model.mae import MaskedAutoencoder
from dailymae_jax.model.vit import VisionTransformer
from dailymae_jax.pretrained import load_encoder_weights, load_mae_weights

D, DEPTH, HEADS, P, DD = 64, 2, 4, 16, 32


@pytest.fixture(scope="module")
def mae():
    model = MaskedAutoencoder(width=D, depth=DEPTH, heads=HEADS, patch=P, decoder_width=DD, decoder_depth=1,
                              decoder_heads=4)
    params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 16)), 0.75))(
        jax.random.PRNGKey(1))["params"]
    # Random (not initial) values everywhere, so a transposition or swapped name cannot pass by accident.
    rng = np.random.default_rng(2)  # numpy: one jax.random call per leaf shape would compile per shape
    params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.2).astype(np.float32), params)
    return model, params


def test_timm_keys_and_shapes(mae):
    model, params = mae
    state = export.to_state_dict(params, fmt="timm", width=D, decoder_width=None, grid=(4, 4))
    expected = {"patch_embed.proj.weight": (D, 3, P, P), "patch_embed.proj.bias": (D,), "cls_token": (1, 1, D),
                "pos_embed": (1, 17, D), "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(DEPTH):
        expected.update({
            f"blocks.{i}.norm1.weight": (D,), f"blocks.{i}.norm1.bias": (D,),
            f"blocks.{i}.attn.qkv.weight": (3 * D, D), f"blocks.{i}.attn.qkv.bias": (3 * D,),
            f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
            f"blocks.{i}.norm2.weight": (D,), f"blocks.{i}.norm2.bias": (D,),
            f"blocks.{i}.mlp.fc1.weight": (4 * D, D), f"blocks.{i}.mlp.fc1.bias": (4 * D,),
            f"blocks.{i}.mlp.fc2.weight": (D, 4 * D), f"blocks.{i}.mlp.fc2.bias": (D,)})
    assert {k: v.shape for k, v in state.items()} == expected
    np.testing.assert_array_equal(state["pos_embed"][0, 0], 0.0)  # the cls slot


def test_mae_format_adds_the_decoder(mae):
    model, params = mae
    state = export.to_state_dict(params, fmt="mae", width=D, decoder_width=DD, grid=(4, 4))
    for key, shape in {"mask_token": (1, 1, DD), "decoder_embed.weight": (DD, D), "decoder_pos_embed": (1, 17, DD),
                       "decoder_blocks.0.attn.qkv.weight": (3 * DD, DD), "decoder_norm.weight": (DD,),
                       "decoder_pred.weight": (P * P * 3, DD)}.items():
        assert state[key].shape == shape, key


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("fmt", ["mae", "timm"])
def test_round_trip_through_files_is_exact(mae, tmp_path, fmt, suffix):
    model, params = mae
    state = export.to_state_dict(params, fmt=fmt, width=D, decoder_width=DD, grid=(4, 4))
    path = export.save_state_dict(state, tmp_path / f"{fmt}{suffix}", fmt=fmt)
    if suffix == ".pth":
        raw = torch.load(path, weights_only=True)
        assert set(raw) == ({"model"} if fmt == "mae" else set(state))
    original = params if fmt == "mae" else {k: v for k, v in params.items()
                                           if not k.startswith(("decoder_", "mask_token"))}
    load = load_mae_weights if fmt == "mae" else load_encoder_weights
    back = load(jax.tree.map(np.zeros_like, original), path)  # every value must come from the file
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), original, back)


def torch_vit_features(state, images):
    """A plain PyTorch ViT forward (pre-norm blocks, exact GELU, LayerNorm eps 1e-6) from timm-named weights."""
    t = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    x = F.conv2d(images, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=P)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([t["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + t["pos_embed"]
    for i in range(DEPTH):
        w = lambda name: (t[f"blocks.{i}.{name}.weight"], t[f"blocks.{i}.{name}.bias"])
        h = F.layer_norm(x, (D,), *w("norm1"), eps=1e-6)
        qkv = F.linear(h, *w("attn.qkv")).reshape(x.shape[0], x.shape[1], 3, HEADS, D // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / (D // HEADS) ** 0.5, dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(x.shape), *w("attn.proj"))
        h = F.layer_norm(x, (D,), *w("norm2"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, *w("mlp.fc1"))), *w("mlp.fc2"))
    return F.layer_norm(x, (D,), t["norm.weight"], t["norm.bias"], eps=1e-6)


def test_pytorch_forward_on_exported_weights_reproduces_our_features(mae, photo_batch, tmp_path):
    model, params = mae
    state = export.to_state_dict(params, fmt="timm", width=D, decoder_width=None, grid=(4, 4))
    path = export.save_state_dict(state, tmp_path / "timm.pth", fmt="timm")
    images = normalize(jnp.asarray(photo_batch))
    ours = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, images))
    theirs = torch_vit_features(export.load_state_dict(path),
                                torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous())
    np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4)


def test_bad_names_are_refused(mae, tmp_path):
    with pytest.raises(ValueError, match="allowed: mae, timm"):
        export.to_state_dict(mae[1], fmt="onnx", width=D, decoder_width=DD, grid=(4, 4))
    with pytest.raises(ValueError, match=".pth or .safetensors"):
        export.save_state_dict({}, tmp_path / "x.bin", fmt="timm")


def test_a_failed_export_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full_disk(obj, f):  # the file is half written when the disk fills up
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    path = tmp_path / "timm.pth"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"):
        export.save_state_dict({"w": np.zeros(2, np.float32)}, path, fmt="timm")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["timm.pth"]


def as_torch_images(images):
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_loads_the_export_strictly_and_reproduces_our_features(mae, photo_batch, tmp_path, suffix):
    model, params = mae
    state = export.to_state_dict(params, fmt="timm", width=D, decoder_width=None, grid=(4, 4))
    path = export.save_state_dict(state, tmp_path / f"timm{suffix}", fmt="timm")
    timm_model = TimmViT(img_size=64, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0)
    timm_model.load_state_dict({k: torch.from_numpy(v) for k, v in export.load_state_dict(path).items()},
                               strict=True)
    images = normalize(jnp.asarray(photo_batch))
    ours = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, images))
    with torch.no_grad():
        theirs = timm_model.eval().forward_features(as_torch_images(images)).numpy()
    assert np.abs(ours).max() > 0.5  # features of real size, not all near zero
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_classifier_round_trip_through_timm(photo_batch):
    """A finetuning-layout ViT (global pool, fc_norm, head) → timm strict, same logits → back, bit-exact."""
    vit = VisionTransformer(width=D, depth=DEPTH, heads=HEADS, patch=P, num_classes=5, global_pool=True)
    shapes = jax.eval_shape(vit.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.2).astype(np.float32), shapes)
    state = export.to_state_dict(params, fmt="timm", width=D, decoder_width=None, grid=(4, 4))
    assert {"fc_norm.weight", "head.weight"} <= set(state) and "norm.weight" not in state
    timm_model = TimmViT(img_size=64, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=5,
                         global_pool="avg")
    timm_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    images = normalize(jnp.asarray(photo_batch))
    ours = np.asarray(jax.jit(vit.apply)({"params": params}, images))
    with torch.no_grad():
        theirs = timm_model.eval()(as_torch_images(images)).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # PyTorch → JAX: timm's own state dict (its tensors, its key order) back into a freshly initialised model.
    fresh = jax.tree.map(np.zeros_like, params)  # every value must come from timm's state dict
    back = load_encoder_weights(fresh, timm_model.state_dict(), load_head=True)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)

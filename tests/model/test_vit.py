"""ViT encoder: position table, attention, block numerics, init, sizes."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from dailymae_jax.model import (
    SIZES,
    Attention,
    Block,
    VisionTransformer,
    attention_core,
    sincos_pos_embed_2d,
    vit_from_size,
)
from dailymae_jax.errors import ConfigError
from dailymae_jax.model.build import attention_implementation
from dailymae_jax.model.vit import padded_attention


# One small configuration shared by the tests: every new array shape costs an XLA compile of each
# eager op, which dominates the runtime on a small CPU.
W, HEADS, PATCH = 128, 4, 16
IMAGES = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))  # 2 x 2 patches -> 5 tokens


@pytest.fixture(scope="module")
def vit_params():
    return jax.jit(VisionTransformer(W, 1, HEADS, PATCH).init)(jax.random.key(1), IMAGES)["params"]


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# ---- 2-D sin-cos position table -------------------------------------------------------------

def _pos_ref(dim: int, row: int, col: int) -> list[float]:
    """[sin(c w), cos(c w), sin(r w), cos(r w)], w_i = 1 / 10000^(i / (dim/4)), by hand."""
    quarter = dim // 4
    omegas = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
    return ([math.sin(col * w) for w in omegas] + [math.cos(col * w) for w in omegas]
            + [math.sin(row * w) for w in omegas] + [math.cos(row * w) for w in omegas])


@pytest.mark.parametrize("dim,gh,gw", [(16, 4, 4), (32, 6, 10), (64, 3, 7)])
def test_pos_table_matches_formula(dim, gh, gw):
    table = sincos_pos_embed_2d(dim, gh, gw)
    assert table.shape == (gh * gw, dim) and table.dtype == np.float32
    for r in range(gh):
        for c in range(gw):
            np.testing.assert_allclose(table[r * gw + c], _pos_ref(dim, r, c), atol=1e-6)


def test_pos_table_cls_row_and_orientation():
    table = sincos_pos_embed_2d(32, 6, 10, cls_token=True)
    assert table.shape == (61, 32)
    np.testing.assert_array_equal(table[0], 0.0)
    body = table[1:]
    # Moving one column changes only the first half; moving one row only the second half.
    np.testing.assert_array_equal(body[0, 16:], body[1, 16:])
    assert not np.allclose(body[0, :16], body[1, :16])
    np.testing.assert_array_equal(body[0, :16], body[10, :16])
    assert not np.allclose(body[0, 16:], body[10, 16:])
    # Origin: sin = 0, cos = 1.
    np.testing.assert_array_equal(body[0], [0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8)


def test_pos_table_is_not_a_parameter(vit_params):
    assert set(vit_params) == {"patch_embed", "cls_token", "blocks_0", "norm"}


# ---- attention ------------------------------------------------------------------------------

def _softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def test_attention_core_matches_einsum():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = (2, 5, HEADS, W // HEADS)  # (B, N, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape) for key in (kq, kk, kv))
    q64, k64, v64 = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q64, k64) / math.sqrt(shape[-1])
    ref = np.einsum("bhqk,bkhd->bqhd", _softmax(logits), v64)
    np.testing.assert_allclose(attention_core(q, k, v), ref, atol=1e-5)


@pytest.mark.parametrize("length", [5, 6])  # odd: padded to 6; even: no pad, the plain call
def test_padded_attention_equals_unpadded(length):
    """The cuDNN path's padding (odd lengths padded to even, the pad hidden by query and key lengths) gives
    the unpadded attention and its gradients. Run with XLA's kernel: cuDNN's runs only on a GPU."""
    keys = jax.random.split(jax.random.key(3), 4)
    shape = (2, length, HEADS, 8)
    q, k, v, cotangent = (jax.random.normal(key, shape) for key in keys)

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v) * cotangent)

    plain = functools.partial(attention_core, implementation="xla")
    padded = functools.partial(padded_attention, implementation="xla")
    np.testing.assert_allclose(jax.jit(padded)(q, k, v), jax.jit(plain)(q, k, v), atol=1e-6)
    grads = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)  # one compile, not one per op
    for got, want in zip(grads(padded, q, k, v), grads(plain, q, k, v)):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_choice_resolves_per_platform_and_dtype():
    config = {"model": {"attention": "auto", "dtype": "bfloat16"}}
    assert attention_implementation(config, platform="cuda") == "cudnn"
    assert attention_implementation(config, platform="cpu") == "xla"
    assert attention_implementation(config, platform="cuda", dtype=jnp.float32) == "xla"  # exports, pictures
    assert attention_implementation({"model": {"dtype": "bfloat16"}}, platform="gpu") == "cudnn"  # older configs
    with pytest.raises(ConfigError, match="model.attention 'cudnn' needs model.dtype bfloat16"):
        attention_implementation({"model": {"attention": "cudnn", "dtype": "float32"}})
    with pytest.raises(ConfigError, match="model.attention 'flash'; allowed: auto, cudnn, xla"):
        attention_implementation({"model": {"attention": "flash", "dtype": "float32"}})


def _layer_norm_ref(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


_erf = np.vectorize(math.erf)


def _block_ref(x, p, heads):
    """Pre-norm block in float64 numpy, fused qkv split as (3, heads, head_dim)."""
    a = {k: np.asarray(v, np.float64) for k, v in flatten_dict(p, sep="/").items()}
    b, n, d = x.shape
    hd = d // heads
    h = _layer_norm_ref(x, a["norm1/scale"], a["norm1/bias"])
    qkv = (h @ a["attn/qkv/kernel"] + a["attn/qkv/bias"]).reshape(b, n, 3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = _softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd))
    o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d)
    x = x + o @ a["attn/proj/kernel"] + a["attn/proj/bias"]
    h = _layer_norm_ref(x, a["norm2/scale"], a["norm2/bias"])
    h = h @ a["mlp/fc1/kernel"] + a["mlp/fc1/bias"]
    h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))  # exact GELU
    return x + h @ a["mlp/fc2/kernel"] + a["mlp/fc2/bias"]


def test_block_matches_numpy_reference(vit_params):
    x = jax.random.normal(jax.random.key(1), (2, 5, W))
    # Perturb every parameter (LayerNorm affine and biases included) so that placement matters.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda t: np.asarray(t + 0.1 * rng.standard_normal(t.shape), np.float32),
                                    vit_params["blocks_0"])
    out = Block(width=W, heads=HEADS).apply({"params": params}, x)
    np.testing.assert_allclose(out, _block_ref(np.asarray(x, np.float64), params, HEADS), atol=5e-5)


def test_attention_module_head_split(vit_params):
    """q, k, v are consecutive D-wide slices of the qkv output, each split into heads."""
    p = vit_params["blocks_0"]["attn"]
    x = jax.random.normal(jax.random.key(4), (2, 5, W))
    hd = W // HEADS
    out = Attention(width=W, heads=HEADS).apply({"params": p}, x)
    for b in range(2):
        qkv = np.asarray(x[b], np.float64) @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])
        heads = []
        for h in range(HEADS):
            q, k, v = (qkv[:, j * W + h * hd: j * W + (h + 1) * hd] for j in range(3))
            heads.append(_softmax(q @ k.T / math.sqrt(hd)) @ v)
        ref = np.concatenate(heads, axis=1) @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])
        np.testing.assert_allclose(out[b], ref, atol=1e-5)


# ---- init -----------------------------------------------------------------------------------

def test_init_tokens_and_norms(vit_params):
    cls = np.asarray(vit_params["cls_token"])
    assert cls.shape == (1, 1, W)
    assert abs(cls.std() - 0.02) < 0.004 and abs(cls.mean()) < 0.006
    for ln in (vit_params["norm"], vit_params["blocks_0"]["norm1"], vit_params["blocks_0"]["norm2"]):
        np.testing.assert_array_equal(ln["scale"], 1.0)
        np.testing.assert_array_equal(ln["bias"], 0.0)


@pytest.mark.parametrize("layer,fan_in,fan_out", [
    ("attn/qkv", W, 3 * W), ("attn/proj", W, W), ("mlp/fc1", W, 4 * W), ("mlp/fc2", 4 * W, W)])
def test_init_dense_xavier(vit_params, layer, fan_in, fan_out):
    p = vit_params["blocks_0"]
    for part in layer.split("/"):
        p = p[part]
    w = np.asarray(p["kernel"])
    assert w.shape == (fan_in, fan_out)
    assert np.abs(w).max() <= math.sqrt(6 / (fan_in + fan_out))
    np.testing.assert_allclose(w.var(), 2 / (fan_in + fan_out), rtol=0.03)
    np.testing.assert_array_equal(p["bias"], 0.0)


def test_init_patch_conv_is_xavier_as_linear(vit_params):
    w = np.asarray(vit_params["patch_embed"]["proj"]["kernel"])
    assert w.shape == (PATCH, PATCH, 3, W)
    fan_in, fan_out = PATCH * PATCH * 3, W  # the Linear (768 -> W) view, not flax's conv fans
    assert np.abs(w).max() <= math.sqrt(6 / (fan_in + fan_out))
    np.testing.assert_allclose(w.var(), 2 / (fan_in + fan_out), rtol=0.03)
    np.testing.assert_array_equal(vit_params["patch_embed"]["proj"]["bias"], 0.0)


# ---- sizes, heads, options ------------------------------------------------------------------

def test_vit_base_param_count():
    model = vit_from_size("base")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    # timm vit_base_patch16_224 without head: 85,798,656, minus its 197 x 768 pos_embed.
    assert _count(shapes["params"]) == 85_798_656 - 197 * 768
    out = jax.eval_shape(model.apply, shapes, jnp.zeros((2, 224, 224, 3)))
    assert out.shape == (2, 197, 768)


def test_sizes_table():
    assert SIZES["tiny"].width == 192 and SIZES["huge"].patch == 14 and SIZES["large"].depth == 24
    assert all(s.width % s.heads == 0 and s.mlp_ratio == 4 for s in SIZES.values())


def test_classifier_heads():
    for pool in (False, True):
        model = VisionTransformer(W, 1, HEADS, PATCH, num_classes=5, global_pool=pool)
        params = model.init(jax.random.key(1), IMAGES)["params"]
        assert ("fc_norm" in params) == pool and ("norm" in params) != pool
        assert params["head"]["kernel"].shape == (W, 5)
        assert model.apply({"params": params}, IMAGES).shape == (2, 5)


def test_drop_path_only_in_training(vit_params):
    v = {"params": vit_params}
    # Rates rise linearly over depth: a single block gets rate 0, the second of two gets 0.5.
    model = VisionTransformer(W, 1, HEADS, PATCH, drop_path=0.5)
    two = VisionTransformer(W, 2, HEADS, PATCH, drop_path=0.5)
    v2 = {"params": {**vit_params, "blocks_1": vit_params["blocks_0"]}}
    eval_out = two.apply(v2, IMAGES)
    outs = [two.apply(v2, IMAGES, train=True, rngs={"dropout": jax.random.key(i)}) for i in range(4)]
    assert any(not np.allclose(eval_out, o) for o in outs)
    np.testing.assert_array_equal(model.apply(v, IMAGES), model.apply(v, IMAGES, train=True))


def test_bf16_compute_keeps_f32_params(vit_params):
    model = VisionTransformer(W, 1, HEADS, PATCH, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.key(1), IMAGES)
    assert all(t.dtype == jnp.float32 for t in jax.tree_util.tree_leaves(shapes))
    out = jax.jit(model.apply)({"params": vit_params}, IMAGES)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
    ref = VisionTransformer(W, 1, HEADS, PATCH).apply({"params": vit_params}, IMAGES)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1)

"""Masked autoencoder: patches, masking, target, loss, decoder wiring, init, sizes, bf16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dailymae_jax.model import (
    MaskedAutoencoder,
    VisionTransformer,
    encoder_params,
    mae_from_size,
    mae_loss,
    norm_pix_target,
    patchify,
    random_masking,
    unpatchify,
)

# One small configuration shared by the tests (each new shape costs eager-op compiles on CPU).
W, HEADS, PATCH, DW, DHEADS = 128, 4, 8, 64, 4
IMAGES = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))  # 4 x 4 grid -> L = 16
L = 16
NOISE = jax.random.uniform(jax.random.key(1), (2, L))
MODEL = MaskedAutoencoder(W, 1, HEADS, PATCH, decoder_width=DW, decoder_depth=1, decoder_heads=DHEADS)


@pytest.fixture(scope="module")
def variables():
    return jax.jit(lambda key: MODEL.init(key, IMAGES, NOISE, 0.75))(jax.random.key(2))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# ---- patches --------------------------------------------------------------------------------

def _patchify_ref(images: np.ndarray, p: int) -> np.ndarray:
    b, h, w, c = images.shape
    out = np.zeros((b, (h // p) * (w // p), p * p * c), images.dtype)
    for n in range(b):
        for r in range(h // p):
            for col in range(w // p):
                flat = []
                for i in range(p):          # row inside the patch
                    for j in range(p):      # column inside the patch
                        for ch in range(c):
                            flat.append(images[n, r * p + i, col * p + j, ch])
                out[n, r * (w // p) + col] = flat
    return out


def test_patchify_matches_loops_non_square():
    images = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    got = patchify(jnp.asarray(images), 4)
    assert got.shape == (2, 6, 48)
    np.testing.assert_array_equal(got, _patchify_ref(images, 4))
    np.testing.assert_array_equal(unpatchify(got, 4, 2, 3), images)


def test_patch_embed_is_linear_on_patchify(variables):
    """The conv kernel flattened as (p*p*3, D) acts on patchify's (row, col, channel) order."""
    pe = variables["params"]["patch_embed"]["proj"]
    tokens = MODEL.apply(variables, IMAGES, method=lambda m, x: m.patch_embed(x))
    ref = patchify(IMAGES, PATCH) @ pe["kernel"].reshape(-1, W) + pe["bias"]
    np.testing.assert_allclose(tokens.reshape(2, L, W), ref, atol=1e-4)


# ---- masking --------------------------------------------------------------------------------

@pytest.mark.parametrize("length,ratio,keep", [(196, 0.75, 49), (16, 0.75, 4), (16, 0.5, 8), (10, 0.0, 10),
                                               (50, 0.9, 4)])  # 50 * (1 - 0.9) = 4.999..., as in MAE
def test_masking_keeps_smallest_noise(length, ratio, keep):
    rng = np.random.default_rng(length)
    x = rng.standard_normal((3, length, 4)).astype(np.float32)
    noise = rng.random((3, length)).astype(np.float32)
    x_kept, mask, ids_restore = random_masking(jnp.asarray(x), ratio, jnp.asarray(noise))
    assert x_kept.shape == (3, keep, 4) and mask.shape == (3, length)
    mask = np.asarray(mask)
    for b in range(3):
        kept_ids = sorted(range(length), key=lambda i: noise[b, i])[:keep]
        assert (mask[b] == 0).sum() == keep
        # The mask is in image order: 0 exactly at the kept (smallest-noise) tokens.
        np.testing.assert_array_equal(mask[b], [0.0 if i in kept_ids else 1.0 for i in range(length)])
        np.testing.assert_array_equal(x_kept[b], x[b, kept_ids])  # ascending noise order
        # ids_restore undoes the noise sort.
        np.testing.assert_array_equal(np.argsort(noise[b])[np.asarray(ids_restore[b])], np.arange(length))


def test_masking_is_per_sample():
    noise = jax.random.uniform(jax.random.key(3), (4, 196))
    _, mask, _ = random_masking(jnp.zeros((4, 196, 2)), 0.75, noise)
    rows = {tuple(np.asarray(m)) for m in mask}
    assert len(rows) == 4


# ---- target and loss ------------------------------------------------------------------------

def test_norm_pix_target_unbiased():
    images = np.random.default_rng(1).standard_normal((2, 16, 16, 3)) * 3 + 1
    target = np.asarray(norm_pix_target(jnp.asarray(images, jnp.float32), 8))
    patches = _patchify_ref(images, 8)
    ref = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(target, ref, atol=1e-4)


def test_loss_only_on_removed_patches():
    rng = np.random.default_rng(2)
    pred, target = rng.standard_normal((2, 2, L, 12)).astype(np.float32)
    mask = np.zeros((2, L), np.float32)
    mask[0, [1, 5, 7]] = 1
    mask[1, [0, 2, 3, 4, 15]] = 1
    loss = float(mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)))
    per_patch = ((pred.astype(np.float64) - target) ** 2).mean(-1)
    assert loss == pytest.approx((per_patch * mask).sum() / mask.sum(), rel=1e-5)
    changed = pred.copy()
    changed[0, 0] += 10.0  # kept patch
    assert float(mae_loss(changed, target, mask)) == pytest.approx(loss, rel=1e-6)
    changed[0, 1] += 10.0  # removed patch
    assert float(mae_loss(changed, target, mask)) > loss + 1.0


# ---- the model ------------------------------------------------------------------------------

def test_param_tree(variables):
    params = variables["params"]
    assert set(params) == {"patch_embed", "cls_token", "blocks_0", "norm", "decoder_embed", "mask_token",
                           "decoder_blocks_0", "decoder_norm", "decoder_pred"}
    assert params["mask_token"].shape == (1, 1, DW)
    assert params["decoder_embed"]["kernel"].shape == (W, DW)
    assert params["decoder_pred"]["kernel"].shape == (DW, PATCH * PATCH * 3)
    assert set(params["decoder_blocks_0"]) == {"norm1", "attn", "norm2", "mlp"}


def test_init(variables):
    p = variables["params"]
    for tok in (p["mask_token"], p["cls_token"]):
        assert abs(float(tok.std()) - 0.02) < 0.005
    for ln in (p["decoder_norm"], p["decoder_blocks_0"]["norm1"]):
        np.testing.assert_array_equal(ln["scale"], 1.0)
        np.testing.assert_array_equal(ln["bias"], 0.0)
    for dense in (p["decoder_embed"], p["decoder_pred"], p["decoder_blocks_0"]["attn"]["qkv"]):
        fan_in, fan_out = dense["kernel"].shape
        assert float(jnp.abs(dense["kernel"]).max()) <= math.sqrt(6 / (fan_in + fan_out))
        np.testing.assert_array_equal(dense["bias"], 0.0)
    w = np.asarray(p["decoder_pred"]["kernel"])
    np.testing.assert_allclose(w.var(), 2 / (DW + PATCH * PATCH * 3), rtol=0.05)


def test_forward_outputs_and_loss(variables):
    out = MODEL.apply(variables, IMAGES, NOISE, 0.75)
    assert out.pred.shape == (2, L, PATCH * PATCH * 3) and out.mask.shape == (2, L)
    assert out.patch_features.shape == (2, W) and out.ids_restore.shape == (2, L)
    np.testing.assert_array_equal(np.asarray(out.mask).sum(1), [12, 12])
    # The loss is the masked MSE against the norm-pix target, recomputed here in numpy.
    target = _patchify_ref(np.asarray(IMAGES, np.float64), PATCH)
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((np.asarray(out.pred, np.float64) - target) ** 2).mean(-1)
    mask = np.asarray(out.mask)
    assert float(out.loss) == pytest.approx((per_patch * mask).sum() / mask.sum(), rel=1e-4)


def test_visible_order_does_not_matter(variables):
    """Same kept set, different shuffle order -> same prediction: the decoder unshuffles correctly
    and positions were attached before masking."""
    noise = np.asarray(NOISE).copy()
    kept = np.argsort(noise, axis=1)[:, :4]
    noise2 = noise.copy()
    for b in range(2):
        noise2[b, kept[b]] = noise[b, kept[b]][::-1]  # reverse the order among the kept tokens
    a = MODEL.apply(variables, IMAGES, jnp.asarray(noise), 0.75)
    b = MODEL.apply(variables, IMAGES, jnp.asarray(noise2), 0.75)
    assert not np.array_equal(np.argsort(noise, 1), np.argsort(noise2, 1))
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.pred, b.pred, atol=1e-4)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)


def test_unmasked_forward_matches_encode(variables):
    """With ratio 0 the masked path sees every patch: its probe feature is encode's pre-norm mean."""
    out = MODEL.apply(variables, IMAGES, NOISE, 0.0)
    assert float(out.mask.sum()) == 0.0
    tokens, prenorm_mean = MODEL.apply(variables, IMAGES, method=MODEL.encode, return_prenorm_mean=True)
    assert tokens.shape == (2, 1 + L, W)
    np.testing.assert_allclose(out.patch_features, prenorm_mean, atol=1e-4)


def test_encoder_extraction_matches_vit(variables):
    vit = VisionTransformer(W, 1, HEADS, PATCH)
    ref = MODEL.apply(variables, IMAGES, method=MODEL.encode)
    got = vit.apply({"params": encoder_params(variables["params"])}, IMAGES)
    np.testing.assert_array_equal(got, ref)


def test_noise_from_rng(variables):
    a = MODEL.apply(variables, IMAGES, None, 0.75, rngs={"masking": jax.random.key(5)})
    b = MODEL.apply(variables, IMAGES, None, 0.75, rngs={"masking": jax.random.key(6)})
    assert not np.array_equal(a.mask, b.mask)


def test_bf16_loss_close_to_f32(variables):
    bf16 = MaskedAutoencoder(W, 1, HEADS, PATCH, decoder_width=DW, decoder_depth=1, decoder_heads=DHEADS,
                             dtype=jnp.bfloat16)
    out = jax.jit(bf16.apply, static_argnums=3)(variables, IMAGES, NOISE, 0.75)
    ref = MODEL.apply(variables, IMAGES, NOISE, 0.75)
    assert out.loss.dtype == jnp.float32 and bool(jnp.isfinite(out.loss))
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=0.02)


def test_mae_base_param_counts():
    model = mae_from_size("base")
    images = jnp.zeros((1, 224, 224, 3))
    noise = jnp.zeros((1, 196))
    # mask_ratio is static: close over it rather than let eval_shape trace it.
    params = jax.eval_shape(lambda k, x, n: model.init(k, x, n, 0.75), jax.random.key(0), images, noise)["params"]
    enc = _count(encoder_params(params))
    assert enc == 85_798_656 - 197 * 768  # timm ViT-B/16 minus its (learned) pos_embed
    d, dd, p3 = 768, 512, 16 * 16 * 3
    block = 12 * dd * dd + 13 * dd  # qkv 3d^2+3d, proj d^2+d, fc1 4d^2+4d, fc2 4d^2+d, 2 LNs 4d
    decoder = (d * dd + dd) + dd + 8 * block + 2 * dd + (dd * p3 + p3)
    assert _count(params) - enc == decoder
    out = jax.eval_shape(lambda v, x, n: model.apply(v, x, n, 0.75), {"params": params}, images, noise)
    assert out.pred.shape == (1, 196, p3) and out.patch_features.shape == (1, d)

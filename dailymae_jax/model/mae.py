"""Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners").

An image is cut into patches; a random 75% of them are removed per sample. The ViT encoder sees
only the visible patches. A light decoder receives the encoded visible tokens plus a shared,
learned mask token at every removed position, and regresses the pixels of every patch. The loss
is the mean squared error on the removed patches only, against per-patch normalised pixels.

Parameter tree of :class:`MaskedAutoencoder` (flat; D = width, Dd = decoder_width, p = patch)::

    patch_embed/proj/{kernel (p, p, 3, D), bias (D,)}      \
    cls_token (1, 1, D)                                      |  identical to VisionTransformer's:
    blocks_{i}/{norm1, attn/qkv, attn/proj, norm2,           |  extract with encoder_params()
                mlp/fc1, mlp/fc2}                            |
    norm/{scale, bias} (D,)                                 /
    decoder_embed/{kernel (D, Dd), bias (Dd,)}
    mask_token (1, 1, Dd)
    decoder_blocks_{j}/... (same layout as blocks_{i}, width Dd)
    decoder_norm/{scale, bias} (Dd,)
    decoder_pred/{kernel (Dd, p*p*3), bias (p*p*3,)}

Both position tables (encoder and decoder) are constants computed from the input shape.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dailymae_jax.model.vit import (
    SIZES,
    Block,
    Dtype,
    PatchEmbed,
    VitSize,
    dense_init,
    embed_with_pos,
    layer_norm,
    prepend_cls,
    sincos_pos_embed_2d,
    token_init,
    zeros,
)


# --------------------------------------------------------------------------------------------
# Patches, masking, target and loss: pure functions.
# --------------------------------------------------------------------------------------------

def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, L, p*p*C), tokens row-major, values ordered (row, col, channel)."""
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, gh, patch, gw, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid_h: int, grid_w: int) -> jax.Array:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, grid_h*p, grid_w*p, C)."""
    b, _, n = patches.shape
    c = n // (patch * patch)
    x = patches.reshape(b, grid_h, grid_w, patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, grid_h * patch, grid_w * patch, c)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """How many tokens survive masking: MAE's int(L * (1 - ratio)), float truncation included
    (e.g. L=50, ratio=0.9 keeps 4, not 5). ``mask_ratio`` must be a Python float, not traced."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(x: jax.Array, mask_ratio: float, noise: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample random masking by sorting noise.

    Args:
      x: tokens (B, L, D), without cls.
      mask_ratio: fraction to remove (static: it fixes the number of visible tokens).
      noise: (B, L) uniform in [0, 1); the tokens with the smallest noise are kept.

    Returns:
      x_kept (B, len_keep, D) in ascending-noise order, mask (B, L) in the original token order
      with 1 = removed and 0 = kept, and ids_restore (B, L) that undoes the shuffle.
    """
    b, length, _ = x.shape
    len_keep = num_visible(length, mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    x_kept = jnp.take_along_axis(x, ids_shuffle[:, :len_keep, None], axis=1)
    # Build the mask in shuffled order (visible first), then put it back in token order.
    mask = jnp.concatenate([jnp.zeros((b, len_keep)), jnp.ones((b, length - len_keep))], axis=1)
    mask = jnp.take_along_axis(mask, ids_restore, axis=1)
    return x_kept, mask, ids_restore


def patch_mean_std(patches: jax.Array, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Each patch's mean and unbiased std (as torch's .var() in MAE), the statistics of the norm-pix target."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, ddof=1, keepdims=True)
    return mean, (var + eps) ** 0.5


def norm_pix_target(images: jax.Array, patch: int, eps: float = 1e-6) -> jax.Array:
    """Patches normalised by their own mean and unbiased std (as torch's .var() in MAE)."""
    target = patchify(images.astype(jnp.float32), patch)
    mean, std = patch_mean_std(target, eps)
    return (target - mean) / std


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-patch MSE averaged over the removed patches only (float32)."""
    err = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(err * mask) / jnp.sum(mask)


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------

class MAEOutput(NamedTuple):
    """What one MAE forward pass returns."""

    loss: jax.Array            # scalar, float32
    pred: jax.Array            # (B, L, p*p*3) pixel predictions for every patch
    mask: jax.Array            # (B, L), 1 = removed
    patch_features: jax.Array  # (B, D) mean visible patch token after the last block, pre-norm
    ids_restore: jax.Array     # (B, L)


class MaskedAutoencoder(nn.Module):
    """ViT encoder on visible patches + narrow transformer decoder regressing pixels."""

    width: int
    depth: int
    heads: int
    patch: int
    mlp_ratio: float = 4.0
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"  # vit.ATTENTION_IMPLEMENTATIONS, for encoder and decoder blocks alike

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Encoder: names match VisionTransformer exactly.
        self.patch_embed = PatchEmbed(self.width, self.patch, **kw)
        self.cls_token = self.param("cls_token", token_init, (1, 1, self.width), self.param_dtype)
        self.blocks = [Block(self.width, self.heads, self.mlp_ratio, attention=self.attention, **kw)
                       for _ in range(self.depth)]
        self.norm = layer_norm("norm", **kw)
        # Decoder.
        self.decoder_embed = nn.Dense(self.decoder_width, kernel_init=dense_init, bias_init=zeros, **kw)
        self.mask_token = self.param("mask_token", token_init, (1, 1, self.decoder_width),
                                     self.param_dtype)
        self.decoder_blocks = [Block(self.decoder_width, self.decoder_heads, self.mlp_ratio, attention=self.attention,
                                     **kw)
                               for _ in range(self.decoder_depth)]
        self.decoder_norm = layer_norm("decoder_norm", **kw)
        self.decoder_pred = nn.Dense(self.patch * self.patch * 3, kernel_init=dense_init,
                                     bias_init=zeros, **kw)

    # ---- encoder ---------------------------------------------------------------------------

    def _encoder_blocks(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Run the blocks; return (normed tokens, pre-norm mean of the patch tokens in float32)."""
        for block in self.blocks:
            x = block(x)
        prenorm_mean = x[:, 1:].astype(jnp.float32).mean(axis=1)
        return self.norm(x), prenorm_mean

    def encode(self, images: jax.Array, *, return_prenorm_mean: bool = False
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Encode the full, unmasked image: tokens (B, 1 + L, D) after the final norm.

        With ``return_prenorm_mean`` also return the (B, D) mean patch token before the final
        norm (the DailyMAE online-probe feature, here on unmasked images).
        """
        x = prepend_cls(self.cls_token, embed_with_pos(self.patch_embed, images.astype(self.dtype)))
        tokens, prenorm_mean = self._encoder_blocks(x)
        return (tokens, prenorm_mean) if return_prenorm_mean else tokens

    # ---- decoder ---------------------------------------------------------------------------

    def decode(self, latent: jax.Array, ids_restore: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """Encoded visible tokens (B, 1 + keep, D) -> pixel predictions (B, L, p*p*3)."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        # A shared learned token stands in for every removed patch; appended after the visible
        # tokens, the whole sequence is then un-shuffled back to image order (cls stays first).
        masks = jnp.broadcast_to(self.mask_token.astype(x.dtype),
                                 (b, length + 1 - x.shape[1], self.decoder_width))
        patches = jnp.concatenate([x[:, 1:], masks], axis=1)
        patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)
        x = jnp.concatenate([x[:, :1], patches], axis=1)
        # The decoder needs positions again: mask tokens carry none of their own.
        pos = sincos_pos_embed_2d(self.decoder_width, *grid, cls_token=True)
        x = x + jnp.asarray(pos, x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    # ---- the whole thing -------------------------------------------------------------------

    def __call__(self, images: jax.Array, noise: jax.Array | None = None,
                 mask_ratio: float = 0.75) -> MAEOutput:
        """Patchify+embed -> add pos -> mask -> encode visible -> decode with mask tokens -> loss.

        ``noise`` (B, L) decides which patches are removed; if None it is drawn from the
        'masking' rng stream. ``mask_ratio`` must be a Python float.
        """
        b, h, w, _ = images.shape
        grid = (h // self.patch, w // self.patch)
        if noise is None:
            noise = jax.random.uniform(self.make_rng("masking"), (b, grid[0] * grid[1]))

        x = embed_with_pos(self.patch_embed, images.astype(self.dtype))  # pos added before masking
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        latent, patch_features = self._encoder_blocks(prepend_cls(self.cls_token, x))

        pred = self.decode(latent, ids_restore, grid)
        target = (norm_pix_target(images, self.patch) if self.norm_pix_loss
                  else patchify(images.astype(jnp.float32), self.patch))
        loss = mae_loss(pred, target, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask, patch_features=patch_features,
                         ids_restore=ids_restore)


DECODER_PARAM_PREFIXES = ("decoder_", "mask_token")


def encoder_params(mae_params: dict) -> dict:
    """The VisionTransformer (num_classes=0) params contained in an MAE's params tree."""
    return {k: v for k, v in mae_params.items() if not k.startswith(DECODER_PARAM_PREFIXES)}


def mae_from_size(size: str | VitSize, **kw: Any) -> MaskedAutoencoder:
    """Build a :class:`MaskedAutoencoder` from a name in :data:`SIZES` or a :class:`VitSize`."""
    s = SIZES[size] if isinstance(size, str) else size
    return MaskedAutoencoder(width=s.width, depth=s.depth, heads=s.heads, patch=s.patch,
                             mlp_ratio=s.mlp_ratio, **kw)

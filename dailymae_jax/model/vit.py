"""Vision Transformer encoder (ViT), laid out as in MAE / timm.

The encoder turns an image into tokens:

1. split the image into non-overlapping p x p patches and project each one linearly
   (a p x p, stride p convolution, ``patch_embed/proj``);
2. add a fixed 2-D sine-cosine position table (a constant, not a parameter);
3. prepend a learnable ``cls_token`` (its position row is all zeros, so nothing is added);
4. run ``depth`` pre-norm transformer blocks;
5. apply a final LayerNorm ``norm``.

Parameter tree of :class:`VisionTransformer` (D = width, p = patch, H = int(D * mlp_ratio))::

    patch_embed/proj/{kernel (p, p, 3, D), bias (D,)}
    cls_token (1, 1, D)
    blocks_{i}/norm1/{scale, bias} (D,)
    blocks_{i}/attn/qkv/{kernel (D, 3D), bias (3D,)}     # q, k, v concatenated in that order
    blocks_{i}/attn/proj/{kernel (D, D), bias (D,)}
    blocks_{i}/norm2/{scale, bias} (D,)
    blocks_{i}/mlp/fc1/{kernel (D, H), bias (H,)}
    blocks_{i}/mlp/fc2/{kernel (H, D), bias (D,)}
    norm/{scale, bias} (D,)                              # absent when global_pool and num_classes > 0
    fc_norm/{scale, bias} (D,)                           # only when global_pool and num_classes > 0
    head/{kernel (D, C), bias (C,)}                      # only when num_classes = C > 0

The same names appear at the top level of :class:`~dailymae_jax.model.mae.MaskedAutoencoder`, so a
pretrained encoder is a plain dict lookup away from an MAE checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# MAE initialises every nn.Linear with xavier_uniform and zero bias. The patch projection is a
# Linear in disguise (p*p*3 -> D), so its fans must be computed over the whole (p, p, 3) input
# block rather than flax's default conv convention (receptive field multiplies both fans).
dense_init = nn.initializers.xavier_uniform()
patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
token_init = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class VitSize:
    """Shape of a ViT encoder."""

    width: int
    depth: int
    heads: int
    patch: int
    mlp_ratio: float = 4.0


SIZES: dict[str, VitSize] = {
    "tiny": VitSize(192, 12, 3, 16),
    "small": VitSize(384, 12, 6, 16),
    "base": VitSize(768, 12, 12, 16),
    "large": VitSize(1024, 24, 16, 16),
    "huge": VitSize(1280, 32, 16, 14),
}


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(pos * omega), cos(pos * omega)] with omega_i = 1 / 10000^(i / (dim / 2))."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sine-cosine position table, MAE's formula, for any (grid_h, grid_w).

    Row ``r * grid_w + c`` (row-major token order) is
    ``[sin(c w), cos(c w), sin(r w), cos(r w)]``: as in MAE the first half of the channels encodes
    the column coordinate and the second half the row. Computed exactly for the requested grid (no
    interpolation), so progressive-resolution training sees the true table at every size.

    Returns float32 ``(grid_h * grid_w, dim)``, or ``(1 + grid_h * grid_w, dim)`` with a leading
    all-zero row for the cls token when ``cls_token`` is True.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)


class PatchEmbed(nn.Module):
    """Linear projection of non-overlapping patches: (B, H, W, 3) -> (B, gh, gw, D)."""

    width: int
    patch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch
        return nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init,
                       bias_init=zeros, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="proj")(images)


# model.attention after resolution (model/build.py turns "auto" into one of these).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla") -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v on (B, N, heads, head_dim) inputs.

    ``"xla"``: XLA's softmax attention (logits in float32), any backend. ``"cudnn"``: cuDNN's fused (flash)
    attention, CUDA only, bfloat16/float16 only. cuDNN trains only on even sequence lengths, and ours are odd
    (cls token + patches: 197 at 224 px), so that path goes through :func:`padded_attention`.
    """
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return padded_attention(q, k, v, implementation=implementation)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str,
                     multiple: int = 2) -> jax.Array:
    """Attention with the sequence zero-padded to a multiple of ``multiple``: the pad is hidden from every
    query through the key lengths (and the pad's own rows through the query lengths), then cut off, so the
    result and its gradients are those of the unpadded attention."""
    length = q.shape[1]
    padded = -(-length // multiple) * multiple
    if padded == length:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    out = jax.nn.dot_product_attention(jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths),
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :length]


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm layout)."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"  # one of ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.heads
        dense = lambda f, name: nn.Dense(f, kernel_init=dense_init, bias_init=zeros, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
        qkv = dense(3 * d, "qkv")(x).reshape(b, n, 3, self.heads, head_dim)
        out = attention_core(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention)
        return dense(d, "proj")(out.reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP with exact (erf) GELU, as PyTorch's nn.GELU()."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda f, name: nn.Dense(f, kernel_init=dense_init, bias_init=zeros, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
        out_features = x.shape[-1]
        x = nn.gelu(dense(self.hidden, "fc1")(x), approximate=False)
        return dense(out_features, "fc2")(x)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm as in timm (eps 1e-6); two-pass variance to match PyTorch numerically."""
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                        name=name)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth: zero the whole residual branch for a random subset of samples."""
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    # Scale survivors by 1/keep so the expected residual is unchanged (timm's scale_by_keep).
    return x * (jax.random.bernoulli(rng, keep, shape) / keep).astype(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    width: int
    heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def residual(branch: jax.Array) -> jax.Array:
            if deterministic or self.drop_path == 0.0:
                return branch
            return drop_path(branch, self.drop_path, self.make_rng("dropout"))

        attn = Attention(self.width, self.heads, name="attn", attention=self.attention, **kw)
        mlp = Mlp(int(self.width * self.mlp_ratio), name="mlp", **kw)
        x = x + residual(attn(layer_norm("norm1", **kw)(x)))
        x = x + residual(mlp(layer_norm("norm2", **kw)(x)))
        return x


def embed_with_pos(patch_embed: PatchEmbed, images: jax.Array) -> jax.Array:
    """Patch tokens (B, L, D) plus the exact sin-cos table for this image size (no cls yet)."""
    x = patch_embed(images)
    b, gh, gw, d = x.shape
    # The table depends only on static shapes: a numpy constant folded in at trace time.
    pos = sincos_pos_embed_2d(d, gh, gw)
    return x.reshape(b, gh * gw, d) + jnp.asarray(pos, x.dtype)


def prepend_cls(cls_token: jax.Array, x: jax.Array) -> jax.Array:
    """Prepend the cls token (its position row is zero, so no position is added)."""
    cls = jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate rising linearly from 0 to ``rate`` over the blocks (timm)."""
    return [float(r) for r in np.linspace(0.0, rate, depth)]


class VisionTransformer(nn.Module):
    """ViT encoder, optionally with a classification head for fine-tuning.

    ``__call__`` returns the tokens (B, 1 + L, D) after the final norm when ``num_classes == 0``,
    else logits (B, num_classes). With ``global_pool`` the head reads the LayerNorm'd (``fc_norm``)
    mean of the patch tokens, as MAE fine-tuning does; otherwise it reads the normed cls token.
    """

    width: int
    depth: int
    heads: int
    patch: int
    mlp_ratio: float = 4.0
    num_classes: int = 0
    global_pool: bool = False
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.patch_embed = PatchEmbed(self.width, self.patch, **kw)
        self.cls_token = self.param("cls_token", token_init, (1, 1, self.width), self.param_dtype)
        self.blocks = [Block(self.width, self.heads, self.mlp_ratio, dp, attention=self.attention, **kw)
                       for dp in drop_path_rates(self.drop_path, self.depth)]
        pooled_head = self.num_classes > 0 and self.global_pool
        if pooled_head:
            self.fc_norm = layer_norm("fc_norm", **kw)
        else:
            self.norm = layer_norm("norm", **kw)
        if self.num_classes > 0:
            self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5),
                                 bias_init=zeros, **kw)

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        x = prepend_cls(self.cls_token, embed_with_pos(self.patch_embed, images.astype(self.dtype)))
        for block in self.blocks:
            x = block(x, deterministic=not train)
        if self.num_classes == 0:
            return self.norm(x)
        if self.global_pool:
            feats = self.fc_norm(x[:, 1:].mean(axis=1))
        else:
            feats = self.norm(x)[:, 0]
        return self.head(feats)


def vit_from_size(size: str | VitSize, **kw: Any) -> VisionTransformer:
    """Build a :class:`VisionTransformer` from a name in :data:`SIZES` or a :class:`VitSize`."""
    s = SIZES[size] if isinstance(size, str) else size
    return VisionTransformer(width=s.width, depth=s.depth, heads=s.heads, patch=s.patch,
                             mlp_ratio=s.mlp_ratio, **kw)

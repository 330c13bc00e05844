"""Config → model: the one place that turns a recipe's ``model`` block into a Flax module.

Every task, the pretrained-weight readers and the tools build their models here, so a field added to the
``model`` block takes effect everywhere at once. Configs may be ``ml_collections.ConfigDict`` objects or the
plain dicts saved beside checkpoints (``config.json``, a checkpoint's ``meta``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from dailymae_jax.errors import ConfigError
from dailymae_jax.model.mae import MaskedAutoencoder, mae_from_size
from dailymae_jax.model.vit import SIZES, VisionTransformer, VitSize, vit_from_size

# config.model.dtype → the compute dtype of the model's matrix products. Parameters stay float32 either way.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_DTYPES = tuple(COMPUTE_DTYPES)
# config.model.attention: "auto" takes cuDNN's fused attention where it can run (a CUDA target and a 16-bit
# compute dtype) and XLA's everywhere else; the other two force one implementation.
ATTENTION_CHOICES = ("auto", "cudnn", "xla")
CUDA_PLATFORMS = ("gpu", "cuda")  # jax.default_backend() says "gpu", a CUDA device's .platform "cuda"


def compute_dtype(name: str) -> Any:
    """The jnp dtype named by ``model.dtype``; raises ConfigError for any other name."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"model.dtype {name!r}; allowed: {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def model_size(config: ml_collections.ConfigDict | Mapping[str, Any]) -> VitSize:
    """The encoder size: a named size, with any of width/depth/heads/patch overridden."""
    m = _as_config(config).model
    if m.size not in SIZES:
        raise ConfigError(f"model.size: unknown size {m.size!r}; allowed: {', '.join(SIZES)}")
    base = SIZES[m.size]
    overrides = {k: m.get(k) for k in ("width", "depth", "heads", "patch") if m.get(k) is not None}
    size = VitSize(**{**base.__dict__, **overrides})
    if size.width % size.heads:
        raise ConfigError(f"model.width {size.width} is not divisible by model.heads {size.heads}")
    if size.width % 4:
        raise ConfigError(f"model.width {size.width} must be divisible by 4 (2-D sin-cos position table)")
    return size


def attention_implementation(config: ml_collections.ConfigDict | Mapping[str, Any], *, dtype: Any = None,
                             platform: str | None = None) -> str:
    """``model.attention`` resolved for a model computing in ``dtype`` (default ``model.dtype``) that compiles
    for ``platform`` (default: JAX's default backend): "cudnn" or "xla". Raises ConfigError for an unknown
    choice, and for "cudnn" where it cannot run."""
    m = _as_config(config).model
    choice = m.get("attention", "auto")
    if choice not in ATTENTION_CHOICES:
        raise ConfigError(f"model.attention {choice!r}; allowed: {', '.join(ATTENTION_CHOICES)}")
    dtype = dtype or compute_dtype(m.dtype)
    fused_possible = jnp.dtype(dtype).itemsize == 2
    if choice == "cudnn" and not fused_possible:
        raise ConfigError(f"model.attention 'cudnn' needs model.dtype bfloat16, not {jnp.dtype(dtype).name}")
    if choice == "auto":  # the backend is asked only here: float32 models build before JAX starts
        return "cudnn" if fused_possible and (platform or jax.default_backend()) in CUDA_PLATFORMS else "xla"
    return choice


def _as_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    return config if isinstance(config, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(config))


def mae_from_config(config: ml_collections.ConfigDict | Mapping[str, Any], *, dtype: Any = None,
                    platform: str | None = None) -> MaskedAutoencoder:
    """The MaskedAutoencoder of a pretraining config; ``dtype`` overrides ``model.dtype`` (e.g. float32 for
    exports and pictures), ``platform`` names the backend it compiles for (see attention_implementation)."""
    config = _as_config(config)
    m = config.model
    dtype = dtype or compute_dtype(m.dtype)
    return mae_from_size(model_size(config), decoder_width=m.decoder_width,
                         decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                         norm_pix_loss=m.norm_pix_loss, dtype=dtype,
                         attention=attention_implementation(config, dtype=dtype, platform=platform))


def mae_settings(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The architecture :func:`mae_from_config` builds, as plain JSON-ready values: encoder size (named size
    and overrides resolved), decoder, loss target and compute dtype name. Reports record it, the analytic FLOPs
    count (train/flops.py) reads it, and other frameworks' references are built from it."""
    config = _as_config(config)
    size, m = model_size(config), config.model
    return {"width": size.width, "depth": size.depth, "heads": size.heads, "patch": size.patch,
            "mlp_ratio": size.mlp_ratio, "decoder_width": m.decoder_width, "decoder_depth": m.decoder_depth,
            "decoder_heads": m.decoder_heads, "norm_pix_loss": bool(m.norm_pix_loss), "dtype": m.dtype}


def vit_from_config(config: ml_collections.ConfigDict | Mapping[str, Any], *, num_classes: int,
                    dtype: Any = None) -> VisionTransformer:
    """The VisionTransformer of a classifier config with a ``num_classes`` head (0: no head, the normed tokens
    are returned, as linear probing reads them). Global pooling and drop path come from ``model`` when set."""
    config = _as_config(config)
    m = config.model
    dtype = dtype or compute_dtype(m.dtype)
    return vit_from_size(model_size(config), num_classes=num_classes,
                         global_pool=bool(m.get("global_pool", False)),
                         drop_path=float(m.get("drop_path", 0.0)), dtype=dtype,
                         attention=attention_implementation(config, dtype=dtype))

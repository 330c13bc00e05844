"""Config → model: the one place that turns a recipe's ``model`` block into a Flax module.

Every task, the pretrained-weight readers and the tools build their models here, so a field added to the
``model`` block takes effect everywhere at once. Configs may be ``ml_collections.ConfigDict`` objects or the
plain dicts saved beside checkpoints (``config.json``, a checkpoint's ``meta``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

from dailymae_jax import config as config_lib
from dailymae_jax.model.mae import MaskedAutoencoder, mae_from_size
from dailymae_jax.model.vit import VisionTransformer, vit_from_size

# config.model.dtype → the compute dtype of the model's matrix products. Parameters stay float32 either way.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """The jnp dtype named by ``model.dtype``; raises ConfigError for any other name."""
    if name not in COMPUTE_DTYPES:
        raise config_lib.ConfigError(f"model.dtype {name!r}; allowed: {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def _as_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    return config if isinstance(config, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(config))


def mae_from_config(config: ml_collections.ConfigDict | Mapping[str, Any], *,
                    dtype: Any = None) -> MaskedAutoencoder:
    """The MaskedAutoencoder of a pretraining config; ``dtype`` overrides ``model.dtype`` (e.g. float32 for
    exports and pictures)."""
    config = _as_config(config)
    m = config.model
    return mae_from_size(config_lib.model_size(config), decoder_width=m.decoder_width,
                         decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                         norm_pix_loss=m.norm_pix_loss, dtype=dtype or compute_dtype(m.dtype))


def vit_from_config(config: ml_collections.ConfigDict | Mapping[str, Any], *, num_classes: int,
                    dtype: Any = None) -> VisionTransformer:
    """The VisionTransformer of a classifier config with a ``num_classes`` head (0: no head, the normed tokens
    are returned, as linear probing reads them). Global pooling and drop path come from ``model`` when set."""
    config = _as_config(config)
    m = config.model
    return vit_from_size(config_lib.model_size(config), num_classes=num_classes,
                         global_pool=bool(m.get("global_pool", False)),
                         drop_path=float(m.get("drop_path", 0.0)), dtype=dtype or compute_dtype(m.dtype))

"""ViT encoder and masked autoencoder."""

from dailymae_jax.model.mae import (
    MAEOutput,
    MaskedAutoencoder,
    encoder_params,
    mae_from_size,
    mae_loss,
    norm_pix_target,
    num_visible,
    patchify,
    random_masking,
    unpatchify,
)
from dailymae_jax.model.vit import (
    SIZES,
    Attention,
    Block,
    Mlp,
    PatchEmbed,
    VisionTransformer,
    VitSize,
    attention_core,
    sincos_pos_embed_2d,
    vit_from_size,
)

__all__ = [
    "SIZES", "Attention", "Block", "MAEOutput", "MaskedAutoencoder", "Mlp", "PatchEmbed",
    "VisionTransformer", "VitSize", "attention_core", "encoder_params", "mae_from_size",
    "mae_loss", "norm_pix_target", "num_visible", "patchify", "random_masking",
    "sincos_pos_embed_2d", "unpatchify", "vit_from_size",
]

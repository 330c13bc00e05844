"""Pictures of what the MAE sees and reconstructs."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dailymae_jax import augment
from dailymae_jax.model.mae import patch_mean_std, patchify, unpatchify


def reconstruct(model: nn.Module, params, images_u8: np.ndarray, *, mask_ratio: float,
                rng: jax.Array) -> dict[str, np.ndarray]:
    """Runs the MAE on uint8 images; returns uint8 'original', 'masked', 'reconstruction', 'pasted'.

    With norm_pix_loss the decoder predicts per-patch normalised pixels; they are mapped back with each
    target patch's own mean and standard deviation, the inverse of the training target.
    """
    images_u8 = np.asarray(images_u8)
    n, h, w, _ = images_u8.shape
    noise = jax.random.uniform(rng, (n, (h // model.patch) * (w // model.patch)))
    pictures = jax.device_get(_reconstruct(model, params, jnp.asarray(images_u8), noise, float(mask_ratio)))
    return {"original": images_u8, **pictures}


# One compiled program per (model, image shape, mask ratio): run op by op, the model would compile each of
# its operations at every new resolution. Pretraining compiles the programs it will need before step 0.
@functools.partial(jax.jit, static_argnums=(0, 4))
def _reconstruct(model: nn.Module, params, images_u8: jax.Array, noise: jax.Array,
                 mask_ratio: float) -> dict[str, jax.Array]:
    images = augment.normalize(images_u8)
    _, h, w, _ = images.shape
    p = model.patch
    grid = (h // p, w // p)
    out = model.apply({"params": params}, images, noise, mask_ratio)
    pred = out.pred.astype(jnp.float32)
    patches = patchify(images, p)
    if model.norm_pix_loss:
        mean, std = patch_mean_std(patches)  # the target's own statistics, undone
        pred = pred * std + mean
    removed = out.mask[:, :, None]  # 1 = removed
    as_image = lambda x: augment.denormalize(unpatchify(x, p, *grid))
    gray = jnp.zeros_like(patches)  # 0 in normalised space: the dataset's mean colour
    return {
        "masked": as_image(jnp.where(removed, gray, patches)),
        "reconstruction": as_image(pred),
        "pasted": as_image(jnp.where(removed, pred, patches)),
    }

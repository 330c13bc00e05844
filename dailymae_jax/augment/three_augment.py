"""Three Augmentation (DeiT III) and colour jitter, on device, per sample.

DeiT III's finetuning augmentation, after RandomResizedCrop and flip, applies to each image exactly one of

* grayscale: ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` (PIL's ``convert('L')``) copied to all channels;
* solarize: every channel value ``v >= 128`` becomes ``255 - v`` (PIL's ``ImageOps.solarize``);
* Gaussian blur with ``sigma ~ U(0.1, 2.0)`` (PIL's ``GaussianBlur(radius=sigma)``; the radius *is* sigma),

chosen uniformly, then optionally a colour jitter (brightness, contrast, saturation by factors
``U(1 - s, 1 + s)``, in a random order per image, as torchvision's ``ColorJitter(s, s, s)``).

Everything works on float32 images with values in [0, 255] (the uint8 batch from the loader, converted on
device) and keeps that range, so it runs before ``augment.normalize``. Results are not rounded back to
integers: the model sees the exact transform rather than its 8-bit quantisation. Each op is computed for the
whole batch and then selected per sample; the three are elementwise or a 13-tap separable filter, negligible
next to a ViT step, and a fixed program keeps the compiled step free of data-dependent control flow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128.0
BLUR_SIGMA_RANGE = (0.1, 2.0)
# Taps either side of the centre: 3 sigma at the largest sigma. A Gaussian's mass beyond 3 sigma is 0.27%;
# weights are renormalised over the taps, so a flat image stays flat.
BLUR_RADIUS = 6

# Indices of the ops in the per-sample choice returned by three_augment.
GRAYSCALE, SOLARIZE, BLUR = 0, 1, 2


def grayscale(images: jax.Array) -> jax.Array:
    """(B, H, W, 3) → luma copied to three channels."""
    luma = images @ jnp.asarray(GRAY_WEIGHTS, images.dtype)
    return jnp.broadcast_to(luma[..., None], images.shape)


def solarize(images: jax.Array, threshold: float = SOLARIZE_THRESHOLD) -> jax.Array:
    """Inverts every channel value at or above ``threshold`` (0..255 scale)."""
    return jnp.where(images >= threshold, 255.0 - images, images)


def gaussian_kernels(sigma: jax.Array, radius: int = BLUR_RADIUS) -> jax.Array:
    """(B,) sigmas → (B, 2·radius + 1) normalised 1-D Gaussian weights exp(−x²/2σ²)/Σ."""
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def _filter_axis(images: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
    """Per-sample 1-D correlation along ``axis`` (1 = rows, 2 = columns), mirrored borders."""
    radius = (weights.shape[1] - 1) // 2
    pad = [(0, 0)] * images.ndim
    pad[axis] = (radius, radius)
    # 'symmetric' repeats the edge pixel (d c b a | a b c d), as scipy.ndimage's mode='reflect'.
    padded = jnp.pad(images, pad, mode="symmetric")
    size = images.shape[axis]
    out = jnp.zeros_like(images)
    for tap in range(weights.shape[1]):
        window = jax.lax.slice_in_dim(padded, tap, tap + size, axis=axis)
        out = out + weights[:, tap, None, None, None] * window
    return out


def gaussian_blur(images: jax.Array, sigma: jax.Array, radius: int = BLUR_RADIUS) -> jax.Array:
    """Separable Gaussian blur with a per-sample ``sigma`` (B,), on (B, H, W, C) images."""
    weights = gaussian_kernels(sigma, radius).astype(images.dtype)
    return _filter_axis(_filter_axis(images, weights, 1), weights, 2)


def draw_three_augment(rng: jax.Array, batch: int, *, sigma_range: tuple[float, float] = BLUR_SIGMA_RANGE
                       ) -> tuple[jax.Array, jax.Array]:
    """Per sample: which op (int32 GRAYSCALE / SOLARIZE / BLUR, uniform) and the blur sigma ~ U(sigma_range)."""
    choice_rng, sigma_rng = jax.random.split(rng)
    choice = jax.random.randint(choice_rng, (batch,), 0, 3)
    sigma = jax.random.uniform(sigma_rng, (batch,), minval=sigma_range[0], maxval=sigma_range[1])
    return choice, sigma


def apply_three_augment(images: jax.Array, choice: jax.Array, sigma: jax.Array) -> jax.Array:
    """Sample i gets op ``choice[i]`` (its blur, if chosen, with ``sigma[i]``) and nothing else."""
    pick = choice[:, None, None, None]
    return jnp.where(pick == GRAYSCALE, grayscale(images),
                     jnp.where(pick == SOLARIZE, solarize(images), gaussian_blur(images, sigma)))


def three_augment(rng: jax.Array, images: jax.Array, *,
                  sigma_range: tuple[float, float] = BLUR_SIGMA_RANGE) -> tuple[jax.Array, jax.Array]:
    """Applies exactly one of grayscale, solarize, Gaussian blur to each image, chosen uniformly.

    Returns the images and the (B,) int32 choice per sample.
    """
    choice, sigma = draw_three_augment(rng, images.shape[0], sigma_range=sigma_range)
    return apply_three_augment(images, choice, sigma), choice


def adjust_brightness(images: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with black: ``clip(f · x)``; ``factor`` is (B,)."""
    return jnp.clip(images * factor[:, None, None, None], 0.0, 255.0)


def adjust_contrast(images: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with the image's mean luma: ``clip(f · x + (1 − f) · mean(gray))``."""
    mean = (images @ jnp.asarray(GRAY_WEIGHTS, images.dtype)).mean(axis=(1, 2))
    f = factor[:, None, None, None]
    return jnp.clip(f * images + (1.0 - f) * mean[:, None, None, None], 0.0, 255.0)


def adjust_saturation(images: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with the image's own grayscale: ``clip(f · x + (1 − f) · gray)``."""
    f = factor[:, None, None, None]
    return jnp.clip(f * images + (1.0 - f) * grayscale(images), 0.0, 255.0)


def color_jitter(rng: jax.Array, images: jax.Array, strength: float) -> jax.Array:
    """Brightness, contrast and saturation, each by a factor ``U(1 − s, 1 + s)``, in a random order per image.

    ``strength`` 0 returns the images unchanged (and draws nothing).
    """
    if strength <= 0.0:
        return images
    factor_rng, order_rng = jax.random.split(rng)
    batch = images.shape[0]
    factors = jax.random.uniform(factor_rng, (3, batch), minval=max(0.0, 1.0 - strength),
                                 maxval=1.0 + strength)
    # One permutation of (brightness, contrast, saturation) per image: slot j applies op order[:, j].
    order = jnp.argsort(jax.random.uniform(order_rng, (batch, 3)), axis=1)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation)
    for slot in range(3):
        op_here = order[:, slot][:, None, None, None]
        out = images
        for index, op in enumerate(ops):
            out = jnp.where(op_here == index, op(images, factors[index]), out)
        images = out
    return images

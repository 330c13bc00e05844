"""Mixup, CutMix and label smoothing on device, with the semantics of timm's ``Mixup`` in 'batch' mode.

For each group of the batch (one group per device, as timm mixes each GPU's batch on its own), with
probability ``prob``: CutMix with probability ``switch_prob`` (λ ~ Beta(cutmix_alpha, cutmix_alpha)), else
Mixup (λ ~ Beta(mixup_alpha, mixup_alpha)). Sample i of a group is mixed with the sample at the mirrored
position of the same group (timm's ``x.flip(0)``), so no image crosses devices.

* Mixup: ``x = λ x + (1 − λ) x_partner``.
* CutMix: a box with sides ``H·√(1 − λ)`` by ``W·√(1 − λ)`` (integer parts) centred at a uniform pixel and
  clipped to the image is pasted from the partner; λ is then corrected to ``1 − box_area / (H·W)``.
* Targets: ``λ · smooth(y) + (1 − λ) · smooth(y_partner)`` with ``smooth(y) = (1 − ε) one_hot(y) + ε / C``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixupConfig:
    """DeiT / MAE finetuning defaults."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5  # chance of CutMix when both are enabled
    prob: float = 1.0  # chance that a group is mixed at all
    label_smoothing: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.prob > 0.0 and (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """(B,) int labels → (B, C) targets: ``1 − ε + ε/C`` on the label, ``ε/C`` elsewhere."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_boxes(rng: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
    """(G,) λ → (G, 4) int32 boxes (top, bottom, left, right), half-open, clipped to the image (timm's rand_bbox)."""
    cy_rng, cx_rng = jax.random.split(rng)
    groups = lam.shape[0]
    cut = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut).astype(jnp.int32)
    cut_w = jnp.floor(width * cut).astype(jnp.int32)
    cy = jax.random.randint(cy_rng, (groups,), 0, height)
    cx = jax.random.randint(cx_rng, (groups,), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    return jnp.stack([top, bottom, left, right], axis=1)


def partner(x: jax.Array, groups: int) -> jax.Array:
    """Each sample's mixing partner: the batch reversed within each of ``groups`` equal, contiguous groups."""
    b = x.shape[0]
    return x.reshape(groups, b // groups, *x.shape[1:])[:, ::-1].reshape(x.shape)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int, cfg: MixupConfig,
              groups: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixes a (B, H, W, C) batch in ``groups`` groups; returns (images, soft targets (B, C), λ per group (G,)).

    With mixing disabled this is label smoothing only (λ = 1).
    """
    targets = smooth_one_hot(labels, num_classes, cfg.label_smoothing)
    b, height, width = images.shape[:3]
    if b % groups:
        raise ValueError(f"batch {b} is not divisible into {groups} mixing groups")
    if not cfg.enabled:
        return images, targets, jnp.ones((groups,), jnp.float32)
    apply_rng, switch_rng, mix_rng, cut_rng, box_rng = jax.random.split(rng, 5)
    apply = jax.random.uniform(apply_rng, (groups,)) < cfg.prob
    if cfg.mixup_alpha > 0.0 and cfg.cutmix_alpha > 0.0:
        use_cutmix = jax.random.uniform(switch_rng, (groups,)) < cfg.switch_prob
    else:
        use_cutmix = jnp.full((groups,), cfg.cutmix_alpha > 0.0)
    lam_mix = (jax.random.beta(mix_rng, cfg.mixup_alpha, cfg.mixup_alpha, (groups,))
               if cfg.mixup_alpha > 0.0 else jnp.ones((groups,)))
    lam_cut = (jax.random.beta(cut_rng, cfg.cutmix_alpha, cfg.cutmix_alpha, (groups,))
               if cfg.cutmix_alpha > 0.0 else jnp.ones((groups,)))

    boxes = cutmix_boxes(box_rng, lam_cut, height, width)
    top, bottom, left, right = (boxes[:, i] for i in range(4))
    lam_cut = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)

    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    in_box = ((rows >= top[:, None, None]) & (rows < bottom[:, None, None])
              & (cols >= left[:, None, None]) & (cols < right[:, None, None]))  # (G, H, W)
    paste = (in_box & (apply & use_cutmix)[:, None, None])[:, None, :, :, None]  # (G, 1, H, W, 1)
    blend = jnp.where(apply & ~use_cutmix, lam, 1.0)[:, None, None, None, None]

    grouped = images.reshape(groups, b // groups, *images.shape[1:])
    other = grouped[:, ::-1]
    mixed = jnp.where(paste, other, blend.astype(images.dtype) * grouped
                      + (1.0 - blend).astype(images.dtype) * other)
    per_sample_lam = jnp.repeat(lam, b // groups)[:, None]
    targets = per_sample_lam * targets + (1.0 - per_sample_lam) * partner(targets, groups)
    return mixed.reshape(images.shape), targets, lam


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of ``−Σ_c target_c · log_softmax(logits)_c`` (timm's SoftTargetCrossEntropy)."""
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1))

"""Pure step functions of every task: (state, images_uint8, labels) → (state, metrics), and the logits the
classifiers are evaluated on. No sharding or device logic lives here: train/compile.py compiles them.

* pretraining (MAE): normalise and flip on device, per-sample masking, norm-pix loss, AdamW, and the online
  probe on the stop-gradient patch features;
* finetuning (MAE / DailyMAE recipe): flip, Three Augmentation (+ optional colour jitter), normalisation,
  Mixup/CutMix with label smoothing, soft-target cross-entropy, dropping paths;
* linear probing (MAE's protocol): a frozen encoder in inference mode, its normed cls token, BatchNorm without
  affine parameters and a linear head; the BatchNorm statistics update in training mode, as in PyTorch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dailymae_jax import augment
from dailymae_jax.augment import mixup, three_augment
from dailymae_jax.model.probe import LinearProbe
from dailymae_jax.model.vit import VisionTransformer
from dailymae_jax.train.state import ClassifierState, TrainState

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PretrainStepConfig:
    """What one compiled pretraining step depends on besides the state and the batch."""

    mask_ratio: float
    patch: int
    hflip: bool = True
    grad_accum_steps: int = 1
    probe_on_full_image: bool = False  # DailyMAE's probe: an extra encoder pass on the unmasked image


def make_pretrain_step(model: nn.Module, probe: nn.Module, tx: optax.GradientTransformation,
                       probe_tx: optax.GradientTransformation, lr_schedule: Callable[[jax.Array], jax.Array],
                       cfg: PretrainStepConfig) -> Callable[[TrainState, jax.Array, jax.Array],
                                                            tuple[TrainState, Metrics]]:
    """Builds the MAE pretraining step for one resolution bucket (one mask ratio)."""

    def mae_loss(params, images, noise):
        out = model.apply({"params": params}, images, noise, cfg.mask_ratio)
        return out.loss, out.patch_features

    grad_fn = jax.value_and_grad(mae_loss, has_aux=True)

    def accumulated_grads(params, images, noise):
        """Mean loss and gradient over ``grad_accum_steps`` micro-batches, one at a time (less memory)."""
        k = cfg.grad_accum_steps
        if k == 1:
            (loss, features), grads = grad_fn(params, images, noise)
            return loss, features, grads

        # Sample i·k + j goes to micro-batch j: each device keeps its own rows, so no data moves.
        def split(x):
            return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

        def body(carry, micro):
            loss_sum, grad_sum = carry
            (loss, features), grads = grad_fn(params, *micro)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), features

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, grad_sum), features = jax.lax.scan(body, (0.0, zeros), (split(images), split(noise)))
        features = jnp.swapaxes(features, 0, 1).reshape(images.shape[0], -1)
        # Every micro-batch masks the same number of patches per sample, so the mean of the micro-batch
        # losses is the loss of the whole batch.
        return loss_sum / k, features, jax.tree.map(lambda g: g / k, grad_sum)

    def step(state: TrainState, images_u8: jax.Array, labels: jax.Array) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        flip_rng, noise_rng = jax.random.split(rng)
        # float32 here: the norm_pix target is computed from these; the model casts its own input.
        images = augment.normalize(images_u8)
        if cfg.hflip:
            images = augment.random_flip(flip_rng, images)
        num_patches = (images.shape[1] // cfg.patch) * (images.shape[2] // cfg.patch)
        noise = jax.random.uniform(noise_rng, (images.shape[0], num_patches))

        loss, features, grads = accumulated_grads(state.params, images, noise)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        if cfg.probe_on_full_image:
            _, features = model.apply({"params": state.params}, images, return_prenorm_mean=True,
                                      method=model.encode)
        features = jax.lax.stop_gradient(features)

        def probe_loss(probe_params):
            logits, new_stats = probe.apply({"params": probe_params, "batch_stats": state.probe_stats},
                                            features, train=True, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce, (logits, new_stats["batch_stats"])

        (probe_ce, (logits, probe_stats)), probe_grads = jax.value_and_grad(
            probe_loss, has_aux=True)(state.probe_params)
        probe_updates, probe_opt_state = probe_tx.update(probe_grads, state.probe_opt_state,
                                                         state.probe_params)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            probe_params=optax.apply_updates(state.probe_params, probe_updates),
            probe_stats=probe_stats, probe_opt_state=probe_opt_state)
        metrics = {
            "loss": loss,
            "lr": jnp.asarray(lr_schedule(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(grads),
            "probe_loss": probe_ce,
            "probe_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        }
        return new_state, metrics

    return step


# ---------------------------------------------------------------------------------------------------------
# Finetuning.


@dataclasses.dataclass(frozen=True)
class FinetuneStepConfig:
    """What one compiled finetuning step depends on besides the state and the batch."""

    num_classes: int
    hflip: bool = True
    three_augment: bool = True
    color_jitter: float = 0.0
    mix: mixup.MixupConfig = mixup.MixupConfig()
    mix_groups: int = 1  # one mixing group per device: partners never cross devices


def preprocess(rng: jax.Array, images_u8: jax.Array, cfg: FinetuneStepConfig) -> jax.Array:
    """uint8 crops → flipped, Three-Augmented, jittered, normalised float32 images."""
    flip_rng, three_rng, jitter_rng = jax.random.split(rng, 3)
    x = images_u8.astype(jnp.float32)
    if cfg.hflip:
        x = augment.random_flip(flip_rng, x)
    if cfg.three_augment:
        x, _ = three_augment.three_augment(three_rng, x)
    x = three_augment.color_jitter(jitter_rng, x, cfg.color_jitter)
    return augment.normalize(x)


def make_finetune_step(model: VisionTransformer, tx: optax.GradientTransformation,
                       lr_schedule: Callable[[jax.Array], jax.Array], cfg: FinetuneStepConfig
                       ) -> Callable[[ClassifierState, jax.Array, jax.Array], tuple[ClassifierState, Metrics]]:
    """The finetuning step (resolution-agnostic: compile it once per resolution bucket)."""

    def step(state: ClassifierState, images_u8: jax.Array, labels: jax.Array) -> tuple[ClassifierState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, mix_rng, drop_rng = jax.random.split(rng, 3)
        images = preprocess(aug_rng, images_u8, cfg)
        images, targets, _ = mixup.mix_batch(mix_rng, images, labels, num_classes=cfg.num_classes, cfg=cfg.mix,
                                             groups=cfg.mix_groups)

        def loss_fn(params):
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": drop_rng})
            return mixup.soft_cross_entropy(logits, targets), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        metrics = {
            "loss": loss,
            "lr": jnp.asarray(lr_schedule(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(grads),
            # Against the dominant label of each (mixed) target: a rough training signal, not an accuracy.
            "train_top1": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)),
        }
        return new_state, metrics

    return step


def finetune_logits(model: VisionTransformer) -> Callable[[ClassifierState, jax.Array], jax.Array]:
    def logits(state: ClassifierState, images_u8: jax.Array) -> jax.Array:
        return model.apply({"params": state.params}, augment.normalize(images_u8), train=False)
    return logits


# ---------------------------------------------------------------------------------------------------------
# Linear probing.


def features(encoder: VisionTransformer, frozen: Any, images_u8: jax.Array, hflip_rng: jax.Array | None = None
             ) -> jax.Array:
    """Stop-gradient cls features (B, D), float32, of (optionally flipped) uint8 images."""
    x = images_u8 if hflip_rng is None else augment.random_flip(hflip_rng, images_u8)
    tokens = encoder.apply({"params": frozen}, augment.normalize(x), train=False)
    return jax.lax.stop_gradient(tokens[:, 0].astype(jnp.float32))


def make_linprobe_step(encoder: VisionTransformer, probe: LinearProbe, tx: optax.GradientTransformation,
                       lr_schedule: Callable[[jax.Array], jax.Array], *, hflip: bool = True
                       ) -> Callable[[ClassifierState, jax.Array, jax.Array], tuple[ClassifierState, Metrics]]:
    def step(state: ClassifierState, images_u8: jax.Array, labels: jax.Array) -> tuple[ClassifierState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        feats = features(encoder, state.frozen, images_u8, rng if hflip else None)

        def loss_fn(params):
            logits, updated = probe.apply({"params": params, "batch_stats": state.batch_stats}, feats, train=True,
                                          mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updated["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, batch_stats=batch_stats)
        metrics = {"loss": loss, "lr": jnp.asarray(lr_schedule(state.step), jnp.float32),
                   "grad_norm": optax.tree.norm(grads),
                   "train_top1": jnp.mean(jnp.argmax(logits, -1) == labels)}
        return new_state, metrics

    return step


def linprobe_logits(encoder: VisionTransformer, probe: LinearProbe
                    ) -> Callable[[ClassifierState, jax.Array], jax.Array]:
    def logits(state: ClassifierState, images_u8: jax.Array) -> jax.Array:
        feats = features(encoder, state.frozen, images_u8)
        return probe.apply({"params": state.params, "batch_stats": state.batch_stats}, feats, train=False)
    return logits

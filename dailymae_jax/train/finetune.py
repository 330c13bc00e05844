"""The finetune task: a ViT classifier (global average pooling + fc_norm) initialised from a pretrained encoder.

Recipe (MAE / DailyMAE, RECIPE.md §5): AdamW (0.9, 0.999) with layer-wise lr decay, weight decay 0.05 on
matrices, drop path, warmup + cosine per step; on device: flip, Three Augmentation (+ optional colour jitter),
normalisation, Mixup/CutMix with label smoothing, soft-target cross-entropy. Progressive resolution during
finetuning reuses the pretraining machinery: one ahead-of-time compiled step per resolution bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dailymae_jax import augment, mixup, three_augment
from dailymae_jax import config as config_lib
from dailymae_jax.data.loader import CropSpec
from dailymae_jax.model.vit import VisionTransformer, vit_from_size
from dailymae_jax.train.warm_start import init_from_pretrained
from dailymae_jax.train import classify
from dailymae_jax.train import schedule as schedule_lib
from dailymae_jax.train.state import ClassifierState, make_finetune_optimizer

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class FinetuneStepConfig:
    """What one compiled finetuning step depends on besides the state and the batch."""

    num_classes: int
    hflip: bool = True
    three_augment: bool = True
    color_jitter: float = 0.0
    mix: mixup.MixupConfig = mixup.MixupConfig()
    mix_groups: int = 1  # one mixing group per device: partners never cross devices


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> VisionTransformer:
    m = config.model
    return vit_from_size(config_lib.model_size(config), num_classes=num_classes, global_pool=m.global_pool,
                         drop_path=m.drop_path, dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32)


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


def logits_fn(model: VisionTransformer) -> Callable[[ClassifierState, jax.Array], jax.Array]:
    def logits(state: ClassifierState, images_u8: jax.Array) -> jax.Array:
        return model.apply({"params": state.params}, augment.normalize(images_u8), train=False)
    return logits


def init_state(rng: jax.Array, *, model: VisionTransformer, tx: optax.GradientTransformation,
               resolution: int) -> ClassifierState:
    """A fresh classifier state (random weights; pretrained ones are loaded afterwards, on the host)."""
    init_rng, run_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, resolution, resolution, 3), jnp.float32))["params"]
    return ClassifierState(step=jnp.zeros((), jnp.int32), rng=run_rng, params=params, opt_state=tx.init(params),
                           batch_stats={}, frozen={})


def build_parts(config: ml_collections.ConfigDict, shape: classify.RunShape) -> classify.TaskParts:
    model = build_model(config, shape.num_classes)
    resolution = config_lib.finetune_stages(config)[0].resolution
    abstract_params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, resolution, resolution, 3))))["params"]
    train = config.train
    lr_schedule = schedule_lib.learning_rate_schedule(
        peak_lr=schedule_lib.scaled_learning_rate(train.base_lr, config.data.global_batch_size),
        total_steps=shape.total_steps, warmup_steps=train.warmup_epochs * shape.steps_per_epoch,
        min_lr=train.min_lr)
    tx = make_finetune_optimizer(abstract_params, learning_rate=lr_schedule, weight_decay=train.weight_decay,
                                 b1=train.b1, b2=train.b2, layer_decay=train.layer_decay, depth=model.depth)
    a = config.augment
    step_cfg = FinetuneStepConfig(
        num_classes=shape.num_classes, hflip=config.data.hflip, three_augment=a.three_augment,
        color_jitter=a.color_jitter,
        mix=mixup.MixupConfig(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
                              switch_prob=a.mixup_switch_prob, prob=a.mixup_prob,
                              label_smoothing=a.label_smoothing),
        mix_groups=shape.device_count)

    def load_pretrained(state: ClassifierState) -> tuple[ClassifierState, dict[str, Any]]:
        # MAE finetuning with global pooling drops the encoder's final norm and trains a fresh fc_norm.
        params, report = init_from_pretrained(config, jax.device_get(state.params))
        return state.replace(params=params), report

    return classify.TaskParts(
        init_state=functools.partial(init_state, model=model, tx=tx, resolution=resolution),
        load_pretrained=load_pretrained,
        make_step=lambda _resolution: make_finetune_step(model, tx, lr_schedule, step_cfg),
        logits_fn=logits_fn(model),
        crop=CropSpec(tuple(config.data.crop_scale), tuple(config.data.crop_ratio)))


def prepare_data(config: ml_collections.ConfigDict) -> tuple[Path, Path]:
    return classify.prepare_data(config)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Finetunes (or resumes) into ``workdir``; returns the summary written to summary.json."""
    return classify.run(config, workdir, build_parts)

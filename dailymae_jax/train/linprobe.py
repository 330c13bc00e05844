"""The linprobe task (MAE's protocol): a frozen pretrained encoder, its normed cls token as the feature,
BatchNorm without affine parameters and a linear head on top, trained with LARS.

Augmentation is RandomResizedCrop + flip only (no Three Augmentation, no Mixup). The encoder runs in
inference mode inside the step and receives no gradient; only the head is optimised, and the BatchNorm's
running statistics are updated in training mode, as in PyTorch.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dailymae_jax import augment
from dailymae_jax import config as config_lib
from dailymae_jax.data.loader import CropSpec
from dailymae_jax.model.probe import LinearProbe
from dailymae_jax.model.vit import VisionTransformer, vit_from_size
from dailymae_jax.train.warm_start import init_from_pretrained
from dailymae_jax.train import classify
from dailymae_jax.train import schedule as schedule_lib
from dailymae_jax.train.state import ClassifierState, make_lars_optimizer

Metrics = dict[str, jax.Array]


def build_encoder(config: ml_collections.ConfigDict) -> VisionTransformer:
    """The encoder without a head: returns the normed tokens; the probe reads the cls token (row 0)."""
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    return vit_from_size(config_lib.model_size(config), num_classes=0, dtype=dtype)


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


def logits_fn(encoder: VisionTransformer, probe: LinearProbe) -> Callable[[ClassifierState, jax.Array], jax.Array]:
    def logits(state: ClassifierState, images_u8: jax.Array) -> jax.Array:
        feats = features(encoder, state.frozen, images_u8)
        return probe.apply({"params": state.params, "batch_stats": state.batch_stats}, feats, train=False)
    return logits


def init_state(rng: jax.Array, *, encoder: VisionTransformer, probe: LinearProbe, tx: optax.GradientTransformation,
               resolution: int) -> ClassifierState:
    encoder_rng, probe_rng, run_rng = jax.random.split(rng, 3)
    frozen = encoder.init(encoder_rng, jnp.zeros((1, resolution, resolution, 3), jnp.float32))["params"]
    probe_vars = probe.init(probe_rng, jnp.zeros((2, encoder.width), jnp.float32), train=False)
    return ClassifierState(step=jnp.zeros((), jnp.int32), rng=run_rng, params=probe_vars["params"],
                           opt_state=tx.init(probe_vars["params"]), batch_stats=probe_vars["batch_stats"],
                           frozen=frozen)


def build_parts(config: ml_collections.ConfigDict, shape: classify.RunShape) -> classify.TaskParts:
    encoder = build_encoder(config)
    probe = LinearProbe(num_classes=shape.num_classes)
    train = config.train
    lr_schedule = schedule_lib.learning_rate_schedule(
        peak_lr=schedule_lib.scaled_learning_rate(train.base_lr, config.data.global_batch_size),
        total_steps=shape.total_steps, warmup_steps=train.warmup_epochs * shape.steps_per_epoch,
        min_lr=train.min_lr)
    tx = make_lars_optimizer(learning_rate=lr_schedule, weight_decay=train.weight_decay, momentum=train.momentum)
    resolution = config_lib.finetune_stages(config)[0].resolution

    def load_pretrained(state: ClassifierState) -> tuple[ClassifierState, dict[str, Any]]:
        # The encoder keeps its pretrained final norm: the probe reads the normed cls token.
        frozen, report = init_from_pretrained(config, jax.device_get(state.frozen), keep_fresh=())
        return state.replace(frozen=frozen), report

    return classify.TaskParts(
        init_state=functools.partial(init_state, encoder=encoder, probe=probe, tx=tx, resolution=resolution),
        load_pretrained=load_pretrained,
        make_step=lambda _resolution: make_linprobe_step(encoder, probe, tx, lr_schedule, hflip=config.data.hflip),
        logits_fn=logits_fn(encoder, probe),
        crop=CropSpec(tuple(config.data.crop_scale), tuple(config.data.crop_ratio)))


def prepare_data(config: ml_collections.ConfigDict) -> tuple[Path, Path]:
    return classify.prepare_data(config)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains a linear probe on a frozen encoder (or resumes) into ``workdir``; returns the summary."""
    return classify.run(config, workdir, build_parts)

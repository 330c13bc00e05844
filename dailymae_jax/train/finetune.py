"""The finetune task: a ViT classifier (global average pooling + fc_norm) initialised from a pretrained encoder.

Recipe (MAE and DailyMAE): AdamW (0.9, 0.999) with layer-wise lr decay, weight decay 0.05 on matrices, drop
path, warmup + cosine per step; on device: flip, Three Augmentation (+ optional colour jitter), normalisation,
Mixup/CutMix with label smoothing, soft-target cross-entropy (train/steps.py). Progressive resolution during
finetuning reuses the pretraining machinery: one ahead-of-time compiled step per resolution.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dailymae_jax import config as config_lib
from dailymae_jax import pretrained
from dailymae_jax import schedule as schedule_lib
from dailymae_jax.augment import mixup
from dailymae_jax.model.build import vit_from_config
from dailymae_jax.train import classify
from dailymae_jax.train.state import ClassifierState, init_finetune_state, make_finetune_optimizer
from dailymae_jax.train.steps import FinetuneStepConfig, finetune_logits, make_finetune_step


def build_parts(config: ml_collections.ConfigDict, shape: classify.RunShape) -> classify.TaskParts:
    model = vit_from_config(config, num_classes=shape.num_classes)
    resolution = config_lib.finetune_stages(config)[0].resolution
    abstract_params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, resolution, resolution, 3))))["params"]
    train = config.train
    lr_schedule = schedule_lib.run_learning_rate(train, global_batch=config.data.global_batch_size,
                                                 steps_per_epoch=shape.steps_per_epoch)
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

    def load_pretrained(state: ClassifierState) -> tuple[ClassifierState, dict]:
        # MAE finetuning with global pooling drops the encoder's final norm and trains a fresh fc_norm.
        params, report = pretrained.init_from_pretrained(config, jax.device_get(state.params))
        return state.replace(params=params), report

    return classify.TaskParts(
        init_state=functools.partial(init_finetune_state, model=model, tx=tx, resolution=resolution),
        load_pretrained=load_pretrained,
        make_step=lambda _resolution: make_finetune_step(model, tx, lr_schedule, step_cfg),
        logits_fn=finetune_logits(model))


prepare_data = classify.prepare_data  # the task's .beton files, before JAX starts (main)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) into ``workdir``; returns the summary also written to summary.json."""
    return classify.run(config, workdir, build_parts)

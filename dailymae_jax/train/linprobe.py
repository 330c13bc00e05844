"""The linprobe task (MAE's protocol): a frozen pretrained encoder, its normed cls token as the feature,
BatchNorm without affine parameters and a linear head on top, trained with LARS.

Augmentation is RandomResizedCrop + flip only (no Three Augmentation, no Mixup). The encoder runs in
inference mode inside the step and receives no gradient (train/steps.py).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import ml_collections

from dailymae_jax import config as config_lib
from dailymae_jax import pretrained
from dailymae_jax import schedule as schedule_lib
from dailymae_jax.model.build import vit_from_config
from dailymae_jax.model.probe import LinearProbe
from dailymae_jax.train import classify
from dailymae_jax.train.state import ClassifierState, init_linprobe_state, make_lars_optimizer
from dailymae_jax.train.steps import linprobe_logits, make_linprobe_step


def build_parts(config: ml_collections.ConfigDict, shape: classify.RunShape) -> classify.TaskParts:
    encoder = vit_from_config(config, num_classes=0)  # no head: returns the normed tokens
    probe = LinearProbe(num_classes=shape.num_classes)
    train = config.train
    lr_schedule = schedule_lib.run_learning_rate(train, global_batch=config.data.global_batch_size,
                                                 steps_per_epoch=shape.steps_per_epoch)
    tx = make_lars_optimizer(learning_rate=lr_schedule, weight_decay=train.weight_decay, momentum=train.momentum)
    resolution = config_lib.finetune_stages(config)[0].resolution

    def load_pretrained(state: ClassifierState) -> tuple[ClassifierState, dict]:
        # The encoder keeps its pretrained final norm: the probe reads the normed cls token.
        frozen, report = pretrained.init_from_pretrained(config, jax.device_get(state.frozen))
        return state.replace(frozen=frozen), report

    return classify.TaskParts(
        init_state=functools.partial(init_linprobe_state, encoder=encoder, probe=probe, tx=tx,
                                     resolution=resolution),
        load_pretrained=load_pretrained,
        make_step=lambda _resolution: make_linprobe_step(encoder, probe, tx, lr_schedule, hflip=config.data.hflip),
        logits_fn=linprobe_logits(encoder, probe))


prepare_data = classify.prepare_data  # the task's .beton files, before JAX starts (main)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) into ``workdir``; returns the summary also written to summary.json."""
    return classify.run(config, workdir, build_parts)

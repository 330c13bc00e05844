"""What a pretraining config trains, built once for every user: the MAE, the online probe, their optimizers on
the run's learning-rate schedule, the initial state and the step of each (resolution, mask ratio) bucket.

The training run (train/pretrain.py) and the throughput benchmark (train/benchmark.py) both build from here,
so a benchmark times exactly the step a run takes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import ml_collections
import optax

from dailymae_jax.model.build import mae_from_config
from dailymae_jax.model.mae import MaskedAutoencoder
from dailymae_jax.model.probe import LinearProbe
from dailymae_jax.schedule import run_learning_rate
from dailymae_jax.train.state import TrainState, init_state, make_optimizer, make_probe_optimizer
from dailymae_jax.train.steps import PretrainStepConfig, make_pretrain_step

Bucket = tuple[int, float]  # (resolution, mask ratio)


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
    """The model, probe and optimizers of a pretraining config; ``init_fn`` and ``make_step`` build the rest."""

    config: ml_collections.ConfigDict
    model: MaskedAutoencoder
    probe: LinearProbe
    lr_schedule: Callable[[Any], Any]
    tx: optax.GradientTransformation
    probe_tx: optax.GradientTransformation

    def init_fn(self, bucket: Bucket) -> Callable[[Any], TrainState]:
        """key → a fresh TrainState (parameter shapes do not depend on the bucket; it only shapes the dummy
        input of ``model.init``)."""
        return functools.partial(init_state, model=self.model, probe=self.probe, tx=self.tx, probe_tx=self.probe_tx,
                                 resolution=bucket[0], mask_ratio=bucket[1])

    def make_step(self, bucket: Bucket, grad_accum_steps: int | None = None) -> Callable:
        """The uncompiled pretraining step of ``bucket``: step(state, images_u8, labels) → (state, metrics).

        It accumulates gradients over ``grad_accum_steps`` micro-batches (default ``train.grad_accum_steps``;
        that setting's 0, "the smallest that fits", is decided by train/fit.py and means 1 here)."""
        c = self.config
        return make_pretrain_step(self.model, self.probe, self.tx, self.probe_tx, self.lr_schedule,
                                  PretrainStepConfig(mask_ratio=bucket[1], patch=self.model.patch, hflip=c.data.hflip,
                                                     grad_accum_steps=grad_accum_steps or c.train.grad_accum_steps or 1,
                                                     probe_on_full_image=c.probe.features == "full"))


def pretrain_recipe(config: ml_collections.ConfigDict, *, num_classes: int, steps_per_epoch: int,
                    platform: str | None = None) -> PretrainRecipe:
    """The recipe of ``config`` for a dataset of ``num_classes`` classes and ``steps_per_epoch`` steps per epoch
    (the learning-rate schedule's unit), compiled for ``platform`` (default: JAX's default backend)."""
    lr_schedule = run_learning_rate(config.train, global_batch=config.data.global_batch_size,
                                    steps_per_epoch=steps_per_epoch)
    return PretrainRecipe(
        config=config, model=mae_from_config(config, platform=platform),
        probe=LinearProbe(num_classes=max(num_classes, 2)), lr_schedule=lr_schedule,
        tx=make_optimizer(learning_rate=lr_schedule, weight_decay=config.train.weight_decay, b1=config.train.b1,
                          b2=config.train.b2),
        probe_tx=make_probe_optimizer(config.probe.learning_rate))

"""Checks shared by every task, run before anything is built or compiled, and the schedule's stages.

Every error is a ``ConfigError`` whose message is one line naming the key and what is allowed;
``main`` prints it and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from dailymae_jax.model.vit import SIZES, VitSize
from dailymae_jax.train.schedule import Stage, preset_stages, validate_stages

TASKS = ("pretrain",)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


def model_size(config: ml_collections.ConfigDict) -> VitSize:
    """The encoder size: a named size, with any of width/depth/heads/patch overridden."""
    m = config.model
    if m.size not in SIZES:
        raise ConfigError(f"model.size: unknown size {m.size!r}; allowed: {', '.join(SIZES)}")
    base = SIZES[m.size]
    overrides = {k: m.get(k) for k in ("width", "depth", "heads", "patch") if m.get(k) is not None}
    size = VitSize(**{**base.__dict__, **overrides})
    if size.width % size.heads:
        raise ConfigError(f"model.width {size.width} is not divisible by model.heads {size.heads}")
    if size.width % 4:
        raise ConfigError(f"model.width {size.width} must be divisible by 4 (2-D sin-cos position table)")
    return size


def stages(config: ml_collections.ConfigDict) -> tuple[Stage, ...]:
    """The progressive-resolution stages: ``schedule.stages`` if given, else the named preset."""
    s = config.schedule
    patch = model_size(config).patch
    if s.get("stages"):
        result = tuple(Stage(int(e), int(r), float(m)) for e, r, m in s.stages)
    else:
        try:
            result = preset_stages(s.preset, epochs=config.train.epochs, base_resolution=s.resolution,
                                   patch=patch, mask_ratio=s.mask_ratio)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    try:
        validate_stages(result, patch=patch, epochs=config.train.epochs)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return result


def validate(config: ml_collections.ConfigDict, *, device_count: int | None = None) -> None:
    """Everything that can be checked before data is read or a step compiled.

    Without ``device_count`` (before JAX has started its backends) the batch is checked against nothing but
    itself; the run checks it again against the mesh.
    """
    if config.task not in TASKS:
        raise ConfigError(f"task: unknown task {config.task!r}; allowed: {', '.join(TASKS)}")
    if not config.data.train_path and not config.data.sample_dir:
        raise ConfigError("data.train_path: missing; give a .beton file (tools/write_dataset.py makes one) "
                          "or set data.sample_dir to build the sample dataset")
    if config.data.train_path and not Path(config.data.train_path).is_file():
        raise ConfigError(f"data.train_path: no such file {config.data.train_path!r}; give a .beton file "
                          "(tools/write_dataset.py makes one)")
    batch = config.data.global_batch_size
    device_count = device_count or 1
    if batch <= 0 or batch % device_count:
        raise ConfigError(f"data.global_batch_size {batch} is not divisible by the device count {device_count}; "
                          f"allowed: positive multiples of {device_count}")
    accum = config.train.grad_accum_steps
    if accum < 1 or (batch // device_count) % accum:
        raise ConfigError(f"train.grad_accum_steps {accum} must be ≥ 1 and divide the per-device batch "
                          f"{batch // device_count}")
    if config.train.epochs < 1:
        raise ConfigError(f"train.epochs {config.train.epochs} must be ≥ 1")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype {config.model.dtype!r}; allowed: float32, bfloat16")
    if config.probe.features not in ("visible", "full"):
        raise ConfigError(f"probe.features {config.probe.features!r}; allowed: visible, full")
    stages(config)  # validates the schedule


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready copy (tuples become lists)."""
    return config.to_dict()

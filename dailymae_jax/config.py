"""Checks shared by every task, run before anything is built or compiled, and the schedule's stages.

It reads the data and model layers' facts (the model sizes, the crop keys' process shares) to check a config
against them, so it sits above both.

Every error is a ``ConfigError`` whose message is one line naming the key and what is allowed;
``main`` prints it and exits with code 2.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from dailymae_jax.errors import ConfigError
from dailymae_jax.model.build import MODEL_DTYPES, attention_implementation, model_size
from dailymae_jax.schedule import Stage, preset_stages, validate_stages

TASKS = ("pretrain", "finetune", "linprobe")
CLASSIFIER_TASKS = ("finetune", "linprobe")
PROBE_FEATURES = ("visible", "full")  # probe.features of pretraining's online probe
INIT_SOURCES = ("pretrain", "file", "scratch")  # init.source of a classifier: where its encoder comes from
INIT_FORMATS = ("mae", "timm")  # init.format of a PyTorch file: official MAE or timm key layout


def load_config_file(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The ``get_config()`` of the recipe file at ``path`` with ``--config.<field>=<value>`` overrides applied,
    parsed as ml_collections parses ``dailymae_jax.main``'s command line (the config is locked: an override of
    a field the recipe lacks is an error, not a new field).

    Raises ConfigError naming the missing file or the override that cannot apply.
    """
    from absl import flags
    from ml_collections import config_flags

    if not Path(path).is_file():
        raise ConfigError(f"--config: no such file {path}")
    argv = ["dailymae_jax", f"--config={path}", *overrides]
    values = flags.FlagValues()  # private flags: nothing leaks into absl's global FLAGS
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (AttributeError, KeyError) as error:
        raise ConfigError(f"config override: {path} has no field {error}") from None
    except (flags.Error, TypeError, ValueError) as error:
        raise ConfigError(f"config override: {error}") from None
    return values.config


def stages(config: ml_collections.ConfigDict) -> tuple[Stage, ...]:
    """The progressive-resolution stages: ``schedule.stages`` if given, else the named preset."""
    s = config.schedule
    patch = model_size(config).patch
    if s.get("stages"):
        for row in s.stages:
            if len(row) != 3:
                raise ConfigError(f"schedule.stages: {tuple(row)} is not (start_epoch, resolution, mask_ratio)")
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


def validate(config: ml_collections.ConfigDict, *, device_count: int | None = None,
             process_count: int = 1) -> None:
    """Everything that can be checked before data is read or a step compiled.

    Without ``device_count`` (before JAX has started its backends) the batch is checked against nothing but
    itself; the run checks it again against the mesh and the process count.
    """
    if config.task not in TASKS:
        raise ConfigError(f"task: unknown task {config.task!r}; allowed: {', '.join(TASKS)}")
    if config.task in CLASSIFIER_TASKS:
        validate_classifier(config, device_count=device_count, process_count=process_count)
        return
    if not config.data.train_path and not config.data.sample_dir:
        raise ConfigError("data.train_path: missing; give a .beton file (tools/write_dataset.py makes one) "
                          "or set data.sample_dir to build the sample dataset")
    if config.data.train_path and not Path(config.data.train_path).is_file():
        raise ConfigError(f"data.train_path: no such file {config.data.train_path!r}; give a .beton file "
                          "(tools/write_dataset.py makes one)")
    pictures = config.report.num_reconstructions
    if not isinstance(pictures, int) or pictures < 1:
        raise ConfigError(f"report.num_reconstructions {pictures!r} must be an integer ≥ 1 (the pictures of each "
                          "reconstruction grid)")
    validate_training(config, device_count=device_count, process_count=process_count)


def validate_training(config: ml_collections.ConfigDict, *, device_count: int | None = None,
                      process_count: int = 1) -> None:
    """What a pretraining config trains, without its data: batch and accumulation against the devices, epochs,
    model choices, probe and schedule. ``tools/plan_gpu.py`` checks this much for devices it does not have."""
    batch = config.data.global_batch_size
    device_count = device_count or 1
    if batch <= 0 or batch % device_count:
        raise ConfigError(f"data.global_batch_size {batch} is not divisible by the device count {device_count}; "
                          f"allowed: positive multiples of {device_count}")
    _check_process_share(batch, process_count)
    accum = config.train.grad_accum_steps
    if accum < 0 or (accum and (batch // device_count) % accum):
        raise ConfigError(f"train.grad_accum_steps {accum} must divide the per-device batch {batch // device_count}"
                          " (0: the smallest that fits the GPU's memory)")
    if config.train.epochs < 1:
        raise ConfigError(f"train.epochs {config.train.epochs} must be ≥ 1")
    _check_choice("model.dtype", config.model.dtype, MODEL_DTYPES)
    attention_implementation(config, platform="any")  # the choice, and cuDNN's dtype (needs no backend)
    _check_choice("probe.features", config.probe.features, PROBE_FEATURES)
    _check_every_task(config)
    stages(config)  # validates the schedule


def finetune_stages(config: ml_collections.ConfigDict) -> tuple[Stage, ...]:
    """Resolution stages of a finetune or linear probe: ``schedule.stages`` ((start_epoch, resolution), ...) or
    one stage at ``schedule.resolution``. The mask ratio is 0: classifiers see every patch."""
    s = config.schedule
    patch = model_size(config).patch
    rows = tuple(s.stages) if s.get("stages") else ((0, s.resolution),)
    result = []
    for row in rows:
        if len(row) != 2:
            raise ConfigError(f"schedule.stages: {tuple(row)} is not (start_epoch, resolution)")
        result.append(Stage(int(row[0]), int(row[1]), 0.0))
    try:
        validate_stages(result, patch=patch, epochs=config.train.epochs, masked=False)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return tuple(result)


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} {value!r}; allowed: {', '.join(allowed)}")


def _check_range(key: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{key} {value} must lie in [{low}, {high}{bracket}")


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``<workdir>/checkpoints`` (orbax renames a step's folder into
    place only when it is complete), ascending."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def _check_every_task(config: ml_collections.ConfigDict) -> None:
    """The values every task reads the same way: the random crop, the logging and checkpoint cadences."""
    scale, ratio = _pair("data.crop_scale", config.data.crop_scale), _pair("data.crop_ratio", config.data.crop_ratio)
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"data.crop_scale {tuple(scale)} must be (low, high) with 0 < low <= high <= 1 "
                          "(the crop's share of the image area)")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"data.crop_ratio {tuple(ratio)} must be (low, high) with 0 < low <= high "
                          "(the crop's width / height)")
    for key, value in (("train.log_every_steps", config.train.log_every_steps),
                       ("checkpoint.every_steps", config.checkpoint.every_steps),
                       ("checkpoint.keep", config.checkpoint.keep)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} {value!r} must be an integer ≥ 1")


def _pair(key: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} {value!r} must be two numbers (low, high)") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{key} {value!r} must be finite")
    return low, high


def check_batch_fits(batch: int, num_samples: int, path: str | Path) -> None:
    """An epoch drops its last partial batch: a global batch larger than the dataset would train no step."""
    if batch > num_samples:
        raise ConfigError(f"data.global_batch_size {batch} is larger than the {num_samples} images of {path}; "
                          f"allowed: at most {num_samples}")


def check_workdir(workdir: str | Path) -> None:
    """The workdir must be a directory this process can write, or creatable in one (checked before any work)."""
    path = Path(workdir)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file, not a directory")
    if not existing.is_dir():
        raise ConfigError(f"--workdir {workdir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing}, where it would be created)"
        raise ConfigError(f"--workdir {workdir} is not writable{where}")


def _check_process_share(batch: int, process_count: int) -> None:
    # The random crops are keyed by pairs of batch positions (data.decode.pair_key): each process's share of
    # a batch must start at an even position for the crops not to depend on the process count.
    if process_count == 1:
        return
    from dailymae_jax.data.decode import KEY_GROUP, process_share_problem  # numba, ffcv: multi-process runs only

    problem = process_share_problem(batch, process_count)
    if problem:
        raise ConfigError(f"{problem}; allowed: multiples of {KEY_GROUP * process_count}")


def validate_classifier(config: ml_collections.ConfigDict, *, device_count: int | None = None,
                        process_count: int = 1) -> None:
    """Checks for the finetune and linprobe tasks (see validate)."""
    data = config.data
    if not data.train_path and not data.sample_dir:
        raise ConfigError("data.train_path: missing; give a .beton file (tools/write_dataset.py makes one) "
                          "or set data.sample_dir to use the sample dataset")
    if not data.val_path and not data.sample_dir:
        raise ConfigError("data.val_path: missing; give the validation .beton or set data.sample_dir")
    device_count = device_count or 1
    for key, batch in (("data.global_batch_size", data.global_batch_size),
                       ("eval.global_batch_size", config.eval.global_batch_size)):
        if batch <= 0 or batch % device_count:
            raise ConfigError(f"{key} {batch} is not divisible by the device count {device_count}; "
                              f"allowed: positive multiples of {device_count}")
    _check_process_share(data.global_batch_size, process_count)
    train = config.train
    if train.epochs < 1:
        raise ConfigError(f"train.epochs {train.epochs} must be ≥ 1")
    _check_range("train.warmup_epochs", train.warmup_epochs, 0, train.epochs)
    _check_choice("model.dtype", config.model.dtype, MODEL_DTYPES)
    attention_implementation(config, platform="any")
    num_classes = config.model.get("num_classes")
    if num_classes is not None and num_classes < 2:
        raise ConfigError(f"model.num_classes {num_classes} must be ≥ 2 (or unset: taken from the data)")
    init = config.init
    _check_choice("init.source", init.source, INIT_SOURCES)
    if init.source == "pretrain":
        if not init.workdir:
            raise ConfigError("init.workdir: missing; give the workdir of a pretraining run "
                              "(e.g. --config.init.workdir=runs/demo) or set init.source=scratch")
        if not checkpoint_steps(init.workdir):
            raise ConfigError(f"init.workdir: no checkpoint in {init.workdir}/checkpoints; run the pretrain task "
                              "there first (make demo writes runs/demo)")
    if init.source == "file":
        _check_choice("init.format", init.format, INIT_FORMATS)
        if not init.path:
            raise ConfigError("init.path: missing; give a .pth or .safetensors checkpoint")
        if not Path(init.path).is_file():
            raise ConfigError(f"init.path: no such file {init.path}")
    _check_every_task(config)
    evaluation = config.eval
    if not evaluation.resolutions:
        raise ConfigError("eval.resolutions: empty; give at least one resolution, e.g. (224,)")
    patch = model_size(config).patch
    for resolution in evaluation.resolutions:
        if resolution <= 0 or resolution % patch:
            raise ConfigError(f"eval.resolutions: {resolution} is not a positive multiple of the patch size {patch}")
    if not 0.0 < evaluation.crop_ratio <= 1.0:
        raise ConfigError(f"eval.crop_ratio {evaluation.crop_ratio} must lie in (0, 1]")
    if evaluation.every_epochs < 1:
        raise ConfigError(f"eval.every_epochs {evaluation.every_epochs} must be ≥ 1")
    if config.task == "finetune":
        _check_range("train.layer_decay", train.layer_decay, 0.0, 1.0)
        _check_range("model.drop_path", config.model.drop_path, 0.0, 1.0, high_open=True)
        aug = config.augment
        _check_range("augment.label_smoothing", aug.label_smoothing, 0.0, 1.0, high_open=True)
        _check_range("augment.mixup_prob", aug.mixup_prob, 0.0, 1.0)
        _check_range("augment.mixup_switch_prob", aug.mixup_switch_prob, 0.0, 1.0)
        _check_range("augment.color_jitter", aug.color_jitter, 0.0, 1.0)
        for key in ("mixup_alpha", "cutmix_alpha"):
            if aug[key] < 0:
                raise ConfigError(f"augment.{key} {aug[key]} must be ≥ 0 (0 turns it off)")
    finetune_stages(config)


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready copy (tuples become lists)."""
    return config.to_dict()

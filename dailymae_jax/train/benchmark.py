"""Throughput of a config's pretraining step, built and compiled as a training run builds and compiles it.

:func:`measure_pretrain_step` times one resolution of the step on a mesh: on synthetic uint8 batches already on
the devices (each step timed alone, host clock around a blocking step, the median quoted) and, given a .beton,
fed by the real TrainLoader as the training loop feeds it (no per-step wait: the mean step time, and the share
of it spent waiting for data). tools/bench_train.py runs it once per resolution, each time in a fresh process.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dailymae_jax.checkpoint import abstract_with_shardings
from dailymae_jax.data.shard import BatchSharding
from dailymae_jax.schedule import Stage
from dailymae_jax.train import compile as compile_lib
from dailymae_jax.train.recipe import pretrain_recipe
from dailymae_jax.train.state import TrainState, create_state

log = logging.getLogger(__name__)

SYNTHETIC_BATCHES = 3  # rotate among a few batches so no step reads its input from cache left by the last


def time_steps(run_step: Callable[[int], None], warmup: int, steps: int) -> tuple[list[float], float]:
    """Calls ``run_step(i)`` (which must block until the step is done) warmup + steps times.

    Returns the timed steps' seconds and the warm-up's total seconds (compilation and autotuning land there).
    """
    start = time.perf_counter()
    for i in range(warmup):
        run_step(i)
    warmup_seconds = time.perf_counter() - start
    times = []
    for i in range(warmup, warmup + steps):
        tick = time.perf_counter()
        run_step(i)
        times.append(time.perf_counter() - tick)
    return times, warmup_seconds


def step_stats(times: Sequence[float], batch: int) -> dict[str, float]:
    """Median, fastest and slowest step, and the images per second of the median step."""
    median = statistics.median(times)
    return {"step_time_median_s": median, "step_time_min_s": min(times), "step_time_max_s": max(times),
            "images_per_second": batch / median}


def finite_or_none(value: float) -> float | None:
    """``value``, or None where it is not finite (JSON has no NaN)."""
    return value if math.isfinite(value) else None


def device_peak_memory(device: jax.Device) -> int | None:
    """Peak bytes in use on ``device`` so far, or None where the backend keeps no statistics (CPU)."""
    stats = device.memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def compile_pretrain_step(config: ml_collections.ConfigDict, *, mesh: Mesh, bucket: tuple[int, float],
                          global_batch: int, num_classes: int, seed: int,
                          steps_per_epoch: int) -> tuple[TrainState, Any, float]:
    """A fresh train state and the compiled step of one (resolution, mask ratio) bucket, as a pretraining run
    builds them from ``config`` (train/recipe.py, with ``num_classes`` for the online probe and ``steps_per_epoch``
    for the learning-rate schedule): the state born sharded on ``mesh``, and the step compiled ahead of time by
    :func:`compile_lib.compile_buckets` with the run's shardings and donated state.

    Returns (state, executable, compile seconds).
    """
    recipe = pretrain_recipe(config, num_classes=num_classes, steps_per_epoch=steps_per_epoch)
    state, shardings = create_state(recipe.init_fn(bucket), jax.random.PRNGKey(seed), mesh)
    executables, seconds = compile_lib.compile_buckets(
        recipe.make_step, [bucket], abstract_state=abstract_with_shardings(jax.eval_shape(lambda: state), shardings),
        state_shardings=shardings, mesh=mesh, global_batch=global_batch, resolution_of=lambda b: b[0])
    return state, executables[bucket], seconds[bucket]


def synthetic_batches(mesh: Mesh, *, count: int, global_batch: int, resolution: int, num_classes: int,
                      seed: int) -> list[tuple[jax.Array, jax.Array]]:
    """``count`` batches of uniformly random uint8 images and int32 labels, placed on ``mesh`` as the loader
    places its batches."""
    rng, sharding = np.random.default_rng(seed), BatchSharding(mesh)
    return [(sharding.images(rng.integers(0, 256, (global_batch, resolution, resolution, 3), np.uint8)),
             sharding.labels(rng.integers(0, num_classes, global_batch))) for _ in range(count)]


def measure_pretrain_step(config: ml_collections.ConfigDict, *, mesh: Mesh, resolution: int, global_batch: int,
                          num_classes: int, steps: int, warmup_steps: int, seed: int = 0,
                          beton: str | Path | None = None) -> list[dict[str, Any]]:
    """Times the step of ``config`` at ``resolution`` (and ``schedule.mask_ratio``) after ``warmup_steps``
    untimed steps: a record for synthetic batches and, with ``beton``, one for the TrainLoader reading it.

    The learning-rate schedule is the recipe's with the measured steps taken as one epoch: its value does not
    change the work of a step. FLOPs are XLA's count for one device; MFU is None where the device's peak rate is
    unknown (CPUs).
    """
    device = mesh.devices.flat[0]
    bucket = (resolution, float(config.schedule.mask_ratio))
    state, step, compile_seconds = compile_pretrain_step(
        config, mesh=mesh, bucket=bucket, global_batch=global_batch, num_classes=num_classes, seed=seed,
        steps_per_epoch=warmup_steps + steps)
    flops = compile_lib.flops_per_step(step)
    peak = compile_lib.peak_bf16_flops(device.device_kind)
    log.info("jax %d px: compiled in %.1f s on %s, %.3g GFLOP per step", resolution, compile_seconds,
             device.device_kind, (flops or 0) / 1e9)

    batches = synthetic_batches(mesh, count=SYNTHETIC_BATCHES, global_batch=global_batch, resolution=resolution,
                                num_classes=num_classes, seed=seed + 1)
    holder = {"state": state}

    def run_step(i: int) -> None:
        holder["state"], holder["metrics"] = step(holder["state"], *batches[i % len(batches)])
        jax.block_until_ready(holder["state"])

    with compile_lib.CompilationCounter() as counter:
        times, warmup_seconds = time_steps(run_step, warmup_steps, steps)
    common = {"framework": "jax", "resolution": resolution, "batch_size": global_batch,
              "device_kind": device.device_kind, "platform": device.platform, "flops_per_step": flops,
              "peak_bf16_flops": peak, "compile_seconds": compile_seconds}
    synthetic = {**common, "data": "synthetic", "steps": steps, **step_stats(times, global_batch),
                 "warmup_seconds": warmup_seconds, "compilations_during_steps": counter.count,
                 "final_loss": finite_or_none(float(holder["metrics"]["loss"]))}
    synthetic["mfu"] = compile_lib.model_flops_utilization(flops, synthetic["step_time_median_s"], peak)
    synthetic["peak_memory_bytes"] = device_peak_memory(device)
    log.info("jax %d px synthetic: %.1f img/s, %.1f ms per step", resolution, synthetic["images_per_second"],
             1e3 * synthetic["step_time_median_s"])
    if beton is None:
        return [synthetic]
    return [synthetic, _measure_with_loader(config, step, holder, common, mesh=mesh, bucket=bucket, beton=beton,
                                            steps=steps, warmup_steps=warmup_steps, seed=seed)]


def _measure_with_loader(config: ml_collections.ConfigDict, step: Any, holder: dict[str, Any],
                         common: dict[str, Any], *, mesh: Mesh, bucket: tuple[int, float], beton: str | Path,
                         steps: int, warmup_steps: int, seed: int) -> dict[str, Any]:
    """Steps fed by the real TrainLoader, as the training loop feeds them (no per-step wait)."""
    from dailymae_jax.data.loader import CropSpec, EpochOrder, TrainLoader
    from dailymae_jax.data.prepare import dataset_info

    batch = common["batch_size"]
    info = dataset_info(beton)
    order = EpochOrder(info.num_samples, batch, seed)
    start = time.perf_counter()
    loader = TrainLoader(beton, stages=(Stage(0, *bucket),), order=order, sharding=BatchSharding(mesh),
                         num_workers=config.data.num_workers,
                         crop=CropSpec(tuple(config.data.crop_scale), tuple(config.data.crop_ratio)))
    loader_warmup = time.perf_counter() - start
    log.info("jax %d px: loader pipeline ready in %.1f s", bucket[0], loader_warmup)
    batches = loader.batches(0, 0, -(-(warmup_steps + steps) // order.steps_per_epoch))
    try:
        with compile_lib.CompilationCounter() as counter:
            for _ in range(warmup_steps):
                b = next(batches)
                holder["state"], holder["metrics"] = step(holder["state"], b.images, b.labels)
            jax.block_until_ready(holder["state"])
            wait, start = 0.0, time.perf_counter()
            for _ in range(steps):
                tick = time.perf_counter()
                b = next(batches)
                wait += time.perf_counter() - tick
                holder["state"], holder["metrics"] = step(holder["state"], b.images, b.labels)
            jax.block_until_ready(holder["state"])
            wall = time.perf_counter() - start
    finally:
        batches.close()
    mean = wall / steps
    log.info("jax %d px loader: %.1f img/s, data wait %.0f%%", bucket[0], batch / mean, 100 * wait / wall)
    return {**common, "data": "loader", "steps": steps, "step_time_mean_s": mean, "images_per_second": batch / mean,
            "data_wait_share": wait / wall, "loader_warmup_seconds": loader_warmup,
            "num_workers": config.data.num_workers, "dataset": str(beton), "dataset_samples": info.num_samples,
            "compilations_during_steps": counter.count,
            "final_loss": finite_or_none(float(holder["metrics"]["loss"])),
            "mfu": compile_lib.model_flops_utilization(common["flops_per_step"], mean, common["peak_bf16_flops"]),
            "peak_memory_bytes": device_peak_memory(mesh.devices.flat[0])}

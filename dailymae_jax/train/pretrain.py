"""The MAE pretraining task: wires data, model, compiled steps, checkpoints and reports together.

It does not decode images, define the model or write files itself: each of those has its own module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dailymae_jax import config as config_lib
from dailymae_jax import distributed, export, report, visualize
from dailymae_jax.checkpoint import Checkpointer, DataPosition, abstract_with_shardings
from dailymae_jax.data.loader import CropSpec, EpochOrder, TrainLoader
from dailymae_jax.data.prepare import dataset_info, sample_beton
from dailymae_jax.data.shard import BatchSharding, make_mesh
from dailymae_jax.model.mae import MaskedAutoencoder, mae_from_size
from dailymae_jax.model.probe import LinearProbe
from dailymae_jax.train import compile as compile_lib
from dailymae_jax.train import guards
from dailymae_jax.train import schedule as schedule_lib
from dailymae_jax.train.state import (create_state, init_state, make_optimizer, make_probe_optimizer,
                                      parameter_count)
from dailymae_jax.train.steps import PretrainStepConfig, make_pretrain_step

log = logging.getLogger(__name__)


def build_model(config: ml_collections.ConfigDict) -> MaskedAutoencoder:
    size = config_lib.model_size(config)
    m = config.model
    return mae_from_size(size, decoder_width=m.decoder_width, decoder_depth=m.decoder_depth,
                         decoder_heads=m.decoder_heads, norm_pix_loss=m.norm_pix_loss,
                         dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32)


def train_beton(config: ml_collections.ConfigDict) -> Path:
    """The run's .beton; the sample dataset is cut and written on first use.

    Call it before JAX starts its backends (as ``main`` does): writing forks worker processes, and forking
    a process that already runs JAX's threads can deadlock.
    """
    if config.data.train_path:
        return Path(config.data.train_path)
    return sample_beton(config.data.sample_dir, num_images=config.data.sample_num_images, seed=config.seed)


@dataclasses.dataclass
class RunStats:
    """Host-side bookkeeping of the loop (nothing here touches the devices)."""

    steps: int = 0
    images: int = 0
    loop_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    losses: list[float] = dataclasses.field(default_factory=list)
    stage_switches: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Pretrains (or resumes) into ``workdir``; returns the summary also written to summary.json."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = make_mesh()
    config_lib.validate(config, device_count=mesh.devices.size)
    stages = config_lib.stages(config)
    compile_lib.enable_persistent_cache(config.train.compilation_cache_dir)
    if is_main:
        report.write_json(workdir / "config.json", config_lib.to_dict(config))

    # Data: the file, the order, and one warmed-up pipeline per resolution.
    beton = train_beton(config)
    data = dataset_info(beton)
    batch = config.data.global_batch_size
    order = EpochOrder(data.num_samples, batch, config.seed, jax.process_index(), jax.process_count())
    sharding = BatchSharding(mesh)
    epochs, steps_per_epoch = config.train.epochs, order.steps_per_epoch
    total_steps = epochs * steps_per_epoch

    # Model, optimizers and the state, born sharded.
    model = build_model(config)
    probe = LinearProbe(num_classes=max(data.num_classes, 2))
    peak_lr = schedule_lib.scaled_learning_rate(config.train.base_lr, batch)
    lr_schedule = schedule_lib.learning_rate_schedule(
        peak_lr=peak_lr, total_steps=total_steps, warmup_steps=config.train.warmup_epochs * steps_per_epoch,
        min_lr=config.train.min_lr)
    tx = make_optimizer(learning_rate=lr_schedule, weight_decay=config.train.weight_decay,
                        b1=config.train.b1, b2=config.train.b2)
    probe_tx = make_probe_optimizer(config.probe.learning_rate)
    first = stages[0]

    init = functools.partial(init_state, model=model, probe=probe, tx=tx, probe_tx=probe_tx,
                             resolution=first.resolution, mask_ratio=first.mask_ratio)
    state, state_shardings = create_state(init, jax.random.PRNGKey(config.seed), mesh)
    abstract_state = abstract_with_shardings(jax.eval_shape(lambda: state), state_shardings)

    checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep)
    position = DataPosition(0, 0)
    if checkpointer.latest_step() is not None:
        state, position, _ = checkpointer.restore(abstract_state)
        log.info("resumed from %s at epoch %d, step %d of the epoch", checkpointer.path(int(state.step)),
                 position.epoch, position.step_in_epoch)
        if position.epoch >= epochs and (workdir / "summary.json").exists():
            log.info("%s already finished its %d steps; keeping its summary.json", workdir, total_steps)
            checkpointer.close()
            return json.loads((workdir / "summary.json").read_text())

    loader = TrainLoader(beton, stages=stages, order=order, sharding=sharding,
                         num_workers=config.data.num_workers,
                         crop=CropSpec(tuple(config.data.crop_scale), tuple(config.data.crop_ratio)))
    log.info("loader pipelines ready: %s", {r: f"{s:.1f}s" for r, s in loader.warmup_seconds.items()})

    def make_step(bucket: tuple[int, float]):
        return make_pretrain_step(model, probe, tx, probe_tx, lr_schedule, PretrainStepConfig(
            mask_ratio=bucket[1], patch=model.patch, hflip=config.data.hflip,
            grad_accum_steps=config.train.grad_accum_steps,
            probe_on_full_image=config.probe.features == "full"))

    buckets = sorted({s.bucket for s in stages})
    executables, compile_seconds = compile_lib.compile_buckets(
        make_step, buckets, abstract_state=abstract_state, state_shardings=state_shardings, mesh=mesh,
        global_batch=batch, resolution_of=lambda b: b[0])
    log.info("compiled %d buckets ahead of time: %s", len(buckets),
             {f"{r}px/{m}": f"{s:.1f}s" for (r, m), s in compile_seconds.items()})

    writer = report.MetricsWriter(workdir, enabled=is_main)
    distributed.barrier("training")  # all processes take their first step together
    stats = RunStats()
    counter = compile_lib.CompilationCounter()
    config_dict = config_lib.to_dict(config)
    last_batch = None
    try:
        with counter:
            state, last_batch = _train_loop(config, state, loader, executables, checkpointer, writer, stats,
                                            position, epochs, steps_per_epoch, config_dict)
    except BaseException:
        # Keep what is done: flush the metrics and let in-flight (finite) saves finish. The error that
        # stopped the loop is the one to report, not a second one from closing.
        writer.close()
        with contextlib.suppress(Exception):
            checkpointer.close()
        raise
    checkpointer.close()
    writer.close()
    last_step = checkpointer.latest_step()

    summary = {
        "steps": int(state.step),
        "steps_this_run": stats.steps,
        "initial_loss": stats.losses[0] if stats.losses else None,
        "final_loss": float(np.mean(stats.losses[-steps_per_epoch:])) if stats.losses else None,
        "images_per_second": stats.images / stats.loop_seconds if stats.loop_seconds else None,
        "data_wait_share": stats.data_wait_seconds / stats.loop_seconds if stats.loop_seconds else None,
        "compilations_during_training": counter.count,
        "compile_seconds_ahead_of_time": {f"{r}px_mask{m}": s for (r, m), s in compile_seconds.items()},
        "stages": [dataclasses.asdict(s) for s in stages],
        "stage_switches": stats.stage_switches,
        "device_count": int(mesh.devices.size),
        "process_count": jax.process_count(),
        "global_batch_size": batch,
        "parameters": parameter_count(state.params),
        "last_checkpoint": str(checkpointer.path(last_step)) if last_step is not None else None,
    }
    if is_main:
        # Host copies: the state's arrays span every process's devices, and process 0 computes alone here.
        params = jax.device_get(state.params)
        if last_batch is not None:
            summary["reconstruction"] = str(visualize.save_reconstructions(
                workdir / "reconstructions" / f"step_{int(state.step)}.png", model, params,
                np.asarray(last_batch.images.addressable_data(0))[:config.report.num_reconstructions],
                mask_ratio=last_batch.stage.mask_ratio,
                rng=jax.random.PRNGKey(config.seed)))
        summary["exports"] = {fmt: str(p) for fmt, p in export.export_run(
            params, model, workdir / "export", formats=tuple(config.export.formats),
            resolution=config.schedule.resolution).items()}
        report.write_json(workdir / "summary.json", summary)
    return summary


def _train_loop(config, state, loader, executables, checkpointer, writer, stats, position, epochs,
                steps_per_epoch, config_dict):
    """Runs the steps; returns the final state and the last batch seen.

    Raises NonFiniteError (naming the step) before a non-finite state can be checkpointed, and Interrupted
    after saving a checkpoint when SIGTERM or SIGINT arrives.
    """
    batch_size = config.data.global_batch_size
    log_every = config.train.log_every_steps
    pending: list[dict[str, jax.Array]] = []  # metrics not yet logged
    unchecked: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet checked for NaN/inf
    current_bucket = None
    last = None
    window_start = loop_start = time.perf_counter()
    window_images = 0
    step_returned = time.perf_counter()
    with distributed.signal_guard() as signals:
        for batch in loader.batches(position.epoch, position.step_in_epoch, epochs):
            stats.data_wait_seconds += time.perf_counter() - step_returned
            bucket = batch.stage.bucket
            switching = current_bucket is not None and bucket != current_bucket
            state, metrics = executables[bucket](state, batch.images, batch.labels)
            if switching:
                # Host time between the previous stage's last step returning and this stage's first step
                # being launched: fetching the new resolution's batch and picking its executable.
                stats.stage_switches.append({"epoch": batch.epoch, "resolution": batch.stage.resolution,
                                             "mask_ratio": batch.stage.mask_ratio,
                                             "seconds": time.perf_counter() - step_returned})
                log.info("stage switch at epoch %d → %d px, mask %.2f in %.1f ms", batch.epoch,
                         batch.stage.resolution, batch.stage.mask_ratio,
                         stats.stage_switches[-1]["seconds"] * 1e3)
            current_bucket = bucket
            last = batch
            stats.steps += 1
            stats.images += batch_size
            window_images += batch_size
            host_step = batch.epoch * steps_per_epoch + batch.step_in_epoch + 1  # no device sync needed
            pending.append(metrics)
            unchecked.append((host_step, metrics))
            end_of_epoch = batch.step_in_epoch == steps_per_epoch - 1
            stop_signal = signals.poll(host_step)  # read once: a signal may land anywhere in this block
            logging_now = host_step % log_every == 0 or end_of_epoch
            saving_now = host_step % config.checkpoint.every_steps == 0 or end_of_epoch or stop_signal
            if logging_now or saving_now:
                # Fetching waits for these steps, which a save would do anyway; logging cadence bounds how
                # long a NaN can go unnoticed.
                guards.check_finite(jax.device_get(unchecked))
                unchecked.clear()
            if logging_now:
                fetched = jax.device_get(pending)
                pending.clear()
                stats.losses.extend(float(m["loss"]) for m in fetched)
                elapsed = time.perf_counter() - window_start
                row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                row.update(images_per_second=window_images / elapsed, resolution=batch.stage.resolution,
                           mask_ratio=batch.stage.mask_ratio, epoch=batch.epoch)
                writer.write(host_step, row)
                log.info("step %d epoch %d: loss %.4f lr %.2e probe acc %.3f %.0f img/s", host_step,
                         batch.epoch, row["loss"], row["lr"], row["probe_accuracy"], row["images_per_second"])
                window_start, window_images = time.perf_counter(), 0
            if saving_now:
                next_position = (DataPosition(batch.epoch + 1, 0) if end_of_epoch
                                 else DataPosition(batch.epoch, batch.step_in_epoch + 1))
                checkpointer.save(host_step, state, next_position, config_dict)
            if stop_signal:
                checkpointer.wait()
                raise guards.Interrupted(stop_signal, host_step, str(checkpointer.path(host_step)))
            step_returned = time.perf_counter()
    if pending:
        stats.losses.extend(float(m["loss"]) for m in jax.device_get(pending))
    guards.check_finite(jax.device_get(unchecked))
    stats.loop_seconds = time.perf_counter() - loop_start
    return state, last

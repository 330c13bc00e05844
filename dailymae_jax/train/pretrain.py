"""The MAE pretraining task: wires data, model, compiled steps, checkpoints and reports together.

``run`` is what the command line does: build, train to the end (resuming from the workdir), export. The same
``Pretraining`` object serves notebooks: build it, train k steps, look at a batch and the reconstructions,
train more. It does not decode images, define the model or write files itself: each has its own module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dailymae_jax import config as config_lib
from dailymae_jax import distributed, export, report, visualize
from dailymae_jax.checkpoint import Checkpointer, DataPosition, abstract_with_shardings
from dailymae_jax.data.loader import Batch, CropSpec, EpochOrder, TrainLoader
from dailymae_jax.data.prepare import dataset_info, sample_beton
from dailymae_jax.data.shard import BatchSharding, make_mesh
from dailymae_jax.model.mae import MaskedAutoencoder, mae_from_size
from dailymae_jax.model.probe import LinearProbe
from dailymae_jax.train import compile as compile_lib
from dailymae_jax.train import guards
from dailymae_jax.train import schedule as schedule_lib
from dailymae_jax.train.progress import Progress
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


class Pretraining:
    """A pretraining run, built and ready to step.

    Building does everything that can happen before the first step: the mesh, the state (born sharded, or
    restored from the workdir's last checkpoint), one warmed-up loader pipeline and one compiled step per
    resolution bucket, and the reports. ``train()`` then runs steps, saving checkpoints and metrics as the
    config says; it can be called again to continue.

        run = Pretraining(config, "runs/notebook")
        run.train(num_steps=20)
        images, labels = run.sample_batch()
        pictures = run.reconstructions(images[:4])
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh()
        config_lib.validate(config, device_count=self.mesh.devices.size, process_count=jax.process_count())
        self.stages = config_lib.stages(config)
        compile_lib.enable_persistent_cache(config.train.compilation_cache_dir)
        if self.is_main:
            report.write_json(self.workdir / "config.json", config_lib.to_dict(config))

        # Data: the file, the order, and one warmed-up pipeline per resolution.
        beton = train_beton(config)
        data = dataset_info(beton)
        self.batch_size = config.data.global_batch_size
        self.order = EpochOrder(data.num_samples, self.batch_size, config.seed, jax.process_index(),
                                jax.process_count())
        self.epochs, self.steps_per_epoch = config.train.epochs, self.order.steps_per_epoch
        self.total_steps = self.epochs * self.steps_per_epoch

        # Model, optimizers and the state, born sharded.
        self.model = build_model(config)
        probe = LinearProbe(num_classes=max(data.num_classes, 2))
        peak_lr = schedule_lib.scaled_learning_rate(config.train.base_lr, self.batch_size)
        lr_schedule = schedule_lib.learning_rate_schedule(
            peak_lr=peak_lr, total_steps=self.total_steps,
            warmup_steps=config.train.warmup_epochs * self.steps_per_epoch, min_lr=config.train.min_lr)
        tx = make_optimizer(learning_rate=lr_schedule, weight_decay=config.train.weight_decay,
                            b1=config.train.b1, b2=config.train.b2)
        probe_tx = make_probe_optimizer(config.probe.learning_rate)
        init = functools.partial(init_state, model=self.model, probe=probe, tx=tx, probe_tx=probe_tx,
                                 resolution=self.stages[0].resolution, mask_ratio=self.stages[0].mask_ratio)
        self.state, state_shardings = create_state(init, jax.random.PRNGKey(config.seed), self.mesh)
        abstract_state = abstract_with_shardings(jax.eval_shape(lambda: self.state), state_shardings)

        self.checkpointer = Checkpointer(self.workdir, keep=config.checkpoint.keep)
        self.position = DataPosition(0, 0)
        if self.checkpointer.latest_step() is not None:
            self.state, self.position, _ = self.checkpointer.restore(abstract_state)
            log.info("resumed from %s at epoch %d, step %d of the epoch",
                     self.checkpointer.path(int(self.state.step)), self.position.epoch,
                     self.position.step_in_epoch)

        self.loader = TrainLoader(beton, stages=self.stages, order=self.order, sharding=BatchSharding(self.mesh),
                                  num_workers=config.data.num_workers,
                                  crop=CropSpec(tuple(config.data.crop_scale), tuple(config.data.crop_ratio)))
        log.info("loader pipelines ready: %s", {r: f"{s:.1f}s" for r, s in self.loader.warmup_seconds.items()})

        def make_step(bucket: tuple[int, float]):
            return make_pretrain_step(self.model, probe, tx, probe_tx, lr_schedule, PretrainStepConfig(
                mask_ratio=bucket[1], patch=self.model.patch, hflip=config.data.hflip,
                grad_accum_steps=config.train.grad_accum_steps,
                probe_on_full_image=config.probe.features == "full"))

        buckets = sorted({s.bucket for s in self.stages})
        self.executables, self.compile_seconds = compile_lib.compile_buckets(
            make_step, buckets, abstract_state=abstract_state, state_shardings=state_shardings, mesh=self.mesh,
            global_batch=self.batch_size, resolution_of=lambda b: b[0])
        log.info("compiled %d buckets ahead of time: %s", len(buckets),
                 {f"{r}px/{m}": f"{s:.1f}s" for (r, m), s in self.compile_seconds.items()})
        self._compile_reconstructions()

        self.writer = report.MetricsWriter(self.workdir, enabled=self.is_main)
        self.progress = Progress(total_steps=self.total_steps, flops_per_step={
            b: compile_lib.flops_per_step(e) for b, e in self.executables.items()})
        self.progress.warm_up(NamedSharding(self.mesh, PartitionSpec()))  # as compile_buckets places metrics
        self.stats = RunStats()
        self.counter = compile_lib.CompilationCounter()
        self.last_batch: Batch | None = None
        if self.is_main:
            overview = report.parameter_overview(self.state.params)
            (self.workdir / "parameters.txt").write_text(overview + "\n")
            log.info("parameters: %s in total (table in %s)", f"{parameter_count(self.state.params):,}",
                     self.workdir / "parameters.txt")

    @property
    def step(self) -> int:
        """Optimizer steps taken (over every run into this workdir)."""
        return self.position.epoch * self.steps_per_epoch + self.position.step_in_epoch

    @property
    def finished(self) -> bool:
        return self.position.epoch >= self.epochs

    def train(self, num_steps: int | None = None) -> None:
        """Trains ``num_steps`` more steps (all remaining ones by default), checkpointing as configured.

        Raises NonFiniteError (naming the step) before a non-finite state can be checkpointed, and
        Interrupted after saving a checkpoint when SIGTERM or SIGINT arrives.
        """
        remaining = self.total_steps - self.step
        num_steps = remaining if num_steps is None else min(num_steps, remaining)
        if num_steps <= 0:
            return
        loop_start = time.perf_counter()
        try:
            distributed.barrier("training")  # all processes take their first step together
            with self.counter, distributed.signal_guard() as signals, contextlib.closing(self.loader.batches(
                    self.position.epoch, self.position.step_in_epoch, self.epochs)) as batches:
                self._run_steps(batches, num_steps, signals)
        finally:
            self.stats.loop_seconds += time.perf_counter() - loop_start

    def _run_steps(self, batches: Iterator[Batch], num_steps: int, signals: Any) -> None:
        config, stats = self.config, self.stats
        unchecked: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet checked for NaN/inf
        current_bucket = None
        step_returned = time.perf_counter()
        for done, batch in enumerate(batches, start=1):
            data_wait = time.perf_counter() - step_returned
            stats.data_wait_seconds += data_wait
            bucket = batch.stage.bucket
            switching = current_bucket is not None and bucket != current_bucket
            self.state, metrics = self.executables[bucket](self.state, batch.images, batch.labels)
            if switching:
                # Host time between the previous stage's last step returning and this stage's first step
                # being launched: fetching the new resolution's batch and picking its executable.
                stats.stage_switches.append({"epoch": batch.epoch, "resolution": batch.stage.resolution,
                                             "mask_ratio": batch.stage.mask_ratio, "seconds": data_wait})
                log.info("stage switch at epoch %d → %d px, mask %.2f in %.1f ms", batch.epoch,
                         batch.stage.resolution, batch.stage.mask_ratio, data_wait * 1e3)
            current_bucket = bucket
            self.last_batch = batch
            stats.steps += 1
            stats.images += self.batch_size
            self.progress.add(metrics, images=self.batch_size, data_wait_seconds=data_wait)
            host_step = batch.epoch * self.steps_per_epoch + batch.step_in_epoch + 1  # no device sync needed
            unchecked.append((host_step, {k: metrics[k] for k in ("loss", "grad_norm")}))
            end_of_epoch = batch.step_in_epoch == self.steps_per_epoch - 1
            self.position = (DataPosition(batch.epoch + 1, 0) if end_of_epoch
                             else DataPosition(batch.epoch, batch.step_in_epoch + 1))
            last = done == num_steps
            stop_signal = signals.poll(host_step)  # read once; across processes, all stop after the same step
            logging_now = host_step % config.train.log_every_steps == 0 or end_of_epoch or last
            saving_now = (host_step % config.checkpoint.every_steps == 0 or end_of_epoch or stop_signal
                          or (last and not self.finished))
            if logging_now or saving_now:
                # Fetching waits for these steps, which a save would do anyway; the logging cadence bounds how
                # long a NaN can go unnoticed.
                checked = jax.device_get(unchecked)
                unchecked.clear()
                guards.check_finite(checked)
                stats.losses.extend(float(m["loss"]) for _, m in checked)
            if logging_now:
                self._log(host_step, batch)
            if saving_now:
                self.checkpointer.save(host_step, self.state, self.position, config_lib.to_dict(config))
            if end_of_epoch and self._reconstruction_due(batch.epoch):
                self.save_reconstructions(step=host_step)  # compiled ahead (_compile_reconstructions)
            if stop_signal:
                self.checkpointer.wait()
                raise guards.Interrupted(stop_signal, host_step, str(self.checkpointer.path(host_step)))
            if last:
                return
            step_returned = time.perf_counter()

    def _log(self, host_step: int, batch: Batch) -> None:
        scalars, window = self.progress.flush(step=host_step, bucket=batch.stage.bucket)
        scalars.update(resolution=batch.stage.resolution, mask_ratio=batch.stage.mask_ratio, epoch=batch.epoch)
        self.writer.write(host_step, scalars)
        log.info("%s", self.progress.line(host_step, batch.epoch, self.epochs, scalars))
        warning = Progress.data_bound_warning(window)
        if warning and batch.epoch > 0:  # the first epoch includes the loader's start-up
            log.warning("%s", warning)

    def _reconstruction_due(self, epoch: int) -> bool:
        every = self.config.report.reconstruction_every_epochs
        return bool(every) and (epoch + 1) % every == 0 and epoch + 1 < self.epochs

    def _compile_reconstructions(self) -> None:
        """Compiles the reconstruction program for every (resolution, mask ratio) that the rest of the run
        draws pictures of between epochs, by running it once on blank images: the jit cache then serves them, so
        a reconstruction never stalls training on a compilation (the final one, after training, may compile)."""
        buckets = sorted({schedule_lib.stage_at(self.stages, epoch).bucket
                          for epoch in range(self.position.epoch, self.epochs) if self._reconstruction_due(epoch)})
        if not self.is_main or not buckets:
            return
        params = jax.device_get(self.state.params)
        count = self._reconstruction_count()
        seconds = {}
        for resolution, mask_ratio in buckets:
            start = time.perf_counter()
            self.reconstructions(np.zeros((count, resolution, resolution, 3), np.uint8), mask_ratio=mask_ratio,
                                 params=params)
            seconds[f"{resolution}px/{mask_ratio}"] = f"{time.perf_counter() - start:.1f}s"
        log.info("compiled the reconstruction pictures ahead of time: %s", seconds)

    def sample_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """This process's next training batch as numpy (uint8 images at the current stage's resolution, labels).

        It is decoded exactly as training will decode it, and does not advance the run.
        """
        epoch = min(self.position.epoch, self.epochs - 1)
        step = self.position.step_in_epoch if epoch == self.position.epoch else 0
        with contextlib.closing(self.loader.host_batches(epoch, step)) as batches:
            return next(batches)

    def reconstructions(self, images: np.ndarray | None = None, *, mask_ratio: float | None = None,
                        seed: int | None = None, params: Any = None) -> dict[str, np.ndarray]:
        """Original, masked, reconstructed and pasted uint8 pictures of ``images`` (default: the last batch).

        The mask ratio defaults to that of the stage the images were decoded for: the last batch's, or the
        current stage's for images passed in. ``params`` (host arrays) default to a copy of the state's.
        """
        stage = schedule_lib.stage_at(self.stages, min(self.position.epoch, self.epochs - 1))
        if images is None:
            images = self._last_images()
            if self.last_batch is not None:
                stage = self.last_batch.stage
        # Host copies: the state's arrays may span every process's devices, and process 0 computes alone here.
        params = jax.device_get(self.state.params) if params is None else params
        return visualize.reconstruct(self.model, params, images,
                                     mask_ratio=stage.mask_ratio if mask_ratio is None else mask_ratio,
                                     rng=jax.random.PRNGKey(self.config.seed if seed is None else seed))

    def save_reconstructions(self, *, step: int | None = None) -> Path | None:
        """Writes the reconstruction grid of the last batch to reconstructions/step_<N>.png and TensorBoard."""
        if not self.is_main:
            return None
        step = self.step if step is None else step
        grid = report.reconstruction_grid(**self.reconstructions())
        path = self.workdir / "reconstructions" / f"step_{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        report.save_png(path, grid)
        self.writer.write_image(step, "reconstructions", grid)
        return path

    def _reconstruction_count(self) -> int:
        """Pictures per reconstruction: the configured number, at most this process's share of a batch."""
        return min(self.config.report.num_reconstructions, self.order.local_batch)

    def _last_images(self) -> np.ndarray:
        """The first pictures of this process's share of the last batch (or of the next one, before training)."""
        count = self._reconstruction_count()
        if self.last_batch is None:
            return self.sample_batch()[0][:count]
        pieces, have = [], 0
        for shard in sorted(self.last_batch.images.addressable_shards, key=lambda s: s.index[0].start or 0):
            if have >= count:
                break
            pieces.append(np.asarray(shard.data)[:count - have])
            have += pieces[-1].shape[0]
        return np.concatenate(pieces)

    def summary(self) -> dict[str, Any]:
        stats, losses = self.stats, self.stats.losses
        last_step = self.checkpointer.latest_step()
        return {
            "steps": int(self.state.step),
            "steps_this_run": stats.steps,
            "initial_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-self.steps_per_epoch:])) if losses else None,
            "images_per_second": stats.images / stats.loop_seconds if stats.loop_seconds else None,
            "data_wait_share": stats.data_wait_seconds / stats.loop_seconds if stats.loop_seconds else None,
            "compilations_during_training": self.counter.count,
            "compile_seconds_ahead_of_time": {f"{r}px_mask{m}": s for (r, m), s in self.compile_seconds.items()},
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "stage_switches": stats.stage_switches,
            "device_count": int(self.mesh.devices.size),
            "process_count": jax.process_count(),
            "global_batch_size": self.batch_size,
            "parameters": parameter_count(self.state.params),
            "last_checkpoint": str(self.checkpointer.path(last_step)) if last_step is not None else None,
        }

    def finish(self) -> dict[str, Any]:
        """Waits for the last checkpoint, writes the final reconstructions, exports and summary.json."""
        self.close()
        summary = self.summary()
        if self.is_main:
            path = self.save_reconstructions()
            if path is not None:
                summary["reconstruction"] = str(path)
            summary["exports"] = {fmt: str(p) for fmt, p in export.export_run(
                jax.device_get(self.state.params), self.model, self.workdir / "export", formats=tuple(self.config.export.formats),
                resolution=self.config.schedule.resolution).items()}
            report.write_json(self.workdir / "summary.json", summary)
        self.writer.close()
        return summary

    def close(self) -> None:
        """Lets in-flight checkpoint saves finish; raises CheckpointSaveError if one failed."""
        self.checkpointer.close()

    def abort(self) -> None:
        """After an error: keep what is done (metrics flushed, in-flight saves of finite states finished) and
        report nothing new; the error that stopped the run is the one to raise, not one from closing."""
        self.writer.close()
        with contextlib.suppress(Exception):
            self.checkpointer.close()


def finished_summary(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any] | None:
    """summary.json of a run in ``workdir`` that already trained all its epochs, else None."""
    summary_path = Path(workdir) / "summary.json"
    if not summary_path.exists():
        return None
    checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep)
    try:
        if checkpointer.latest_step() is None or checkpointer.restore_meta()["epoch"] < config.train.epochs:
            return None
    finally:
        checkpointer.close()
    return json.loads(summary_path.read_text())


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Pretrains (or resumes) into ``workdir``; returns the summary also written to summary.json."""
    done = finished_summary(config, workdir)
    if done is not None:
        log.info("%s already finished its %d epochs; keeping its summary.json", workdir, config.train.epochs)
        return done
    pretraining = Pretraining(config, workdir)
    try:
        pretraining.train()
        return pretraining.finish()
    except BaseException:
        pretraining.abort()
        raise

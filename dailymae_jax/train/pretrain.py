"""The MAE pretraining task: wires data, model, compiled steps, checkpoints and reports together.

``run`` is what the command line does: build, train to the end (resuming from the workdir), export. The same
``Pretraining`` object serves notebooks: build it, train k steps, look at a batch and the reconstructions,
train more. It does not decode images, define the model or write files itself: each has its own module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from dailymae_jax import config as config_lib
from dailymae_jax import export, files, report, visualize
from dailymae_jax import schedule as schedule_lib
from dailymae_jax.checkpoint import Checkpointer
from dailymae_jax.data.loader import CropSpec, EpochOrder, TrainLoader
from dailymae_jax.data.prepare import dataset_info, sample_beton
from dailymae_jax.data.shard import BatchSharding
from dailymae_jax.train import fit as fit_lib
from dailymae_jax.train.loop import (TrainLoop, finished_summary, open_workplace, progress_for,
                                     starting_point)
from dailymae_jax.train.recipe import pretrain_recipe
from dailymae_jax.train.state import parameter_count

log = logging.getLogger(__name__)


def train_beton(config: ml_collections.ConfigDict) -> Path:
    """The run's .beton; the sample dataset is cut and written on first use.

    Call it before JAX starts its backends (as ``main`` does): writing forks worker processes, and forking
    a process that already runs JAX's threads can deadlock.
    """
    if config.data.train_path:
        return Path(config.data.train_path)
    return sample_beton(config.data.sample_dir, num_images=config.data.sample_num_images, seed=config.seed)


prepare_data = train_beton  # what main calls for every task before JAX starts


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
        place = open_workplace(config, workdir)
        self.workdir, self.mesh, self.is_main = place.workdir, place.mesh, place.is_main
        self.stages = config_lib.stages(config)

        # Data: the file and its order.
        beton = train_beton(config)
        data = dataset_info(beton)
        self.batch_size = config.data.global_batch_size
        config_lib.check_batch_fits(self.batch_size, data.num_samples, beton)
        self.order = EpochOrder(data.num_samples, self.batch_size, config.seed, jax.process_index(),
                                jax.process_count())
        self.epochs, self.steps_per_epoch = config.train.epochs, self.order.steps_per_epoch
        self.total_steps = self.epochs * self.steps_per_epoch

        # Model, optimizers and the state, born sharded or restored.
        recipe = pretrain_recipe(config, num_classes=data.num_classes, steps_per_epoch=self.steps_per_epoch)
        self.model = recipe.model
        self.checkpointer = Checkpointer(self.workdir, keep=config.checkpoint.keep)
        start = starting_point(recipe.init_fn(self.stages[0].bucket), config.seed, self.mesh, self.checkpointer)

        # One warmed-up loader pipeline and one compiled step per resolution bucket.
        loader = TrainLoader(beton, stages=self.stages, order=self.order, sharding=BatchSharding(self.mesh),
                             num_workers=config.data.num_workers,
                             crop=CropSpec(tuple(config.data.crop_scale), tuple(config.data.crop_ratio)))
        log.info("loader pipelines ready: %s", {r: f"{s:.1f}s" for r, s in loader.warmup_seconds.items()})
        self._compile_steps(recipe, start)

        self.writer = report.MetricsWriter(self.workdir, enabled=self.is_main)
        self.loop = TrainLoop(
            config=config, state=start.state, position=start.position, loader=loader,
            executables=self.executables, bucket_of=lambda stage: stage.bucket, checkpointer=self.checkpointer,
            writer=self.writer, on_epoch_end=self._on_epoch_end,
            progress=progress_for(self.executables, total_steps=self.total_steps, mesh=self.mesh,
                                  metric_names=("loss", "grad_norm", "probe_loss", "probe_accuracy", "lr"),
                                  line_metrics=(("probe_accuracy", "probe acc"),)))
        self._compile_reconstructions()
        if self.is_main:
            overview = report.parameter_overview(self.state.params)
            (self.workdir / "parameters.txt").write_text(overview + "\n")
            log.info("parameters: %s in total (table in %s)", f"{parameter_count(self.state.params):,}",
                     self.workdir / "parameters.txt")

    def _compile_steps(self, recipe: Any, start: Any) -> None:
        """One compiled step per bucket, checked against the GPUs' memory pool before step 0 (train/fit.py):
        a bucket that does not fit stops the run with one line saying which accumulation fits, and
        ``train.grad_accum_steps: 0`` takes the smallest that fits each bucket."""
        buckets = sorted({s.bucket for s in self.stages})
        pool = fit_lib.device_pool_bytes(self.mesh)
        fits = fit_lib.compile_fitting(recipe.make_step, buckets, configured_accum=self.config.train.grad_accum_steps,
                                       global_batch=self.batch_size, mesh=self.mesh, pool_bytes=pool,
                                       abstract_state=start.abstract_state, state_shardings=start.shardings)
        fit_lib.require_fit(fits, pool_bytes=pool, device_kind=self.mesh.devices.flat[0].device_kind,
                            per_device_batch=self.batch_size // int(self.mesh.devices.size),
                            global_batch=self.batch_size)
        self.executables = {f.bucket: f.executable for f in fits}
        self.compile_seconds = {f.bucket: f.compile_seconds for f in fits}
        self.grad_accum_steps = {f.bucket: f.grad_accum_steps for f in fits}
        log.info("compiled %d buckets ahead of time: %s", len(buckets),
                 {f"{r}px/{m}": f"{s:.1f}s" for (r, m), s in self.compile_seconds.items()})
        if pool is not None:
            log.info("per-device memory of each bucket's step against the %.1f GiB pool: %s", pool / fit_lib.GIB,
                     {f"{r}px/{m}": f"{f.memory.peak / fit_lib.GIB:.1f} GiB, grad_accum_steps={f.grad_accum_steps}"
                      for f in fits for (r, m) in [f.bucket] if f.memory is not None})

    # The loop owns the state, the position and the statistics; these read them through.
    state = property(lambda self: self.loop.state)
    position = property(lambda self: self.loop.position)
    stats = property(lambda self: self.loop.stats)
    last_batch = property(lambda self: self.loop.last_batch)
    loader = property(lambda self: self.loop.loader)

    @property
    def step(self) -> int:
        """Optimizer steps taken (over every run into this workdir)."""
        return self.loop.step

    @property
    def finished(self) -> bool:
        return self.loop.finished

    def train(self, num_steps: int | None = None) -> None:
        """Trains ``num_steps`` more steps (all remaining ones by default), checkpointing as configured.

        Raises NonFiniteError (naming the step) before a non-finite state can be checkpointed, and
        Interrupted after saving a checkpoint when SIGTERM or SIGINT arrives.
        """
        self.loop.train(num_steps)

    def _on_epoch_end(self, state: Any, batch: Any, step: int) -> None:
        del state
        if self._reconstruction_due(batch.epoch):
            self.save_reconstructions(step=step)  # compiled ahead (_compile_reconstructions)

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
            "images_per_second": stats.images_per_second,
            "data_wait_share": stats.data_wait_share,
            "compilations_during_training": self.loop.counter.count,
            "compile_seconds_ahead_of_time": {f"{r}px_mask{m}": s for (r, m), s in self.compile_seconds.items()},
            "grad_accum_steps": {f"{r}px_mask{m}": k for (r, m), k in self.grad_accum_steps.items()},
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
            exports = export.export_run(jax.device_get(self.state.params), self.model, self.workdir / "export",
                                        formats=tuple(self.config.export.formats),
                                        resolution=self.config.schedule.resolution)
            summary["exports"] = {fmt: str(path) for fmt, path in exports.items()}
            files.write_json(self.workdir / "summary.json", summary)
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


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Pretrains (or resumes) into ``workdir``; returns the summary also written to summary.json."""
    done = finished_summary(config, workdir)
    if done is not None:
        return done
    pretraining = Pretraining(config, workdir)
    try:
        pretraining.train()
        return pretraining.finish()
    except BaseException:
        pretraining.abort()
        raise

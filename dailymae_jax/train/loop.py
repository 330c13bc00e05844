"""The training loop every task runs, and what a run needs before its first step.

A task (pretraining, finetuning, linear probing) builds its parts: the state, one compiled step per bucket,
the loader, and what happens at the end of an epoch (reconstruction pictures, validation). ``TrainLoop`` then
owns everything else, the same way for every task:

* the data position (epoch, step in epoch) and resuming from it;
* the non-finite check: loss and gradient norm are fetched and checked before any checkpoint is written, so
  every checkpoint on disk holds finite numbers (at the latest every ``train.log_every_steps`` steps);
* SIGTERM/SIGINT: the step in flight finishes, a checkpoint is saved at that exact position, and
  ``Interrupted`` is raised (all processes of a multi-process run stop after the same step);
* the checkpoint cadence (every ``checkpoint.every_steps`` steps, at every epoch's end and at the last step);
* progress: averaged metrics, img/s, data-wait share, MFU and ETA every ``train.log_every_steps`` steps, and
  the data-bound warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Mapping

import jax
import ml_collections

from dailymae_jax import config as config_lib
from dailymae_jax import distributed, files, guards, report
from dailymae_jax.checkpoint import Checkpointer, DataPosition, abstract_with_shardings
from dailymae_jax.data.loader import Batch, TrainLoader
from dailymae_jax.data.shard import make_mesh
from dailymae_jax.schedule import Stage
from dailymae_jax.train import compile as compile_lib
from dailymae_jax.train.progress import Progress
from dailymae_jax.train.state import create_state

log = logging.getLogger(__name__)

# A compiled step: (state, images_uint8, labels) → (state, metrics), metrics holding at least these.
Step = Callable[[Any, jax.Array, jax.Array], tuple[Any, Mapping[str, jax.Array]]]
CHECKED_METRICS = ("loss", "grad_norm")
# Called after the last step of an epoch, before that step's checkpoint: (state, batch, step).
EpochEndHook = Callable[[Any, Batch, int], None]


# ---------------------------------------------------------------------------------------------------------
# Before the first step.


@dataclasses.dataclass(frozen=True)
class Workplace:
    """Where a run lives: its workdir, its mesh, and whether this process writes the reports."""

    workdir: Path
    mesh: jax.sharding.Mesh
    is_main: bool

    @property
    def device_count(self) -> int:
        return int(self.mesh.devices.size)


def open_workplace(config: ml_collections.ConfigDict, workdir: str | Path) -> Workplace:
    """Creates the workdir, checks the config against the devices and writes config.json (process 0)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    config_lib.validate(config, device_count=int(mesh.devices.size), process_count=jax.process_count())
    compile_lib.enable_persistent_cache(config.train.compilation_cache_dir)
    is_main = jax.process_index() == 0
    if is_main:
        files.write_json(workdir / "config.json", config_lib.to_dict(config))
    return Workplace(workdir, mesh, is_main)


@dataclasses.dataclass
class StartingPoint:
    """The state a run starts from (born sharded, or restored), with what compiling and restoring need."""

    state: Any
    shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying the shardings
    position: DataPosition
    resumed: bool


def starting_point(init_fn: Callable[[jax.Array], Any], seed: int, mesh: jax.sharding.Mesh,
                   checkpointer: Checkpointer) -> StartingPoint:
    """A fresh state from ``init_fn`` (under jit, born on its devices) or, when the workdir has a checkpoint,
    the latest one restored onto the same shardings with its data position."""
    state, shardings = create_state(init_fn, jax.random.PRNGKey(seed), mesh)
    abstract_state = abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    if checkpointer.latest_step() is None:
        return StartingPoint(state, shardings, abstract_state, DataPosition(0, 0), resumed=False)
    state, position, _ = checkpointer.restore(abstract_state)
    log.info("resumed from %s at epoch %d, step %d of the epoch", checkpointer.path(int(state.step)),
             position.epoch, position.step_in_epoch)
    return StartingPoint(state, shardings, abstract_state, position, resumed=True)


def place_on_mesh(host_tree: Any, shardings: Any) -> Any:
    """Host arrays (the same on every process) → global arrays with ``shardings``, without a collective."""
    def place(value, sharding):
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, jax.device_get(host_tree), shardings)


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
    log.info("%s already finished its %d epochs; keeping its summary.json", workdir, config.train.epochs)
    return json.loads(summary_path.read_text())


# ---------------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class LoopStats:
    """Host-side bookkeeping of the loop (nothing here touches the devices)."""

    steps: int = 0
    images: int = 0
    loop_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    hook_seconds: float = 0.0  # end-of-epoch work (validation, pictures): not training time
    losses: list[float] = dataclasses.field(default_factory=list)
    stage_switches: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def images_per_second(self) -> float | None:
        seconds = self.loop_seconds - self.hook_seconds
        return self.images / seconds if seconds > 0 else None

    @property
    def data_wait_share(self) -> float | None:
        seconds = self.loop_seconds - self.hook_seconds
        return self.data_wait_seconds / seconds if seconds > 0 else None


class TrainLoop:
    """Runs compiled steps over the loader's batches from the current position (see the module docstring).

    ``state`` and ``position`` advance as it trains; ``train()`` can be called again to continue.
    """

    def __init__(self, *, config: ml_collections.ConfigDict, state: Any, position: DataPosition,
                 loader: TrainLoader, executables: Mapping[Hashable, Step], bucket_of: Callable[[Stage], Hashable],
                 checkpointer: Checkpointer, writer: report.MetricsWriter, progress: Progress,
                 on_epoch_end: EpochEndHook | None = None):
        self.config = config
        self.state = state
        self.position = position
        self.loader = loader
        self.executables = executables
        self.bucket_of = bucket_of
        self.checkpointer = checkpointer
        self.writer = writer
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.epochs = config.train.epochs
        self.steps_per_epoch = loader.steps_per_epoch
        self.batch_size = config.data.global_batch_size
        self.stats = LoopStats()
        self.counter = compile_lib.CompilationCounter()
        self.last_batch: Batch | None = None
        self._config_dict = config_lib.to_dict(config)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

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
            distributed.barrier("training")  # processes leave compilation at different times; start together
            with self.counter, distributed.signal_guard() as signals, contextlib.closing(self.loader.batches(
                    self.position.epoch, self.position.step_in_epoch, self.epochs)) as batches:
                self._run_steps(batches, num_steps, signals)
        finally:
            self.stats.loop_seconds += time.perf_counter() - loop_start

    def _run_steps(self, batches: Iterator[Batch], num_steps: int, signals: guards.SignalGuard) -> None:
        config, stats = self.config, self.stats
        unchecked: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet checked for NaN/inf
        current_bucket = None
        step_returned = time.perf_counter()
        for done, batch in enumerate(batches, start=1):
            data_wait = time.perf_counter() - step_returned
            stats.data_wait_seconds += data_wait
            bucket = self.bucket_of(batch.stage)
            self.state, metrics = self.executables[bucket](self.state, batch.images, batch.labels)
            if current_bucket is not None and bucket != current_bucket:
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
            unchecked.append((host_step, {k: metrics[k] for k in CHECKED_METRICS}))
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
                guards.check_finite(checked, CHECKED_METRICS)
                stats.losses.extend(float(m["loss"]) for _, m in checked)
            if logging_now:
                self._log(host_step, batch)
            if end_of_epoch and self.on_epoch_end is not None:
                hook_start = time.perf_counter()
                self.on_epoch_end(self.state, batch, host_step)
                hook_seconds = time.perf_counter() - hook_start
                stats.hook_seconds += hook_seconds
                self.progress.exclude(hook_seconds)
            if saving_now:
                self.checkpointer.save(host_step, self.state, self.position, self._config_dict)
            if stop_signal:
                self.checkpointer.wait()
                raise guards.Interrupted(stop_signal, host_step, str(self.checkpointer.path(host_step)))
            if last:
                return
            step_returned = time.perf_counter()

    def _log(self, host_step: int, batch: Batch) -> None:
        scalars, window = self.progress.flush(step=host_step, bucket=self.bucket_of(batch.stage))
        scalars.update(resolution=batch.stage.resolution, epoch=batch.epoch)
        if batch.stage.mask_ratio:
            scalars["mask_ratio"] = batch.stage.mask_ratio
        self.writer.write(host_step, scalars)
        log.info("%s", self.progress.line(host_step, batch.epoch, self.epochs, scalars))
        warning = Progress.data_bound_warning(window)
        if warning and batch.epoch > 0:  # the first epoch includes the loader's start-up
            log.warning("%s", warning)


def progress_for(executables: Mapping[Hashable, Any], *, total_steps: int, mesh: jax.sharding.Mesh,
                 metric_names: tuple[str, ...], line_metrics: tuple[tuple[str, str], ...] = ()) -> Progress:
    """Progress reporting for these compiled steps, its bookkeeping compiled before the first step."""
    progress = Progress(total_steps=total_steps, metric_names=metric_names, line_metrics=line_metrics,
                        flops_per_step={b: compile_lib.flops_per_step(e) for b, e in executables.items()})
    # Metrics leave the compiled steps replicated (compile_buckets' out_shardings).
    progress.warm_up(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return progress

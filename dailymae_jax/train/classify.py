"""What finetuning and linear probing share: data, state, ahead-of-time compilation, the loop, evaluation
after each epoch, checkpoints and the summary.

A task (train/finetune.py, train/linprobe.py) supplies only what differs, as a :class:`TaskParts`: how the
state is initialised and where pretrained weights go, the compiled training step per resolution, and the
logits used for evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from dailymae_jax import config as config_lib
from dailymae_jax import distributed
from dailymae_jax import evaluate as evaluate_lib
from dailymae_jax import report
from dailymae_jax.checkpoint import Checkpointer, DataPosition, abstract_with_shardings
from dailymae_jax.data.eval_loader import EvalLoader, EvalOrder
from dailymae_jax.data.loader import CropSpec, EpochOrder, TrainLoader
from dailymae_jax.data.prepare import dataset_info, sample_beton, sample_val_beton
from dailymae_jax.data.shard import BatchSharding, make_mesh
from dailymae_jax.train import compile as compile_lib
from dailymae_jax.train.state import ClassifierState, create_state, parameter_count

log = logging.getLogger(__name__)


def prepare_data(config: ml_collections.ConfigDict) -> tuple[Path, Path]:
    """(train, val) .beton files; the sample dataset's are written on first use.

    Call it before JAX starts its backends (``main`` does): writing forks worker processes.
    """
    d = config.data
    train = Path(d.train_path) if d.train_path else sample_beton(d.sample_dir, num_images=d.sample_num_images,
                                                                  seed=config.seed)
    val = Path(d.val_path) if d.val_path else sample_val_beton(d.sample_dir, num_images=d.sample_num_images,
                                                                seed=config.seed)
    return train, val


@dataclasses.dataclass(frozen=True)
class RunShape:
    """Facts about the run a task needs to build its model, optimizer and steps."""

    num_classes: int
    steps_per_epoch: int
    total_steps: int
    device_count: int


@dataclasses.dataclass(frozen=True)
class TaskParts:
    """What a classifier task provides."""

    init_state: Callable[[jax.Array], ClassifierState]  # fresh state from a key (runs under jit)
    # Host side, on a fresh state: returns the state with pretrained weights in place, and a report.
    load_pretrained: Callable[[ClassifierState], tuple[ClassifierState, dict[str, Any]]]
    make_step: Callable[[int], Callable]  # resolution → step(state, images_u8, labels) → (state, metrics)
    logits_fn: evaluate_lib.LogitsFn  # (state, images_u8) → logits, for evaluation
    crop: CropSpec  # training RandomResizedCrop


BuildParts = Callable[[ml_collections.ConfigDict, RunShape], TaskParts]


def run(config: ml_collections.ConfigDict, workdir: str | Path, build_parts: BuildParts) -> dict[str, Any]:
    """Trains (or resumes) a classifier into ``workdir``; returns the summary also written to summary.json."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = make_mesh()
    config_lib.validate(config, device_count=mesh.devices.size, process_count=jax.process_count())
    stages = config_lib.finetune_stages(config)
    compile_lib.enable_persistent_cache(config.train.compilation_cache_dir)
    if is_main:
        report.write_json(workdir / "config.json", config_lib.to_dict(config))

    train_beton, val_beton = prepare_data(config)
    train_info, val_info = dataset_info(train_beton), dataset_info(val_beton)
    num_classes = config.model.get("num_classes") or train_info.num_classes
    if val_info.num_classes > num_classes:
        raise config_lib.ConfigError(f"data.val_path: labels reach {val_info.num_classes - 1}, but the model has "
                                     f"{num_classes} classes (model.num_classes or the training labels)")
    batch = config.data.global_batch_size
    order = EpochOrder(train_info.num_samples, batch, config.seed, jax.process_index(), jax.process_count())
    sharding = BatchSharding(mesh)
    epochs, steps_per_epoch = config.train.epochs, order.steps_per_epoch
    shape = RunShape(num_classes=num_classes, steps_per_epoch=steps_per_epoch, total_steps=epochs * steps_per_epoch,
                     device_count=int(mesh.devices.size))
    parts = build_parts(config, shape)

    state, state_shardings = create_state(parts.init_state, jax.random.PRNGKey(config.seed), mesh)
    abstract_state = abstract_with_shardings(jax.eval_shape(lambda: state), state_shardings)
    checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep)
    position = DataPosition(0, 0)
    init_report: dict[str, Any]
    if checkpointer.latest_step() is not None:
        state, position, _ = checkpointer.restore(abstract_state)
        init_report = {"source": "resumed", "from": str(checkpointer.path(int(state.step)))}
        log.info("resumed from %s at epoch %d, step %d of the epoch", init_report["from"], position.epoch,
                 position.step_in_epoch)
        if position.epoch >= epochs and (workdir / "summary.json").exists():
            log.info("%s already finished its %d epochs; keeping its summary.json", workdir, epochs)
            checkpointer.close()
            return json.loads((workdir / "summary.json").read_text())
    else:
        state, init_report = parts.load_pretrained(state)
        state = jax.device_put(state, state_shardings)

    loader = TrainLoader(train_beton, stages=stages, order=order, sharding=sharding,
                         num_workers=config.data.num_workers, crop=parts.crop)
    eval_order = EvalOrder(val_info.num_samples, config.eval.global_batch_size, jax.process_index(),
                           jax.process_count())
    eval_loaders = {r: EvalLoader(val_beton, resolution=r, order=eval_order, sharding=sharding,
                                  num_workers=config.data.num_workers, crop_ratio=config.eval.crop_ratio)
                    for r in config.eval.resolutions}
    log.info("loaders ready: train %s, eval %s", {r: f"{s:.1f}s" for r, s in loader.warmup_seconds.items()},
             {r: f"{l.warmup_seconds:.1f}s" for r, l in eval_loaders.items()})

    resolutions = sorted({s.resolution for s in stages})
    executables, compile_seconds = compile_lib.compile_buckets(
        parts.make_step, resolutions, abstract_state=abstract_state, state_shardings=state_shardings, mesh=mesh,
        global_batch=batch, resolution_of=lambda r: r)
    eval_step = evaluate_lib.make_eval_step(parts.logits_fn, num_classes)
    eval_executables = {}
    for r in config.eval.resolutions:
        start = time.perf_counter()
        eval_executables[r] = evaluate_lib.compile_eval_step(
            eval_step, abstract_state=abstract_state, state_shardings=state_shardings, mesh=mesh,
            global_batch=config.eval.global_batch_size, resolution=r)
        compile_seconds[f"eval_{r}"] = time.perf_counter() - start
    log.info("compiled ahead of time: %s", {f"{k}px" if isinstance(k, int) else k: f"{s:.1f}s"
                                            for k, s in compile_seconds.items()})

    writer = report.MetricsWriter(workdir, enabled=is_main)
    counter = compile_lib.CompilationCounter()
    loop = _Loop(config, executables, eval_executables, eval_loaders, checkpointer, writer, steps_per_epoch,
                 config_lib.to_dict(config))
    distributed.barrier("training")  # processes leave compilation at different times; start together
    with counter:
        state = loop.run(state, loader.batches(position.epoch, position.step_in_epoch, epochs), epochs)
    if loop.last_eval is None:  # a finished run resumed without its summary: evaluate the final state
        loop.evaluate(state, epochs - 1, int(state.step))
    checkpointer.close()
    writer.close()

    history = _eval_history(workdir / "metrics.jsonl") if is_main else loop.history
    primary = config.eval.resolutions[0]
    final = loop.last_eval
    best = max(history, key=lambda row: row["val_top1"]) if history else None
    last_step = checkpointer.latest_step()
    summary = {
        "task": config.task,
        "steps": int(state.step),
        "steps_this_run": loop.steps,
        "epochs": epochs,
        "val_top1": final[primary].top1 if final else None,
        "val_top5": final[primary].top5 if final else None,
        "val_count": final[primary].count if final else None,
        "val_resolution": primary,
        "val": {str(r): result.as_dict() for r, result in final.items()} if final else None,
        "best_val_top1": best["val_top1"] if best else None,
        "best_epoch": int(best["epoch"]) if best else None,
        "chance_top1": 1.0 / num_classes,
        "history": history,
        "initial_loss": loop.losses[0] if loop.losses else None,
        "final_loss": float(np.mean(loop.losses[-steps_per_epoch:])) if loop.losses else None,
        "images_per_second": loop.images / loop.train_seconds if loop.train_seconds else None,
        "eval_seconds": loop.eval_seconds,
        "compilations_during_training": counter.count,
        "compile_seconds_ahead_of_time": {str(k): s for k, s in compile_seconds.items()},
        "stages": [{"start_epoch": s.start_epoch, "resolution": s.resolution} for s in stages],
        "num_classes": num_classes,
        "train_images": train_info.num_samples,
        "val_images": val_info.num_samples,
        "device_count": int(mesh.devices.size),
        "process_count": jax.process_count(),
        "global_batch_size": batch,
        "parameters": parameter_count(state.params) + parameter_count(state.frozen),
        "trainable_parameters": parameter_count(state.params),
        "init": init_report,
        "last_checkpoint": str(checkpointer.path(last_step)) if last_step is not None else None,
    }
    if is_main:
        report.write_json(workdir / "summary.json", summary)
    return summary


def _eval_history(metrics_path: Path) -> list[dict[str, float]]:
    """Per-epoch validation rows of metrics.jsonl (the last one per epoch, so resumed runs count once)."""
    by_epoch: dict[int, dict[str, float]] = {}
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            row = json.loads(line)
            if "val_top1" in row:
                by_epoch[int(row["epoch"])] = {k: v for k, v in row.items() if k.startswith("val_") or k == "epoch"}
    return [by_epoch[e] for e in sorted(by_epoch)]


class _Loop:
    """The training loop with evaluation after every ``eval.every_epochs`` epochs and at the end."""

    def __init__(self, config, executables, eval_executables, eval_loaders, checkpointer, writer,
                 steps_per_epoch, config_dict):
        self.config = config
        self.executables = executables
        self.eval_executables = eval_executables
        self.eval_loaders = eval_loaders
        self.checkpointer = checkpointer
        self.writer = writer
        self.steps_per_epoch = steps_per_epoch
        self.config_dict = config_dict
        self.steps = 0
        self.images = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.losses: list[float] = []
        self.history: list[dict[str, float]] = []
        self.last_eval: dict[int, evaluate_lib.EvalResult] | None = None

    def evaluate(self, state: ClassifierState, epoch: int, host_step: int) -> None:
        start = time.perf_counter()
        results = {r: evaluate_lib.evaluate(self.eval_executables[r], state, loader)
                   for r, loader in self.eval_loaders.items()}
        self.eval_seconds += time.perf_counter() - start
        primary = self.config.eval.resolutions[0]
        row = {"epoch": epoch, "val_top1": results[primary].top1, "val_top5": results[primary].top5,
               "val_count": results[primary].count}
        for r, result in results.items():
            if r != primary:
                row.update({f"val_top1_{r}": result.top1, f"val_top5_{r}": result.top5})
        self.writer.write(host_step, row)
        self.history.append(row)
        self.last_eval = results
        log.info("epoch %d: val top-1 %.4f top-5 %.4f at %d px over %d images (%.1fs)", epoch, row["val_top1"],
                 row["val_top5"], primary, row["val_count"], time.perf_counter() - start)

    def run(self, state: ClassifierState, batches, epochs: int) -> ClassifierState:
        config = self.config
        batch_size = config.data.global_batch_size
        pending: list[dict[str, jax.Array]] = []
        window_start = time.perf_counter()
        window_images = 0
        for batch in batches:
            state, metrics = self.executables[batch.stage.resolution](state, batch.images, batch.labels)
            self.steps += 1
            self.images += batch_size
            window_images += batch_size
            pending.append(metrics)
            host_step = batch.epoch * self.steps_per_epoch + batch.step_in_epoch + 1
            end_of_epoch = batch.step_in_epoch == self.steps_per_epoch - 1
            if host_step % config.train.log_every_steps == 0 or end_of_epoch:
                fetched = jax.device_get(pending)
                pending.clear()
                self.losses.extend(float(m["loss"]) for m in fetched)
                elapsed = time.perf_counter() - window_start
                self.train_seconds += elapsed
                row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                row.update(images_per_second=window_images / elapsed, resolution=batch.stage.resolution,
                           epoch=batch.epoch)
                self.writer.write(host_step, row)
                log.info("step %d epoch %d: loss %.4f lr %.2e %.0f img/s", host_step, batch.epoch, row["loss"],
                         row["lr"], row["images_per_second"])
            if end_of_epoch and ((batch.epoch + 1) % config.eval.every_epochs == 0 or batch.epoch + 1 == epochs):
                self.evaluate(state, batch.epoch, host_step)
            if host_step % config.checkpoint.every_steps == 0 or end_of_epoch:
                next_position = (DataPosition(batch.epoch + 1, 0) if end_of_epoch
                                 else DataPosition(batch.epoch, batch.step_in_epoch + 1))
                self.checkpointer.save(host_step, state, next_position, self.config_dict)
            if host_step % config.train.log_every_steps == 0 or end_of_epoch:
                window_start, window_images = time.perf_counter(), 0  # after eval and checkpoint: not timed
        if pending:
            self.losses.extend(float(m["loss"]) for m in jax.device_get(pending))
        return state

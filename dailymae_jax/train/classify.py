"""What finetuning and linear probing share: data, state, ahead-of-time compilation, evaluation after each
epoch and the summary; the training loop itself is train/loop.py's, as for pretraining.

A task (train/finetune.py, train/linprobe.py) supplies only what differs, as a :class:`TaskParts`: how the
state is initialised and where pretrained weights go, the compiled training step per resolution, and the
logits used for evaluation.
"""

from __future__ import annotations

import contextlib
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
from dailymae_jax import files, report
from dailymae_jax.checkpoint import Checkpointer
from dailymae_jax.data.eval_loader import EvalLoader, EvalOrder
from dailymae_jax.data.loader import Batch, CropSpec, EpochOrder, TrainLoader
from dailymae_jax.data.prepare import dataset_info, sample_beton, sample_val_beton
from dailymae_jax.data.shard import BatchSharding
from dailymae_jax.train import compile as compile_lib
from dailymae_jax.train import evaluate as evaluate_lib
from dailymae_jax.train.loop import TrainLoop, finished_summary, open_workplace, place_on_mesh, progress_for, \
    starting_point
from dailymae_jax.train.state import ClassifierState, parameter_count

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


BuildParts = Callable[[ml_collections.ConfigDict, RunShape], TaskParts]


def run(config: ml_collections.ConfigDict, workdir: str | Path, build_parts: BuildParts) -> dict[str, Any]:
    """Trains (or resumes) a classifier into ``workdir``; returns the summary also written to summary.json."""
    done = finished_summary(config, workdir)
    if done is not None:
        return done
    place = open_workplace(config, workdir)
    stages = config_lib.finetune_stages(config)
    train_beton, val_beton = prepare_data(config)
    train_info, val_info = dataset_info(train_beton), dataset_info(val_beton)
    num_classes = config.model.get("num_classes") or train_info.num_classes
    if val_info.num_classes > num_classes:
        raise config_lib.ConfigError(f"data.val_path: labels reach {val_info.num_classes - 1}, but the model has "
                                     f"{num_classes} classes (model.num_classes or the training labels)")
    batch = config.data.global_batch_size
    config_lib.check_batch_fits(batch, train_info.num_samples, train_beton)
    order = EpochOrder(train_info.num_samples, batch, config.seed, jax.process_index(), jax.process_count())
    epochs, steps_per_epoch = config.train.epochs, order.steps_per_epoch
    parts = build_parts(config, RunShape(num_classes=num_classes, steps_per_epoch=steps_per_epoch,
                                         total_steps=epochs * steps_per_epoch, device_count=place.device_count))

    checkpointer = Checkpointer(place.workdir, keep=config.checkpoint.keep)
    start = starting_point(parts.init_state, config.seed, place.mesh, checkpointer)
    if start.resumed:
        init_report = {"source": "resumed", "from": str(checkpointer.path(int(start.state.step)))}
    else:
        state, init_report = parts.load_pretrained(start.state)
        start.state = place_on_mesh(state, start.shardings)

    sharding = BatchSharding(place.mesh)
    loader = TrainLoader(train_beton, stages=stages, order=order, sharding=sharding,
                         num_workers=config.data.num_workers,
                         crop=CropSpec(tuple(config.data.crop_scale), tuple(config.data.crop_ratio)))
    eval_order = EvalOrder(val_info.num_samples, config.eval.global_batch_size, jax.process_index(),
                           jax.process_count())
    eval_loaders = {r: EvalLoader(val_beton, resolution=r, order=eval_order, sharding=sharding,
                                  num_workers=config.data.num_workers, crop_ratio=config.eval.crop_ratio)
                    for r in config.eval.resolutions}
    log.info("loaders ready: train %s, eval %s", {r: f"{s:.1f}s" for r, s in loader.warmup_seconds.items()},
             {r: f"{l.warmup_seconds:.1f}s" for r, l in eval_loaders.items()})

    resolutions = sorted({s.resolution for s in stages})
    executables, compile_seconds = compile_lib.compile_buckets(
        parts.make_step, resolutions, abstract_state=start.abstract_state, state_shardings=start.shardings,
        mesh=place.mesh, global_batch=batch, resolution_of=lambda r: r)
    eval_step = evaluate_lib.make_eval_step(parts.logits_fn, num_classes)
    eval_executables = {}
    for r in config.eval.resolutions:
        tick = time.perf_counter()
        eval_executables[r] = evaluate_lib.compile_eval_step(
            eval_step, abstract_state=start.abstract_state, state_shardings=start.shardings, mesh=place.mesh,
            global_batch=config.eval.global_batch_size, resolution=r)
        compile_seconds[f"eval_{r}"] = time.perf_counter() - tick
    log.info("compiled ahead of time: %s", {f"{k}px" if isinstance(k, int) else k: f"{s:.1f}s"
                                            for k, s in compile_seconds.items()})

    writer = report.MetricsWriter(place.workdir, enabled=place.is_main)
    validation = Validation(config, eval_executables, eval_loaders, writer)
    loop = TrainLoop(config=config, state=start.state, position=start.position, loader=loader,
                     executables=executables, bucket_of=lambda stage: stage.resolution, checkpointer=checkpointer,
                     writer=writer, on_epoch_end=validation.after_epoch,
                     progress=progress_for(executables, total_steps=epochs * steps_per_epoch, mesh=place.mesh,
                                           metric_names=("loss", "grad_norm", "train_top1", "lr"),
                                           line_metrics=(("train_top1", "train top-1"),)))
    try:
        loop.train()
        if validation.last is None:  # a finished run resumed without its summary: evaluate the final state
            validation.run(loop.state, epochs - 1, loop.step)
        checkpointer.close()
    except BaseException:
        # Keep what is done (metrics flushed, in-flight saves of finite states finished); the error that
        # stopped the run is the one to raise, not one from closing.
        writer.close()
        with contextlib.suppress(Exception):
            checkpointer.close()
        raise
    writer.close()

    state, stats = loop.state, loop.stats
    history = _eval_history(place.workdir / "metrics.jsonl") if place.is_main else validation.history
    primary = config.eval.resolutions[0]
    final = validation.last
    best = max(history, key=lambda row: row["val_top1"]) if history else None
    last_step = checkpointer.latest_step()
    summary = {
        "task": config.task,
        "steps": int(state.step),
        "steps_this_run": stats.steps,
        "epochs": epochs,
        "val_top1": final[primary].top1,
        "val_top5": final[primary].top5,
        "val_count": final[primary].count,
        "val_resolution": primary,
        "val": {str(r): result.as_dict() for r, result in final.items()},
        "best_val_top1": best["val_top1"] if best else None,
        "best_epoch": int(best["epoch"]) if best else None,
        "chance_top1": 1.0 / num_classes,
        "history": history,
        "initial_loss": stats.losses[0] if stats.losses else None,
        "final_loss": float(np.mean(stats.losses[-steps_per_epoch:])) if stats.losses else None,
        "images_per_second": stats.images_per_second,
        "data_wait_share": stats.data_wait_share,
        "eval_seconds": validation.seconds,
        "compilations_during_training": loop.counter.count,
        "compile_seconds_ahead_of_time": {str(k): s for k, s in compile_seconds.items()},
        "stages": [{"start_epoch": s.start_epoch, "resolution": s.resolution} for s in stages],
        "num_classes": num_classes,
        "train_images": train_info.num_samples,
        "val_images": val_info.num_samples,
        "device_count": place.device_count,
        "process_count": jax.process_count(),
        "global_batch_size": batch,
        "parameters": parameter_count(state.params) + parameter_count(state.frozen),
        "trainable_parameters": parameter_count(state.params),
        "init": init_report,
        "last_checkpoint": str(checkpointer.path(last_step)) if last_step is not None else None,
    }
    if place.is_main:
        files.write_json(place.workdir / "summary.json", summary)
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


class Validation:
    """Top-1/top-5 on the validation split after every ``eval.every_epochs`` epochs and after the last."""

    def __init__(self, config: ml_collections.ConfigDict, executables: dict[int, Any],
                 loaders: dict[int, EvalLoader], writer: report.MetricsWriter):
        self.config = config
        self.executables = executables
        self.loaders = loaders
        self.writer = writer
        self.seconds = 0.0
        self.history: list[dict[str, float]] = []
        self.last: dict[int, evaluate_lib.EvalResult] | None = None

    def after_epoch(self, state: ClassifierState, batch: Batch, step: int) -> None:
        """The loop's end-of-epoch hook."""
        epoch = batch.epoch
        if (epoch + 1) % self.config.eval.every_epochs == 0 or epoch + 1 == self.config.train.epochs:
            self.run(state, epoch, step)

    def run(self, state: ClassifierState, epoch: int, step: int) -> None:
        start = time.perf_counter()
        results = {r: evaluate_lib.evaluate(self.executables[r], state, loader) for r, loader in self.loaders.items()}
        self.seconds += time.perf_counter() - start
        primary = self.config.eval.resolutions[0]
        row = {"epoch": epoch, "val_top1": results[primary].top1, "val_top5": results[primary].top5,
               "val_count": results[primary].count}
        for r, result in results.items():
            if r != primary:
                row.update({f"val_top1_{r}": result.top1, f"val_top5_{r}": result.top5})
        self.writer.write(step, row)
        self.history.append(row)
        self.last = results
        log.info("epoch %d: val top-1 %.4f top-5 %.4f at %d px over %d images (%.1fs)", epoch, row["val_top1"],
                 row["val_top5"], primary, row["val_count"], time.perf_counter() - start)

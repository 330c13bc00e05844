"""What the training loop reports as it goes: averaged metrics, throughput, ETA, MFU and a data-bound warning.

Metrics are accumulated on device with clu.metrics (merging a step's metrics launches a few tiny device ops
and never waits for the step), and fetched only when a log line is due.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

from dailymae_jax.train import compile as compile_lib

# A window in which the training loop waited this share of its time for the loader is reported as data-bound.
DATA_BOUND_SHARE = 0.25


def metrics_collection(names: tuple[str, ...]) -> type[clu_metrics.Collection]:
    """A clu Collection of per-window means of the step metrics ``names``; ``lr`` keeps the window's last value."""
    return clu_metrics.Collection.create(**{
        name: (clu_metrics.LastValue if name == "lr" else clu_metrics.Average).from_output(name) for name in names})


@functools.lru_cache(maxsize=None)
def _window_programs(names: tuple[str, ...]) -> tuple[Callable, Callable, Callable]:
    """(first, merge, compute), jitted once per set of metric names."""
    collection = metrics_collection(names)
    first = jax.jit(lambda step_metrics: collection.single_from_model_output(**step_metrics))
    merge = jax.jit(lambda metrics, step_metrics: metrics.merge(collection.single_from_model_output(**step_metrics)))
    compute = jax.jit(lambda metrics: metrics.compute())
    return first, merge, compute


def format_duration(seconds: float) -> str:
    """``3h05m``, ``12m40s`` or ``42s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclasses.dataclass
class Window:
    """Throughput of the steps since the last log line."""

    steps: int
    images: int
    seconds: float
    data_wait_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    @property
    def data_wait_share(self) -> float:
        return min(1.0, self.data_wait_seconds / self.seconds) if self.seconds > 0 else 0.0


class Progress:
    """Accumulates one log window at a time and turns it into scalars and a log line with an ETA.

    ``flops_per_step`` maps a bucket to the compiled step's FLOPs per device (XLA's cost analysis); with the
    device's peak bf16 rate it gives model FLOPs utilisation (None on CPUs, whose peak we do not tabulate).
    """

    def __init__(self, *, total_steps: int, metric_names: tuple[str, ...], flops_per_step: dict | None = None,
                 device_kind: str | None = None, clock: Callable[[], float] = time.perf_counter,
                 line_metrics: tuple[tuple[str, str], ...] = ()):
        self.total_steps = total_steps
        self.metric_names = tuple(metric_names)
        self.line_metrics = line_metrics  # (metric, label) pairs shown after loss and lr in the log line
        self._first, self._merge, self._compute = _window_programs(self.metric_names)
        self.flops_per_step = flops_per_step or {}
        kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
        self.peak_flops = compile_lib.peak_bf16_flops(kind)
        self.metrics: clu_metrics.Collection | None = None
        self._steps = self._images = 0
        self._data_wait = self._excluded = 0.0
        self._clock = clock
        self._start = clock()

    def warm_up(self, sharding: jax.sharding.Sharding) -> None:
        """Compiles the accumulation for metrics placed like the step's (``sharding``) before training starts,
        so that bookkeeping never shows up as a compilation during training."""
        # Made on device rather than device_put: in a multi-process run, device_put of a host value checks
        # with a cross-process collective that every process passed the same one, and on CPU a collective's
        # first use gives up after 30 s, which a process still compiling its steps exceeds.
        zeros = jax.jit(lambda: {name: jnp.zeros((), jnp.float32) for name in self.metric_names},
                        out_shardings=sharding)()
        self.add(zeros, images=0, data_wait_seconds=0.0)
        self.add(zeros, images=0, data_wait_seconds=0.0)
        jax.block_until_ready(self._compute(self.metrics))
        self.metrics = None
        self._steps = self._images = 0
        self._start = self._clock()

    def add(self, step_metrics: dict[str, jax.Array], *, images: int, data_wait_seconds: float) -> None:
        """Records one step (its metrics stay on device: one small asynchronous jitted merge)."""
        if self.metrics is None:
            self.metrics = self._first(step_metrics)
        else:
            self.metrics = self._merge(self.metrics, step_metrics)
        self._steps += 1
        self._images += images
        self._data_wait += data_wait_seconds

    def flush(self, *, step: int, bucket) -> tuple[dict[str, float], Window]:
        """The window's scalars (fetching the averages waits for its steps) and its throughput; resets."""
        scalars = {k: float(v) for k, v in jax.device_get(self._compute(self.metrics)).items()}
        window = Window(self._steps, self._images, self._clock() - self._start - self._excluded, self._data_wait)
        scalars.update(images_per_second=window.images_per_second, step_seconds=window.step_seconds,
                       data_wait_share=window.data_wait_share)
        mfu = compile_lib.model_flops_utilization(self.flops_per_step.get(bucket), window.step_seconds,
                                                  self.peak_flops)
        if mfu is not None:
            scalars["mfu"] = mfu
        scalars["eta_seconds"] = window.step_seconds * max(self.total_steps - step, 0)
        self.metrics = None
        self._steps = self._images = 0
        self._data_wait = self._excluded = 0.0
        self._start = self._clock()
        return scalars, window

    def exclude(self, seconds: float) -> None:
        """Leaves ``seconds`` of the current window out of its throughput (evaluation, pictures)."""
        self._excluded += seconds

    def line(self, step: int, epoch: int, epochs: int, scalars: dict[str, float]) -> str:
        """``step 120/2016 (6%) epoch 3/9: loss 0.8123 lr 1.2e-03 probe acc 0.410 | 53 img/s 0.60 s/step
        data wait 4% MFU 47% | ETA 18m57s`` (the metrics after lr are ``line_metrics``)."""
        mfu = f" MFU {scalars['mfu']:.0%}" if "mfu" in scalars else ""
        extra = "".join(f" {label} {scalars[name]:.3f}" for name, label in self.line_metrics)
        return (f"step {step}/{self.total_steps} ({step / self.total_steps:.0%}) epoch {epoch + 1}/{epochs}: "
                f"loss {scalars['loss']:.4f} lr {scalars['lr']:.2e}{extra} | "
                f"{scalars['images_per_second']:.0f} img/s {scalars['step_seconds']:.3f} s/step "
                f"data wait {scalars['data_wait_share']:.0%}{mfu} | "
                f"ETA {format_duration(scalars['eta_seconds'])}")

    @staticmethod
    def data_bound_warning(window: Window) -> str | None:
        """A warning when the loop spent more than DATA_BOUND_SHARE of the window waiting for data."""
        if window.data_wait_share <= DATA_BOUND_SHARE:
            return None
        return (f"data-bound: the loop waited {window.data_wait_share:.0%} of its time for the loader; "
                "raise data.num_workers or write the dataset at a smaller max side (tools/write_dataset.py)")

"""Does each bucket's compiled step fit the GPU's memory pool, and with how many gradient-accumulation steps.

Before step 0 a run on GPUs compiles every (resolution, mask ratio) bucket and reads XLA's memory analysis of
each executable: per device, its arguments, outputs and temporaries (less the outputs that reuse donated
arguments). When that exceeds the memory pool JAX allocates from, the run stops with one line naming the bucket
and an accumulation that fits; ``train.grad_accum_steps: 0`` instead takes, bucket by bucket, the smallest
accumulation that fits. Accumulation keeps the global batch: k micro-batches of batch/k images make one step.
``tools/plan_gpu.py`` runs the same search for GPUs it does not have.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax

from dailymae_jax.errors import ConfigError
from dailymae_jax.train import compile as compile_lib

log = logging.getLogger(__name__)
GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled step, from XLA's memory analysis."""

    argument: int
    output: int
    alias: int  # outputs written into donated arguments: counted once
    temp: int

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp


def step_memory(executable: Any) -> StepMemory | None:
    """The memory analysis of a compiled step, or None where the backend gives none."""
    try:
        stats = executable.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if stats is None:
        return None
    return StepMemory(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                      int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes))


def device_pool_bytes(mesh: jax.sharding.Mesh) -> int | None:
    """The smallest memory pool among this process's devices of ``mesh`` (``bytes_limit``), or None on CPUs
    (no pool to fit) and where the backend keeps no statistics."""
    limits = []
    for device in mesh.local_devices:
        stats = device.memory_stats() if device.platform != "cpu" else None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def accumulation_candidates(configured: int, per_device_batch: int) -> list[int]:
    """Accumulations to try, first the one to use when it fits: the configured one and then the larger
    divisors of the per-device batch (where the configured one does not fit, they make the advice), or every
    divisor from 1 when the setting is 0."""
    divisors = [k for k in range(1, per_device_batch + 1) if per_device_batch % k == 0]
    return [k for k in divisors if k >= configured] if configured else divisors


@dataclasses.dataclass
class BucketFit:
    """A bucket's compiled step at the accumulation it runs with, and whether it fits the pool."""

    bucket: tuple[int, float]
    executable: Any
    compile_seconds: float
    grad_accum_steps: int
    memory: StepMemory | None
    fits: bool
    fitting_accum: int | None  # the smallest accumulation that fits (None: none does)


def fit_bucket(compile_one: Callable[[tuple[int, float], int], tuple[Any, float]], bucket: tuple[int, float], *,
               configured_accum: int, per_device_batch: int, pool_bytes: int | None) -> BucketFit:
    """Compiles ``bucket`` at the first candidate accumulation (see :func:`accumulation_candidates`) and, where
    it does not fit ``pool_bytes``, at the next ones until one does. Without a pool the first one is taken.

    ``compile_one(bucket, accumulation)`` returns (executable, compile seconds).
    """
    first = last = None
    for k in accumulation_candidates(configured_accum, per_device_batch):
        executable, seconds = compile_one(bucket, k)
        memory = step_memory(executable)
        last = BucketFit(bucket, executable, seconds, k, memory, True, k)
        if pool_bytes is None or memory is None or memory.peak <= pool_bytes:
            if configured_accum and first is not None:  # the configured one did not fit: this is the advice
                first.fitting_accum = k
                return first
            return last
        last.fits, last.fitting_accum = False, None
        first = first or last
        log.info("%d px, mask %.2f: %.1f GiB per device at train.grad_accum_steps=%d, over the %.1f GiB pool",
                 bucket[0], bucket[1], memory.peak / GIB, k, pool_bytes / GIB)
    # Nothing fits: report the configured accumulation, or (setting 0) the largest one tried.
    return first if configured_accum else last


def not_fitting_message(fit: BucketFit, *, pool_bytes: int, device_kind: str, per_device_batch: int,
                        global_batch: int) -> str:
    """One line: the bucket that does not fit, by how much, and the accumulation that does."""
    resolution, mask_ratio = fit.bucket
    head = (f"the {resolution} px bucket (mask ratio {mask_ratio}) needs {fit.memory.peak / GIB:.1f} GiB per GPU at "
            f"train.grad_accum_steps={fit.grad_accum_steps}, over the {pool_bytes / GIB:.1f} GiB memory pool of "
            f"{device_kind}")
    if fit.fitting_accum is None:
        return f"{head}; no accumulation fits: use a smaller model or a GPU with more memory"
    return (f"{head}; fits: --config.train.grad_accum_steps={fit.fitting_accum} "
            f"({per_device_batch // fit.fitting_accum} images per GPU per micro-batch, global batch {global_batch} "
            "kept), or 0 for the smallest that fits each bucket")


def compile_fitting(make_step: Callable[[tuple[int, float], int], Callable], buckets: Sequence[tuple[int, float]], *,
                    configured_accum: int, global_batch: int, mesh: jax.sharding.Mesh, pool_bytes: int | None,
                    **compile_kw: Any) -> list[BucketFit]:
    """Every bucket compiled (train/compile.py ``compile_buckets``, the run's shardings and donation) at the
    accumulation it runs with. ``make_step(bucket, accumulation)`` builds the uncompiled step; ``compile_kw``
    are ``compile_buckets``' state arguments."""
    def compile_one(bucket, accumulation):
        executables, seconds = compile_lib.compile_buckets(
            lambda b: make_step(b, accumulation), [bucket], mesh=mesh, global_batch=global_batch,
            resolution_of=lambda b: b[0], **compile_kw)
        return executables[bucket], seconds[bucket]

    per_device_batch = global_batch // int(mesh.devices.size)
    return [fit_bucket(compile_one, bucket, configured_accum=configured_accum, per_device_batch=per_device_batch,
                       pool_bytes=pool_bytes) for bucket in buckets]


def require_fit(fits: Sequence[BucketFit], *, pool_bytes: int | None, device_kind: str, per_device_batch: int,
                global_batch: int) -> None:
    """Raises ConfigError (one line, the first bucket that does not fit and the setting that does)."""
    for fit in fits:
        if not fit.fits:
            raise ConfigError(not_fitting_message(fit, pool_bytes=pool_bytes, device_kind=device_kind,
                                                  per_device_batch=per_device_batch, global_batch=global_batch))

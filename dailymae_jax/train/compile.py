"""Ahead-of-time compilation of every resolution bucket, and a counter of XLA compilations.

Progressive resolution changes the input shape at stage boundaries; a lazily jitted step would recompile
there, mid-run. Instead every distinct (resolution, mask ratio) of the schedule is lowered and compiled
before step 0, and the loop only picks the executable for the current stage.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from dailymae_jax.data.shard import DATA_AXIS

# JAX records this event once per XLA executable it builds (also when one comes from the persistent cache).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompilationCounter:
    """Counts XLA compilations while active: ``with counter: ...`` then ``counter.count``."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self._active = False
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == _BACKEND_COMPILE_EVENT and self._active:
            with self._lock:
                self.count += 1
                self.seconds += duration

    def __enter__(self) -> "CompilationCounter":
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False


def enable_persistent_cache(cache_dir: str) -> None:
    """Reuses compiled executables across runs (JAX's persistent compilation cache)."""
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def compile_buckets(make_step: Callable[[Any], Callable], buckets: Iterable[Any], *, abstract_state: Any,
                    state_shardings: Any, mesh: jax.sharding.Mesh, global_batch: int,
                    resolution_of: Callable[[Any], int],
                    compiler_options: dict[str, Any] | None = None) -> tuple[dict[Any, Any], dict[Any, float]]:
    """Lowers and compiles ``make_step(bucket)`` for each bucket; returns executables and seconds per bucket.

    The step signature is ``step(state, images_uint8, labels) -> (state, metrics)``; the state is donated,
    images and labels are sharded over the batch axis, metrics are replicated. ``compiler_options`` are XLA
    flags for these compilations only.
    """
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    replicated = NamedSharding(mesh, P())
    executables, seconds = {}, {}
    for bucket in buckets:
        resolution = resolution_of(bucket)
        images = jax.ShapeDtypeStruct((global_batch, resolution, resolution, 3), jnp.uint8,
                                      sharding=batch_sharding)
        labels = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch_sharding)
        start = time.perf_counter()
        jitted = jax.jit(make_step(bucket), in_shardings=(state_shardings, batch_sharding, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
        executables[bucket] = jitted.lower(abstract_state, images, labels).compile(compiler_options)
        seconds[bucket] = time.perf_counter() - start
    return executables, seconds


def flops_per_step(executable: Any) -> float | None:
    """FLOPs of one call of a compiled step, from XLA's cost analysis (None where the backend gives none)."""
    try:
        analysis = executable.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


# Dense (no structured sparsity) bf16 tensor-core peaks per device, from NVIDIA's datasheets, in FLOP/s.
# Matched as substrings of ``jax.Device.device_kind`` (e.g. "NVIDIA H100 80GB HBM3"), first match wins: the
# PCIe and NVL H100s come before the plain "H100" (the SXM part), and "GH200" before "H200".
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5
    ("GH200", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),  # SXM4 and PCIe alike
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def peak_bf16_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this kind, or None when the kind is not in the table (CPUs)."""
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def model_flops_utilization(flops_per_step: float | None, step_seconds: float,
                            peak_flops: float | None) -> float | None:
    """Achieved over peak FLOP rate of one device: ``flops_per_step / step_seconds / peak_flops``.

    ``flops_per_step`` is per device, as :func:`flops_per_step` returns it for an SPMD executable (XLA analyses
    the partitioned program), so the result is the same on 1 or n devices of one kind. None when either the
    FLOPs or the peak is unknown.
    """
    if not flops_per_step or not peak_flops or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak_flops

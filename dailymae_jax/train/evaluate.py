"""Standardized validation: top-1 / top-5 over the whole split, counted exactly, at one or more resolutions.

The compiled step returns per-class integer counts (images, top-1 hits, top-5 hits) summed over the real
slots of a global batch (``mask``; see data/eval_loader.py); the host adds them up over the batches. Integer
sums are exact in any order, so the result does not depend on the device or process count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dailymae_jax.data.eval_loader import EvalLoader
from dailymae_jax.data.shard import DATA_AXIS

# logits_fn(state, images_uint8) → (B, C) logits; the task decides how images are normalised and fed.
LogitsFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Accuracy of one pass over the split at one resolution."""

    resolution: int
    count: int  # images counted: the split's size
    top1: float  # fractions in [0, 1]
    top5: float
    per_class_count: tuple[int, ...]
    per_class_top1: tuple[int, ...]  # hits per class
    per_class_top5: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "count": self.count, "top1": self.top1, "top5": self.top5,
                "per_class_count": list(self.per_class_count), "per_class_top1": list(self.per_class_top1),
                "per_class_top5": list(self.per_class_top5)}


def make_eval_step(logits_fn: LogitsFn, num_classes: int, top_k: int = 5):
    """``step(state, images_uint8, labels, mask) -> {'count', 'top1', 'top5'}``, each (C,) int32 per class."""
    k = min(top_k, num_classes)

    def step(state: Any, images: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        logits = logits_fn(state, images).astype(jnp.float32)
        _, best = jax.lax.top_k(logits, k)  # (B, k), best first; ties go to the lower class index
        hit1 = best[:, 0] == labels
        hit5 = jnp.any(best == labels[:, None], axis=1)
        onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * mask[:, None].astype(jnp.int32)
        return {"count": onehot.sum(0), "top1": (onehot * hit1[:, None]).sum(0),
                "top5": (onehot * hit5[:, None]).sum(0)}

    return step


def compile_eval_step(step: Callable, *, abstract_state: Any, state_shardings: Any, mesh: jax.sharding.Mesh,
                      global_batch: int, resolution: int):
    """Ahead-of-time compiles ``step`` for one resolution (batch sharded, state as trained, counts replicated)."""
    batch = NamedSharding(mesh, P(DATA_AXIS))
    replicated = NamedSharding(mesh, P())
    images = jax.ShapeDtypeStruct((global_batch, resolution, resolution, 3), jnp.uint8, sharding=batch)
    labels = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch)
    mask = jax.ShapeDtypeStruct((global_batch,), jnp.bool_, sharding=batch)
    jitted = jax.jit(step, in_shardings=(state_shardings, batch, batch, batch), out_shardings=replicated)
    return jitted.lower(abstract_state, images, labels, mask).compile()


def evaluate(executable: Callable, state: Any, loader: EvalLoader) -> EvalResult:
    """One pass over the split; device work is queued batch after batch and fetched once at the end."""
    pending = [executable(state, images, labels, mask) for images, labels, mask in loader.batches()]
    totals = {key: np.zeros_like(np.asarray(value), dtype=np.int64) for key, value in pending[0].items()}
    for counts in jax.device_get(pending):
        for key, value in counts.items():
            totals[key] += np.asarray(value, dtype=np.int64)
    count = int(totals["count"].sum())
    if count != loader.num_samples:
        raise RuntimeError(f"evaluation counted {count} images, the split has {loader.num_samples}")
    return EvalResult(resolution=loader.resolution, count=count, top1=float(totals["top1"].sum() / count),
                      top5=float(totals["top5"].sum() / count),
                      per_class_count=tuple(int(c) for c in totals["count"]),
                      per_class_top1=tuple(int(c) for c in totals["top1"]),
                      per_class_top5=tuple(int(c) for c in totals["top5"]))

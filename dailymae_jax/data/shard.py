"""Host numpy batches → one global ``jax.Array`` sharded over the mesh's batch axis."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all (or the given) devices, with the batch axis named ``data``.

    Devices are ordered process by process, so each process's devices hold one contiguous block of the batch:
    the block the loader gives that process (EpochOrder), whatever order the runtime lists devices in.
    """
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


class BatchSharding:
    """Places each process's slice of a global batch on its devices, split along the batch axis."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.sharding = NamedSharding(mesh, P(DATA_AXIS))
        self.process_count = jax.process_count()

    def _global(self, local: np.ndarray) -> jax.Array:
        global_shape = (local.shape[0] * self.process_count, *local.shape[1:])
        return jax.make_array_from_process_local_data(self.sharding, local, global_shape)

    def images(self, local: np.ndarray) -> jax.Array:
        """uint8 (b, H, W, 3) on this process → uint8 (B, H, W, 3) global array."""
        if local.dtype != np.uint8:
            raise TypeError(f"images must be uint8 on the wire, got {local.dtype}")
        return self._global(local)

    def labels(self, local: np.ndarray) -> jax.Array:
        """int (b,) on this process → int32 (B,) global array."""
        return self._global(np.asarray(local, dtype=np.int32))

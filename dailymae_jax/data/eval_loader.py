"""Validation data: every image of the split exactly once, centre-cropped, in whole padded global batches.

The standardized validation transform (DailyMAE, and torchvision's Resize(256) + CenterCrop(224)) is the
centred square of side ``0.875 · min(H, W)`` resized to the output resolution (area averaging). Only that
square is decoded (data.decode.CenterCropDecoder); ``decoder_factory`` swaps in another decoder.

Exact counting: the split's N samples, in file order, fill ``ceil(N / B)`` global batches of B; the slots
past N are padding. Process p of P reads columns ``[p·B/P, (p+1)·B/P)`` of every global batch, as the
training loader does. Padding slots decode a real image (sample ``slot mod N``, so the decoder needs no
special case) and carry ``mask = False``; the compiled evaluation step counts only ``mask = True`` slots, so
each image counts once whatever the batch size, device count or process count.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from ffcv.fields.decoders import IntDecoder
from ffcv.loader import OrderOption

from dailymae_jax.data.decode import CenterCropDecoder
from dailymae_jax.data.loader import CheckedLoader
from dailymae_jax.data.shard import BatchSharding

VAL_CROP_RATIO = 0.875  # 224 / 256


def center_crop_decoder(resolution: int, ratio: float = VAL_CROP_RATIO) -> CenterCropDecoder:
    """Crop decode of the centre square of side ``int(ratio · min(H, W))``, area-resized to ``resolution``."""
    return CenterCropDecoder((resolution, resolution), ratio=ratio)


class EvalOrder:
    """Which samples this process reads for evaluation, padded to whole global batches, and which count."""

    def __init__(self, num_samples: int, global_batch: int, process_index: int = 0, process_count: int = 1):
        if num_samples < 1:
            raise ValueError("the validation split is empty")
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(f"eval.global_batch_size {global_batch} is not a positive multiple of the process "
                             f"count {process_count}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.steps = math.ceil(num_samples / global_batch)

    def _slots(self) -> np.ndarray:
        """(steps, local_batch) global slot numbers read by this process."""
        start = self.process_index * self.local_batch
        slots = np.arange(self.steps * self.global_batch).reshape(self.steps, self.global_batch)
        return slots[:, start:start + self.local_batch]

    def process_indices(self) -> np.ndarray:
        """Sample indices this process decodes, batch after batch (padding slots repeat real samples)."""
        return (self._slots() % self.num_samples).reshape(-1).astype(np.uint64)

    def process_mask(self) -> np.ndarray:
        """(steps, local_batch) bool: True where the slot is a real sample, False for padding."""
        return self._slots() < self.num_samples


class _Order:
    """ffcv traversal order that returns exactly the indices we give it (ffcv iterates ``sample_order``)."""

    def __init__(self, indices: np.ndarray):
        self.indices = indices

    def sample_order(self, epoch: int) -> np.ndarray:
        del epoch
        return self.indices


class EvalLoader:
    """Centre-crop batches of one resolution as global device arrays (images uint8, labels int32, mask bool).

    The ffcv pipeline is built and its numba code compiled in the constructor, so the first evaluation in
    the middle of a run does not pause to compile.
    """

    def __init__(self, beton: str | Path, *, resolution: int, order: EvalOrder, sharding: BatchSharding,
                 num_workers: int, crop_ratio: float = VAL_CROP_RATIO,
                 decoder_factory: Callable[[int, float], object] = center_crop_decoder):
        self.resolution = resolution
        self.order = order
        self.sharding = sharding
        indices = order.process_indices()
        self._mask = order.process_mask()
        self._loader = CheckedLoader(
            str(beton), batch_size=order.local_batch, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
            drop_last=False, indices=indices, batches_ahead=2,
            pipelines={"image": [decoder_factory(resolution, crop_ratio)], "label": [IntDecoder()]})
        self._loader.traversal_order = _Order(indices)
        start = time.perf_counter()
        warm = iter(self._loader)
        next(warm)
        warm.close()
        self.warmup_seconds = time.perf_counter() - start

    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    def host_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """This process's (images, labels, mask) numpy batches, copied out of ffcv's reused buffers."""
        for step, (images, labels) in enumerate(self._loader):
            yield np.array(images), np.asarray(labels, dtype=np.int32).reshape(-1), self._mask[step]

    def batches(self) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """Global (images, labels, mask) arrays sharded over the batch axis."""
        global_shape = (self.order.global_batch,)
        for images, labels, mask in self.host_batches():
            yield (self.sharding.images(images), self.sharding.labels(labels),
                   jax.make_array_from_process_local_data(self.sharding.sharding, mask, global_shape))

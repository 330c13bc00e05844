"""Training loader: one FFCV pipeline per resolution bucket, a global sample order, and a prefetch thread.

The order of samples depends only on (seed, epoch), never on the number of processes or devices: every epoch
is a permutation of the dataset cut into global batches, and each process decodes only its own contiguous
slice of every global batch. That makes a run's data identical on 1 or 64 devices, and lets a run resume at
any (epoch, step).

Batches leave this module as uint8 on the wire: normalisation and float conversion happen on device, inside
the compiled step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from ffcv.fields.decoders import IntDecoder
from ffcv.loader import Loader, OrderOption

from dailymae_jax.data.decode import KEY_GROUP, CropDecoder, RandomResizedCropDecoder, process_share_problem
from dailymae_jax.data.shard import BatchSharding
from dailymae_jax.schedule import Stage, stage_at


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """RandomResizedCrop parameters (torchvision's meaning).

    ``flip`` mirrors half of the crops in the decoder (free: it is folded into the resampling). Pretraining
    leaves it off and flips on device instead (config.data.hflip, see augment.random_flip).
    """

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False


class EpochOrder:
    """Which samples this process reads, in which order, for each epoch.

    Epoch ``e`` is ``permutation(num_samples)`` drawn from ``numpy.random.default_rng([seed, e])``, cut into
    ``steps_per_epoch`` global batches (the remainder is dropped, as with drop_last). Process ``p`` of ``P``
    reads columns ``[p·B/P, (p+1)·B/P)`` of every global batch; with several processes B/P must be even, so
    that every slice starts at an even position and the crop keys (decode.pair_key) match a single process's.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"data.global_batch_size {global_batch} is not divisible by the process count "
                             f"{process_count}")
        problem = process_share_problem(global_batch, process_count)
        if problem:
            # Crops are keyed by aligned pairs of batch positions (decode.pair_key): a process slice that starts
            # at an odd position would pair its samples differently from a single process.
            raise ValueError(f"{problem}; it must be a multiple of {KEY_GROUP} for crops that do not depend on the "
                             f"process count")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seed = seed
        self.process_index = process_index
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.global_batch_size {global_batch} is larger than the dataset "
                             f"({num_samples} samples)")

    def global_batches(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, global_batch) sample indices of ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        used = self.steps_per_epoch * self.global_batch
        return rng.permutation(self.num_samples)[:used].reshape(self.steps_per_epoch, self.global_batch)

    def process_indices(self, epoch: int, start_step: int = 0) -> np.ndarray:
        """This process's indices for ``epoch`` from ``start_step`` on, flattened batch after batch."""
        start = self.process_index * self.local_batch
        share = self.global_batches(epoch)[start_step:, start:start + self.local_batch]
        return share.reshape(-1).astype(np.uint64)


class _FixedOrder:
    """Stands in for ffcv's TraversalOrder: ffcv iterates whatever ``indices`` we set before ``iter()``."""

    def __init__(self, indices: np.ndarray):
        self.indices = indices

    def sample_order(self, epoch: int) -> np.ndarray:
        del epoch  # the order was chosen by EpochOrder already
        return self.indices


class CheckedLoader(Loader):
    """An ffcv Loader that raises, after the batch that hit it, the first sample its crop decoders could not
    decode (the decoders record failures instead of raising inside ffcv's worker thread)."""

    def __iter__(self) -> Iterator:
        decoders = [spec.decoder for spec in self.pipeline_specs.values() if isinstance(spec.decoder, CropDecoder)]
        return _checked(super().__iter__(), decoders, self.fname)


# A stopped decoding thread finishes at most the few batches it holds; one that is stuck must not hang the exit.
_THREAD_STOP_SECONDS = 60.0


def _checked(epoch: Iterator, decoders: list[CropDecoder], source: str) -> Iterator:
    try:
        for batch in epoch:
            for decoder in decoders:
                decoder.raise_if_failed(source)
            yield batch
    finally:
        _stop(epoch)


def _stop(epoch) -> None:
    """Stop ffcv's decoding thread, wait for it, then release its buffers.

    ffcv's own close() releases the buffers at once and leaves the thread behind: it notices the request only
    while waiting on a full queue, and at the end of an epoch it blocks for good putting its end marker into a
    full queue nobody reads. A thread left running (or blocked) when the interpreter exits can abort the
    process ("FATAL: exception not rethrown"). So: ask it to stop, take a batch off its queue now and then to
    unblock that last put, and wait until it has ended.
    """
    epoch.terminate_event.set()
    deadline = time.monotonic() + _THREAD_STOP_SECONDS
    while epoch is not threading.current_thread() and epoch.is_alive() and time.monotonic() < deadline:
        epoch.join(0.5)
        with contextlib.suppress(queue.Empty):
            epoch.output_queue.get_nowait()
    epoch.close()


def build_ffcv_loader(beton: str | Path, *, resolution: int, local_batch: int, num_workers: int,
                      crop: CropSpec, epoch_indices: np.ndarray, seed: int) -> Loader:
    """An ffcv Loader that crop-decodes random crops at ``resolution`` for whatever order we hand it.

    ``epoch_indices`` must be a whole epoch's share: ffcv fixes the loader's length from it.
    """
    loader = CheckedLoader(
        str(beton), batch_size=local_batch, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
        drop_last=True, indices=epoch_indices, batches_ahead=2,
        pipelines={
            "image": [RandomResizedCropDecoder((resolution, resolution), scale=crop.scale, ratio=crop.ratio,
                                               flip=crop.flip, seed=seed)],
            "label": [IntDecoder()],
        })
    loader.traversal_order = _FixedOrder(epoch_indices)
    return loader


@dataclasses.dataclass
class Batch:
    """One global batch on device and where it sits in the run."""

    epoch: int
    step_in_epoch: int
    stage: Stage
    images: jax.Array  # uint8 (B, R, R, 3), sharded over the batch axis
    labels: jax.Array  # int32 (B,)


class TrainLoader:
    """Decodes the run's batches, epoch after epoch, switching resolution bucket at stage boundaries.

    All bucket pipelines are built and warmed up (numba-compiled) in the constructor, so a stage switch never
    waits for compilation. Iterating starts a background thread that decodes, copies out of ffcv's reused
    buffers and places batches on the devices ``prefetch`` batches ahead of the training step.
    """

    def __init__(self, beton: str | Path, *, stages: Sequence[Stage], order: EpochOrder,
                 sharding: BatchSharding, num_workers: int, crop: CropSpec = CropSpec(),
                 prefetch: int = 2):
        self.stages = tuple(stages)
        self.order = order
        self.sharding = sharding
        self.prefetch = prefetch
        epoch_indices = order.process_indices(0)
        self._loaders: dict[int, Loader] = {}
        self.warmup_seconds: dict[int, float] = {}
        for resolution in sorted({s.resolution for s in self.stages}):
            start = time.perf_counter()
            loader = build_ffcv_loader(beton, resolution=resolution, local_batch=order.local_batch,
                                       num_workers=num_workers, crop=crop, epoch_indices=epoch_indices,
                                       seed=order.seed)
            loader.traversal_order = _FixedOrder(epoch_indices[:order.local_batch])
            iterator = iter(loader)
            next(iterator)  # compiles the numba pipeline for this bucket
            iterator.close()
            self._loaders[resolution] = loader
            self.warmup_seconds[resolution] = time.perf_counter() - start

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def host_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This process's (images, labels) numpy batches for ``epoch``, copied out of ffcv's buffers."""
        stage = stage_at(self.stages, epoch)
        loader = self._loaders[stage.resolution]
        loader.traversal_order = _FixedOrder(self.order.process_indices(epoch, start_step))
        for images, labels in loader:
            # ffcv reuses its output buffers a few batches later: copy before handing the batch on.
            yield np.array(images), np.asarray(labels, dtype=np.int32).reshape(-1)

    def batches(self, start_epoch: int, start_step: int, num_epochs: int) -> Iterator[Batch]:
        """Global device batches from (start_epoch, start_step) to the end of the run, prefetched."""
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for epoch in range(start_epoch, num_epochs):
                    stage = stage_at(self.stages, epoch)
                    first = start_step if epoch == start_epoch else 0
                    step = first
                    for images, labels in self.host_batches(epoch, first):
                        batch = Batch(epoch, step, stage, self.sharding.images(images),
                                      self.sharding.labels(labels))
                        while not stop.is_set():
                            try:
                                out.put(batch, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                        step += 1
                out.put(done)
            except BaseException as error:  # surfaced in the consumer, not lost in a thread
                out.put(error)

        thread = threading.Thread(target=produce, name="dailymae-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Wait for the producer (and, through its cleanup, ffcv's thread): none may outlive the iteration.
            # Taking what it still hands over unblocks a producer stuck on a full queue.
            stop.set()
            deadline = time.monotonic() + _THREAD_STOP_SECONDS
            while thread.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    out.get(timeout=0.1)

"""FFCV decoders that decode only the crop, with reproducible random crops.

Both decoders call the crop-decode kernel (:mod:`dailymae_jax.data.jpeg_crop`) once per sample from ffcv's
numba-compiled, thread-parallel pipeline code: the kernel decodes the crop's MCU-aligned region at the smallest
DCT scale that still covers the output, then resamples it (bicubic for random crops, area averaging for centre
crops). Raw (uncompressed) records are resampled by the same code. The only per-sample buffer is the output:
the kernel's scratch is per thread and crop-sized, where ffcv's stock decoders keep a full-image buffer for
every sample of every batch in flight.

Stock ffcv's RandomResizedCrop draws from numba's per-thread generators, which nothing seeds: two runs, or a
run and its resumption, see different crops. Here every sample's crop is drawn from a generator seeded by
(run seed, sample index, pair key), where the pair key hashes the sample indices at batch positions 2k and
2k+1, the pair the sample belongs to. Our sample order is a function of (seed, epoch) (see loader.EpochOrder),
so a sample's partner, and with it its crop, changes from epoch to epoch. Pairs rather than whole batches: a
process decodes only its slice of each global batch, and slices start at even positions whenever the
per-process batch is even, so every pair, and every crop, is the same for any number of processes.

The crop box follows torchvision's RandomResizedCrop: area fraction U(scale), log-uniform aspect ratio,
ten tries, then a centred crop clamped to the ratio range.

A sample that fails to decode gets a black image and is recorded; :meth:`CropDecoder.raise_if_failed` (called
by the loaders after every batch) turns the record into an error naming the sample. Raising inside the
pipeline would kill ffcv's worker thread and leave the consumer waiting forever.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import replace
from typing import Callable

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

from dailymae_jax.data.beton import BetonError
from dailymae_jax.data.jpeg_crop import (ERROR_RECORD_BYTES, FLIP, decode_into, interpolation_flags,
                                         read_error_record, record_error, resize_into)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=False, nogil=True)
def mix_seed(seed: int, sample: int, batch_key: int) -> int:
    """A well-spread 31-bit seed from three integers (splitmix64's finaliser)."""
    x = np.uint64(seed) * _GOLDEN + np.uint64(sample)
    x = (x ^ np.uint64(batch_key)) * _GOLDEN
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    return np.int64(x & np.uint64(0x7FFFFFFF))


@numba.njit(cache=False, nogil=True)
def batch_key(batch_indices: np.ndarray) -> int:
    """Order-sensitive hash of a batch's sample indices."""
    key = np.uint64(1469598103934665603)
    for index in batch_indices:
        key = (key ^ np.uint64(index)) * np.uint64(1099511628211)
    return np.int64(key & np.uint64(0x7FFFFFFFFFFFFFFF))


KEY_GROUP = 2  # samples per crop key: must divide the per-process batch for crops independent of process count


@numba.njit(cache=False, nogil=True)
def pair_key(batch_indices: np.ndarray, position: int) -> int:
    """The key of the sample at ``position``: a hash of its aligned group (positions 2k, 2k+1) of the batch."""
    start = position - position % KEY_GROUP
    return batch_key(batch_indices[start:start + KEY_GROUP])


def process_share_problem(global_batch: int, process_count: int) -> str | None:
    """What makes the crops depend on the process count, or None: with several processes, each one's share of a
    global batch must be a multiple of KEY_GROUP, so that its slice starts on a key group's first position."""
    share = global_batch // process_count
    if process_count > 1 and share % KEY_GROUP:
        return f"data.global_batch_size {global_batch} over {process_count} processes gives {share} samples per process"
    return None


@numba.njit(cache=False, nogil=True)
def random_resized_crop_box(height: int, width: int, scale_low: float, scale_high: float,
                            log_ratio_low: float, log_ratio_high: float) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) as torchvision's RandomResizedCrop.get_params draws it."""
    area = height * width
    for _ in range(10):
        target_area = area * np.random.uniform(scale_low, scale_high)
        aspect = math.exp(np.random.uniform(log_ratio_low, log_ratio_high))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.random.randint(0, height - h + 1)
            left = np.random.randint(0, width - w + 1)
            return top, left, h, w
    ratio_low, ratio_high = math.exp(log_ratio_low), math.exp(log_ratio_high)
    in_ratio = width / height
    if in_ratio < ratio_low:
        w, h = width, int(round(width / ratio_low))
    elif in_ratio > ratio_high:
        h, w = height, int(round(height * ratio_high))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit(cache=False, nogil=True)
def center_crop_box(height: int, width: int, ratio: float) -> tuple[int, int, int, int]:
    """(top, left, side, side): the centred square of side int(ratio * min(height, width)), as ffcv's
    CenterCropRGBImageDecoder cuts it (ratio 0.875 = Resize(256/224 * size) + CenterCrop(size))."""
    side = max(1, int(ratio * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


class CropDecoder(SimpleRGBImageDecoder):
    """Base of the crop-decode decoders for ``RGBImageField``: one C call per sample, output-sized buffers only.

    (ffcv only accepts instances of the field's default decoder class, SimpleRGBImageDecoder, as the first
    operation of a pipeline; nothing else of it is used.) Subclasses provide :meth:`crop_params_code`, a numba
    function ``(height, width, sample, key) -> (top, left, crop_height, crop_width, flip)``.
    """

    def __init__(self, output_size: tuple[int, int], interpolation: str):
        super().__init__()
        if len(output_size) != 2 or min(output_size) < 1:
            raise ValueError(f"output_size must be (height, width) with positive sides, got {output_size}")
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.flags = interpolation_flags(interpolation)
        self.interpolation = interpolation
        # [failures, first failing sample, message]: written by the C kernel's threads, read by raise_if_failed.
        self.errors = np.zeros(ERROR_RECORD_BYTES // 8, np.int64)

    @abstractmethod
    def crop_params_code(self) -> Callable:
        """The numba function that gives a sample's crop box and flip."""

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        shape = (*self.output_size, 3)
        state = replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1"))
        return state, AllocationQuery(shape, np.dtype("u1"))

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        each = Compiler.get_iterator()
        decode_c = Compiler.compile(decode_into)
        resize_c = Compiler.compile(resize_into)
        record_c = Compiler.compile(record_error)
        params = self.crop_params_code()
        base_flags = self.flags
        errors_address = self.errors.ctypes.data

        def decode(batch_indices, destination, metadata, storage_state):
            for dst_ix in each(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.int32(field["height"]), np.int32(field["width"])
                top, left, h, w, flip = params(height, width, source_ix, pair_key(batch_indices, dst_ix))
                flags = (base_flags | FLIP) if flip else base_flags
                out = destination[dst_ix]
                if field["mode"] == jpg:
                    code = decode_c(data, top, left, h, w, out, flags)
                else:
                    code = resize_c(data, height, width, top, left, h, w, out, flags)
                if code != 0:
                    out[:] = 0
                    record_c(errors_address, np.int64(source_ix), code)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

    def raise_if_failed(self, source: str) -> None:
        """Raise BetonError naming ``source`` (the file) and the first sample that failed to decode since the
        last call, if any: a one-line "data error" for the command line (main.py)."""
        failures, sample, message = read_error_record(self.errors)
        if failures:
            self.errors[:] = 0
            raise BetonError(f"{source}: {failures} sample(s) failed to decode; first: sample {sample}: {message}")


class RandomResizedCropDecoder(CropDecoder):
    """Seeded torchvision RandomResizedCrop (+ optional horizontal flip), crop-decoded, bicubic resampling.

    ``seed`` is the run's seed; ``flip`` mirrors each sample with probability 1/2 (drawn after the box).
    """

    def __init__(self, output_size: tuple[int, int], *, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False, seed: int = 0,
                 interpolation: str = "bicubic"):
        super().__init__(output_size, interpolation)
        if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"scale and ratio must be increasing positive pairs, got {scale} and {ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = bool(flip)
        self.seed = int(seed)

    def crop_params_code(self) -> Callable:
        scale_low, scale_high = self.scale
        log_ratio_low, log_ratio_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        seed, flip = self.seed, self.flip

        @numba.njit(cache=False, nogil=True)
        def params(height, width, source_ix, key):
            # Seeding the generator of the thread that handles this sample makes its crop independent of
            # which thread that is.
            np.random.seed(mix_seed(seed, source_ix, key))
            top, left, h, w = random_resized_crop_box(height, width, scale_low, scale_high, log_ratio_low,
                                                      log_ratio_high)
            return top, left, h, w, flip and np.random.random() < 0.5

        return params


class CenterCropDecoder(CropDecoder):
    """The standardized validation transform: centred square of side ``ratio`` * short side, area resampling."""

    def __init__(self, output_size: tuple[int, int], *, ratio: float = 0.875, interpolation: str = "area"):
        super().__init__(output_size, interpolation)
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)

    def crop_params_code(self) -> Callable:
        ratio = self.ratio

        @numba.njit(cache=False, nogil=True)
        def params(height, width, source_ix, key):
            top, left, h, w = center_crop_box(height, width, ratio)
            return top, left, h, w, False

        return params

"""FFCV decoders with reproducible random crops.

Stock ffcv's RandomResizedCrop draws from numba's per-thread generators, which nothing seeds: two runs, or a
run and its resumption, see different crops. Here every sample's crop is drawn from a generator seeded by
(run seed, sample index, pair key), where the pair key hashes the sample indices at batch positions 2k and
2k+1, the pair the sample belongs to. Our sample order is a function of (seed, epoch) (see loader.EpochOrder),
so a sample's partner, and with it its crop, changes from epoch to epoch. Pairs rather than whole batches: a
process decodes only its slice of each global batch, and slices start at even positions whenever the
per-process batch is even, so every pair, and every crop, is the same for any number of processes.

The crop box follows torchvision's RandomResizedCrop: area fraction U(scale), log-uniform aspect ratio,
ten tries, then a centred crop clamped to the ratio range.
"""

from __future__ import annotations

import math
from typing import Callable

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler

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


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """ffcv decoder: full JPEG decode, seeded RandomResizedCrop box, resize to ``output_size``.

    Raw (uncompressed) records are cropped directly. ``seed`` is the run's seed.
    """

    def __init__(self, output_size: tuple[int, int], *, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), seed: int = 0):
        super().__init__(output_size)
        self.scale = scale
        self.ratio = ratio
        self.seed = seed

    @property
    def get_crop_generator(self):  # required by the abstract base; our generate_code draws boxes itself
        return random_resized_crop_box

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        each = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        scale_low, scale_high = float(self.scale[0]), float(self.scale[1])
        log_ratio_low, log_ratio_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        seed = int(self.seed)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            for dst_ix in each(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    pixels = scratch[dst_ix]
                    imdecode_c(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
                    pixels = pixels.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    pixels = data.reshape(height, width, 3)
                # Seeding the generator of the thread that handles this sample makes its crop independent of
                # which thread that is.
                np.random.seed(mix_seed(seed, source_ix, pair_key(batch_indices, dst_ix)))
                top, left, h, w = random_resized_crop_box(height, width, scale_low, scale_high,
                                                          log_ratio_low, log_ratio_high)
                resize_crop_c(pixels, top, top + h, left, left + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

"""Sample order, seeded crops and the prefetching loader, on the sample photographs."""

import math
import threading
import time

import numba
import numpy as np
import pytest
from ffcv.reader import Reader

from dailymae_jax.data import decode_crop
from dailymae_jax.data.decode import RandomResizedCropDecoder, pair_key, random_resized_crop_box
from dailymae_jax.data.loader import EpochOrder, TrainLoader
from dailymae_jax.data.shard import BatchSharding, make_mesh
from dailymae_jax.schedule import Stage

from beton_read import jpeg_blobs  # noqa: E402  (pytest puts tests/data first on the import path)


def test_epoch_order_is_a_permutation_and_independent_of_process_count():
    single = EpochOrder(100, 24, seed=3)
    batches = single.global_batches(0)
    assert batches.shape == (4, 24) and len(np.unique(batches)) == 96  # drop_last, no repeats
    assert not np.array_equal(single.global_batches(1), batches)  # a new order each epoch
    np.testing.assert_array_equal(EpochOrder(100, 24, seed=3).global_batches(0), batches)  # same (seed, epoch)
    # Four processes read disjoint slices whose concatenation, batch by batch, is the single-process batch.
    shares = [EpochOrder(100, 24, 3, p, 4).process_indices(0).reshape(4, 6) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(shares, axis=1), batches)
    # Resuming at step 2 skips exactly two batches.
    np.testing.assert_array_equal(single.process_indices(0, start_step=2), batches[2:].reshape(-1))


def test_epoch_order_rejects_impossible_batches():
    with pytest.raises(ValueError, match="process count"):
        EpochOrder(100, 10, 0, 0, 4)
    with pytest.raises(ValueError, match="larger than the dataset"):
        EpochOrder(10, 16, 0)
    # An odd share per process would start slices at odd positions and split crop-key pairs.
    with pytest.raises(ValueError, match="6 over 2 processes gives 3 samples per process; it must be a multiple "
                                         "of 2"):
        EpochOrder(100, 6, 0, 1, 2)
    assert EpochOrder(100, 7, 0).local_batch == 7  # one process: no slice, no constraint


def test_crop_keys_of_a_process_slice_match_the_global_batch():
    batch = np.random.default_rng(1).permutation(1000)[:24].astype(np.uint64)
    keys = [pair_key(batch, i) for i in range(24)]
    assert len(set(keys)) == 12  # one key per pair
    for share in (2, 6, 12):  # even shares: every slice starts at an even position
        for start in range(0, 24, share):
            local = batch[start:start + share].copy()
            assert [pair_key(local, i) for i in range(share)] == keys[start:start + share]
    # Odd shares (refused by EpochOrder) would pair samples differently.
    assert [pair_key(batch[3:6].copy(), i) for i in range(3)] != keys[3:6]


@numba.njit(cache=False)
def _draw_boxes(count, height, width, scale_low, scale_high, log_ratio_low, log_ratio_high):
    np.random.seed(0)  # numba's generator: seeding it from Python would not reach it
    boxes = np.empty((count, 4), np.int64)
    for k in range(count):
        boxes[k] = random_resized_crop_box(height, width, scale_low, scale_high, log_ratio_low, log_ratio_high)
    return boxes


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    points = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), points, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("height, width, scale", [(375, 500, (0.2, 1.0)), (500, 333, (0.08, 1.0)),
                                                  (64, 64, (0.2, 1.0)), (100, 300, (0.35, 1.0))])
def test_crop_boxes_are_distributed_as_torchvision_draws_them(height, width, scale):
    # torchvision's RandomResizedCrop.get_params is the definition; the two generators differ, so compare the
    # distributions of 20000 draws. Critical KS distance for two samples of 20000 at p = 1e-6: 0.027. A
    # uniform instead of log-uniform aspect ratio, or a wrong area range, moves them further than that.
    import torch
    from torchvision.transforms import RandomResizedCrop

    count, ratio = 20000, (3 / 4, 4 / 3)
    ours = _draw_boxes(count, height, width, *scale, math.log(ratio[0]), math.log(ratio[1]))
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    theirs = np.array([RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(count)])
    full = float(height * width)
    for name, of in [("area fraction", lambda b: b[:, 2] * b[:, 3] / full),
                     ("log aspect", lambda b: np.log(b[:, 3] / b[:, 2])),
                     ("centre row", lambda b: (b[:, 0] + b[:, 2] / 2) / height),
                     ("centre column", lambda b: (b[:, 1] + b[:, 3] / 2) / width)]:
        distance = _ks_distance(of(ours), of(theirs))
        assert distance < 0.027, (name, distance)
    # Both fall back to the centred, ratio-clamped box equally often (when ten tries all fail).
    in_ratio = width / height
    fallback_w = round(height * ratio[1]) if in_ratio > ratio[1] else width
    fallback_h = round(width / ratio[0]) if in_ratio < ratio[0] else height
    fallback = ((height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w)
    rates = [np.mean(np.all(b == fallback, axis=1)) for b in (ours, theirs)]
    assert abs(rates[0] - rates[1]) < 0.01, (fallback, rates)


def test_crop_boxes_stay_inside_the_image():
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for height, width in [(375, 500), (500, 333), (64, 64), (20, 400)]:
        for _ in range(200):
            top, left, h, w = random_resized_crop_box(height, width, 0.2, 1.0, log_lo, log_hi)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
            if (height, width) != (20, 400):  # a very wide image falls back to a centred, ratio-clamped crop
                assert 0.2 * 0.9 <= h * w / (height * width) <= 1.0 + 1e-9
                assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert random_resized_crop_box(20, 400, 0.2, 1.0, log_lo, log_hi) == (0, (400 - 27) // 2, 20, 27)  # h = 20, w = round(20·4/3)


@pytest.fixture(scope="module")
def loader(sample_beton):
    order = EpochOrder(112, 16, seed=0)
    return TrainLoader(sample_beton, stages=(Stage(0, 64, 0.75), Stage(1, 32, 0.75)), order=order,
                       sharding=BatchSharding(make_mesh()), num_workers=2)


def test_loader_batches_follow_the_order_and_stages(loader, sample_beton):
    reader = Reader(str(sample_beton))
    labels_on_disk = np.asarray(reader.metadata["f1"])
    batches = list(loader.batches(start_epoch=0, start_step=5, num_epochs=2))
    assert [(b.epoch, b.step_in_epoch) for b in batches] == [(0, 5), (0, 6)] + [(1, s) for s in range(7)]
    assert batches[0].images.shape == (16, 64, 64, 3) and batches[0].images.dtype == np.uint8
    assert batches[-1].images.shape == (16, 32, 32, 3) and batches[-1].stage.resolution == 32
    expected = labels_on_disk[loader.order.global_batches(1)[3]]
    np.testing.assert_array_equal(np.asarray(batches[2 + 3].labels), expected)
    assert all(np.asarray(b.images).std() > 10 for b in batches)  # real pixels, not blank buffers


def test_stopping_early_leaves_no_decoding_thread_behind(loader):
    # A thread still decoding when the interpreter exits can abort the process; closing the iteration waits
    # for ours and for ffcv's.
    from ffcv.loader.epoch_iterator import EpochIterator

    def decoding_threads():
        return [t for t in threading.enumerate() if t.is_alive() and
                (t.name == "dailymae-prefetch" or isinstance(t, EpochIterator))]

    batches = loader.batches(start_epoch=0, start_step=0, num_epochs=2)
    next(batches)
    next(batches)
    batches.close()
    assert not decoding_threads()
    # Stopped two batches before the end of the epoch: ffcv's thread fills its queue with them, then blocks
    # putting its end-of-epoch marker. Closing must still be quick and leave nothing behind.
    host = loader.host_batches(0)
    for _ in range(loader.steps_per_epoch - 2):
        next(host)
    time.sleep(2)
    start = time.monotonic()
    host.close()
    assert time.monotonic() - start < 10 and not decoding_threads()


def test_crops_are_reproducible_and_change_between_epochs(loader):
    first = [images for images, _ in loader.host_batches(0)]
    again = [images for images, _ in loader.host_batches(0)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # A resumed epoch decodes exactly the batches it would have decoded.
    resumed = [images for images, _ in loader.host_batches(0, start_step=3)]
    for a, b in zip(first[3:], resumed):
        np.testing.assert_array_equal(a, b)
    # The same sample gets another crop in another epoch.
    order = loader.order
    sample = order.global_batches(0)[0][0]
    row, col = np.argwhere(order.global_batches(1) == sample)[0]
    next_epoch = [images for images, _ in loader.host_batches(1)]
    assert not np.array_equal(first[0][0], next_epoch[row][col])


def _stored_images(beton) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Every sample's JPEG bytes, height and width, read with ffcv's Reader (not through a loader)."""
    metadata = Reader(str(beton)).metadata["f0"]
    assert (metadata["mode"] == 0).all()  # the sample dataset is all JPEG
    return jpeg_blobs(beton), metadata["height"].astype(int), metadata["width"].astype(int)


def test_loader_pixels_are_decode_crop_of_the_seeded_boxes(loader, sample_beton):
    # Bit for bit: the loader runs decode_crop's kernel on the box its decoder draws from (seed, sample, pair).
    blobs, heights, widths = _stored_images(sample_beton)
    params = RandomResizedCropDecoder((1, 1), seed=loader.order.seed).crop_params_code()  # CropSpec's defaults
    for epoch, resolution in ((0, 64), (1, 32)):
        order = loader.order.global_batches(epoch)
        for step, (images, _) in zip(range(2), loader.host_batches(epoch)):
            indices = order[step].astype(np.uint64)
            for position, sample in enumerate(indices):
                top, left, h, w, flip = params(heights[sample], widths[sample], sample, pair_key(indices, position))
                assert not flip
                expected = decode_crop(blobs[sample], (top, left, h, w), (resolution, resolution), flip)
                np.testing.assert_array_equal(images[position], expected, err_msg=f"{epoch=} {step=} {position=}")

"""Sample order, seeded crops and the prefetching loader, on the sample photographs."""

import math
import threading
import time

import numpy as np
import pytest
from ffcv.reader import Reader

from dailymae_jax.data.decode import random_resized_crop_box
from dailymae_jax.data.loader import EpochOrder, TrainLoader
from dailymae_jax.data.shard import BatchSharding, make_mesh
from dailymae_jax.train.schedule import Stage


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


def test_crop_boxes_follow_random_resized_crop():
    np.random.seed(0)
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

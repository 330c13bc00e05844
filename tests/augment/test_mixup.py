"""Mixup / CutMix / label smoothing: label mass, box areas against λ, partners within device groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dailymae_jax.augment import mixup

C = 10
# Compiled once per configuration: eager dispatch of every small op would dominate these tests' time.
mix_batch = jax.jit(mixup.mix_batch, static_argnames=("num_classes", "cfg", "groups"))


def distinct_images(batch, size=32):
    """Sample i is the constant image i + 1 (channel-independent), so every pixel tells its source."""
    return jnp.broadcast_to(jnp.arange(1, batch + 1, dtype=jnp.float32)[:, None, None, None], (batch, size, size, 3))


def test_label_smoothing_values_and_mass():
    targets = np.asarray(mixup.smooth_one_hot(jnp.array([0, 3, 9]), C, 0.1))
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    assert np.isclose(targets[1, 3], 0.9 + 0.01) and np.isclose(targets[1, 0], 0.01)


def test_cutmix_box_area_matches_lambda_and_targets():
    batch, groups = 8, 2
    images, labels = distinct_images(batch), jnp.arange(batch) % C
    cfg = mixup.MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.1)
    seen_partial = False
    for seed in range(20):
        mixed, targets, lam = mix_batch(jax.random.PRNGKey(seed), images, labels, num_classes=C, cfg=cfg,
                                              groups=groups)
        mixed, targets, lam = np.asarray(mixed), np.asarray(targets), np.asarray(lam)
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
        per_group = batch // groups
        for i in range(batch):
            g, j = divmod(i, per_group)
            partner = g * per_group + per_group - 1 - j  # mirrored within the device's group
            own = mixed[i, ..., 0] == i + 1
            from_partner = mixed[i, ..., 0] == partner + 1
            assert np.all(own | from_partner)  # pixels come only from the sample and its partner
            if partner != i:
                # The pasted area is exactly 1 − λ of the image, and it is one axis-aligned box.
                np.testing.assert_allclose(from_partner.mean(), 1.0 - lam[g], atol=1e-6)
                rows, cols = np.flatnonzero(from_partner.any(1)), np.flatnonzero(from_partner.any(0))
                if rows.size:
                    assert from_partner.sum() == rows.size * cols.size
                    seen_partial |= 0 < from_partner.mean() < 1
            expected = (lam[g] * np.asarray(mixup.smooth_one_hot(labels[i:i + 1], C, 0.1))[0]
                        + (1 - lam[g]) * np.asarray(mixup.smooth_one_hot(labels[partner:partner + 1], C, 0.1))[0])
            np.testing.assert_allclose(targets[i], expected, rtol=1e-5, atol=1e-7)
    assert seen_partial


def test_mixup_blends_with_lambda():
    batch = 6
    images, labels = distinct_images(batch, 4), jnp.arange(batch)
    cfg = mixup.MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.0)
    mixed, targets, lam = mix_batch(jax.random.PRNGKey(1), images, labels, num_classes=C, cfg=cfg)
    lam = float(lam[0])
    assert 0.0 < lam < 1.0
    for i in range(batch):
        partner = batch - 1 - i
        np.testing.assert_allclose(np.asarray(mixed)[i], lam * (i + 1) + (1 - lam) * (partner + 1), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(targets)[i, i], lam, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(targets)[i, partner], 1 - lam, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, rtol=1e-5)


def test_switch_probability_picks_both_modes_and_prob_zero_is_smoothing_only():
    batch = 4
    images, labels = distinct_images(batch, 16), jnp.arange(batch)
    cfg = mixup.MixupConfig()  # mixup 0.8, cutmix 1.0, switch 0.5
    modes = set()
    for seed in range(40):
        mixed, _, _ = mix_batch(jax.random.PRNGKey(seed), images, labels, num_classes=C, cfg=cfg)
        values = np.unique(np.asarray(mixed)[0])
        modes.add("cutmix" if set(values) <= {1.0, 4.0} else "mixup")
    assert modes == {"cutmix", "mixup"}
    off = mixup.MixupConfig(prob=0.0, label_smoothing=0.1)
    mixed, targets, lam = mix_batch(jax.random.PRNGKey(0), images, labels, num_classes=C, cfg=off)
    np.testing.assert_array_equal(np.asarray(mixed), np.asarray(images))
    np.testing.assert_allclose(np.asarray(targets), np.asarray(mixup.smooth_one_hot(labels, C, 0.1)))
    assert np.all(np.asarray(lam) == 1.0)


def test_soft_cross_entropy_equals_integer_cross_entropy_on_one_hot_targets():
    logits = jax.random.normal(jax.random.PRNGKey(0), (5, C))
    labels = jnp.array([1, 2, 3, 4, 0])
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(mixup.soft_cross_entropy(logits, jax.nn.one_hot(labels, C)), expected, rtol=1e-6)

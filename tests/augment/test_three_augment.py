"""Three Augmentation and colour jitter against independent references (PIL, scipy, the Gaussian formula),
on real photographs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dailymae_jax.augment import three_augment as ta


blur = jax.jit(ta.gaussian_blur, static_argnames=("radius",))


def as_float(batch):
    return jnp.asarray(batch, jnp.float32)


def test_grayscale_matches_pil_luma(photo_batch):
    ours = np.asarray(ta.grayscale(as_float(photo_batch)))
    for image, gray in zip(photo_batch, ours):
        reference = np.asarray(Image.fromarray(image).convert("L"), np.float64)  # 299/587/114 per mille
        assert np.all(gray[..., 0] == gray[..., 1]) and np.all(gray[..., 0] == gray[..., 2])
        # PIL rounds to 8 bits; ours keeps the exact value.
        assert np.abs(gray[..., 0] - reference).max() <= 0.5 + 1e-3
    assert ta.GRAY_WEIGHTS == (0.299, 0.587, 0.114)


def test_solarize_matches_pil_threshold_128(photo_batch):
    ours = np.asarray(ta.solarize(as_float(photo_batch)))
    for image, solarized in zip(photo_batch, ours):
        np.testing.assert_array_equal(solarized, np.asarray(ImageOps.solarize(Image.fromarray(image), 128)))
    # The threshold itself: 127 stays, 128 becomes 127, 255 becomes 0.
    edge = ta.solarize(jnp.array([[[[127.0, 128.0, 255.0]]]]))
    np.testing.assert_array_equal(np.asarray(edge).ravel(), [127.0, 127.0, 0.0])


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_gaussian_blur_matches_scipy_and_pil(photo_batch, sigma):
    images = photo_batch[:4]
    ours = np.asarray(blur(as_float(images), jnp.full((4,), sigma)))
    for image, blurred in zip(images, ours):
        # scipy with the same support (6 taps each side) and border rule (mirror, edge pixel repeated).
        reference = ndi.gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0), mode="reflect",
                                        truncate=ta.BLUR_RADIUS / sigma)
        np.testing.assert_allclose(blurred, reference, atol=2e-3)
        # PIL's GaussianBlur(radius=sigma) approximates the Gaussian with box filters: close, not equal.
        pil = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)), np.float64)
        assert np.abs(blurred - pil).mean() < 0.75
        assert np.abs(blurred - pil)[8:-8, 8:-8].max() < 5


def test_blur_kernel_is_the_normalised_gaussian():
    sigma = np.array([0.3, 1.0, 2.0], np.float32)
    kernels = np.asarray(ta.gaussian_kernels(jnp.asarray(sigma)))
    x = np.arange(-ta.BLUR_RADIUS, ta.BLUR_RADIUS + 1)
    for s, kernel in zip(sigma, kernels):
        expected = np.exp(-x ** 2 / (2 * s ** 2))
        np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=1e-5, atol=1e-7)
    # Blurring a single bright pixel draws the separable kernel: outer(k, k).
    delta = np.zeros((1, 31, 31, 3), np.float32)
    delta[0, 15, 15] = 1.0
    out = np.asarray(blur(jnp.asarray(delta), jnp.array([1.5])))[0, ..., 0]
    k = np.asarray(ta.gaussian_kernels(jnp.array([1.5])))[0]
    np.testing.assert_allclose(out[15 - 6:15 + 7, 15 - 6:15 + 7], np.outer(k, k), atol=1e-7)
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-5)


def test_each_sample_gets_exactly_one_op(photo_batch):
    images = as_float(np.concatenate([photo_batch] * 8))  # 64 real photographs
    rng = jax.random.PRNGKey(3)
    out, choice = jax.jit(ta.three_augment)(rng, images)
    out, choice = np.asarray(out), np.asarray(choice)
    drawn_choice, sigma = ta.draw_three_augment(rng, len(images))
    np.testing.assert_array_equal(choice, np.asarray(drawn_choice))
    candidates = np.stack([np.asarray(ta.grayscale(images)), np.asarray(ta.solarize(images)),
                           np.asarray(blur(images, sigma))])  # (3, B, H, W, 3)
    assert set(np.unique(choice)) == {ta.GRAYSCALE, ta.SOLARIZE, ta.BLUR}
    for i in range(len(images)):
        matches = [np.allclose(out[i], candidates[op, i], atol=1e-4) for op in range(3)]
        colour = np.asarray(images[i]).std(axis=-1).mean() > 2  # three photos are grayscale already
        if colour:  # the three ops give visibly different pictures, so exactly one can match
            assert matches.count(True) == 1, (i, matches)
        assert matches[choice[i]], i


def test_op_choice_is_uniform():
    images = jnp.zeros((3000, 2, 2, 3))
    _, choice = jax.jit(ta.three_augment)(jax.random.PRNGKey(0), images)
    counts = np.bincount(np.asarray(choice), minlength=3)
    assert np.all(np.abs(counts - 1000) < 100), counts


def test_color_jitter_ops_match_pil_enhance(photo_batch):
    image = photo_batch[2]
    x = as_float(image[None])
    pil = Image.fromarray(image)
    for factor in (0.7, 1.3):
        f = jnp.array([factor])
        checks = {
            "brightness": (ta.adjust_brightness(x, f), ImageEnhance.Brightness(pil).enhance(factor)),
            "saturation": (ta.adjust_saturation(x, f), ImageEnhance.Color(pil).enhance(factor)),
            # PIL blends with the rounded mean of the L image; ours with the exact mean luma.
            "contrast": (ta.adjust_contrast(x, f), ImageEnhance.Contrast(pil).enhance(factor)),
        }
        for name, (ours, reference) in checks.items():
            diff = np.abs(np.asarray(ours)[0] - np.asarray(reference, np.float64))
            assert diff.max() <= 1.5, (name, factor, diff.max())


def test_color_jitter_strength_zero_is_identity_and_output_stays_in_range(photo_batch):
    images = as_float(photo_batch)
    np.testing.assert_array_equal(np.asarray(ta.color_jitter(jax.random.PRNGKey(0), images, 0.0)), photo_batch)
    out = np.asarray(jax.jit(ta.color_jitter, static_argnums=2)(jax.random.PRNGKey(0), images, 0.4))
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert np.abs(out - photo_batch).mean() > 1.0

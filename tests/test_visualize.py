"""Reconstruction pictures: what the MAE was shown, what it predicted, and the two pasted together."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dailymae_jax import augment, visualize
from dailymae_jax.model.mae import mae_from_size, num_visible, patchify
from dailymae_jax.model.vit import VitSize
from dailymae_jax.train.compile import CompilationCounter

PATCH = 16


@pytest.fixture(scope="module")
def mae():
    model = mae_from_size(VitSize(64, 2, 2, PATCH), decoder_width=32, decoder_depth=1, decoder_heads=2,
                          norm_pix_loss=True)
    noise = jax.random.uniform(jax.random.PRNGKey(1), (1, 16))
    params = jax.jit(lambda key: model.init(key, jnp.zeros((1, 64, 64, 3)), noise, 0.75))(jax.random.PRNGKey(0))
    params = params["params"]
    return model, jax.device_get(params)


def patches(images: np.ndarray) -> np.ndarray:
    return np.asarray(patchify(jnp.asarray(images), PATCH))


def test_pictures_show_the_visible_patches_and_fill_the_removed_ones(mae, photo_batch):
    model, params = mae
    pictures = visualize.reconstruct(model, params, photo_batch, mask_ratio=0.75, rng=jax.random.PRNGKey(2))
    for name in ("original", "masked", "reconstruction", "pasted"):
        assert pictures[name].shape == photo_batch.shape and pictures[name].dtype == np.uint8, name
    original, masked, reconstruction, pasted = (patches(pictures[k]) for k in
                                                ("original", "masked", "reconstruction", "pasted"))
    np.testing.assert_array_equal(original, patches(photo_batch))
    mean_colour = np.asarray(augment.denormalize(jnp.zeros(3)))  # what a removed patch shows
    visible = (masked == original).all(-1)
    removed = (masked.reshape(*masked.shape[:2], -1, 3) == mean_colour).all((-2, -1))
    assert (visible ^ removed).all()  # every patch is one or the other (real photographs: never flat grey)
    assert (visible.sum(1) == num_visible(16, 0.75)).all()
    np.testing.assert_array_equal(pasted[visible], original[visible])
    np.testing.assert_array_equal(pasted[removed], reconstruction[removed])
    assert reconstruction.std() > 1  # predicted pixels, not a constant


def test_one_compiled_program_per_image_shape(mae, photo_batch):
    # Run op by op, the first reconstruction at each resolution would compile every operation of the model
    # (dozens of programs, seconds of training time at each of the demo's stage switches).
    model, params = mae
    images = photo_batch[:, :48, :48]  # a shape no other test used
    with CompilationCounter() as counter:
        visualize.reconstruct(model, params, images, mask_ratio=0.5, rng=jax.random.PRNGKey(3))
    assert counter.count <= 5, counter.count  # the model's program and the noise's (3 with jax 0.10), not one per op
    with CompilationCounter() as counter:
        visualize.reconstruct(model, params, images[::-1], mask_ratio=0.5, rng=jax.random.PRNGKey(4))
    assert counter.count == 0

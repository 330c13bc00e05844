"""The PyTorch reference MAE (tools/torch_mae.py) against NumPy formulas and against our model's layout.

It only serves as a timing reference, but a reference that masks or averages differently would do different
work than ours, so its masking, loss, position table, patch order and parameter shapes are checked here.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tools import torch_mae  # noqa: E402  (after the skip: it imports torch)

MEAN = np.array(torch_mae.IMAGENET_MEAN, np.float32)
STD = np.array(torch_mae.IMAGENET_STD, np.float32)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tensors are tiny: torch's thread pool only adds contention on a shared CI machine (20× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def numpy_patchify(images: np.ndarray, p: int) -> np.ndarray:
    """(B, H, W, C) → (B, L, p·p·C), patch values in (row, column, channel) order, by explicit loops."""
    b, h, w, c = images.shape
    out = np.empty((b, (h // p) * (w // p), p * p * c), images.dtype)
    for i in range(h // p):
        for j in range(w // p):
            out[:, i * (w // p) + j] = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1)
    return out


@pytest.mark.parametrize("length, ratio", [(196, 0.75), (50, 0.9), (49, 0.66), (144, 0.75), (16, 0.5)])
def test_masking_keeps_the_smallest_noise_tokens(length, ratio):
    rng = np.random.default_rng(length)
    noise = rng.random((3, length)).astype(np.float32)
    tokens = torch.arange(length, dtype=torch.float32)[None, :, None].expand(3, length, 4).contiguous()
    kept, mask, ids_restore = torch_mae.random_masking(tokens, ratio, torch.from_numpy(noise))

    keep = int(length * (1 - ratio))  # MAE's truncation: 50 tokens at 0.9 keep 4, not 5
    order = np.argsort(noise, axis=1)
    assert kept.shape == (3, keep, 4)
    np.testing.assert_array_equal(kept[:, :, 0].numpy(), order[:, :keep])  # kept in ascending-noise order
    expected_mask = np.ones((3, length), np.float32)
    np.put_along_axis(expected_mask, order[:, :keep], 0.0, axis=1)
    np.testing.assert_array_equal(mask.numpy(), expected_mask)
    assert (mask.sum(1) == length - keep).all()
    np.testing.assert_array_equal(ids_restore.numpy(), np.argsort(order, axis=1))


def test_keeps_as_many_tokens_as_ours():
    from dailymae_jax.model.mae import num_visible

    for length in (196, 144, 100, 50, 49, 16):
        for ratio in (0.5, 0.66, 0.75, 0.8, 0.85, 0.9):
            kept, _, _ = torch_mae.random_masking(torch.zeros(1, length, 1), ratio, torch.rand(1, length))
            assert kept.shape[1] == num_visible(length, ratio), (length, ratio)


def test_loss_is_norm_pix_mse_on_removed_patches_only(photo_batch):
    """The model's loss equals the NumPy formula on its own predictions, averaged over removed patches only."""
    torch.manual_seed(0)
    model = torch_mae.TorchMAE(width=32, depth=1, heads=2, patch=16, resolution=64, decoder_width=32,
                               decoder_depth=1, decoder_heads=2)
    # Large random prediction weights so that predictions differ a lot between patches.
    torch.nn.init.normal_(model.decoder_pred.weight, std=1.0)
    images = (photo_batch.astype(np.float32) / 255.0 - MEAN) / STD
    noise = np.random.default_rng(1).random((len(images), 16)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(images), torch.from_numpy(noise), 0.75)

    target = numpy_patchify(images.astype(np.float64), 16)
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    err = ((out.pred.numpy().astype(np.float64) - target) ** 2).mean(-1)
    removed = np.ones_like(err)
    np.put_along_axis(removed, np.argsort(noise, axis=1)[:, :4], 0.0, axis=1)
    expected = (err * removed).sum() / removed.sum()
    np.testing.assert_allclose(out.loss.item(), expected, rtol=1e-5)
    np.testing.assert_array_equal(out.mask.numpy(), removed)
    # The kept patches' error is not part of it: averaging over all patches would give another number.
    assert abs(err.mean() - expected) > 100 * 1e-5 * expected


def test_position_table_matches_ours():
    from dailymae_jax.model.vit import sincos_pos_embed_2d

    for dim, gh, gw, cls in ((64, 3, 5, False), (32, 4, 4, True), (768, 14, 14, False), (512, 7, 7, True)):
        np.testing.assert_allclose(torch_mae.sincos_table_2d(dim, gh, gw, cls).numpy(),
                                   sincos_pos_embed_2d(dim, gh, gw, cls_token=cls), atol=1e-6)


def test_patch_order_matches_ours(photo_batch):
    import jax.numpy as jnp

    from dailymae_jax.model.mae import patchify

    ours = np.asarray(patchify(jnp.asarray(photo_batch), 16))
    np.testing.assert_array_equal(torch_mae.patchify_nhwc(torch.from_numpy(photo_batch), 16).numpy(), ours)
    np.testing.assert_array_equal(ours, numpy_patchify(photo_batch, 16))


def test_mae_b16_has_our_parameter_shapes_and_decay_mask():
    """Same parameter sizes, one by one, as our MAE-B/16 (decoder 512/8/16), and the same decayed subset."""
    import jax
    import jax.numpy as jnp

    from dailymae_jax.model.mae import mae_from_size
    from dailymae_jax.train.state import weight_decay_mask

    ours = mae_from_size("base", decoder_width=512, decoder_depth=8, decoder_heads=16)
    shapes = jax.eval_shape(lambda k: ours.init(k, jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 196)), 0.75),
                            jax.random.PRNGKey(0))["params"]
    leaves = jax.tree.leaves(shapes)
    decayed = jax.tree.leaves(weight_decay_mask(shapes))
    theirs = torch_mae.TorchMAE(width=768, depth=12, heads=12, patch=16, resolution=224)
    params = list(theirs.parameters())

    assert sorted(int(np.prod(x.shape)) for x in leaves) == sorted(p.numel() for p in params)
    assert torch_mae.parameter_count(theirs) == sum(int(np.prod(x.shape)) for x in leaves)
    groups = torch_mae.decay_param_groups(theirs, 0.05)
    assert sum(p.numel() for p in groups[0]["params"]) == sum(int(np.prod(x.shape))
                                                              for x, d in zip(leaves, decayed) if d)


def test_training_steps_lower_the_loss(photo_batch):
    """A handful of steps on one batch of photographs: the optimizer is wired to the loss (fixed seed)."""
    torch.manual_seed(0)
    model = torch_mae.TorchMAE(width=64, depth=2, heads=2, patch=16, resolution=64, decoder_width=32,
                               decoder_depth=1, decoder_heads=2)
    probe = torch_mae.LinearProbe(64, 8)
    step = torch_mae.TorchPretrainStep(model, probe, mask_ratio=0.75, lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95),
                                       probe_lr=1e-3, bf16=False, compile=False)
    images = torch.from_numpy(photo_batch)
    labels = torch.arange(len(photo_batch))
    probe_before = probe.head.weight.detach().clone()
    losses = [step(images, labels).item() for _ in range(20)]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:3]), losses
    assert not torch.equal(probe.head.weight, probe_before)
    assert all(p.grad is None for p in model.parameters())  # zeroed after every step


@pytest.mark.slow  # a compiled forward and backward on each side: about 40 s on the loaded 2-core machine
def test_our_loss_and_gradients_equal_the_reference():
    """Our MAE (every fast path of its forward and backward) against this independent reference: the same
    weights, images and noise give the same loss, predictions and gradient of every parameter. Random images:
    a flat patch of a photograph divides float32 rounding by its tiny standard deviation in the norm-pix
    target; decoder head width 8 gives an attention scale (1/√8) that is not a power of two."""
    import jax

    from dailymae_jax import export
    from dailymae_jax.model.mae import MaskedAutoencoder

    sizes = dict(width=64, depth=2, heads=2, patch=16, decoder_width=32, decoder_depth=2, decoder_heads=4)
    ours = MaskedAutoencoder(**sizes)
    images = np.random.default_rng(1).normal(size=(4, 64, 64, 3)).astype(np.float32)
    noise = np.random.default_rng(2).random((4, 16)).astype(np.float32)
    params = ours.init(jax.random.PRNGKey(3), images, noise, 0.75)["params"]
    (loss, pred), grads = jax.jit(jax.value_and_grad(
        lambda p: (lambda out: (out.loss, out.pred))(ours.apply({"params": p}, images, noise, 0.75)),
        has_aux=True))(params)

    def reference_layout(tree) -> dict[str, np.ndarray]:  # the official layout, then this module's names
        state = export.to_state_dict(tree, fmt="mae", width=64, decoder_width=32, grid=(4, 4))
        return {k.replace("patch_embed.proj.", "patch_embed.").replace(".mlp.", "."): v for k, v in state.items()
                if k not in export.POSITION_TABLES}

    theirs = torch_mae.TorchMAE(resolution=64, **sizes)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in reference_layout(params).items()}, strict=True)
    out = theirs(torch.from_numpy(images), torch.from_numpy(noise), 0.75)
    out.loss.backward()

    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pred), out.pred.detach().numpy(), rtol=1e-4, atol=1e-5)
    our_grads = reference_layout(grads)
    for name, param in theirs.named_parameters():
        scale = float(np.abs(param.grad.numpy()).max())
        np.testing.assert_allclose(our_grads[name], param.grad.numpy(), rtol=1e-3, atol=1e-4 * scale, err_msg=name)

"""Standardized validation counts every image exactly once: padded global batches, masks, any number of
devices or processes, an odd-sized split."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dailymae_jax.data.eval_loader import EvalOrder

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("num_samples", [1, 27, 64, 65])
@pytest.mark.parametrize("global_batch,processes", [(8, 1), (16, 2), (24, 4), (64, 8)])
def test_eval_order_covers_each_sample_once_across_processes(num_samples, global_batch, processes):
    orders = [EvalOrder(num_samples, global_batch, p, processes) for p in range(processes)]
    steps = orders[0].steps
    assert steps == -(-num_samples // global_batch)
    # Reassemble global batches from the processes' slices, as make_array_from_process_local_data does.
    indices = np.concatenate([o.process_indices().reshape(steps, -1) for o in orders], axis=1)
    mask = np.concatenate([o.process_mask() for o in orders], axis=1)
    assert indices.shape == mask.shape == (steps, global_batch)
    real = indices[mask]
    np.testing.assert_array_equal(np.sort(real), np.arange(num_samples))  # each sample once, none missing
    np.testing.assert_array_equal(real, np.arange(num_samples))  # in file order
    assert (~mask).sum() == steps * global_batch - num_samples
    assert indices.max() < num_samples  # padding slots still point at real records


def test_eval_order_rejects_bad_sizes():
    with pytest.raises(ValueError, match="empty"):
        EvalOrder(0, 8)
    with pytest.raises(ValueError, match="eval.global_batch_size 10 .* process count 4"):
        EvalOrder(10, 10, 0, 4)


# Run in a fresh interpreter with 8 simulated CPU devices: evaluate a small ViT on the odd-sized split with
# several meshes and batch sizes, and compare with a reference that decodes the whole split as one batch and
# runs the model on it without sharding, padding or masks.
_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from ffcv.fields.decoders import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from dailymae_jax import augment
from dailymae_jax.train import evaluate
from dailymae_jax.data.eval_loader import EvalLoader, EvalOrder, center_crop_decoder
from dailymae_jax.data.shard import BatchSharding, make_mesh
from dailymae_jax.model.vit import VisionTransformer
from dailymae_jax.train.state import state_sharding

beton, num_classes, res = sys.argv[1], 14, 64
model = VisionTransformer(width=32, depth=1, heads=2, patch=16, num_classes=num_classes, global_pool=True)
params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))["params"]
logits_fn = lambda state, images: model.apply({"params": state}, augment.normalize(images))

reader = Reader(beton)
n = int(reader.num_samples)
ref_loader = Loader(beton, batch_size=n, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [center_crop_decoder(res)], "label": [IntDecoder()]})
images, labels = next(iter(ref_loader))
images, labels = np.array(images), np.asarray(labels).reshape(-1)
# A head fitted (least squares) to the labels of the first 14 images: a classifier that is right on some
# images and wrong on others, with well-separated logits.
_, seen = model.apply({"params": params}, augment.normalize(jnp.asarray(images)), capture_intermediates=True)
features = np.asarray(seen["intermediates"]["fc_norm"]["__call__"][0], np.float64)
# Random offsets keep the other classes' logits apart (a tie at the 5th place would make top-5 ambiguous).
targets = 10.0 * np.eye(num_classes)[labels[:14]] + np.random.default_rng(0).normal(size=(14, num_classes))
fit = np.linalg.lstsq(features[:14], targets, rcond=None)[0]
params["head"]["kernel"] = jnp.asarray(fit, jnp.float32)
logits = np.asarray(logits_fn(params, jnp.asarray(images)))
top5 = np.argsort(-logits, axis=1)[:, :5]
reference = {"count": np.bincount(labels, minlength=num_classes).tolist(),
             "top1": np.bincount(labels[top5[:, 0] == labels], minlength=num_classes).tolist(),
             "top5": np.bincount(labels[(top5 == labels[:, None]).any(1)], minlength=num_classes).tolist()}

results = {}
for devices, batch in [(8, 8), (8, 64)]:  # 4 steps, devices 3-7 all padding at the end; 1 step
    mesh = make_mesh(jax.devices()[:devices])
    shardings = state_sharding(jax.eval_shape(lambda: params), mesh)
    loader = EvalLoader(beton, resolution=res, order=EvalOrder(n, batch), sharding=BatchSharding(mesh),
                        num_workers=2)
    step = evaluate.make_eval_step(logits_fn, num_classes)
    executable = evaluate.compile_eval_step(step, abstract_state=jax.eval_shape(lambda: params),
                                            state_shardings=shardings, mesh=mesh, global_batch=batch,
                                            resolution=res)
    result = evaluate.evaluate(executable, jax.device_put(params, shardings), loader)
    results[f"{devices}x{batch}"] = result.as_dict()
print("RESULT " + json.dumps({"n": n, "devices": jax.device_count(), "reference": reference,
                              "results": results}))
"""


@pytest.fixture(scope="module")
def odd_val_beton(sample_beton, tmp_path_factory):
    """The sample dataset's validation split with one image removed: 27 images, all 14 classes."""
    from dailymae_jax.data.write import write_beton

    folder = tmp_path_factory.mktemp("odd") / "val"
    shutil.copytree(Path(sample_beton).parent / "val", folder)
    first_class = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    sorted(first_class.glob("*.jpg"))[0].unlink()
    out = folder.parent / "val27.beton"
    write_beton(folder, out, num_workers=1)
    return out


@pytest.mark.slow
def test_evaluation_is_exact_on_an_odd_split_with_simulated_devices(odd_val_beton):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(odd_val_beton)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["n"] == 27 and out["devices"] == 8
    reference = out["reference"]
    assert sum(reference["count"]) == 27 and reference["count"][0] == 1  # the class we removed one image from
    assert 0 < sum(reference["top1"]) <= sum(reference["top5"]) < 27  # a non-trivial classifier
    for name, result in out["results"].items():
        assert result["count"] == 27, name
        assert result["per_class_count"] == reference["count"], name
        assert result["per_class_top1"] == reference["top1"], name
        assert result["per_class_top5"] == reference["top5"], name
        assert result["top1"] == pytest.approx(sum(reference["top1"]) / 27), name
        assert result["top5"] == pytest.approx(sum(reference["top5"]) / 27), name

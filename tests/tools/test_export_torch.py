"""tools/export_torch.py: a workdir's orbax checkpoint → PyTorch files and a reference batch that timm and a
reloaded JAX model reproduce; the workdir as an import source; one-line errors with exit code 2."""

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from dailymae_jax import export
from dailymae_jax.augment import normalize
from dailymae_jax.checkpoint import Checkpointer, DataPosition
from dailymae_jax.model.mae import MaskedAutoencoder, encoder_params
from dailymae_jax.model.probe import LinearProbe
from dailymae_jax.model.vit import VisionTransformer
from dailymae_jax.pretrained import load_encoder_weights, load_mae_weights
from dailymae_jax.train.state import init_state, make_optimizer, make_probe_optimizer
from tools import export_torch

REPO = Path(__file__).resolve().parents[2]
D, DEPTH, HEADS, P, DD, DDEPTH = 64, 2, 4, 16, 32, 1
# The demo recipe shrunk to a 64-px, 2-block model (used by both the synthetic and the trained workdir).
OVERRIDES = {"model.width": D, "model.depth": DEPTH, "model.heads": HEADS, "model.decoder_width": DD,
             "model.decoder_depth": DDEPTH, "model.decoder_heads": 4, "schedule.resolution": 64}


def cli(*argv):
    """Runs the tool in this process; returns its exit code (argparse's errors exit through SystemExit)."""
    try:
        return export_torch.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def our_mae():
    return MaskedAutoencoder(width=D, depth=DEPTH, heads=HEADS, patch=P, decoder_width=DD, decoder_depth=DDEPTH,
                             decoder_heads=4)


def demo_config():
    """configs/mae_demo.py with OVERRIDES, as the dict a run saves."""
    from configs import mae_demo
    config = mae_demo.get_config()
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        config[section][name] = value
    return config.to_dict()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A workdir with checkpoints at steps 3 and 5 of a full TrainState (optimizer and probe included), with
    random parameters: the tool must read the params alone, and the step asked for."""
    workdir = tmp_path_factory.mktemp("saved") / "run"
    model = our_mae()
    tx = make_optimizer(learning_rate=lambda step: 1e-3, weight_decay=0.05, b1=0.9, b2=0.95)
    init = functools.partial(init_state, model=model, probe=LinearProbe(num_classes=3), tx=tx,
                             probe_tx=make_probe_optimizer(1e-3), resolution=64, mask_ratio=0.75)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    config = demo_config()
    checkpointer = Checkpointer(workdir, keep=5, async_save=False)
    params_at = {}
    for step in (3, 5):
        params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.2).astype(np.float32), shapes.params)
        checkpointer.save(step, zeros.replace(params=params, step=np.int32(step)), DataPosition(0, step), config)
        params_at[step] = params
    checkpointer.close()
    (workdir / "config.json").write_text(json.dumps(config))
    return workdir, params_at


def assert_trees_equal(expected, actual):
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), expected, actual)


def check_reference_batch(npz_path, mae_file, timm_file):
    """What a user would do: recompute the loss in JAX from the reloaded weights, and the features in timm."""
    ref = dict(np.load(npz_path))
    n = ref["images"].shape[0]
    assert ref["images"].dtype == np.uint8 and ref["images"].shape == (n, 64, 64, 3)
    assert ref["noise"].shape == ref["mask"].shape == (n, 16) and float(ref["mask_ratio"]) == 0.75
    assert ref["pred"].shape == (n, 16, P * P * 3)
    assert ref["features_cls"].shape == ref["features_mean"].shape == (n, D)
    assert ref["images"].std() > 20  # real photographs

    model = our_mae()
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                               jnp.zeros((1, 16)), 0.75))["params"]
    params = load_mae_weights(shapes, mae_file)
    images = normalize(jnp.asarray(ref["images"]))
    out = jax.jit(lambda p, x, z: model.apply({"params": p}, x, z, 0.75))(params, images, ref["noise"])
    np.testing.assert_allclose(float(out.loss), float(ref["loss"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.pred), ref["pred"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.mask), ref["mask"])
    assert ref["mask"].sum(axis=1).tolist() == [12] * n  # 75% of 16 patches

    timm_model = TimmViT(img_size=64, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0)
    timm_model.load_state_dict({k: torch.from_numpy(v) for k, v in export.load_state_dict(timm_file).items()},
                               strict=True)
    pixels = (ref["images"] / np.float32(255) - ref["pixel_mean"]) / ref["pixel_std"]
    with torch.no_grad():
        tokens = timm_model.eval().forward_features(torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2))
    np.testing.assert_allclose(tokens[:, 0].numpy(), ref["features_cls"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(tokens[:, 1:].mean(1).numpy(), ref["features_mean"], atol=1e-4, rtol=0)
    return ref


def test_cli_exports_both_layouts_and_a_reference_batch(saved_run, tmp_path):
    workdir, params_at = saved_run
    out = tmp_path / "out"
    assert cli("--workdir", workdir, "--format", "mae", "--out", out / "mae.safetensors",
               "--sample-out", out / "ref.npz", "--sample-size", 4) == 0
    assert cli("--workdir", workdir, "--format", "timm", "--out", out / "timm.pth") == 0
    # The latest step, exactly, in both layouts.
    assert_trees_equal(params_at[5], load_mae_weights(params_at[3], out / "mae.safetensors"))
    raw = torch.load(out / "timm.pth", weights_only=True)
    assert "blocks.1.mlp.fc2.weight" in raw and not any(k.startswith("decoder") for k in raw)
    ref = check_reference_batch(out / "ref.npz", out / "mae.safetensors", out / "timm.pth")
    assert ref["images"].shape[0] == 4


def test_cli_step_picks_the_checkpoint(saved_run, tmp_path):
    workdir, params_at = saved_run
    assert cli("--workdir", workdir, "--step", 3, "--format", "mae", "--out", tmp_path / "mae.pth") == 0
    raw = torch.load(tmp_path / "mae.pth", weights_only=True)
    assert set(raw) == {"model"} and raw["model"]["decoder_pos_embed"].shape == (1, 17, DD)
    assert_trees_equal(params_at[3], load_mae_weights(params_at[5], tmp_path / "mae.pth"))


def test_cli_resolution_sets_the_position_tables(saved_run, tmp_path):
    workdir, _ = saved_run
    assert cli("--workdir", workdir, "--format", "timm", "--resolution", 96, "--out", tmp_path / "t.safetensors") == 0
    assert export.load_state_dict(tmp_path / "t.safetensors")["pos_embed"].shape == (1, 37, D)


def test_workdir_is_an_import_source(saved_run):
    workdir, params_at = saved_run
    vit = VisionTransformer(width=D, depth=DEPTH, heads=HEADS, patch=P)
    shapes = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"]
    initial = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    assert_trees_equal(encoder_params(params_at[5]), load_encoder_weights(initial, workdir))
    assert_trees_equal(encoder_params(params_at[3]), load_encoder_weights(initial, workdir, step=3))
    assert_trees_equal(params_at[5], load_mae_weights(params_at[3], workdir))


@pytest.mark.parametrize("args, message", [
    (["--workdir", "{tmp}/nope", "--format", "mae", "--out", "{tmp}/x.pth"], "--workdir {tmp}/nope does not exist"),
    (["--workdir", "{run}", "--format", "onnx", "--out", "{tmp}/x.pth"], "invalid choice: 'onnx'"),
    (["--workdir", "{run}", "--format", "timm", "--out", "{tmp}/x.bin"], "must end in .pth or .safetensors"),
    (["--workdir", "{run}", "--format", "timm", "--out", "{tmp}/x.pth", "--sample-out", "{tmp}/r.npy"],
     "--sample-out {tmp}/r.npy: the name must end in .npz"),
    (["--workdir", "{run}", "--step", "4", "--format", "mae", "--out", "{tmp}/x.pth"],
     "no checkpoint for step 4 in {run}/checkpoints; available: 3, 5"),
    (["--workdir", "{tmp}", "--format", "mae", "--out", "{tmp}/x.pth"], "no checkpoints in {tmp}"),
    (["--workdir", "{run}", "--format", "timm", "--out", "{tmp}/x.pth", "--resolution", "70"],
     "--resolution 70 is not a multiple of the patch size 16"),
    (["--format", "timm", "--out", "{tmp}/x.pth"], "the following arguments are required: --workdir"),
    (["--workdir", "{run}", "--format", "timm", "--out", "{tmp}/x.pth", "--resolution", "-16"],
     "--resolution -16: must be a positive multiple of the patch size"),
    (["--workdir", "{run}", "--format", "mae", "--out", "{tmp}/x.pth", "--sample-out", "{tmp}/r.npz",
      "--mask-ratio", "1.5"], "--mask-ratio 1.5: allowed: 0 < ratio < 1"),
    (["--workdir", "{run}", "--format", "mae", "--out", "{tmp}/x.pth", "--mask-ratio", "0.5"],
     "--mask-ratio and --sample-size describe the reference batch: give --sample-out too"),
    (["--workdir", "{run}", "--format", "mae", "--out", "{tmp}/x.pth", "--sample-out", "{tmp}/r.npz",
      "--sample-size", "0"], "--sample-size 0: allowed: 1 to"),
    (["--workdir", "{run}", "--format", "mae", "--out", "{tmp}/x.pth", "--step", "-1"], "--step -1: must be ≥ 0"),
    (["--workdir", "{run}", "--format", "mae", "--out", "{tmp}/dir.pth"], "--out {tmp}/dir.pth is a directory"),
])
def test_cli_errors_are_one_line_with_exit_code_2(saved_run, tmp_path, capsys, args, message):
    run = saved_run[0].resolve()
    fill = lambda s: s.format(tmp=tmp_path, run=run)
    (tmp_path / "dir.pth").mkdir()
    assert cli(*map(fill, args)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("export_torch.py: error: ")
    assert fill(message) in err
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "r.npz").exists()


def test_cli_with_no_intact_checkpoint_is_one_line_and_exit_1(saved_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run[0], workdir)
    for step in (3, 5):
        (workdir / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{}")
    assert cli("--workdir", workdir, "--format", "mae", "--out", tmp_path / "x.pth") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("export_torch.py: error: no intact checkpoint")
    assert not (tmp_path / "x.pth").exists()


# ------------------------------------------------------------------------------------------------
# On a workdir written by a real (tiny) training run, through the command line.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "dailymae_jax.main", "--config=configs/mae_demo.py", f"--workdir={root / 'run'}",
           f"--config.data.sample_dir={root / 'sample'}", "--config.data.sample_num_images=40",
           "--config.data.global_batch_size=16", "--config.train.epochs=2", "--config.train.warmup_epochs=1",
           "--config.schedule.stages=((0, 64, 0.75),)", "--config.report.num_reconstructions=2",
           *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return root / "run"


@pytest.mark.slow
def test_cli_on_a_trained_run(trained_run, tmp_path):
    summary = json.loads((trained_run / "summary.json").read_text())
    cmd = [sys.executable, "tools/export_torch.py", "--workdir", str(trained_run), "--format", "mae",
           "--out", str(tmp_path / "mae.pth"), "--sample-out", str(tmp_path / "ref.npz")]
    result = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported step {summary['steps']} of" in result.stdout and str(tmp_path / "mae.pth") in result.stdout
    assert str(tmp_path / "ref.npz") in result.stdout
    assert cli("--workdir", trained_run, "--format", "timm", "--out", tmp_path / "timm.safetensors") == 0
    # The last checkpoint holds the final parameters: the same tensors the run exported when it finished.
    for name in ("mae.pth", "timm.safetensors"):
        ours, runs = export.load_state_dict(tmp_path / name), export.load_state_dict(trained_run / "export" / name)
        assert set(ours) == set(runs)
        for key in ours:
            np.testing.assert_array_equal(ours[key], runs[key], err_msg=key)
    check_reference_batch(tmp_path / "ref.npz", tmp_path / "mae.pth", tmp_path / "timm.safetensors")

"""End to end through the command line: a tiny pretraining run, then finetuning (2 simulated devices,
progressive resolution, evaluation at two resolutions) and linear probing from its checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# 140 sample images → 112 train (7 steps of 16) and 28 validation images.
DATA = ["--config.data.sample_num_images=140", "--config.data.global_batch_size=16"]


def run_main(config, workdir, sample_dir, *extra, devices=1, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "dailymae_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.data.sample_dir={sample_dir}", *DATA, *extra]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_e2e")
    run_main("configs/mae_demo.py", root / "pretrain", root / "sample", "--config.train.epochs=2",
             "--config.schedule.preset=fixed", "--config.checkpoint.every_steps=100")
    return root


@pytest.mark.slow
def test_finetune_from_our_pretraining(pretrained_run):
    root = pretrained_run
    workdir = root / "finetune"
    result = run_main("configs/finetune_demo.py", workdir, root / "sample",
                      f"--config.init.workdir={root / 'pretrain'}", "--config.train.epochs=2",
                      "--config.train.log_every_steps=1",
                      "--config.schedule.stages=((0, 96), (1, 128))", "--config.eval.resolutions=(128, 96)",
                      "--config.eval.global_batch_size=8", devices=2)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "finetune" and summary["device_count"] == 2 and summary["steps"] == 14
    assert summary["val_count"] == 28 and summary["val_resolution"] == 128
    assert 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 1.0
    assert summary["val"]["96"]["count"] == 28 and sum(summary["val"]["128"]["per_class_count"]) == 28
    assert summary["compilations_during_training"] == 0
    assert summary["init"]["source"] == "pretrain" and summary["init"]["loaded"] > 0
    assert set(summary["init"]["fresh"]) == {"head/kernel", "head/bias", "fc_norm/scale", "fc_norm/bias"}
    assert summary["num_classes"] == 14 and summary["chance_top1"] == pytest.approx(1 / 14)
    # metrics.jsonl: one row per step (resolution per stage), one validation row per epoch.
    rows = metrics(workdir)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 15))
    assert {r["resolution"] for r in steps if r["step"] <= 7} == {96}
    assert {r["resolution"] for r in steps if r["step"] > 7} == {128}
    evals = [r for r in rows if "val_top1" in r]
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 7), (1, 14)]
    assert all({"val_top5", "val_count", "val_top1_96", "val_top5_96"} <= set(r) for r in evals)
    assert evals[-1]["val_top1"] == summary["val_top1"]
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert "val top-1" in result.stdout and "over 28 images" in result.stdout
    # A finished run is not retrained.
    again = run_main("configs/finetune_demo.py", workdir, root / "sample",
                     f"--config.init.workdir={root / 'pretrain'}", "--config.train.epochs=2",
                     "--config.schedule.stages=((0, 96), (1, 128))",
                     "--config.eval.resolutions=(128, 96)", "--config.eval.global_batch_size=8", devices=2)
    assert json.loads((workdir / "summary.json").read_text()) == summary and "14 steps" in again.stdout


@pytest.mark.slow
def test_linear_probe_from_our_pretraining(pretrained_run):
    root = pretrained_run
    workdir = root / "linprobe"
    run_main("configs/linprobe_demo.py", workdir, root / "sample", f"--config.init.workdir={root / 'pretrain'}",
             "--config.train.epochs=2")
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "linprobe" and summary["val_count"] == 28
    assert 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 1.0
    assert summary["trainable_parameters"] == 192 * 14 + 14  # the head only; BatchNorm has no affine
    assert summary["init"]["fresh"] == [] and summary["compilations_during_training"] == 0
    assert [r["epoch"] for r in metrics(workdir) if "val_top1" in r] == [0, 1]


def test_missing_pretraining_is_a_config_error(tmp_path):
    result = run_main("configs/finetune_demo.py", tmp_path / "ft", tmp_path / "sample",
                      f"--config.init.workdir={tmp_path / 'nothing'}", check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "init.workdir: no checkpoint" in errors[0]
    assert not (tmp_path / "sample").exists()  # rejected before any data was written

"""Finetuning and linear probing end to end through the command line, from a tiny pretraining run's checkpoint:
progressive resolution and evaluation at two resolutions on 8 simulated devices, and the guarantees every task
shares with pretraining (the same training loop): a non-finite loss stops the run before it is checkpointed,
SIGTERM saves and exits 143 and the same command resumes to bit-identical parameters, and 2 processes × 4
devices train like 1 × 8."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from conftest import poisoned_run_command
from dailymae_jax.checkpoint import restore_params

REPO = Path(__file__).resolve().parents[2]
# 140 sample images → 112 train (7 steps of 16) and 28 validation images.
DATA = ["--config.data.sample_num_images=140", "--config.data.global_batch_size=16"]


def cpu_env(devices=1):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def main_args(config, workdir, sample_dir, *extra):
    return [f"--config={config}", f"--workdir={workdir}", f"--config.data.sample_dir={sample_dir}", *DATA, *extra]


def run_main(config, workdir, sample_dir, *extra, devices=1, check=True):
    cmd = [sys.executable, "-m", "dailymae_jax.main", *main_args(config, workdir, sample_dir, *extra)]
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(devices), capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# 112 training images, batch 16 → 7 steps per epoch; 2 epochs = 14 steps; checkpoints at steps 5, 7, 10 and 14.
# Finetuning: progressive resolution 64 → 96 px, evaluation at 96 and 64 px, on 8 devices (the reference of the
# 2-process run). Linear probing: 64 px, on 1 device.
# Runs of one task share JAX's persistent compilation cache (root/jax_cache): a resumed run compiles nothing anew.
TASKS = {"finetune": "configs/finetune_demo.py", "linprobe": "configs/linprobe_demo.py"}
STEP_BUILDERS = {"finetune": "make_finetune_step", "linprobe": "make_linprobe_step"}
DEVICES = {"finetune": 8, "linprobe": 1}
COMMON = ["--config.train.epochs=2", "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=5",
          "--config.checkpoint.keep=10", "--config.eval.global_batch_size=8"]
ARGS = {"finetune": [*COMMON, "--config.schedule.stages=((0, 64), (1, 96))", "--config.eval.resolutions=(96, 64)"],
        "linprobe": [*COMMON, "--config.schedule.resolution=64", "--config.eval.resolutions=(64,)"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A pretraining run's checkpoint, and the uninterrupted run of each classifier task from it."""
    root = tmp_path_factory.mktemp("classifiers")
    run_main("configs/mae_demo.py", root / "pretrain", root / "sample", "--config.train.epochs=1",
             "--config.schedule.preset=fixed", "--config.schedule.resolution=64",
             "--config.checkpoint.every_steps=100")
    for task in TASKS:
        result = run_main(*task_args(task, root, root / task), devices=DEVICES[task])
        (root / task / "stdout.txt").write_text(result.stdout)
    return root


def task_args(task, root, workdir):
    return (TASKS[task], workdir, root / "sample", f"--config.init.workdir={root / 'pretrain'}", *ARGS[task],
            f"--config.train.compilation_cache_dir={root / 'jax_cache'}")


@pytest.mark.slow
def test_finetune_from_our_pretraining(root):
    workdir = root / "finetune"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "finetune" and summary["device_count"] == 8 and summary["steps"] == 14
    assert summary["val_count"] == 28 and summary["val_resolution"] == 96
    assert 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 1.0
    assert summary["val"]["64"]["count"] == 28 and sum(summary["val"]["96"]["per_class_count"]) == 28
    assert summary["compilations_during_training"] == 0
    assert summary["init"]["source"] == "pretrain" and summary["init"]["loaded"] > 0
    assert set(summary["init"]["fresh"]) == {"head/kernel", "head/bias", "fc_norm/scale", "fc_norm/bias"}
    assert summary["num_classes"] == 14 and summary["chance_top1"] == pytest.approx(1 / 14)
    # metrics.jsonl: one row per step (resolution per stage), one validation row per epoch.
    rows = metrics(workdir)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 15))
    assert {r["resolution"] for r in steps if r["step"] <= 7} == {64}
    assert {r["resolution"] for r in steps if r["step"] > 7} == {96}
    assert all({"train_top1", "images_per_second", "eta_seconds", "data_wait_share"} <= set(r) for r in steps)
    evals = [r for r in rows if "val_top1" in r]
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 7), (1, 14)]
    assert all({"val_top5", "val_count", "val_top1_64", "val_top5_64"} <= set(r) for r in evals)
    assert evals[-1]["val_top1"] == summary["val_top1"]
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    stdout = (workdir / "stdout.txt").read_text()
    assert "val top-1" in stdout and "over 28 images" in stdout
    # A finished run is not retrained.
    again = run_main(*task_args("finetune", root, workdir), devices=DEVICES["finetune"])
    assert json.loads((workdir / "summary.json").read_text()) == summary and "14 steps" in again.stdout


@pytest.mark.slow
def test_linear_probe_from_our_pretraining(root):
    workdir = root / "linprobe"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "linprobe" and summary["val_count"] == 28
    assert 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 1.0
    assert summary["trainable_parameters"] == 192 * 14 + 14  # the head only; BatchNorm has no affine
    assert summary["init"]["fresh"] == [] and summary["compilations_during_training"] == 0
    assert [r["epoch"] for r in metrics(workdir) if "val_top1" in r] == [0, 1]


# --- The shared training loop's guarantees, for both classifier tasks --------------------------------------

def checkpoint_steps(workdir):
    directory = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def assert_same_params(workdir, reference, step=None):
    got, _, _ = restore_params(workdir, step)
    want, _, _ = restore_params(reference, step)
    flat_got, flat_want = dict(_leaves(got)), dict(_leaves(want))
    assert flat_got.keys() == flat_want.keys()
    for key, value in flat_want.items():
        np.testing.assert_array_equal(flat_got[key], value, err_msg=key)


def _leaves(tree):
    """(path, numpy array) of every leaf, the path joined with '/'."""
    return [("/".join(path), np.asarray(value)) for path, value in traverse_util.flatten_dict(tree).items()]


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_sigterm_saves_exits_143_and_resumes_to_the_same_parameters(root, task):
    workdir = root / f"{task}-sigterm"
    cmd = [sys.executable, "-m", "dailymae_jax.main", *main_args(*task_args(task, root, workdir))]
    process = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(DEVICES[task]), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not checkpoint_steps(workdir):  # after the first checkpoint
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM after step ") and "run the same command to resume" in line, line
    stopped = int(line.split("after step ")[1].split(";")[0])
    assert stopped in checkpoint_steps(workdir) and stopped < 14 and not (workdir / "summary.json").exists()

    result = run_main(*task_args(task, root, workdir), devices=DEVICES[task])
    assert "14 steps" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    reference = json.loads((root / task / "summary.json").read_text())
    assert summary["steps"] == 14 and summary["steps_this_run"] == 14 - stopped
    assert summary["init"]["source"] == "resumed"
    assert summary["val_top1"] == reference["val_top1"] and summary["val"] == reference["val"]
    assert_same_params(workdir, root / task)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_a_nan_stops_the_run_with_one_line_and_no_nonfinite_checkpoint(root, task):
    workdir = root / f"{task}-nan"
    cmd = poisoned_run_command(main_args(*task_args(task, root, workdir)), module=task, builder=STEP_BUILDERS[task],
                               at=9)
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(DEVICES[task]), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss is nan at step 9; nothing after it was checkpointed"), last
    assert checkpoint_steps(workdir) == [5, 7]  # 10 and later were never written
    for step in (5, 7):
        params, _, _ = restore_params(workdir, step)
        assert all(np.isfinite(value).all() for _, value in _leaves(params))
        assert_same_params(workdir, root / task, step)
    assert not (workdir / "summary.json").exists()


@pytest.mark.slow
def test_two_processes_finetune_like_one(root):
    one, two = root / "finetune", root / "finetune-two"  # 1 process × 8 devices, and 2 × 4
    launcher = [sys.executable, "tools/launch_local.py", "--num-processes=2", "--devices-per-process=4", "--",
                *main_args(*task_args("finetune", root, two)), "--config.data.num_workers=1"]
    result = subprocess.run(launcher, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]
    summary = json.loads((two / "summary.json").read_text())
    reference = json.loads((one / "summary.json").read_text())
    assert summary["process_count"] == 2 and summary["device_count"] == 8 and reference["process_count"] == 1
    assert summary["steps"] == reference["steps"] == 14 and summary["compilations_during_training"] == 0
    assert summary["val_count"] == reference["val_count"] == 28
    assert abs(summary["val_top1"] - reference["val_top1"]) <= 1e-2
    assert abs(summary["final_loss"] - reference["final_loss"]) <= 1e-2 * abs(reference["final_loss"])
    got, _, _ = restore_params(two)
    want, _, _ = restore_params(one)
    flat_got = dict(_leaves(got))
    for key, value in _leaves(want):
        np.testing.assert_allclose(flat_got[key], value, rtol=1e-2, atol=1e-2, err_msg=key)

"""Faults during pretraining: non-finite numbers, signals, kill -9, a full disk and a corrupt image record.

Each test fails without the handling it checks: a NaN would be checkpointed, SIGTERM would kill the run without
a checkpoint, a resumed run would drift from an uninterrupted one, a failed save would go unnoticed, and a
corrupt record would surface as a traceback.
"""

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, cpu_env, main_command, poisoned_run_command, run_command

# A tiny, single-bucket run: 112 training images, batch 16 → 7 steps per epoch, 4 epochs = 28 steps;
# checkpoints at steps 5, 7, 10, 14, 15, 20, 21, 25 and 28 (every 5 steps and at each epoch's end).
STEPS = 28


def tiny_args(beton: Path, cache: Path) -> list[str]:
    return [f"--config.data.train_path={beton}", "--config.data.global_batch_size=16", "--config.train.epochs=4",
            "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=5", "--config.checkpoint.keep=20",
            "--config.schedule.preset=fixed", "--config.schedule.resolution=64",
            f"--config.train.compilation_cache_dir={cache}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_beton):
    """The uninterrupted reference run, plus what the other runs here share."""
    root = tmp_path_factory.mktemp("reliability")
    args = tiny_args(sample_beton, root / "jax_cache")
    run_command(main_command(root / "reference", *args))
    return root, args


def final_weights(workdir: Path) -> dict[str, np.ndarray]:
    return load_file(workdir / "export" / "mae.safetensors")


def assert_same_final_weights(workdir: Path, reference: Path) -> None:
    got, want = final_weights(workdir), final_weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def metric_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def start_and_wait_for_step(cmd: list[str], workdir: Path, step: int, *, saved_after: int = 0,
                            timeout: float = 600) -> subprocess.Popen:
    """Starts a run; returns once its metrics log shows ``step`` and a complete checkpoint of a step after
    ``saved_after`` exists (so that a restart has something new to resume from), with the process running."""
    process = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + timeout
    while max(metric_steps(workdir), default=0) < step or max(checkpoint_steps(workdir), default=0) <= saved_after:
        if process.poll() is not None:
            raise AssertionError(f"run ended early with {process.returncode}: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"step {step} not reached in {timeout} s")
        time.sleep(0.05)
    return process


def checkpoint_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def restore_params(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """The params of a checkpoint, flattened, read with plain orbax (no model or config needed)."""
    import jax
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(checkpoint_dir / "state")
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])}


# --- Non-finite loss: stop naming the step; no non-finite checkpoint -------------------------------------

@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_only_finite_checkpoints(runs):
    root, args = runs
    workdir = root / "nan"
    cmd = poisoned_run_command(main_command(workdir, *args)[3:], module="recipe", builder="make_pretrain_step",
                               at=9)
    result = run_command(cmd, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: loss is nan at step 9" in result.stderr.splitlines()[-1]
    assert checkpoint_steps(workdir) == [5, 7]  # 10 and later were never written
    for step in (5, 7):
        params = restore_params(workdir / "checkpoints" / str(step))
        assert all(np.isfinite(v).all() for v in params.values())
        reference = restore_params(root / "reference" / "checkpoints" / str(step))
        for key, value in reference.items():
            np.testing.assert_array_equal(params[key], value, err_msg=key)
    assert not (workdir / "summary.json").exists()


# --- Signals and kill -9: resume to exactly the uninterrupted result -------------------------------------

@pytest.mark.slow
def test_sigterm_and_kill_9_resume_to_the_same_parameters(runs):
    """SIGTERM saves and exits 143; kill -9 loses only the steps after the last checkpoint; either way the same
    command resumes to the uninterrupted run's exact parameters (one run interrupted both ways)."""
    root, args = runs
    workdir = root / "interrupted"
    cmd = main_command(workdir, *args)
    at = random.randint(6, 12)  # the property holds for any step; the signal lands at or a little after it
    process = start_and_wait_for_step(cmd, workdir, step=at)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM after step ") and "run the same command to resume" in line
    stopped_at = int(line.split("after step ")[1].split(";")[0])
    assert stopped_at >= at and max(checkpoint_steps(workdir)) == stopped_at
    assert not (workdir / "summary.json").exists()

    process = start_and_wait_for_step(cmd, workdir, step=stopped_at + 1, saved_after=stopped_at)
    process.kill()
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert not (workdir / "summary.json").exists()

    resume_from = max(checkpoint_steps(workdir))
    result = run_command(cmd)
    assert f"{STEPS} steps" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["steps_this_run"] == STEPS - resume_from
    assert_same_final_weights(workdir, root / "reference")


# --- A full disk during a checkpoint save -----------------------------------------------------------------

def _namespace_prefix() -> list[str] | None:
    """A private mount namespace where we may mount a tmpfs (root, or an unprivileged user namespace)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "-m"] if os.geteuid() == 0 else [unshare, "-rm"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return prefix if probe.returncode == 0 else None


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(runs):
    root, args = runs
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root or unprivileged user namespaces)")
    checkpoint_bytes = sum(f.stat().st_size for f in (root / "reference" / "checkpoints" / "5").rglob("*")
                           if f.is_file())
    workdir = root / "full-disk"
    (workdir / "checkpoints").mkdir(parents=True)
    # Room for one checkpoint and a half: step 5 is saved, step 7 runs out of space. Everything the test
    # inspects is copied out before the namespace (and its tmpfs) goes away.
    script = (f"mount -t tmpfs -o size={int(checkpoint_bytes * 1.5)} tmpfs {workdir / 'checkpoints'} && "
              f"{shlex.join(map(str, main_command(workdir, *args)))}; rc=$?; "
              f"cp -a {workdir / 'checkpoints'} {workdir / 'kept'}; exit $rc")
    result = run_command([*prefix, "bash", "-c", script], check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: saving checkpoint 7 in ") and "No space left on device" in line, line
    assert "the last complete checkpoint is" in line and line.endswith("checkpoints/5")
    kept = sorted(p.name for p in (workdir / "kept").iterdir() if p.name.isdigit())
    assert kept == ["5"]
    params = restore_params(workdir / "kept" / "5")
    reference = restore_params(root / "reference" / "checkpoints" / "5")
    for key, value in reference.items():
        np.testing.assert_array_equal(params[key], value, err_msg=key)


@pytest.mark.slow  # starts a run: state init and the numba compile of the first pipeline
def test_a_corrupt_image_record_gives_one_line_and_exit_code_2(tmp_path, sample_beton):
    from ffcv.reader import Reader

    broken = tmp_path / "train.beton"
    data = bytearray(sample_beton.read_bytes())
    for ptr in Reader(str(sample_beton)).metadata["f0"]["data_ptr"]:  # every image: whichever a batch reads first
        data[int(ptr):int(ptr) + 64] = bytes(64)
    broken.write_bytes(bytes(data))
    result = run_command(main_command(tmp_path / "run", f"--config.data.train_path={broken}"), check=False,
                         timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("data error:")]
    assert len(errors) == 1 and f"{broken}: " in errors[0] and "failed to decode" in errors[0] \
        and "Not a JPEG file" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr

"""Sharded pretraining on simulated CPU devices: 1 process × 8 devices must train like 1 device, and on real
processes on 127.0.0.1 (tools/launch_local.py) 2 × 4 devices must train like 1 × 8, a 2-process checkpoint
must resume in 1 process, a SIGTERM to one process must stop both after the same step, and killing one must end
the other within a bound instead of hanging. (Finetuning on 2 processes: tests/e2e/test_classifiers.py.)"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, cpu_env, main_command, run_command

# The tiny single-bucket run of test_pretrain_faults: 112 images, batch 16 → 7 steps per epoch, 4 epochs = 28 steps.
STEPS = 28
HEARTBEAT = 10  # s; a dead process must end the others within this plus a margin
LAUNCHER = [sys.executable, str(REPO / "tools" / "launch_local.py")]


def tiny_args(beton: Path, cache: Path) -> list[str]:
    return [f"--config.data.train_path={beton}", "--config.data.global_batch_size=16", "--config.train.epochs=4",
            "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=5", "--config.checkpoint.keep=20",
            "--config.schedule.preset=fixed", "--config.schedule.resolution=64",
            f"--config.train.compilation_cache_dir={cache}", f"--config.distributed.heartbeat_timeout={HEARTBEAT}"]


class Launched:
    """tools/launch_local.py running in the background, its output collected line by line."""

    def __init__(self, workdir: Path, args: list[str], processes: int = 2, devices: int = 4):
        main_args = main_command(workdir, *args)[3:]  # after "python -m dailymae_jax.main"
        self.workdir = workdir
        self.process = subprocess.Popen(
            [*LAUNCHER, f"--num-processes={processes}", f"--devices-per-process={devices}", "--", *main_args],
            cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._collect, args=(s, out), daemon=True)
                         for s, out in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _collect(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def pid(self, process_id: int) -> int:
        for line in list(self.stderr):
            if line.startswith(f"launch_local: process {process_id} of ") and " is pid " in line:
                return int(line.split(" is pid ")[1].split()[0])
        raise AssertionError("the launcher did not report its processes:\n" + "\n".join(self.stderr[-20:]))

    def wait_for_step(self, step: int, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while max(metric_steps(self.workdir), default=0) < step:
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended early ({self.process.returncode}):\n" + self.tail())
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"step {step} not reached in {timeout} s:\n" + self.tail())
            time.sleep(0.1)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=10)
        return code

    def tail(self, lines: int = 60) -> str:
        return "\n".join([*self.stdout[-10:], *self.stderr[-lines:]])


def metric_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def step_losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows}


def assert_close_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= 1e-3 * abs(want[step]), (step, got[step], want[step])


@pytest.fixture(scope="module")
def loopback(tmp_path_factory, sample_beton):
    """The 1 process × 8 devices reference run, and what the 2-process runs share."""
    root = tmp_path_factory.mktemp("distributed")
    args = tiny_args(sample_beton, root / "jax_cache")
    run_command(main_command(root / "one", *args), devices=8)
    return root, args


@pytest.mark.slow
def test_eight_devices_train_like_one(loopback):
    root, args = loopback
    run_command(main_command(root / "single", *args))
    eight, one = step_losses(root / "one"), step_losses(root / "single")
    assert sorted(eight) == sorted(one) == list(range(1, STEPS + 1))
    assert_close_losses(eight, one, range(1, STEPS + 1))
    summary = json.loads((root / "one" / "summary.json").read_text())
    assert summary["device_count"] == 8 and summary["compilations_during_training"] == 0


@pytest.mark.slow
def test_two_processes_train_like_one(loopback):
    root, args = loopback
    workdir = root / "two"
    launched = Launched(workdir, args)
    assert launched.wait(timeout=1800) == 0, launched.tail()
    one, two = step_losses(root / "one"), step_losses(workdir)
    assert sorted(two) == list(range(1, STEPS + 1))  # every step logged once: by process 0 alone
    assert_close_losses(two, one, range(1, STEPS + 1))
    summary = json.loads((workdir / "summary.json").read_text())
    reference = json.loads((root / "one" / "summary.json").read_text())
    assert summary["process_count"] == 2 and summary["device_count"] == 8 and reference["process_count"] == 1
    assert summary["steps"] == STEPS and summary["compilations_during_training"] == 0
    assert abs(summary["final_loss"] - reference["final_loss"]) <= 1e-3 * reference["final_loss"]
    # Process 0 reports the run and writes its files; process 1 writes nothing of its own.
    assert [line for line in launched.stdout if "summary:" in line][0].startswith("[p0] summary:")
    # Gloo's C++ logging also reaches stdout, unflushed and sometimes split mid-line, so look for our own lines.
    ours = ("summary:", "exported ", "reconstructions:")
    assert not [line for line in launched.stdout if line.startswith("[p1]") and any(word in line for word in ours)]
    assert not [line for line in launched.stderr if line.startswith("[p1]") and "dailymae_jax.train" in line]
    for name in ("config.json", "export/mae.safetensors", "export/timm.pth", f"reconstructions/step_{STEPS}.png"):
        assert (workdir / name).is_file(), name
    got, want = load_file(workdir / "export" / "mae.safetensors"), load_file(root / "one" / "export" / "mae.safetensors")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-4, err_msg=key)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_resumes_in_one(loopback):
    root, args = loopback
    workdir = root / "sigterm"
    launched = Launched(workdir, args)
    launched.wait_for_step(6)
    os.kill(launched.pid(1), signal.SIGTERM)  # process 1 alone; process 0 learns of it through JAX
    assert launched.wait(timeout=600) == 128 + signal.SIGTERM, launched.tail()
    stops = {p: [line for line in launched.stderr if line.startswith(f"[p{p}] stopped by SIGTERM after step ")]
             for p in (0, 1)}
    assert len(stops[0]) == len(stops[1]) == 1, launched.tail()
    steps = {p: int(stops[p][0].split("after step ")[1].split(";")[0]) for p in (0, 1)}
    assert steps[0] == steps[1] >= 6, steps
    stopped = steps[0]
    assert (workdir / "checkpoints" / str(stopped)).is_dir() and not (workdir / "summary.json").exists()

    # The 2-process checkpoint resumes on 1 process with 8 devices and ends where the 1-process run ended.
    result = run_command(main_command(workdir, *args), devices=8)
    assert f"{STEPS} steps" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["process_count"] == 1 and summary["steps_this_run"] == STEPS - stopped
    assert_close_losses(step_losses(workdir), step_losses(root / "one"), range(stopped + 1, STEPS + 1))
    reference = json.loads((root / "one" / "summary.json").read_text())
    assert abs(summary["final_loss"] - reference["final_loss"]) <= 1e-3 * reference["final_loss"]


@pytest.mark.slow
def test_killing_one_process_ends_the_other(loopback):
    root, args = loopback
    launched = Launched(root / "killed", args)
    launched.wait_for_step(3)
    os.kill(launched.pid(1), signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        code = launched.wait(timeout=HEARTBEAT + 80)
    except subprocess.TimeoutExpired:
        launched.process.kill()
        raise AssertionError(f"process 0 still running {HEARTBEAT + 80} s after process 1 died:\n" + launched.tail())
    waited = time.monotonic() - killed_at
    assert code != 0 and waited < HEARTBEAT + 80, (code, waited)
    process_0 = "\n".join(line for line in launched.stderr if line.startswith("[p0]"))
    assert ("This most likely indicates that another task died" in process_0
            or "exiting at once, so that the others stop within" in process_0), launched.tail()
    assert "launch_local: " in launched.stderr[-1] and "process 1 was killed by SIGKILL" in launched.stderr[-1]

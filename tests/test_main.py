"""The command line itself: --help, and problems that end a run before anything is written or compiled with one
line and exit code 2 (bad configs, unreadable datasets), or with a hard exit whose message stays the last line."""

import sys

import pytest

from conftest import REPO, main_command, run_command


def test_help_lists_the_flags_and_every_recipe():
    result = run_command([sys.executable, "-m", "dailymae_jax.main", "--help"], timeout=120, check=False)
    assert result.returncode in (0, 1), result.stderr[-2000:]  # absl exits 1 after printing the help
    for flag in ("--config", "--workdir"):
        assert flag in result.stdout
    recipes = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name not in ("__init__.py", "common.py"))
    assert recipes and all(name in result.stdout for name in recipes), recipes


# --- Configuration: one line, exit code 2, before anything is written or compiled -------------------------

# One case per path an error takes to the command line: config.validate before JAX starts, the check against
# the mesh once it exists, absl's flag parsing, the data file, the config file itself. Every value check of
# validate and the workdir check are tested in process (tests/test_config.py, tests/test_schedule.py).
@pytest.mark.parametrize("args, devices, expected", [
    (["--config.schedule.resolution=100"], 1, "patch size 16"),
    pytest.param(["--config.data.global_batch_size=12"], 8,
                 "data.global_batch_size 12 is not divisible by the device count 8",
                 marks=pytest.mark.slow),  # checked once the mesh exists: the child loads the task's modules
    (["--config.train.epoch=3"], 1, "train has no field 'epoch'; did you mean train.epochs?"),
    (["--config.data.train_path=/no/such/train.beton"], 1, "data.train_path: no such file"),
    # Checked as the flags are parsed, before JAX is imported: each of these costs a fraction of a second.
    (["--config=/no/such/recipe.py"], 1, "--config: no such file /no/such/recipe.py"),
    (["--config={tmp}/syntax.py"], 1, "syntax.py: invalid syntax (line 1)"),
    (["--config={tmp}/raises.py"], 1, "raises.py: RuntimeError: no recipe here"),
], ids=["resolution", "batch-vs-devices", "unknown-key", "missing-data", "missing-config", "config-syntax",
        "config-raises"])
def test_bad_config_gives_one_line_and_exit_code_2(tmp_path, sample_beton, args, devices, expected):
    workdir = tmp_path / "run"
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    raise RuntimeError('no recipe here')\n")
    args = [arg.format(tmp=tmp_path) for arg in args]
    # Two short epochs, so that a check that fails to fire costs seconds, not minutes.
    base = ["--config.train.epochs=2", "--config.data.global_batch_size=16"] if devices == 1 else []
    base += [f"--config.data.train_path={sample_beton}"] if "train_path" not in args[0] else []
    result = run_command(main_command(workdir, *base, *args), devices=devices, check=False, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (workdir / "checkpoints").exists()


HARD_FAIL = """
import os, sys
from dailymae_jax import main
print("trained 7 steps")
# What a dying orbax thread printed (Python writes tracebacks in pieces): half a line at the end.
sys.stderr.write("  File 'orbax', line 1\\n")
sys.stderr.write("    raise RuntimeError('Event loop is closed')")
# And what such a thread prints after the message, before the process is gone.
exit_now = os._exit
def print_late_then_exit(code):
    print("late line", file=sys.stderr, flush=True)
    print("late line", flush=True)
    exit_now(code)
os._exit = print_late_then_exit
main._fail("error: saving checkpoint 7 failed", 1, hard=True)
"""


def test_hard_failure_message_is_the_last_line_and_a_line_of_its_own():
    """A failed save ends with os._exit while orbax's threads may still print, even half a traceback line."""
    result = run_command([sys.executable, "-c", HARD_FAIL], check=False, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == "error: saving checkpoint 7 failed", result.stderr
    assert result.stdout == "trained 7 steps\n"


@pytest.mark.slow  # the child loads the task's modules (ffcv) before it reads the file
def test_truncated_dataset_gives_one_line_and_exit_code_2(tmp_path, sample_beton):
    truncated = tmp_path / "train.beton"
    data = sample_beton.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    result = run_command(main_command(tmp_path / "run", f"--config.data.train_path={truncated}"), check=False,
                         timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("data error:")]
    assert len(errors) == 1 and str(truncated) in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_missing_pretraining_is_a_config_error(tmp_path):
    cmd = main_command(tmp_path / "ft", f"--config.data.sample_dir={tmp_path / 'sample'}",
                       f"--config.init.workdir={tmp_path / 'nothing'}", config="configs/finetune_demo.py")
    result = run_command(cmd, check=False, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "init.workdir: no checkpoint" in errors[0]
    assert not (tmp_path / "sample").exists()  # rejected before any data was written

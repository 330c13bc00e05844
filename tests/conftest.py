"""Shared fixtures: real photographs (the sample dataset's sources) and a small sample dataset on disk."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The suite runs on the CPU. Where JAX's CUDA plugin is installed (the test extra installs it, for
# tests/tools/test_plan_gpu.py) but there is no GPU, this also keeps the plugin from probing for one, which
# fails with a traceback on stderr; with the CPU named, the plugin only registers its compiler.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def photo_batch() -> np.ndarray:
    """uint8 (8, 64, 64, 3): centre squares of real photographs, resized."""
    from dailymae_jax.data.sample import source_photograph_paths

    images = []
    for path in list(source_photograph_paths().values())[:8]:
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        images.append(np.asarray(image.crop((left, top, left + side, top + side)).resize((64, 64),
                                                                                         Image.BICUBIC)))
    return np.stack(images)


@pytest.fixture(scope="session")
def sample_beton(tmp_path_factory) -> Path:
    """A small sample dataset (140 images) written to a .beton, shared by the loader and training tests."""
    from dailymae_jax.data.prepare import sample_beton as build

    return build(tmp_path_factory.mktemp("sample"), num_images=140, seed=0)


REPO = Path(__file__).resolve().parents[1]


def main_command(workdir, *args, config: str = "configs/mae_demo.py") -> list[str]:
    """The command line of a training run (the same one users type)."""
    return [sys.executable, "-m", "dailymae_jax.main", f"--config={config}", f"--workdir={workdir}", *args]


def cpu_env(devices: int = 1) -> dict[str, str]:
    """Environment for a child run on ``devices`` simulated CPU devices."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run_command(cmd: list[str], *, devices: int = 1, check: bool = True,
                timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(devices), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


# A training run through the real command line whose step builder (``dailymae_jax.train.<module>.<builder>``, the
# name that module calls) is wrapped so that the step producing ``state.step == at`` returns NaN parameters and
# loss.
_POISONED_RUN = """
import sys
import jax, jax.numpy as jnp
from dailymae_jax.train import {module}

real = {module}.{builder}

def poisoned(*args, **kwargs):
    step = real(*args, **kwargs)

    def wrapped(state, images, labels):
        state, metrics = step(state, images, labels)
        scale = jnp.where(state.step == {at}, jnp.nan, 1.0)  # the step that produced state.step
        state = state.replace(params=jax.tree.map(lambda p: p * scale, state.params))
        return state, dict(metrics, loss=metrics["loss"] * scale)
    return wrapped

{module}.{builder} = poisoned
from dailymae_jax import main
sys.argv = {argv!r}
main.run()
"""


def poisoned_run_command(main_args: list[str], *, module: str, builder: str, at: int) -> list[str]:
    """The command of ``python -m dailymae_jax.main *main_args`` with a NaN injected at step ``at``."""
    argv = ["dailymae_jax.main", *main_args]
    return [sys.executable, "-c", _POISONED_RUN.format(module=module, builder=builder, at=at, argv=argv)]


def pytest_collection_modifyitems(config, items) -> None:
    """Every test under tests/e2e is an end-to-end run: marked slow, so `make test-fast` leaves it out."""
    e2e = Path(__file__).resolve().parent / "e2e"
    for item in items:
        if e2e in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.slow)

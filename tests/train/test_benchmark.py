"""The pretraining-step benchmark (dailymae_jax.train.benchmark) on a tiny recipe, in this process, on CPU."""

import math

import jax
import pytest

from conftest import REPO
from dailymae_jax.config import load_config_file
from dailymae_jax.data.shard import make_mesh
from dailymae_jax.train import benchmark

TINY = ["--config.model.size=tiny", "--config.model.depth=2", "--config.model.decoder_width=64",
        "--config.model.decoder_depth=1", "--config.model.decoder_heads=2", "--config.model.dtype=float32"]


@pytest.mark.slow  # compiles and times a step
def test_step_times_and_flops_of_a_tiny_recipe():
    config = load_config_file(REPO / "configs" / "mae_b16.py", TINY)
    assert config.model.size == "tiny" and config.model.depth == 2
    (record,) = benchmark.measure_pretrain_step(config, mesh=make_mesh(jax.devices()[:1]), resolution=32,
                                                global_batch=4, num_classes=10, steps=2, warmup_steps=1)
    assert record["framework"] == "jax" and record["data"] == "synthetic" and record["steps"] == 2
    assert record["compilations_during_steps"] == 0  # compiled ahead of time, with the run's shardings
    assert record["step_time_min_s"] <= record["step_time_median_s"] <= record["step_time_max_s"]
    assert record["images_per_second"] == 4 / record["step_time_median_s"]
    assert record["flops_per_step"] > 0 and math.isfinite(record["final_loss"])
    assert record["mfu"] is None and record["peak_memory_bytes"] is None  # CPU: no peak rate, no memory stats


def test_time_steps_runs_warmup_then_timed_steps():
    calls = []
    times, warmup_seconds = benchmark.time_steps(calls.append, warmup=2, steps=3)
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3 and warmup_seconds >= 0
    assert benchmark.step_stats([0.5, 0.25, 1.0], batch=8)["images_per_second"] == 16.0

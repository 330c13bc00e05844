"""Resuming through the loop's own entry points when the newest checkpoint is damaged: the run starts from the
step before and is not taken for finished (the command-line path is main → task → these functions)."""

import logging

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dailymae_jax.checkpoint import Checkpointer, DataPosition
from dailymae_jax.data.shard import make_mesh
from dailymae_jax.train.loop import finished_summary, starting_point


@flax.struct.dataclass
class TinyState:
    params: dict
    step: jax.Array


def init(rng):
    return TinyState({"w": jax.random.normal(rng, (8, 4))}, jnp.int32(0))


def test_a_damaged_last_checkpoint_resumes_from_the_one_before_and_the_run_is_not_finished(tmp_path, caplog):
    workdir = tmp_path / "run"
    saver = Checkpointer(workdir, keep=5)
    kept = init(jax.random.PRNGKey(1)).replace(step=jnp.int32(5))
    saver.save(5, kept, DataPosition(0, 5), {})
    saver.save(7, kept.replace(step=jnp.int32(7)), DataPosition(1, 0), {})  # the run's last step: epoch 1 done
    saver.close()
    (workdir / "summary.json").write_text("{}")
    metadata = workdir / "checkpoints" / "7" / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:100])

    config = ml_collections.ConfigDict({"train": {"epochs": 1}, "checkpoint": {"keep": 5}})
    with caplog.at_level(logging.WARNING, logger="dailymae_jax.checkpoint"):
        assert finished_summary(config, workdir) is None  # step 7 would have said "finished"
    assert [r.getMessage().endswith("resuming from step 5") for r in caplog.records
            if r.name == "dailymae_jax.checkpoint"] == [True]
    checkpointer = Checkpointer(workdir, keep=5)
    try:
        start = starting_point(init, 0, make_mesh(), checkpointer)
    finally:
        checkpointer.close()
    assert start.resumed and start.position == DataPosition(0, 5) and int(start.state.step) == 5
    np.testing.assert_array_equal(start.state.params["w"], kept.params["w"])

"""Checkpoint digests: a damaged newest step, in any one of its files, is set aside and the previous one restored."""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dailymae_jax.checkpoint import (DAMAGED_DIRECTORY, DIGEST_FILE, CheckpointDamagedError, Checkpointer,
                                     DataPosition, restore_params, step_damage)


def small_state(step: int) -> dict:
    """A small pytree with the parts a TrainState has: float params, a counter."""
    return {"params": {"w": jnp.full((64, 8), float(step)), "b": jnp.arange(8.0) + step}, "step": jnp.int32(step)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with intact steps 2 and 4 (asynchronous saves, as in training)."""
    workdir = tmp_path_factory.mktemp("saved") / "run"
    checkpointer = Checkpointer(workdir, keep=3)
    for step in (2, 4):
        checkpointer.save(step, small_state(step), DataPosition(0, step), {"seed": 0})
    checkpointer.close()
    return workdir


def step_files(workdir, step):
    root = workdir / "checkpoints" / str(step)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def restore(workdir):
    checkpointer = Checkpointer(workdir, keep=3)
    try:
        state, position, _ = checkpointer.restore(jax.eval_shape(lambda: small_state(0)))
    finally:
        checkpointer.close()
    return state, position


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), max(1, len(data) // 20)):  # 20 flipped bytes spread over the file
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate, "flipped": flip, "deleted": lambda path: path.unlink()}
# Files of a saved step as the fixture writes them (orbax's layout); the hashed data files are matched by folder.
SAVED_FILES = ["_CHECKPOINT_METADATA", "commit_success.txt", "meta/commit_success.txt", "meta/metadata",
               "state/_METADATA", "state/_sharding", "state/commit_success.txt", "state/manifest.ocdbt",
               "state/d/*", "state/ocdbt.process_0/manifest.ocdbt", "state/ocdbt.process_0/d/*", DIGEST_FILE]


def test_every_saved_step_has_a_digest_of_all_its_files(saved):
    for step in (2, 4):
        names = step_files(saved, step)
        assert DIGEST_FILE in names and step_damage(saved / "checkpoints" / str(step)) is None
        covered = {name.rsplit("/", 1)[0] + "/*" if "/d/" in name else name for name in names}
        assert covered == set(SAVED_FILES), names


# A deleted digest leaves an intact step without one: see test_a_step_without_a_digest_is_restored_unchecked.
@pytest.mark.parametrize("pattern, damage", [(pattern, damage) for pattern in SAVED_FILES for damage in sorted(DAMAGE)
                                             if (pattern, damage) != (DIGEST_FILE, "deleted")])
def test_a_damaged_newest_step_falls_back_to_the_previous_one(saved, tmp_path, caplog, pattern, damage):
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    newest = workdir / "checkpoints" / "4"
    targets = sorted(newest.glob(pattern))
    assert targets, pattern
    original = {p.relative_to(newest): p.read_bytes() for p in newest.rglob("*") if p.is_file()}
    DAMAGE[damage](targets[0])
    with caplog.at_level(logging.WARNING, logger="dailymae_jax.checkpoint"):
        state, position = restore(workdir)
    assert position == DataPosition(0, 2) and int(state["step"]) == 2
    np.testing.assert_array_equal(state["params"]["w"], 2.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "dailymae_jax.checkpoint"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    relative = str(targets[0].relative_to(newest))
    assert f"step 4: {relative}" in lines[0] or f"step 4: {DIGEST_FILE} unreadable" in lines[0], lines[0]
    assert lines[0].endswith("resuming from step 2"), lines[0]
    # Set aside, not deleted: every other file byte for byte as it was.
    aside = workdir / DAMAGED_DIRECTORY / "4"
    assert not newest.exists() and aside.is_dir()
    for name, data in original.items():
        if name != targets[0].relative_to(newest):
            assert (aside / name).read_bytes() == data, name


def test_a_step_without_a_digest_is_restored_unchecked(saved, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    (workdir / "checkpoints" / "4" / DIGEST_FILE).unlink()
    assert restore(workdir)[1] == DataPosition(0, 4)


def test_no_intact_step_is_one_error_and_nothing_moves(saved, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    for step in (2, 4):
        truncate(workdir / "checkpoints" / str(step) / "state" / "_METADATA")
    with pytest.raises(CheckpointDamagedError) as error:
        Checkpointer(workdir)
    message = str(error.value)
    assert "\n" not in message and message.startswith("no intact checkpoint in ")
    assert "step 4: state/_METADATA does not match its digest; step 2: state/_METADATA" in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert not (workdir / DAMAGED_DIRECTORY).exists()


def test_saving_again_after_a_fallback_reaches_the_damaged_step_number(saved, tmp_path):
    """The step set aside no longer blocks its number: training from step 2 saves step 4 again."""
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    flip(next((workdir / "checkpoints" / "4" / "state" / "ocdbt.process_0" / "d").iterdir()))
    checkpointer = Checkpointer(workdir, keep=3)
    assert checkpointer.latest_step() == 2
    checkpointer.save(4, small_state(40), DataPosition(0, 4), {"seed": 0})
    checkpointer.close()
    state, position = restore(workdir)
    assert position == DataPosition(0, 4)
    np.testing.assert_array_equal(state["params"]["w"], 40.0)


def test_export_reads_the_newest_intact_step_and_leaves_the_damaged_one(saved, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    truncate(workdir / "checkpoints" / "4" / "state" / "manifest.ocdbt")
    with caplog.at_level(logging.WARNING, logger="dailymae_jax.checkpoint"):
        params, step, _ = restore_params(workdir)
    assert step == 2 and (workdir / "checkpoints" / "4").is_dir()
    np.testing.assert_array_equal(params["w"], 2.0)
    assert "step 4: state/manifest.ocdbt does not match its digest" in caplog.text
    with pytest.raises(CheckpointDamagedError, match="step 4: state/manifest.ocdbt"):
        restore_params(workdir, 4)

"""Checkpoints with orbax: the train state plus where the data stood, saved asynchronously and atomically.

A checkpoint directory ``<workdir>/checkpoints/<step>/`` holds ``state`` (the TrainState pytree) and ``meta``
(JSON: epoch, step in epoch, the config). orbax writes to a temporary directory and renames it on success,
so a crash mid-save never leaves a checkpoint that looks complete. A save that fails (a full disk, say) raises
``CheckpointSaveError`` naming the step and the last complete checkpoint, which stays intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the run stands in its data: the next batch to train on is (epoch, step_in_epoch)."""

    epoch: int
    step_in_epoch: int


def _save_from_one_replica() -> None:
    """Makes orbax write replicated arrays from their first replica.

    orbax's default, replica-parallel saving, slices every replicated array into one piece per device with
    small jitted ops, compiled at the first save: that is a burst of compilations in the middle of training
    (one per parameter shape and device). Our state is replicated over the data axis, so one replica per
    array is the natural writer.
    """
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed; earlier checkpoints are untouched."""


class Checkpointer:
    """Saves and restores (TrainState, DataPosition, config) under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        _save_from_one_replica()
        self.directory = Path(workdir).resolve() / "checkpoints"
        # cleanup_tmp_directories: a save that died half-written (kill -9, full disk) leaves a *-tmp directory;
        # the next run removes it rather than letting it fill the disk.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self._saving: int | None = None
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, position: DataPosition, config: dict[str, Any]) -> None:
        """Starts an asynchronous save; training continues while it is written."""
        meta = {"epoch": position.epoch, "step_in_epoch": position.step_in_epoch, "config": config}
        with self._reporting_failures():  # orbax raises a failed asynchronous save at the next call
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        self._saving = step

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, DataPosition, dict[str, Any]]:
        """Restores onto the shardings carried by ``abstract_state`` (any device count)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        meta = restored.meta
        return restored.state, DataPosition(meta["epoch"], meta["step_in_epoch"]), meta["config"]

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        """Blocks until the last save is on disk; raises CheckpointSaveError if it failed."""
        with self._reporting_failures():
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    @contextlib.contextmanager
    def _reporting_failures(self) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            failed, self._saving = self._saving, None
            self._manager.reload()  # forget the failed step; list what is complete on disk
            last = self._manager.latest_step()
            kept = f"the last complete checkpoint is {self.path(last)}" if last is not None else "no checkpoint kept"
            raise CheckpointSaveError(f"saving checkpoint {failed} in {self.directory} failed "
                                      f"({_failure_cause(error)}); {kept}") from error


def _failure_cause(error: BaseException) -> str:
    """The operating system's reason (e.g. 'No space left on device, errno 28') rather than orbax's long chain.

    tensorstore reports file errors as text ending in ``<reason> [os_error_code='N']``; Python code raises
    OSError. Anything else is shortened to its last 200 characters.
    """
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.strerror:
            return f"{cause.strerror}, errno {cause.errno}"
    text = " ".join(str(error).split())
    found = re.findall(r":\s*([^:\[]+?)\s*\[os_error_code='(\d+)'\]", text)
    if found:
        reason, code = found[-1]
        return f"{reason}, errno {code}"
    return text[-200:]


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target shardings, for restoring onto the current mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)


def restore_params(workdir: str | Path, step: int | None = None) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """The MAE parameters of one checkpoint as host numpy arrays, without building the train state.

    For export and import: nothing is compiled, no data is needed, and the optimizer and probe state are not
    read (orbax's partial restore). Returns ``(params, step, meta)`` where ``meta`` holds the epoch, the step in
    the epoch and the run's config. ``step`` None means the latest. Raises FileNotFoundError, one line, naming
    the directory and the steps it holds when there is no such checkpoint.
    """
    import numpy as np

    directory = Path(workdir).resolve() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {Path(workdir)}: {directory} does not exist")
    # Handlers given explicitly: the state was written by StandardSave, but only a PyTree handler can restore
    # a subtree of it.
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                   "meta": ocp.JsonCheckpointHandler()})
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; "
                                    f"available: {', '.join(map(str, sorted(steps)))}")
        tree = manager.item_metadata(step)["state"]
        if "params" not in tree:
            raise FileNotFoundError(f"{directory / str(step)} holds no 'params' (not a pretraining checkpoint)")
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item={"params": tree["params"]}, restore_args={"params": as_numpy},
                                         partial_restore=True),
            meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return restored.state["params"], step, restored.meta

"""Checkpoints with orbax: the train state plus where the data stood, saved asynchronously and atomically.

A checkpoint directory ``<workdir>/checkpoints/<step>/`` holds ``state`` (the TrainState pytree) and ``meta``
(JSON: epoch, step in epoch, the config). orbax writes to a temporary directory and renames it on success,
so a crash mid-save never leaves a checkpoint that looks complete. A save that fails (a full disk, say) raises
``CheckpointSaveError`` naming the step and the last complete checkpoint, which stays intact.

Every saved step also gets ``digest.json``: the SHA-256 of each of its files, written once orbax has finished
the step. Opening a workdir checks the newest step against it; a damaged or incomplete one (a truncated or
missing file, flipped bytes) is moved, untouched, to ``<workdir>/checkpoints-damaged/`` and the run goes on
from the newest intact step, saying so in one line. When no step is intact, ``CheckpointDamagedError`` names
them and nothing is moved. A step without ``digest.json`` (written by an older version, or a run killed in the
moment between orbax's rename and the digest) is restored unchecked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from dailymae_jax import distributed, files

log = logging.getLogger(__name__)
DIGEST_FILE = "digest.json"
DAMAGED_DIRECTORY = "checkpoints-damaged"


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


class CheckpointDamagedError(OSError):
    """No checkpoint step in the workdir is intact (nothing was moved or deleted)."""


def write_digest(step_directory: Path) -> None:
    """Records the SHA-256 of every file of a finished step in its ``digest.json``."""
    digests = {name: _sha256(step_directory / name) for name in _step_files(step_directory)}
    files.write_json(step_directory / DIGEST_FILE, {"sha256": digests})


def step_damage(step_directory: Path) -> str | None:
    """Why a saved step cannot be trusted (one short phrase naming the file), or None when it matches its digest
    or has none."""
    digest_path = step_directory / DIGEST_FILE
    if not digest_path.exists():
        return None
    try:
        recorded = json.loads(digest_path.read_text())["sha256"]
        if not isinstance(recorded, dict):
            raise TypeError("not a table")
    except (OSError, ValueError, TypeError, KeyError) as error:
        return f"{DIGEST_FILE} unreadable ({type(error).__name__})"
    for name, expected in sorted(recorded.items()):
        path = step_directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != expected:
            return f"{name} does not match its digest"
    return None


def _step_files(step_directory: Path) -> list[str]:
    return sorted(str(p.relative_to(step_directory)) for p in step_directory.rglob("*")
                  if p.is_file() and p.name != DIGEST_FILE and not p.name.startswith(f".{DIGEST_FILE}."))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _saved_steps(directory: Path) -> list[int]:
    """The step directories orbax would list, newest first."""
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def set_aside_damaged_steps(directory: Path) -> None:
    """Moves damaged steps newer than the newest intact one to ``checkpoints-damaged`` (never deletes them),
    logging one line; raises CheckpointDamagedError, moving nothing, when no step is intact."""
    steps = _saved_steps(directory)
    damaged: list[tuple[int, str]] = []
    for step in steps:
        reason = step_damage(directory / str(step))
        if reason is None:
            break
        damaged.append((step, reason))
    if not damaged:
        return
    which = "; ".join(f"step {step}: {reason}" for step, reason in damaged)
    if len(damaged) == len(steps):
        raise CheckpointDamagedError(f"no intact checkpoint in {directory} ({which}); nothing was moved or "
                                     "deleted: move the damaged steps away to start afresh, or restore them "
                                     "from a copy")
    aside = directory.parent / DAMAGED_DIRECTORY
    aside.mkdir(exist_ok=True)
    for step, _ in damaged:
        target, n = aside / str(step), 1
        while target.exists():
            target, n = aside / f"{step}-{n}", n + 1
        (directory / str(step)).rename(target)
    log.warning("damaged checkpoint in %s (%s), moved to %s; resuming from step %d", directory, which, aside,
                steps[len(damaged)])


class Checkpointer:
    """Saves and restores (TrainState, DataPosition, config) under ``<workdir>/checkpoints``."""

    _verifications = 0  # a distinct barrier name for each Checkpointer a process opens

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        _save_from_one_replica()
        self.directory = Path(workdir).resolve() / "checkpoints"
        self._verify_steps()
        # cleanup_tmp_directories: a save that died half-written (kill -9, full disk) leaves a *-tmp directory;
        # the next run removes it rather than letting it fill the disk.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self._saving: int | None = None
        self._undigested: int | None = None
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def _verify_steps(self) -> None:
        """Process 0 checks the newest steps against their digests (and sets damaged ones aside) while the
        others wait: a step directory must not move while another process reads it."""
        if distributed.is_main():
            set_aside_damaged_steps(self.directory)
        Checkpointer._verifications += 1
        distributed.barrier(f"checkpoints_verified_{Checkpointer._verifications}")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, position: DataPosition, config: dict[str, Any]) -> None:
        """Starts an asynchronous save; training continues while it is written."""
        meta = {"epoch": position.epoch, "step_in_epoch": position.step_in_epoch, "config": config}
        with self._reporting_failures():  # orbax raises a failed asynchronous save at the next call
            self._finish_previous_save()
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        self._saving = self._undigested = step

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
            self._finish_previous_save()

    def _finish_previous_save(self) -> None:
        """Waits for the save in flight (orbax would before the next save anyway), then digests it."""
        self._manager.wait_until_finished()
        step, self._undigested = self._undigested, None
        if step is not None and distributed.is_main() and self.path(step).is_dir():
            write_digest(self.path(step))

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
    the epoch and the run's config. ``step`` None means the newest intact one (a damaged newer one is named in a
    warning and left in place; a damaged ``step`` raises CheckpointDamagedError). Raises FileNotFoundError, one
    line, naming the directory and the steps it holds when there is no such checkpoint.
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
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; "
                                    f"available: {', '.join(map(str, sorted(steps)))}")
        step = _intact_step(directory, sorted(steps, reverse=True) if step is None else [step])
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


def _intact_step(directory: Path, candidates: list[int]) -> int:
    """The first of ``candidates`` that matches its digest; one warning line names those skipped."""
    skipped = []
    for step in candidates:
        reason = step_damage(directory / str(step))
        if reason is None:
            if skipped:
                log.warning("damaged checkpoint in %s (%s); reading step %d", directory, "; ".join(skipped), step)
            return step
        skipped.append(f"step {step}: {reason}")
    raise CheckpointDamagedError(f"no intact checkpoint in {directory} ({'; '.join(skipped)})")

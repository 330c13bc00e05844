"""Files written whole or not at all: a reader never sees half a file, and a failed write leaves the old
file (if any) and no temporary file behind. Every writer of the package (datasets, exports, reports) goes
through :func:`atomic_path`."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def write_json(path: str | Path, payload: Any) -> None:
    """Writes JSON atomically (see :func:`write_text_atomically`)."""
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")


def write_text_atomically(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer, renamed onto ``path`` when the block completes and removed
    when it raises: a reader never sees half a file, and a failed write leaves the old file (if any) and no
    temporary file behind.

    The temporary file is created before the block runs, exclusively (``O_CREAT | O_EXCL``, which never follows
    a symbolic link) under an unpredictable hidden name ``.<name>.tmp-<random>``: nobody else's file or link
    can stand in for it, and two writers never share one. It gets the mode a new file would get (or the mode
    of the file it replaces)."""
    path = Path(path)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(descriptor, _mode_for(path))
        os.close(descriptor)
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _mode_for(path: Path) -> int:
    """The permission bits of the file at ``path``, or those ``open`` would give a new file."""
    with contextlib.suppress(OSError):
        existing = os.stat(path, follow_symlinks=False)
        if stat.S_ISREG(existing.st_mode):
            return stat.S_IMODE(existing.st_mode)
    return 0o666 & ~umask()


def umask() -> int:
    """The process's umask, read from /proc where it can be (setting it to read it races with other threads);
    0o022 elsewhere. ``tempfile`` creates files 0o600 and folders 0o700: callers widen them to this."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    return 0o022


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

"""Files written whole or not at all: a reader never sees half a file, and a failed write leaves the old
file (if any) and no temporary file behind. Every writer of the package (datasets, exports, reports) goes
through :func:`atomic_path`."""

from __future__ import annotations

import contextlib
import json
import os
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
    temporary file behind. The temporary is ``.<name>.tmp-<pid>`` (hidden; the pid keeps two writers apart)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

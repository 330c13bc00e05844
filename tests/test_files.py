"""Atomic writes: a reader sees the old file or the new one, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dailymae_jax import files


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("old")
    files.write_json(path, {"loss": np.float32(0.5), "steps": np.int64(3), "dir": tmp_path})
    assert json.loads(path.read_text()) == {"loss": 0.5, "steps": 3, "dir": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_write_that_fails_midway_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(TypeError):  # the temporary file is created, then writing into it fails
        files.write_text_atomically(path, 123)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_rename_that_fails_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a non-empty directory: os.replace cannot put a file there
    with pytest.raises(OSError):
        files.write_text_atomically(target, "text")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_unserialisable_json_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        files.write_json(tmp_path / "x.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []

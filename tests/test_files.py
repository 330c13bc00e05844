"""Atomic writes: a reader sees the old file or the new one, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
import stat
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


def test_the_temporary_is_a_new_file_of_our_own_never_a_planted_link(tmp_path: Path) -> None:
    """Links planted at every name the old scheme would use (.<name>.tmp-<pid>) and at the target's own name
    are neither followed nor written through: the victim file keeps its content."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "summary.json"
    (tmp_path / f".summary.json.tmp-{os.getpid()}").symlink_to(victim)
    seen = []
    with files.atomic_path(path) as tmp:
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.name.startswith(".summary.json.tmp-")
        assert tmp.is_file() and not tmp.is_symlink() and tmp.stat().st_size == 0  # created, empty, ours
        tmp.write_text("new")
    assert path.read_text() == "new" and victim.read_text() == "precious"
    assert not seen[0].exists()


def test_two_writers_of_one_file_get_different_temporaries(tmp_path: Path) -> None:
    with files.atomic_path(tmp_path / "x") as first, files.atomic_path(tmp_path / "x") as second:
        assert first != second


def test_the_new_file_has_the_usual_mode_or_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    files.write_text_atomically(path, "a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~files.umask()  # not tempfile's 0o600
    path.chmod(0o640)
    files.write_text_atomically(path, "b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_the_umask_read_from_proc_is_the_process_umask() -> None:
    old = os.umask(0o027)
    try:
        assert files.umask() == 0o027
    finally:
        os.umask(old)

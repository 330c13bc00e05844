"""Tests for the embedded sample dataset (dailymae_jax.data.sample)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from dailymae_jax.data.sample import SOURCE_PHOTOGRAPHS, make_sample_dataset, source_photograph_paths

NUM_IMAGES = 48


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sample") / "ds"
    return root, make_sample_dataset(root, num_images=NUM_IMAGES, seed=0)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_sources_are_real_files_with_enough_classes() -> None:
    paths = source_photograph_paths()
    assert set(paths) == set(SOURCE_PHOTOGRAPHS)
    assert 10 <= len(paths) <= 16
    for name, path in paths.items():
        assert path.is_file(), name
        with Image.open(path) as im:
            assert min(im.size) >= 256, name  # big enough to crop from


def test_layout_balance_and_split(sample_dir: tuple[Path, dict]) -> None:
    root, summary = sample_dir
    classes = sorted(SOURCE_PHOTOGRAPHS)
    assert summary["classes"] == classes
    assert sorted(p.name for p in (root / "train").iterdir()) == classes
    assert sorted(p.name for p in (root / "val").iterdir()) == classes
    totals = []
    for name in classes:
        train = sorted((root / "train" / name).glob("*.jpg"))
        val = sorted((root / "val" / name).glob("*.jpg"))
        assert len(val) >= 1 and len(train) >= 1
        assert summary["per_class"]["train"][name] == len(train)
        assert summary["per_class"]["val"][name] == len(val)
        assert all(p.name.startswith(f"{name}_") for p in train + val)
        # Train and val never share a file name within a class.
        assert not {p.name for p in train} & {p.name for p in val}
        totals.append(len(train) + len(val))
    assert sum(totals) == NUM_IMAGES
    assert max(totals) - min(totals) <= 1  # round-robin balance
    assert summary["counts"] == {"train": sum(summary["per_class"]["train"].values()),
                                 "val": sum(summary["per_class"]["val"].values())}


def test_images_are_rgb_jpeg_with_imagenet_like_geometry(sample_dir: tuple[Path, dict]) -> None:
    root, _ = sample_dir
    aspects = set()
    for path in root.rglob("*.jpg"):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
            assert max(im.size) == 500 and min(im.size) >= 300
            aspects.add(round(im.width / im.height, 2))
    # Both landscape and portrait shapes appear.
    assert any(a > 1 for a in aspects) and any(a < 1 for a in aspects) and len(aspects) >= 3


def test_pixels_come_from_the_source_photograph(sample_dir: tuple[Path, dict]) -> None:
    """A sample's colour histogram is closer to its own source photo than to any other."""
    root, _ = sample_dir
    sources = {}
    for name, path in source_photograph_paths().items():
        with Image.open(path) as im:
            sources[name] = _histogram(im.convert("RGB"))
    for path in sorted((root / "train").rglob("*_00000.jpg")):
        with Image.open(path) as im:
            h = _histogram(im)
        distances = {name: np.abs(h - ref).sum() for name, ref in sources.items()}
        assert min(distances, key=distances.get) == path.parent.name, distances


def _histogram(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.int64) // 32  # 8 bins per channel
    codes = arr[..., 0] * 64 + arr[..., 1] * 8 + arr[..., 2]
    return np.bincount(codes.ravel(), minlength=512) / codes.size


def test_same_seed_same_bytes_other_seed_differs(sample_dir: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = sample_dir
    again = tmp_path / "again"
    make_sample_dataset(again, num_images=NUM_IMAGES, seed=0)
    assert _all_files(again) == _all_files(root)
    other = tmp_path / "other"
    make_sample_dataset(other, num_images=NUM_IMAGES, seed=1)
    other_files = _all_files(other)
    assert other_files.keys() == _all_files(root).keys()
    assert all(other_files[k] != v for k, v in _all_files(root).items())


def test_reuses_complete_dataset_and_rebuilds_on_new_params(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    first = make_sample_dataset(root, num_images=28, seed=3)
    marker = root / "train" / "astronaut" / "astronaut_00000.jpg"
    mtime = marker.stat().st_mtime_ns
    assert make_sample_dataset(root, num_images=28, seed=3) == first
    assert marker.stat().st_mtime_ns == mtime  # not rewritten
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 3
    second = make_sample_dataset(root, num_images=30, seed=3)
    assert second["num_images"] == 30
    assert sum(1 for _ in root.rglob("*.jpg")) == 30
    # No temporary folders are left next to the dataset.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_crash_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dailymae_jax.data.sample as sample

    calls = {"n": 0}
    real_render = sample._render

    def failing_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(sample, "_render", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        make_sample_dataset(tmp_path / "ds", num_images=28)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_foreign_folder_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a sample dataset"):
        make_sample_dataset(tmp_path / "mine", num_images=28)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="num_images"):
        make_sample_dataset(tmp_path / "x", num_images=5)
    with pytest.raises(ValueError, match="val_fraction"):
        make_sample_dataset(tmp_path / "x", num_images=28, val_fraction=1.0)


def test_crop_boxes_stay_inside_the_photograph_over_many_draws():
    # A crop shrunk to fit can exceed the source by a rounding error; drawing its offset then failed
    # ("high - low < 0") for datasets of about 1000 images or more.
    from dailymae_jax.data.sample import _sample_geometry

    rng = np.random.default_rng(0)
    for src_w, src_h in ((512, 512), (640, 427), (427, 640), (3543, 1416)):
        for _ in range(4000):
            (left, top, right, bottom), _, _ = _sample_geometry(rng, src_w, src_h)
            assert 0 <= left <= right <= src_w + 1e-6 and 0 <= top <= bottom <= src_h + 1e-6

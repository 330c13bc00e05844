"""Writing from a prepared TFDS dataset (array_record) read with tfds.data_source, without TensorFlow.

The dataset is prepared here, offline, from the sample photographs: a GeneratorBasedBuilder given the
JPEG bytes (TFDS stores them as they are) writes array_record files into a temporary data_dir.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dailymae_jax.data.sample import make_sample_dataset
from dailymae_jax.data.sources import TfdsSource
from dailymae_jax.data.write import write_beton

from beton_read import read_samples  # noqa: E402  (pytest puts tests/data first on the import path)

tfds = pytest.importorskip("tensorflow_datasets")

BROKEN_INDEX = 5
_BUILD = f"""
import json, sys
import tensorflow_datasets as tfds

manifest = json.load(open(sys.argv[1]))
files, classes = manifest["files"], manifest["classes"]

class TinyPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({{
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=classes)}}))

    def _split_generators(self, dl_manager):
        return {{"train": self._generate_examples()}}

    def _generate_examples(self):
        for i, (path, label) in enumerate(files):
            data = open(path, "rb").read()
            if i == {BROKEN_INDEX}:  # one more record, whose image bytes are cut short
                yield f"{{i:04d}}", {{"image": data[:300], "label": label}}
            yield f"{{i:04d}}b", {{"image": data, "label": label}}

TinyPhotos(data_dir=sys.argv[2], file_format="array_record").download_and_prepare()
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data_dir holding 'tiny_photos', the ImageFolder with the same images minus the broken one)."""
    root = tmp_path_factory.mktemp("tfds")
    make_sample_dataset(root / "ds", num_images=28, seed=2)
    train = root / "ds" / "train"
    classes = sorted(p.name for p in train.iterdir())
    files = [(f, label) for label, c in enumerate(classes) for f in sorted((train / c).iterdir())]
    # A grayscale PNG from one of the photographs, to go through a different codec.
    gray = root / "gray.png"
    Image.open(files[0][0]).convert("L").save(gray)
    dest = train / classes[files[0][1]] / "zz_gray.png"
    gray.replace(dest)
    files.append((dest, files[0][1]))

    # Prepared in a separate process, as a real dataset would be: array_record is not fork-safe,
    # and the writer's forked workers crash if this (parent) process has used it.
    manifest = root / "files.json"
    manifest.write_text(json.dumps({"classes": classes, "files": [(str(f), label) for f, label in files]}))
    data_dir = root / "tfds_data"
    subprocess.run([sys.executable, "-c", _BUILD, str(manifest), str(data_dir)], check=True, timeout=300)
    return data_dir, train


def test_tfds_source_writes_the_same_file_as_the_folder(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, train = prepared
    source = TfdsSource("tiny_photos", "train", data_dir)
    num_files = sum(1 for _ in train.glob("*/*"))
    assert source.classes == sorted(p.name for p in train.iterdir()) and len(source) == num_files + 1
    report = write_beton(source, tmp_path / "tfds.beton", max_resolution=128, num_workers=2, progress=False)
    assert report.source["type"] == "tfds" and report.source["name"] == "tiny_photos"
    assert report.num_written == num_files and report.num_skipped == 1
    ((name, reason),) = report.skipped
    assert name.startswith("tiny_photos[train][") and "truncated" in reason.lower()
    folder = write_beton(train, tmp_path / "folder.beton", max_resolution=128, num_workers=2, progress=False)
    assert folder.num_written == num_files
    # TFDS shuffles records; compare as multisets of (label, pixels).
    key = lambda s: (s[1], s[0].shape, s[0].tobytes())  # noqa: E731
    from_tfds = sorted(read_samples(tmp_path / "tfds.beton"), key=key)
    from_folder = sorted(read_samples(tmp_path / "folder.beton"), key=key)
    for (a, la, _), (b, lb, _) in zip(from_tfds, from_folder, strict=True):
        assert la == lb and np.array_equal(a, b)
    assert "tensorflow" not in sys.modules


def test_tfds_errors_are_one_line(prepared: tuple[Path, Path]) -> None:
    data_dir, _ = prepared
    with pytest.raises(ValueError, match=r"cannot open TFDS dataset 'no_such_set' split 'train' .*not found") as e:
        TfdsSource("no_such_set", "train", data_dir)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'tiny_photos' split 'validation'.*Unknown split"):
        TfdsSource("tiny_photos", "validation", data_dir)
    with pytest.raises(ValueError, match=r"has no feature 'img'; it has \['image', 'label'\]"):
        TfdsSource("tiny_photos", "train", data_dir, image_key="img")


def test_cli_reads_tfds(prepared: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_write_cli import tool

    data_dir, train = prepared
    num_files = sum(1 for _ in train.glob("*/*"))
    out = tmp_path / "cli.beton"
    code = tool.main(["--tfds", "tiny_photos", "--data-dir", str(data_dir), "--out", str(out), "--workers", "1",
                      "--no-progress", "--max-resolution", "64"])
    printed = capsys.readouterr().out
    assert code == 0 and f"wrote {num_files} images (14 classes" in printed and "skipped tiny_photos[train][" in printed
    assert len(read_samples(out)) == num_files

"""Resolves the training file of a run: the configured .beton, or the sample dataset built on first use."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from dailymae_jax.data.beton import BetonError, check_beton

# The sample photographs are cut and saved as quality-90 4:2:0 JPEGs (data/sample.py): re-encoding
# them at the recipe's quality 95 / 4:4:4 would only make the sample file larger.
_SAMPLE_JPEG_QUALITY = 90
_SAMPLE_CHROMA = "420"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    path: Path
    num_samples: int
    num_classes: int


def sample_beton_path(sample_dir: str | Path) -> Path:
    """Where ``sample_beton`` puts the sample dataset's training file."""
    return Path(sample_dir) / "train.beton"


def sample_val_beton_path(sample_dir: str | Path) -> Path:
    """Where ``sample_val_beton`` puts the sample dataset's validation file."""
    return Path(sample_dir) / "val.beton"


def sample_files(data: Any, *, validation: bool) -> list[Path]:
    """The sample-dataset files a run reads because its ``data`` config names no file of its own:
    ``train.beton`` without ``train_path`` and, for ``validation``, ``val.beton`` without ``val_path``."""
    files = [] if data.train_path else [sample_beton_path(data.sample_dir)]
    if validation and not data.get("val_path"):
        files.append(sample_val_beton_path(data.sample_dir))
    return files


def sample_beton(sample_dir: str | Path, *, num_images: int, seed: int = 0) -> Path:
    """``<sample_dir>/train.beton``, cutting the sample photographs and writing the file if missing."""
    from dailymae_jax.data.sample import make_sample_dataset
    from dailymae_jax.data.write import write_beton

    sample_dir = Path(sample_dir)
    beton = sample_beton_path(sample_dir)
    if not beton.exists():
        make_sample_dataset(sample_dir, num_images=num_images, seed=seed)
        write_beton(sample_dir / "train", beton, jpeg_quality=_SAMPLE_JPEG_QUALITY,
                    chroma_subsampling=_SAMPLE_CHROMA)
    return beton


def dataset_info(beton: str | Path) -> DatasetInfo:
    """Sample count and class count (max label + 1) of a .beton with 'image' and 'label' fields.

    Raises FileNotFoundError for a missing file and :class:`~dailymae_jax.data.beton.BetonError` (a
    ValueError) for a truncated, foreign or otherwise broken one, or one without those fields.
    """
    from ffcv.reader import Reader

    path = Path(beton)
    if not path.is_file():
        raise FileNotFoundError(f"data.train_path: no such file {path}")
    info = check_beton(path)
    for name, kind in (("image", "RGBImageField"), ("label", "IntField")):
        if info.fields.get(name) != kind:
            raise BetonError(f"{path}: needs a field {name!r} of type {kind}; the file has {info.fields}")
    reader = Reader(str(path))
    labels = np.asarray(reader.metadata[f"f{list(reader.handlers).index('label')}"])
    return DatasetInfo(path, int(reader.num_samples), int(labels.max()) + 1 if labels.size else 0)


def sample_val_beton(sample_dir: str | Path, *, num_images: int, seed: int = 0) -> Path:
    """``<sample_dir>/val.beton``: the sample dataset's held-out split, written on first use.

    The sample dataset keeps the last ~20% of each class's crops in ``val/`` (never in ``train.beton``);
    labels are the same sorted class-folder indices as in the training file, since every class has
    validation images. Same (num_images, seed) as ``sample_beton`` → the same dataset on disk.
    """
    from dailymae_jax.data.sample import make_sample_dataset
    from dailymae_jax.data.write import write_beton

    sample_dir = Path(sample_dir)
    beton = sample_val_beton_path(sample_dir)
    if not beton.exists():
        make_sample_dataset(sample_dir, num_images=num_images, seed=seed)
        write_beton(sample_dir / "val", beton)
    return beton

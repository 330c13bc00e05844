"""Resolves the training file of a run: the configured .beton, or the sample dataset built on first use."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from ffcv.reader import Reader


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    path: Path
    num_samples: int
    num_classes: int


def sample_beton_path(sample_dir: str | Path) -> Path:
    """Where ``sample_beton`` puts the sample dataset's training file."""
    return Path(sample_dir) / "train.beton"


def sample_beton(sample_dir: str | Path, *, num_images: int, seed: int = 0) -> Path:
    """``<sample_dir>/train.beton``, cutting the sample photographs and writing the file if missing."""
    from dailymae_jax.data.sample import make_sample_dataset
    from dailymae_jax.data.write import write_beton

    sample_dir = Path(sample_dir)
    beton = sample_beton_path(sample_dir)
    if not beton.exists():
        make_sample_dataset(sample_dir, num_images=num_images, seed=seed)
        write_beton(sample_dir / "train", beton)
    return beton


def dataset_info(beton: str | Path) -> DatasetInfo:
    """Sample count and class count (max label + 1) of a .beton with 'image' and 'label' fields."""
    path = Path(beton)
    if not path.is_file():
        raise FileNotFoundError(f"data.train_path: no such file {path}")
    reader = Reader(str(path))
    fields = list(reader.handlers)
    for name in ("image", "label"):
        if name not in fields:
            raise ValueError(f"{path}: field {name!r} missing; the file has {fields}")
    labels = np.asarray(reader.metadata[f"f{fields.index('label')}"])
    return DatasetInfo(path, int(reader.num_samples), int(labels.max()) + 1 if labels.size else 0)

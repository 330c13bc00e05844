"""Shared fixtures: real photographs (the sample dataset's sources) and a small sample dataset on disk."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def photo_batch() -> np.ndarray:
    """uint8 (8, 64, 64, 3): centre squares of real photographs, resized."""
    from dailymae_jax.data.sample import source_photograph_paths

    images = []
    for path in list(source_photograph_paths().values())[:8]:
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        images.append(np.asarray(image.crop((left, top, left + side, top + side)).resize((64, 64),
                                                                                         Image.BICUBIC)))
    return np.stack(images)


@pytest.fixture(scope="session")
def sample_beton(tmp_path_factory) -> Path:
    """A small sample dataset (140 images) written to a .beton, shared by the loader and training tests."""
    from dailymae_jax.data.prepare import sample_beton as build

    return build(tmp_path_factory.mktemp("sample"), num_images=140, seed=0)

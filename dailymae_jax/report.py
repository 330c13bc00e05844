"""What a run leaves for people: metrics (JSON lines + TensorBoard), config.json, summary.json, pictures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image


def write_json(path: str | Path, payload: Any) -> None:
    """Writes JSON atomically (temporary file, then rename): a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class MetricsWriter:
    """Scalars to ``metrics.jsonl`` (one JSON object per logged step) and to TensorBoard event files."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        workdir = Path(workdir)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is always written
            self._tb = None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                if math.isfinite(float(value)):
                    self._tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def reconstruction_grid(original: np.ndarray, masked: np.ndarray, reconstruction: np.ndarray,
                        pasted: np.ndarray, gap: int = 2) -> np.ndarray:
    """One row per image: original | masked input | reconstruction | reconstruction with visible patches.

    All inputs are uint8 (N, H, W, 3); returns a uint8 picture with white gaps.
    """
    n, h, w, _ = original.shape
    columns = (original, masked, reconstruction, pasted)
    grid = np.full((n * (h + gap) + gap, len(columns) * (w + gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        for j, column in enumerate(columns):
            top, left = gap + i * (h + gap), gap + j * (w + gap)
            grid[top:top + h, left:left + w] = column[i]
    return grid


def save_png(path: str | Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path)

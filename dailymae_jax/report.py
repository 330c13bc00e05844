"""What a run leaves for people: metrics (JSON lines + TensorBoard), config.json, summary.json, pictures."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image


def software_versions(distributions: Sequence[str]) -> dict[str, str]:
    """The Python version, the version of each of ``distributions`` that is installed, and the NVIDIA driver's
    where ``nvidia-smi`` answers: what a measurement's numbers depend on besides the code."""
    versions = {"python": platform.python_version()}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0 and smi.stdout.strip():
            versions["nvidia_driver"] = smi.stdout.strip().splitlines()[0].split(",")[-1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return versions


class MetricsWriter:
    """Scalars to ``metrics.jsonl`` (one JSON object per logged step) and scalars and images to TensorBoard.

    TensorBoard events go through clu's writer when TensorFlow is installed, and through tensorboardX (light,
    no TensorFlow) otherwise; both write ``<workdir>/tensorboard/events.out.tfevents.*``.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb: _TensorBoard | None = None
        if not enabled:
            return
        workdir = Path(workdir)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
        self._tb = _TensorBoard(workdir / "tensorboard")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._tb.scalars(int(step), {k: float(v) for k, v in scalars.items() if math.isfinite(float(v))})

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """A uint8 (H, W, 3) picture, e.g. the reconstruction grid."""
        if self.enabled:
            self._tb.image(int(step), name, image)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class _TensorBoard:
    """The TensorBoard half of MetricsWriter: clu's writer with TensorFlow, tensorboardX without."""

    def __init__(self, directory: Path):
        if importlib.util.find_spec("tensorflow") is not None:
            from clu import metric_writers
            self._clu = metric_writers.create_default_writer(str(directory), asynchronous=False)
            self._tbx = None
        else:
            from tensorboardX import SummaryWriter
            self._clu = None
            self._tbx = SummaryWriter(str(directory))

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._clu is not None:
            self._clu.write_scalars(step, scalars)
        else:
            for key, value in scalars.items():
                self._tbx.add_scalar(key, value, step)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self._clu is not None:
            self._clu.write_images(step, {name: image[None]})
        else:
            self._tbx.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._clu is not None:
            self._clu.close()
        else:
            self._tbx.close()


def parameter_overview(params: Any) -> str:
    """A table of every parameter's name, shape, size and statistics (clu's parameter overview)."""
    import jax
    from clu import parameter_overview as overview

    # Statistics need the values on this host; across processes, shapes and sizes are what we can show.
    local = all(getattr(leaf, "is_fully_addressable", True) for leaf in jax.tree.leaves(params))
    return overview.get_parameter_overview(params, include_stats=local)


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

"""Where the images of a dataset file come from: an ImageFolder split or a prepared TFDS split.

A source is an indexable list of (image, label) items that :func:`dailymae_jax.data.write.write_beton`
reads, possibly from several forked processes. Every image, whatever its origin, is decoded by
:func:`load_rgb`, so grayscale, palette, CMYK, alpha, 16-bit and EXIF-rotated pictures become the same
upright 8-bit RGB in both sources.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps


def load_rgb(file: str | Path | BinaryIO) -> np.ndarray:
    """Decode an image file (path or binary file object) as an HxWx3 uint8 RGB array, EXIF orientation applied.

    Grayscale, palette, CMYK, alpha and 16-bit images are all converted; transparent areas are
    composited onto white because the colour stored under fully transparent pixels is arbitrary.
    Raises whatever PIL raises for a file it cannot read (unknown format, truncated or corrupt data).
    """
    with Image.open(file) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return np.asarray(_to_rgb(im), dtype=np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # PIL's convert() clips high-bit-depth values to 255 instead of rescaling them.
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 65535 -> 255
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


class ImageSource:
    """Interface of a source: ``len(source)`` items, each decoded by :meth:`load`."""

    classes: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """The item's (HxWx3 uint8 RGB image, label); raises if the image cannot be decoded."""
        raise NotImplementedError

    def name(self, index: int) -> str:
        """Where the item comes from, for the report of skipped items (a path, or dataset[split][index])."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The source's identity, for the write report."""
        raise NotImplementedError


class ImageFolderSource(ImageSource):
    """An ImageFolder split: ``<root>/<class>/**/<file>``, labels = sorted class-folder indices (as torchvision).

    Hidden files and folders (name starting with '.') are ignored; every other file is an item,
    so non-image files are reported as skipped rather than silently dropped. Files directly under
    ``root`` belong to no class and are ignored, as in torchvision.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"source folder does not exist or is not a folder: {self.root}")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.files: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for folder, dirs, names in os.walk(self.root / name):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                self.files.extend((os.path.join(folder, n), label) for n in sorted(names) if not n.startswith("."))
        if not self.files:
            raise ValueError(f"source folder has no class sub-folders with files: {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.files[index]
        return load_rgb(path), label

    def name(self, index: int) -> str:
        return self.files[index][0]

    def describe(self) -> dict[str, Any]:
        return {"type": "image_folder", "path": str(self.root)}


class TfdsSource(ImageSource):
    """A split of a prepared TFDS dataset (array_record files), read with ``tfds.data_source``; no TensorFlow.

    Images are read as their stored bytes (``SkipDecoding``) and decoded by :func:`load_rgb`. Labels
    are the integers of ``label_key``; class names come from its ClassLabel feature when it has one.
    Nothing is downloaded: the dataset must already be prepared under ``data_dir`` (or TFDS's default).
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | Path | None = None, *,
                 image_key: str = "image", label_key: str = "label") -> None:
        self.dataset, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.data_dir = None if data_dir is None else str(data_dir)
        self._opened: tuple[int, Any] | None = None
        self._read_in: int | None = None  # the process that read records through this object
        source = self._source()
        features = source.dataset_info.features
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(f"TFDS dataset {name!r} has no feature {key!r}; it has {sorted(features.keys())}")
        self.classes = list(getattr(features[label_key], "names", None) or [])
        self._len = len(source)
        if self._len == 0:
            raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")

    def _source(self) -> Any:
        """The data source opened by this process.

        array_record readers are not fork-safe: a forked child that reads through its parent's
        reader can hang forever, and one that opens its own after the parent has read records can
        crash (segmentation fault, seen with array_record 0.8). So each process opens its own, and
        the writer reads records only in forked workers; a child of a process that already read
        gets this error instead of the crash.
        """
        if self._read_in is not None and self._read_in != os.getpid():
            raise RuntimeError(f"TFDS source {self.dataset!r} was read in process {self._read_in} before it forked; "
                               "array_record cannot be used after that in a child: read only in worker processes")
        if self._opened is None or self._opened[0] != os.getpid():
            try:
                import tensorflow_datasets as tfds
            except ImportError as exc:
                raise ValueError("reading a TFDS dataset needs tensorflow-datasets: "
                                 "pip install 'dailymae_jax[tfds]'") from exc
            try:
                source = tfds.data_source(self.dataset, split=self.split, data_dir=self.data_dir, download=False,
                                          decoders={self.image_key: tfds.decode.SkipDecoding()})
            except Exception as exc:  # tfds raises many types; its messages can list every dataset
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(f"cannot open TFDS dataset {self.dataset!r} split {self.split!r} "
                                 f"(data_dir {self.data_dir or 'default'}): {message}") from exc
            self._opened = (os.getpid(), source)
        return self._opened[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_opened"] = state["_read_in"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def load(self, index: int) -> tuple[np.ndarray, int]:
        source = self._source()
        self._read_in = os.getpid()
        record = source[index]
        return load_rgb(io.BytesIO(record[self.image_key])), int(record[self.label_key])

    def name(self, index: int) -> str:
        return f"{self.dataset}[{self.split}][{index}]"

    def describe(self) -> dict[str, Any]:
        return {"type": "tfds", "name": self.dataset, "split": self.split, "data_dir": self.data_dir,
                "image_key": self.image_key, "label_key": self.label_key}

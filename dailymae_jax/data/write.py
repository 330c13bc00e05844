"""Convert an ImageFolder split (``<class>/<image files>``) into an FFCV ``.beton`` file.

Fields, in this order: ``'image'`` (``ffcv.fields.RGBImageField``) and ``'label'``
(``ffcv.fields.IntField``), labels being the sorted class-folder indices as in torchvision's
ImageFolder.

ffcv is imported inside the functions: importing it pulls in torch and numba and takes
several seconds, which callers that only build sample data or parse configs should not pay.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
CHROMA_SUBSAMPLINGS = ("420", "444")


@dataclass
class WriteReport:
    """What :func:`write_beton` wrote and which source files it skipped (path, one-line reason)."""

    out_path: str
    num_written: int
    num_classes: int
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain-JSON-types view of the report."""
        d = asdict(self)
        d["skipped"] = [list(item) for item in self.skipped]
        return d

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.as_dict(), indent=2)


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file as an HxWx3 uint8 RGB array, EXIF orientation applied.

    Grayscale, palette, CMYK, alpha and 16-bit images are all converted; transparent areas are
    composited onto white because the colour stored under fully transparent pixels is arbitrary.
    """
    with Image.open(path) as im:
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


def _check_image(path: str) -> str | None:
    """Return None if ``path`` decodes to RGB, else a one-line reason."""
    try:
        load_rgb(path)
    except Exception as exc:  # any decoder failure means "skip this file"
        message = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {message}".rstrip(": ")
    return None


def _scan_folder(source_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """List (classes, [(file, label)]) of an ImageFolder split, hidden entries ignored."""
    if not source_dir.is_dir():
        raise ValueError(f"source folder does not exist or is not a folder: {source_dir}")
    classes = sorted(p.name for p in source_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for root, dirs, names in os.walk(source_dir / name):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend((os.path.join(root, n), label) for n in sorted(names) if not n.startswith("."))
    if not files:
        raise ValueError(f"source folder has no class sub-folders with files: {source_dir}")
    return classes, files


def _validate(files: list[tuple[str, int]], num_workers: int) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Split files into good ones and skipped (path, reason), decoding each in a process pool.

    This runs before writing because ffcv's writer cannot skip an item once it has counted it.
    """
    paths = [p for p, _ in files]
    if num_workers > 1 and len(paths) > 1:
        with multiprocessing.Pool(num_workers) as pool:
            reasons = pool.map(_check_image, paths, chunksize=max(1, len(paths) // (num_workers * 8)))
    else:
        reasons = [_check_image(p) for p in paths]
    good = [item for item, reason in zip(files, reasons) if reason is None]
    skipped = [(item[0], reason) for item, reason in zip(files, reasons) if reason is not None]
    return good, skipped


class _ImageFolderSamples:
    """Indexable (image, label) view of validated files, as ffcv's writer expects.

    ffcv's writer workers have no way to report an exception: a worker that raises dies and the
    parent waits forever. So a file that fails here (e.g. changed since validation) is counted
    in shared memory and replaced by a 1x1 placeholder; write_beton then discards the output.
    """

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples
        self.num_failed = multiprocessing.Value("i", 0)
        self.first_failure = multiprocessing.Array("c", 1024)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        try:
            return load_rgb(path), label
        except Exception as exc:
            with self.num_failed.get_lock():
                if self.num_failed.value == 0:
                    self.first_failure.value = f"{path}: {type(exc).__name__}: {exc}".encode()[:1023]
                self.num_failed.value += 1
            return np.zeros((1, 1, 3), np.uint8), label


@contextlib.contextmanager
def _jpeg_chroma(chroma_subsampling: str) -> Iterator[None]:
    """Make ffcv's JPEG encoder use the requested chroma subsampling while writing.

    ffcv encodes with ``cv2.imencode('.jpg', img, [IMWRITE_JPEG_QUALITY, q])``, which gives
    4:2:0 (libjpeg's default; checked with OpenCV 5.0: PIL reports sampling 2 == 4:2:0), and has
    no option for it. A subclass of RGBImageField would not do: the writer stores the field
    type by exact class, and a subclass makes the file unreadable without custom handlers. So
    for 4:4:4 the module-level encoder is swapped for the duration of the write; the writer's
    worker processes are forked inside this block and inherit the swap.
    """
    if chroma_subsampling == "420":
        yield
        return
    import cv2
    from ffcv.fields import rgb_image

    def encode_jpeg_444(numpy_image: np.ndarray, quality: int) -> np.ndarray:
        bgr = cv2.cvtColor(numpy_image, cv2.COLOR_RGB2BGR)
        ok, result = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality,
                                                int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR),
                                                int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)])
        if not ok:
            raise ValueError("cv2.imencode failed to encode image as JPEG")
        return result.reshape(-1)

    original = rgb_image.encode_jpeg
    rgb_image.encode_jpeg = encode_jpeg_444
    try:
        yield
    finally:
        rgb_image.encode_jpeg = original


def _check_settings(max_resolution: int, jpeg_quality: int, num_workers: int, write_mode: str,
                    compress_probability: float, chroma_subsampling: str) -> None:
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if chroma_subsampling not in CHROMA_SUBSAMPLINGS:
        raise ValueError(f"chroma_subsampling must be one of {CHROMA_SUBSAMPLINGS}, got {chroma_subsampling!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution < 1:
        raise ValueError(f"max_resolution must be positive, got {max_resolution}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability}")


def write_beton(source_dir: str | Path, out_path: str | Path, *, max_resolution: int = 500,
                jpeg_quality: int = 90, num_workers: int = 2, write_mode: str = "jpg",
                smart_threshold: int | None = None, compress_probability: float = 0.5,
                chroma_subsampling: str = "420") -> WriteReport:
    """Write the ImageFolder split ``source_dir`` to the FFCV file ``out_path``.

    Images larger than ``max_resolution`` on their longest side are downscaled by ffcv.
    Unreadable files are skipped and listed in the report, which is also saved as
    ``<out_path>.report.json``. The beton is written to ``<out_path>.tmp-<pid>`` and renamed
    onto ``out_path`` only on success, so a failed run leaves neither file behind.
    Raises ValueError for a missing/empty source folder, no readable image, or bad settings;
    RuntimeError if an image fails to decode while being written.
    """
    _check_settings(max_resolution, jpeg_quality, num_workers, write_mode, compress_probability,
                    chroma_subsampling)
    source_dir, out_path = Path(source_dir), Path(out_path)
    classes, files = _scan_folder(source_dir)
    good, skipped = _validate(files, num_workers)
    if not good:
        raise ValueError(f"no readable images in {source_dir} ({len(skipped)} files skipped)")

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                               jpeg_quality=jpeg_quality, smart_threshold=smart_threshold,
                               compress_probability=compress_probability),
        "label": IntField(),
    }
    samples = _ImageFolderSamples(good)
    tmp_path = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _jpeg_chroma(chroma_subsampling):
            writer = DatasetWriter(str(tmp_path), fields, num_workers=num_workers)
            # Small chunks keep workers balanced on small datasets (ffcv's default is 100).
            chunksize = max(1, min(100, len(good) // (num_workers * 4)))
            writer.from_indexed_dataset(samples, chunksize=chunksize)
        if samples.num_failed.value:
            raise RuntimeError(f"{samples.num_failed.value} image(s) failed to decode while writing "
                               f"{out_path}, first: {samples.first_failure.value.decode(errors='replace')}")
        os.replace(tmp_path, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise

    report = WriteReport(
        out_path=str(out_path), num_written=len(good), num_classes=len(classes), classes=classes,
        skipped=skipped,
        settings={"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "write_mode": write_mode,
                  "smart_threshold": smart_threshold, "compress_probability": compress_probability,
                  "chroma_subsampling": chroma_subsampling},
    )
    out_path.with_name(out_path.name + ".report.json").write_text(report.to_json())
    return report


def read_beton_info(path: str | Path) -> dict:
    """Return ``{'num_samples': int, 'fields': [names]}`` of an FFCV file.

    The header and allocation table are checked first, so a truncated, missing or foreign file
    raises ValueError naming the file instead of ffcv's assertion or a numpy read error.
    """
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"not an FFCV file: {path} does not exist")
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise ValueError(f"not an FFCV file: {path} is too short ({size} bytes)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise ValueError(f"not an FFCV v{CURRENT_VERSION} file: {path} (header version {int(header['version'])})")
    fields_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    table_ptr = int(header["alloc_table_ptr"])
    if not fields_end <= table_ptr <= size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise ValueError(f"truncated or corrupt FFCV file: {path} (allocation table at {table_ptr}, size {size})")
    try:
        reader = Reader(str(path))
    except Exception as exc:
        raise ValueError(f"unreadable FFCV file: {path} ({type(exc).__name__}: {exc})") from exc
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_ptr:
        raise ValueError(f"truncated or corrupt FFCV file: {path} (sample data past the allocation table)")
    if len(reader.metadata) != int(reader.num_samples):
        raise ValueError(f"truncated or corrupt FFCV file: {path} (metadata shorter than {reader.num_samples} samples)")
    return {"num_samples": int(reader.num_samples), "fields": list(reader.field_names)}

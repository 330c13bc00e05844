"""Write an image source (ImageFolder split or prepared TFDS split) to an FFCV ``.beton`` file.

Fields, in this order: ``'image'`` (``ffcv.fields.RGBImageField``) and ``'label'``
(``ffcv.fields.IntField``).

Writing runs in two passes. The first decodes every item in a process pool and sets aside the
ones that cannot be read (each with a one-line reason, listed in the report), because ffcv's
writer cannot drop an item once it has counted it. The second is ffcv's writer, run by
:func:`dailymae_jax.data.beton.write_indexed`, which watches its worker processes so that a failing
worker ends the write with an error instead of leaving it waiting forever. The file is written
under a temporary name and renamed onto the output only on success.

ffcv is imported inside the functions: importing it pulls in torch and numba and takes several
seconds, which callers that only build sample data or parse configs should not pay.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dailymae_jax.data.beton import jpeg_encoding, page_size_for, write_indexed
from dailymae_jax.data.sources import ImageFolderSource, ImageSource
from dailymae_jax.files import atomic_path, write_text_atomically

WRITE_MODES = ("jpg", "raw", "smart", "proportion")
CHROMA_SUBSAMPLINGS = ("420", "444")
# The dataset files of the DailyMAE recipe (arXiv 2404.00509): longest side 500 px, JPEG quality 95, 4:4:4.
RECIPE_MAX_RESOLUTION = 500
RECIPE_JPEG_QUALITY = 95
RECIPE_CHROMA = "444"
# A crop-index entry every 64 px of an MCU row (jpeg_crop.DEFAULT_INDEX_SPACING, not imported here: that loads
# the C kernel): +4% file size for 4:2:0, +7% for 4:4:4, in exchange for 1.2-1.3x faster crop decoding.
CROP_INDEX_SPACING = 64


@dataclass
class WriteReport:
    """What :func:`write_beton` wrote and which source items it skipped (name, one-line reason)."""

    out_path: str
    num_written: int
    num_classes: int
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    file_bytes: int = 0

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def as_dict(self) -> dict:
        """Plain-JSON-types view of the report."""
        d = asdict(self)
        d["num_skipped"] = self.num_skipped
        d["skipped"] = [list(item) for item in self.skipped]
        return d

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.as_dict(), indent=2)

    def summary(self) -> str:
        """One line for a terminal."""
        rate = self.num_written / self.seconds if self.seconds else 0.0
        return (f"wrote {self.num_written} images ({self.num_classes} classes, {self.file_bytes / 2**20:.1f} MiB) "
                f"to {self.out_path} in {self.seconds:.1f} s ({rate:.0f} img/s); skipped {self.num_skipped}")


def report_path(out_path: str | Path) -> Path:
    """Where :func:`write_beton` saves the report of ``out_path``: ``<out_path>.report.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".report.json")


def _check_settings(max_resolution: int, jpeg_quality: int, num_workers: int, write_mode: str,
                    smart_threshold: int | None, compress_probability: float, chroma_subsampling: str,
                    restart_interval: int, crop_index_spacing: int) -> None:
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if chroma_subsampling not in CHROMA_SUBSAMPLINGS:
        raise ValueError(f"chroma_subsampling must be one of {CHROMA_SUBSAMPLINGS}, got {chroma_subsampling!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if not 0 <= restart_interval <= 65535:
        raise ValueError(f"restart_interval must be in [0, 65535] MCUs (0: no restart markers), "
                         f"got {restart_interval}")
    if not 0 <= crop_index_spacing <= 65535:
        raise ValueError(f"crop_index_spacing must be in [0, 65535] pixels (0: no crop index), got {crop_index_spacing}")
    if max_resolution < 1:
        raise ValueError(f"max_resolution must be positive, got {max_resolution}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability}")
    # ffcv's smart mode without a threshold silently stores every image raw.
    if write_mode == "smart" and (smart_threshold is None or smart_threshold < 0):
        raise ValueError(f"write_mode 'smart' needs smart_threshold >= 0 (bytes of raw RGB above which an image is "
                         f"JPEG-compressed, e.g. 206432), got {smart_threshold}")
    if write_mode != "smart" and smart_threshold is not None:
        raise ValueError(f"smart_threshold applies only to write_mode 'smart', not {write_mode!r}")


def stored_size(height: int, width: int, max_resolution: int) -> tuple[int, int]:
    """(height, width) ffcv stores for an image: scaled so the longest side is at most max_resolution.

    Same arithmetic as ffcv's writer (scale factor, then truncation to int), so a 0 here is a 0 there.
    """
    ratio = max_resolution / max(height, width)
    if ratio >= 1:
        return height, width
    return int(ratio * height), int(ratio * width)


# The source being checked, set in each pool process by the initializer (forked, so not pickled twice).
_CHECK_SOURCE: ImageSource | None = None


def _set_check_source(source: ImageSource) -> None:
    global _CHECK_SOURCE
    _CHECK_SOURCE = source


def _check_item(index: int, max_resolution: int) -> tuple[int, str | None, int]:
    """(label, None, stored raw bytes) if item ``index`` can be written, else (-1, one-line reason, 0)."""
    assert _CHECK_SOURCE is not None
    try:
        image, label = _CHECK_SOURCE.load(index)
    except Exception as exc:  # any decoder failure means "skip this item"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return -1, f"{type(exc).__name__}: {message}".rstrip(": "), 0
    h, w = stored_size(image.shape[0], image.shape[1], max_resolution)
    if h < 1 or w < 1:
        return -1, (f"too thin: {image.shape[1]}x{image.shape[0]} px would be stored as {w}x{h} "
                    f"at max_resolution {max_resolution}"), 0
    if max(h, w) > 65535:  # ffcv stores sides as uint16
        return -1, f"too large: {image.shape[1]}x{image.shape[0]} px; FFCV stores sides up to 65535 px", 0
    return label, None, h * w * 3


def _check_items(source: ImageSource, max_resolution: int, num_workers: int,
                 progress: bool) -> tuple[list[tuple[int, int]], list[tuple[str, str]], int]:
    """Decode every item: ([(index, label)] of good items, [(name, reason)] of skipped ones, largest raw size)."""
    from tqdm import tqdm

    _set_check_source(source)
    indices = range(len(source))
    args = [(i, max_resolution) for i in indices]
    bar = tqdm(total=len(source), desc="checking", unit="img", disable=not progress, file=sys.stderr)
    try:
        # Always in worker processes, even for one worker: a TFDS source must not be read by the
        # process that later forks ffcv's writer workers (see TfdsSource._source). fork: the source
        # (possibly a list of a million paths) is inherited, not pickled.
        context = multiprocessing.get_context("fork")
        chunksize = max(1, min(256, len(source) // (num_workers * 16)))
        results = []
        with context.Pool(num_workers, initializer=_set_check_source, initargs=(source,)) as pool:
            for result in pool.imap(_star_check_item, args, chunksize=chunksize):
                results.append(result)
                bar.update(1)
    finally:
        bar.close()
        _set_check_source(None)
    good = [(i, label) for i, (label, reason, _) in zip(indices, results) if reason is None]
    skipped = [(source.name(i), reason) for i, (_, reason, _) in zip(indices, results) if reason is not None]
    largest = max((nbytes for _, _, nbytes in results), default=0)
    return good, skipped, largest


def _star_check_item(args: tuple[int, int]) -> tuple[int, str | None, int]:
    return _check_item(*args)


class _Samples:
    """Indexable (image, label) view of the checked items, as ffcv's writer expects."""

    def __init__(self, source: ImageSource, items: list[tuple[int, int]]) -> None:
        self.source, self.items = source, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[np.ndarray, int]:
        index, _ = self.items[k]
        try:
            return self.source.load(index)
        except Exception as exc:
            # It decoded in the first pass: the file changed since, or the disk failed.
            raise RuntimeError(f"{self.source.name(index)} failed to decode while writing "
                               f"(it passed the check before): {type(exc).__name__}: {exc}") from exc


class ReportError(OSError):
    """The .beton was written and renamed into place, but its report could not be saved."""


def write_beton(source: str | Path | ImageSource, out_path: str | Path, *,
                max_resolution: int = RECIPE_MAX_RESOLUTION, jpeg_quality: int = RECIPE_JPEG_QUALITY,
                num_workers: int = 2, write_mode: str = "jpg", smart_threshold: int | None = None,
                compress_probability: float = 0.5, chroma_subsampling: str = RECIPE_CHROMA,
                restart_interval: int = 0, crop_index_spacing: int = CROP_INDEX_SPACING, overwrite: bool = True,
                progress: bool = True) -> WriteReport:
    """Write ``source`` (an ImageFolder split folder, or an :class:`ImageSource`) to the FFCV file ``out_path``.

    Images larger than ``max_resolution`` on their longest side are downscaled (by ffcv, INTER_AREA).
    ``write_mode``: 'jpg' (every image JPEG at ``jpeg_quality``), 'raw' (uncompressed RGB), 'smart'
    (JPEG only when the raw image exceeds ``smart_threshold`` bytes), 'proportion' (JPEG with
    probability ``compress_probability``). ``chroma_subsampling``: '444' or '420' for the JPEGs.
    ``restart_interval``: a JPEG restart marker every that many MCUs (0: none); with 1, crop decoding skips
    the entropy-coded data outside each crop (docs/PERFORMANCE.md measures it) at some cost in file size.
    ``crop_index_spacing``: JPEGs without restart markers get a crop index (an APP9 segment other decoders
    skip) with an entry every that many pixels along each MCU row, so crop decoding skips Huffman decoding
    of the rows above and the MCUs beside each crop (0: no index; docs/PERFORMANCE.md measures it).

    Unreadable items are skipped and listed in the report, which is also saved as
    ``<out_path>.report.json``. The beton is written to ``.<name>.tmp-<pid>`` beside it and renamed onto
    ``out_path`` only on success, so a failed run leaves no partial file behind (and an existing
    file untouched). ``progress`` shows img/s and ETA on stderr for both passes.

    Raises ValueError for bad settings, a missing/empty source or no readable image;
    FileExistsError if ``out_path`` exists and not ``overwrite``; RuntimeError if writing fails
    (a worker error, e.g. an image that stopped decoding after the check, or a full disk); ReportError (an
    OSError) if the beton is in place but its report could not be saved.
    """
    _check_settings(max_resolution, jpeg_quality, num_workers, write_mode, smart_threshold, compress_probability,
                    chroma_subsampling, restart_interval, crop_index_spacing)
    if restart_interval:
        crop_index_spacing = 0  # the kernel splices restart intervals instead
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"output path is a folder, give a file name: {out_path}")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"output file exists (pass overwrite to replace it): {out_path}")
    if not isinstance(source, ImageSource):
        source = ImageFolderSource(source)
    from ffcv.fields import IntField, RGBImageField  # several seconds (torch, numba): kept out of the timing

    start = time.perf_counter()
    good, skipped, largest = _check_items(source, max_resolution, num_workers, progress)
    if not good:
        first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise ValueError(f"no readable images in {source.describe()} ({len(skipped)} skipped{first})")

    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                               smart_threshold=smart_threshold, compress_probability=compress_probability),
        "label": IntField(),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp_path, jpeg_encoding(chroma_subsampling, restart_interval, crop_index_spacing):
        # Small chunks keep workers balanced on small datasets (ffcv's default is 100).
        write_indexed(tmp_path, fields, _Samples(source, good), num_workers=num_workers,
                      page_size=page_size_for(largest), chunksize=max(1, min(100, len(good) // (num_workers * 4))),
                      progress=progress)

    labels = [label for _, label in good]
    classes = source.classes or [str(c) for c in range(max(labels) + 1)]
    report = WriteReport(
        out_path=str(out_path), num_written=len(good), num_classes=len(classes), classes=classes,
        skipped=skipped, source=source.describe(),
        settings={"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "write_mode": write_mode,
                  "smart_threshold": smart_threshold, "compress_probability": compress_probability,
                  "chroma_subsampling": chroma_subsampling, "restart_interval": restart_interval,
                  "crop_index_spacing": crop_index_spacing},
        seconds=round(time.perf_counter() - start, 3), file_bytes=out_path.stat().st_size,
    )
    try:
        write_text_atomically(report_path(out_path), report.to_json())
    except OSError as exc:
        raise ReportError(f"{out_path} was written ({report.num_written} images), but its report could not be "
                          f"saved to {report_path(out_path)}: {exc}") from exc
    return report

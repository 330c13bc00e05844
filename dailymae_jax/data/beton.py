"""The FFCV ``.beton`` file: checking one before anything reads it, and driving ffcv's writer safely.

Reading. ffcv's own reader trusts the file: a truncated one fails with an AssertionError, a numpy
read error or, worse, loads and then reads past the end or garbage while training.
:func:`check_beton` validates the layout ffcv 1.0.2 writes (ffcv/writer.py, ffcv/types.py):

    header (24 B: version, num_fields, page_size, num_samples, alloc_table_ptr)
    field descriptors (num_fields x 1041 B: type id, name, arguments)
    sample metadata (num_samples x the fields' combined dtype; images hold a pointer into the data)
    data pages (page_size each)
    allocation table (24 B entries: sample id, pointer, size) from alloc_table_ptr to the end of the file

and raises :class:`BetonError`, one line naming the file and what is wrong, when it does not hold.
Image bytes themselves are not decoded.

Writing. :func:`write_indexed` runs ffcv's writer with three things it lacks: a page size that fits
the largest image (:func:`page_size_for`), a watch on its worker processes (a worker that fails
ends the write with its error instead of leaving ffcv waiting forever), and a progress bar;
:func:`jpeg_encoding` selects 4:4:4 or 4:2:0 JPEGs and restart markers. What to write, and where, is data/write.py's job.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import queue
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class BetonError(ValueError):
    """The file is not a complete, well-formed FFCV dataset file."""


@dataclass(frozen=True)
class BetonInfo:
    """What :func:`check_beton` learnt: sample count, field name -> ffcv field class name, page size."""

    path: Path
    num_samples: int
    fields: dict[str, str]
    page_size: int


# Leading bytes of formats people mistake for, or rename to, .beton.
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "a gzip file"), (b"%PDF", "a PDF document"),
          (b"\x93NUMPY", "a numpy .npy file"), (b"\x89HDF", "an HDF5 file"), (b"ARROW1", "an Arrow file"))


def _what_is_it(head: bytes) -> str:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive"
    return ""


def check_beton(path: str | Path) -> BetonInfo:
    """Validate the FFCV file ``path`` and return its :class:`BetonInfo`; raise :class:`BetonError` if broken.

    Reads the header, field descriptors, all sample metadata and the allocation table (tens of MB for
    ImageNet), not the images.
    """
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType
    from ffcv.writer import MIN_PAGE_SIZE

    path = Path(path)
    if not path.is_file():
        raise BetonError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    foreign = _what_is_it(head)
    if foreign:
        raise BetonError(f"{path}: not an FFCV file, it is {foreign}")
    if size < HeaderType.itemsize:
        raise BetonError(f"{path}: not an FFCV file or cut short: {size} bytes, less than the "
                         f"{HeaderType.itemsize}-byte header")
    header = np.frombuffer(head[:HeaderType.itemsize], dtype=HeaderType)[0]
    version = int(header["version"])
    if version != CURRENT_VERSION:
        raise BetonError(f"{path}: not an FFCV file (format version field is {version}; ffcv 1.0.2 "
                         f"reads version {CURRENT_VERSION})")
    num_fields, page_size = int(header["num_fields"]), int(header["page_size"])
    num_samples, table_ptr = int(header["num_samples"]), int(header["alloc_table_ptr"])
    if not 1 <= num_fields <= 64 or page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise BetonError(f"{path}: not an FFCV file or corrupt header ({num_fields} fields, page size {page_size})")

    fields_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if size < fields_end:
        raise BetonError(f"{path}: truncated inside the field descriptors ({size} bytes, they end at {fields_end})")
    descriptors = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    names, handlers = [], []
    for i, desc in enumerate(descriptors):
        raw_name = bytes(desc["name"]).split(b"\0", 1)[0]
        handler_class = TYPE_ID_HANDLER.get(int(desc["type_id"]))
        if handler_class is None or not raw_name or not raw_name.isascii():
            raise BetonError(f"{path}: corrupt or custom field descriptor {i} (type id {int(desc['type_id'])}, "
                             f"name {raw_name[:16]!r})")
        try:
            handlers.append(handler_class.from_binary(desc["arguments"]))
        except Exception as exc:
            raise BetonError(f"{path}: corrupt arguments of field {raw_name.decode()!r} ({exc})") from exc
        names.append(raw_name.decode())
    metadata_type = np.dtype([("", h.metadata_type) for h in handlers], align=True)

    metadata_end = fields_end + num_samples * metadata_type.itemsize
    if size < metadata_end:
        raise BetonError(f"{path}: truncated inside the sample metadata ({size} bytes, {num_samples} samples "
                         f"need {metadata_end})")
    if table_ptr == 0:
        raise BetonError(f"{path}: incomplete, the writer never finished it (no allocation table)")
    if table_ptr < metadata_end:
        raise BetonError(f"{path}: corrupt header (allocation table at byte {table_ptr}, inside the metadata)")
    if size < table_ptr:
        raise BetonError(f"{path}: truncated inside the image data ({size} bytes, the data runs to {table_ptr})")
    if (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise BetonError(f"{path}: truncated inside the allocation table ({size - table_ptr} bytes after byte "
                         f"{table_ptr}, not a whole number of {ALLOC_TABLE_TYPE.itemsize}-byte entries)")
    if num_samples == 0:
        raise BetonError(f"{path}: contains no samples")

    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_ptr)
    if len(table) and (int(table["ptr"].min()) < metadata_end or int((table["ptr"] + table["size"]).max()) > table_ptr
                       or int(table["sample_id"].max()) >= num_samples):
        raise BetonError(f"{path}: corrupt allocation table (entries point outside the data region or to "
                         f"samples that do not exist)")
    metadata = np.fromfile(path, dtype=metadata_type, count=num_samples, offset=fields_end)
    for i, (name, handler) in enumerate(zip(names, handlers)):
        column = metadata[metadata_type.names[i]]
        if "data_ptr" not in (column.dtype.names or ()):
            continue
        missing = ~np.isin(column["data_ptr"], table["ptr"])
        if missing.any():
            raise BetonError(f"{path}: truncated or corrupt: {int(missing.sum())} of {num_samples} samples' "
                             f"{name!r} data are missing from the allocation table (first: sample "
                             f"{int(np.argmax(missing))})")
        if type(handler).__name__ == "RGBImageField":
            _check_images(path, name, column, table)
    return BetonInfo(path, num_samples, {n: type(h).__name__ for n, h in zip(names, handlers)}, page_size)


def _check_images(path: Path, name: str, column: np.ndarray, table: np.ndarray) -> None:
    """Image metadata: a known mode (0 jpg, 1 raw), positive sizes, raw data as large as height*width*3."""
    bad = ~np.isin(column["mode"], (0, 1)) | (column["height"] == 0) | (column["width"] == 0)
    raw = column["mode"] == 1
    if raw.any():
        order = np.argsort(table["ptr"])
        where = order[np.searchsorted(table["ptr"], column["data_ptr"][raw], sorter=order)]
        need = column["height"][raw].astype(np.uint64) * column["width"][raw] * 3
        bad[np.flatnonzero(raw)] |= table["size"][where] < need
    if bad.any():
        raise BetonError(f"{path}: corrupt image metadata in field {name!r}: {int(bad.sum())} samples "
                         f"(first: sample {int(np.argmax(bad))})")


# ffcv's default page (4 x 2 MiB), kept for images that fit.
_DEFAULT_PAGE_SIZE = 1 << 23


def page_size_for(largest_raw_bytes: int) -> int:
    """A page size (power of two) that holds the largest image, raw or JPEG-encoded.

    ffcv's workers cannot store an item larger than a page. A baseline JPEG can exceed the raw
    size at quality 100 on noisy pictures, but not twice over; 64 KiB covers the headers and another 64 KiB
    the crop index (one APPn segment at most).
    """
    need = 2 * largest_raw_bytes + (2 << 16)
    size = _DEFAULT_PAGE_SIZE
    while size < need:
        size *= 2
    if size >= 1 << 32:  # the header stores the page size as uint32
        raise ValueError(f"an image of {largest_raw_bytes} raw bytes is too large for an FFCV page; "
                         "lower max_resolution")
    return size


def write_indexed(path: str | Path, fields: dict, dataset: Any, *, num_workers: int, page_size: int,
                  chunksize: int, progress: bool) -> None:
    """Write ``dataset`` (indexable, items are tuples in ``fields`` order) to ``path`` with ffcv's writer.

    Raises RuntimeError with the first worker's error if a worker fails or dies.
    """
    writer = _make_guarded_writer_class()(str(path), fields, page_size=page_size, num_workers=num_workers,
                                          progress=progress)
    writer.from_indexed_dataset(dataset, chunksize=chunksize)


def _guarded_worker(work_fn: Any, error: Any, *args: Any) -> None:
    """Run one ffcv writer worker; on failure, store a one-line message for the parent and exit non-zero."""
    try:
        work_fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the parent needs to hear about any failure
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        with error.get_lock():
            if not error.value:
                error.value = message.encode(errors="replace")[:4095]
        sys.exit(1)


def _make_guarded_writer_class() -> type:
    """Subclass of ffcv's DatasetWriter (built on demand so that importing this module does not import ffcv)."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class _GuardedWriter(DatasetWriter):
        """ffcv's writer with a progress bar and a watch on its worker processes.

        ffcv 1.0.2 waits for its workers by polling a shared counter: a worker that raises (an
        image larger than a page, a full disk) dies and the parent waits forever, and its shared
        memory is never released. This driver runs the same worker function and file layout
        (ffcv's prepare/finalize) but stops, with the worker's error, as soon as one fails.
        """

        def __init__(self, fname: str, fields: dict, *, page_size: int, num_workers: int, progress: bool) -> None:
            super().__init__(fname, fields, page_size=page_size, num_workers=num_workers)
            self.progress = progress

        def _write_common(self, num_samples: int, queue_content: Any, work_fn: Any, extra_worker_args: Any) -> None:
            from tqdm import tqdm

            context = multiprocessing.get_context("fork")  # workers inherit the dataset; it is not pickled
            self.num_samples = num_samples
            self.prepare()  # header, field descriptors; creates the shared metadata block
            work = context.Queue()
            allocations = context.Queue()
            done = context.Value(ctypes.c_uint64, 0)
            error = context.Array("c", 4096)
            processes = []
            bar = tqdm(total=num_samples, desc="writing", unit="img", disable=not self.progress, file=sys.stderr)
            try:
                for item in queue_content:
                    work.put(item)
                for _ in range(self.num_workers):
                    work.put(None)  # one stop token per worker
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                        *extra_worker_args)
                processes = [context.Process(target=_guarded_worker, args=(work_fn, error, *args), daemon=True)
                             for _ in range(self.num_workers)]
                for p in processes:
                    p.start()
                tables: list = []
                # Each worker sends its allocation table when it has finished all its items.
                while len(tables) < len(processes):
                    self._raise_if_failed(processes, error)
                    if int(done.value) > bar.n:
                        bar.update(int(done.value) - bar.n)
                    with contextlib.suppress(queue.Empty):
                        tables.append(allocations.get(timeout=0.1))
                if int(done.value) > bar.n:
                    bar.update(int(done.value) - bar.n)
                for p in processes:
                    p.join()
                self._raise_if_failed(processes, error)
                if int(done.value) != num_samples:
                    raise RuntimeError(f"ffcv's workers wrote {int(done.value)} of {num_samples} items")
                self.finalize([entry for table in tables for entry in table])
            finally:
                bar.close()
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                    p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        @staticmethod
        def _raise_if_failed(processes: list, error: Any) -> None:
            if error.value:
                raise RuntimeError(f"a writer worker failed: {error.value.decode(errors='replace')}")
            for p in processes:
                if p.exitcode not in (None, 0):
                    raise RuntimeError(f"a writer worker died with exit code {p.exitcode} "
                                       "(a negative code is the signal that killed it, e.g. -9: out of memory)")

    return _GuardedWriter


@contextlib.contextmanager
def jpeg_encoding(chroma_subsampling: str, restart_interval: int = 0, crop_index_spacing: int = 0) -> Iterator[None]:
    """Make ffcv's JPEG encoder use the requested chroma subsampling, restart interval and crop index.

    ffcv encodes with ``cv2.imencode('.jpg', img, [IMWRITE_JPEG_QUALITY, q])``, which gives
    4:2:0 (libjpeg's default; checked with OpenCV 5.0: PIL reports sampling 2 == 4:2:0) without
    restart markers, and has no option for either. A subclass of RGBImageField would not do: the
    writer stores the field type by exact class, and a subclass makes the file unreadable without
    custom handlers. So the module-level encoder is swapped for the duration of the write; the
    writer's worker processes are forked inside this block and inherit the swap.

    ``restart_interval``: a restart marker every that many MCUs (0: none). Restart markers let the
    crop-decode kernel splice out the entropy-coded data a crop needs (data/_jpeg_crop.c), which
    works when the interval divides the MCUs of a row: 1 always does.

    ``crop_index_spacing``: add a crop index (:func:`data.jpeg_crop.add_crop_index`) with an entry every that
    many pixels along each MCU row (0: none; files with restart markers get none).
    """
    if chroma_subsampling == "420" and restart_interval == 0 and crop_index_spacing == 0:
        yield
        return
    import cv2
    from ffcv.fields import rgb_image

    params = [int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR),
              int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444 if chroma_subsampling == "444"
                  else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)]
    if restart_interval:
        params += [int(cv2.IMWRITE_JPEG_RST_INTERVAL), int(restart_interval)]

    def encode_jpeg(numpy_image: np.ndarray, quality: int) -> np.ndarray:
        bgr = cv2.cvtColor(numpy_image, cv2.COLOR_RGB2BGR)
        ok, result = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality, *params])
        if not ok:
            raise ValueError("cv2.imencode failed to encode image as JPEG")
        if crop_index_spacing:  # add_crop_index leaves files with restart markers alone
            from dailymae_jax.data.jpeg_crop import add_crop_index

            return np.frombuffer(add_crop_index(result.tobytes(), crop_index_spacing), np.uint8)
        return result.reshape(-1)

    original = rgb_image.encode_jpeg
    rgb_image.encode_jpeg = encode_jpeg
    try:
        yield
    finally:
        rgb_image.encode_jpeg = original

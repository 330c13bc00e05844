"""Checks that a file is a complete FFCV ``.beton`` before anything reads it.

ffcv's own reader trusts the file: a truncated one fails with an AssertionError, a numpy read
error or, worse, loads and then reads past the end or garbage while training. :func:`check_beton`
validates the layout ffcv 1.0.2 writes (ffcv/writer.py, ffcv/types.py):

    header (24 B: version, num_fields, page_size, num_samples, alloc_table_ptr)
    field descriptors (num_fields x 1041 B: type id, name, arguments)
    sample metadata (num_samples x the fields' combined dtype; images hold a pointer into the data)
    data pages (page_size each)
    allocation table (24 B entries: sample id, pointer, size) from alloc_table_ptr to the end of the file

and raises :class:`BetonError`, one line naming the file and what is wrong, when it does not hold.
Image bytes themselves are not decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

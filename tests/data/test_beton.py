"""check_beton: a truncated, incomplete or foreign .beton gives one clear error naming the file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dailymae_jax.data.beton import BetonError, check_beton
from dailymae_jax.data.prepare import dataset_info


@pytest.fixture(scope="module")
def layout(sample_beton: Path) -> dict[str, int]:
    """Byte offsets of the regions of the shared sample beton (conftest's sample_beton)."""
    from ffcv.reader import Reader
    from ffcv.types import FieldDescType, HeaderType

    reader = Reader(str(sample_beton))
    fields_end = HeaderType.itemsize + int(reader.num_fields) * FieldDescType.itemsize
    return {"fields_end": fields_end, "metadata_end": fields_end + reader.metadata.nbytes,
            "table_ptr": int(reader.header["alloc_table_ptr"]), "size": sample_beton.stat().st_size,
            "num_samples": int(reader.num_samples)}


def test_a_good_file_passes(sample_beton: Path, layout: dict[str, int]) -> None:
    info = check_beton(sample_beton)
    assert info.num_samples == layout["num_samples"] == dataset_info(sample_beton).num_samples
    assert info.fields == {"image": "RGBImageField", "label": "IntField"}
    assert info.page_size & (info.page_size - 1) == 0


# (name, where the file is cut, expected message)
CUTS = [
    ("empty", lambda L: 0, "less than the 24-byte header"),
    ("in_header", lambda L: 10, "less than the 24-byte header"),
    ("in_field_descriptors", lambda L: L["fields_end"] - 100, "truncated inside the field descriptors"),
    ("in_metadata", lambda L: L["fields_end"] + 40, "truncated inside the sample metadata"),
    ("in_data_start", lambda L: L["metadata_end"] + 1000, "truncated inside the image data"),
    ("in_data_middle", lambda L: (L["metadata_end"] + L["table_ptr"]) // 2, "truncated inside the image data"),
    ("at_table", lambda L: L["table_ptr"], "data are missing from the allocation table"),
    ("in_table", lambda L: L["size"] - 7, "truncated inside the allocation table"),
    # Whole entries gone: the sizes still add up, only the cross-check against the metadata sees it.
    ("whole_table_entries", lambda L: L["size"] - 3 * 24, "3 of .* data are missing from the allocation table"),
]


@pytest.mark.parametrize("name, cut, message", CUTS, ids=[c[0] for c in CUTS])
def test_truncated_files_are_rejected(name: str, cut, message: str, sample_beton: Path, layout: dict[str, int],
                                      tmp_path: Path) -> None:
    path = tmp_path / f"{name}.beton"
    path.write_bytes(sample_beton.read_bytes()[:cut(layout)])
    with pytest.raises(BetonError, match=message) as caught:
        check_beton(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    # The run's entry point to a dataset file reports it the same way.
    with pytest.raises(BetonError, match=message):
        dataset_info(path)


def test_ffcv_alone_accepts_a_file_missing_table_entries(sample_beton: Path, tmp_path: Path) -> None:
    """Why the check exists: ffcv's Reader opens this file silently, and the loader would read garbage."""
    from ffcv.reader import Reader

    path = tmp_path / "cut.beton"
    path.write_bytes(sample_beton.read_bytes()[:-3 * 24])
    assert Reader(str(path)).num_samples > 0
    with pytest.raises(BetonError):
        check_beton(path)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _zip(sample_beton: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("train.beton", sample_beton.read_bytes()[:4096])
    return buf.getvalue()


@pytest.mark.parametrize("kind, message", [
    ("png", "not an FFCV file, it is a PNG image"),
    ("zip", "not an FFCV file, it is a zip archive"),
    ("jpeg", "not an FFCV file, it is a JPEG image"),
    ("text", "not an FFCV file"),
    ("zeros", "not an FFCV file"),
])
def test_foreign_files_are_rejected(kind: str, message: str, sample_beton: Path, tmp_path: Path) -> None:
    content = {
        "png": _png(),
        "zip": _zip(sample_beton) if kind == "zip" else b"",
        "jpeg": b"\xff\xd8\xff\xe0" + bytes(5000),
        "text": b"image,label\n" * 1000,
        "zeros": bytes(1 << 16),
    }[kind]
    path = tmp_path / "foreign.beton"
    path.write_bytes(content)
    with pytest.raises(BetonError, match=message) as caught:
        check_beton(path)
    assert str(path) in str(caught.value)


def _patched(sample_beton: Path, tmp_path: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(sample_beton.read_bytes())
    raw[offset:offset + len(data)] = data
    path = tmp_path / "patched.beton"
    path.write_bytes(bytes(raw))
    return path


def test_unfinished_and_corrupt_headers(sample_beton: Path, layout: dict[str, int], tmp_path: Path) -> None:
    # ffcv writes the header with alloc_table_ptr = 0 first and the real one when it finishes.
    path = _patched(sample_beton, tmp_path, 16, np.uint64(0).tobytes())
    with pytest.raises(BetonError, match="incomplete, the writer never finished it"):
        check_beton(path)
    path = _patched(sample_beton, tmp_path, 0, np.uint16(1).tobytes())
    with pytest.raises(BetonError, match="format version field is 1"):
        check_beton(path)
    path = _patched(sample_beton, tmp_path, 4, np.uint32(12345).tobytes())  # page size
    with pytest.raises(BetonError, match="corrupt header"):
        check_beton(path)
    path = _patched(sample_beton, tmp_path, 24, bytes([200]))  # first field's type id
    with pytest.raises(BetonError, match="corrupt or custom field descriptor 0"):
        check_beton(path)
    # Sample 0's image: mode byte 7 (neither jpg nor raw).
    path = _patched(sample_beton, tmp_path, layout["fields_end"], bytes([7]))
    with pytest.raises(BetonError, match="corrupt image metadata in field 'image'.*first: sample 0"):
        check_beton(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(BetonError, match="no such file"):
        check_beton(tmp_path / "nope.beton")
    with pytest.raises(BetonError, match="not a file"):
        check_beton(tmp_path)
    with pytest.raises(FileNotFoundError, match="data.train_path: no such file"):
        dataset_info(tmp_path / "nope.beton")

"""Test helper: read back what a .beton stores, with ffcv's Reader and PIL (independent of our loader)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def read_samples(path: Path) -> list[tuple[np.ndarray, int, int]]:
    """Decode every sample of a beton with PIL as (RGB array, label, mode: 0 jpg / 1 raw).

    Reading through ffcv.reader.Reader keeps each image's stored size, which a Loader's crop
    decoders would hide.
    """
    from ffcv.reader import Reader

    reader = Reader(str(path))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.fromfile(path, dtype=np.uint8)
    out = []
    for meta in reader.metadata:
        image, label = meta["f0"], int(meta["f1"])
        ptr = int(image["data_ptr"])
        blob = data[ptr:ptr + sizes[ptr]]
        h, w = int(image["height"]), int(image["width"])
        if int(image["mode"]) == 0:  # jpg
            arr = np.asarray(Image.open(io.BytesIO(blob.tobytes())).convert("RGB"))
        else:  # raw
            arr = blob[:h * w * 3].reshape(h, w, 3)
        assert arr.shape == (h, w, 3)
        out.append((arr, label, int(image["mode"])))
    return out


def jpeg_blobs(path: Path) -> list[bytes]:
    """The encoded bytes of every JPEG-mode image in a beton."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = path.read_bytes()
    ptrs = [int(m["f0"]["data_ptr"]) for m in reader.metadata if int(m["f0"]["mode"]) == 0]
    return [data[p:p + sizes[p]] for p in ptrs]

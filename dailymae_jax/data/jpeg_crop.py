"""The crop-decode kernel (``_jpeg_crop.c``, ``_jpeg_index.c``): Python API and the ctypes bindings that
numba-compiled loaders call.

:func:`decode_crop` decodes only the part of a JPEG that a crop box needs, at the smallest DCT scale
(1/1, 1/2, 1/4 or 1/8) that still leaves at least the output's size, and resamples the box to the output size
(bicubic, or area averaging). In a file with a crop index (:func:`add_crop_index`, which the dataset writer
adds), it also Huffman-decodes only the MCUs the crop needs. The ffcv decoders in :mod:`dailymae_jax.data.decode` call the very same C
function, through :func:`decode_into` and :func:`resize_into`, from their numba code.
"""

from __future__ import annotations

import ctypes
import importlib.util
import numbers
from ctypes import c_int32, c_int64, c_uint64, c_void_p

import numpy as np

INTERPOLATIONS = ("bicubic", "area")

# Flags of dm_decode_crop / dm_resize_crop (see _jpeg_crop.c).
FLIP = 1
FILTER_AREA = 2
NO_DCT_SCALING = 4
NO_SPLICE = 8
FAST_UPSAMPLING = 16
FAST_IDCT = 32
DECODE_ONLY = 64  # profiling (tools/bench_decode.py): stop before resampling, destination left untouched
LIBJPEG_HUFFMAN = 128  # libjpeg's own Huffman decoder instead of ours (tests and benchmarks)
NO_INDEX = 256  # ignore a crop index in the file (tests and benchmarks)
RGB_ROWS = 512  # resample libjpeg's RGB rows even where YCbCr planes would be used (tests and benchmarks)

# decode_crop's ``info``: DCT denominator, spliced (0/1), rows and columns decoded, indexed (0/1), planar (0/1).
INFO_SIZE = 6
# Pixels between crop-index entries along an MCU row (see add_crop_index): +4% file size for 4:2:0, +7% for
# 4:4:4, in exchange for 1.2-1.3x faster crop decoding (docs/PERFORMANCE.md). The dataset writer's default.
DEFAULT_INDEX_SPACING = 64

_OK, _ERR_JPEG, _ERR_ARGS, _ERR_NOMEM = 0, -1, -2, -3
# Loader error record: int64 [count, first failing sample] followed by the first failure's message.
ERROR_RECORD_BYTES = 256


def _load_library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("dailymae_jax.data._jpeg_crop")
    if spec is None or spec.origin is None:
        raise ImportError("dailymae_jax.data._jpeg_crop is not built: reinstall the package "
                          "(`pip install -e .`, which compiles dailymae_jax/data/_jpeg_crop.c against libjpeg)")
    return ctypes.CDLL(spec.origin)


_lib = _load_library()

# dm_decode_crop(data, size, top, left, height, width, dst, out_h, out_w, flags, info) -> int32
DECODE_CROP_ARGTYPES = [c_void_p, c_uint64, c_int32, c_int32, c_int32, c_int32, c_void_p, c_int32, c_int32, c_int32,
                        c_void_p]

_decode_c = _lib.dm_decode_crop
_decode_c.argtypes = DECODE_CROP_ARGTYPES
_decode_c.restype = c_int32

_resize_c = _lib.dm_resize_crop
_resize_c.argtypes = [c_void_p, c_int32, c_int32, c_int32, c_int32, c_int32, c_int32, c_void_p, c_int32, c_int32,
                      c_int32]
_resize_c.restype = c_int32

_denominator_c = _lib.dm_dct_denominator
_denominator_c.argtypes = [c_int32] * 4
_denominator_c.restype = c_int32

_index_add_c = _lib.dm_index_add
_index_add_c.argtypes = [c_void_p, c_uint64, c_int32, c_void_p, c_uint64, c_void_p, c_int32]
_index_add_c.restype = c_int64

_message_c = _lib.dm_error_message
_message_c.argtypes = []
_message_c.restype = ctypes.c_char_p

_record_error_c = _lib.dm_record_error
_record_error_c.argtypes = [c_void_p, c_int64, c_int64, c_int32]
_record_error_c.restype = None


# numba compiles these (ffcv's pattern: a plain function that calls a ctypes function with array addresses).
def decode_into(data: np.ndarray, top: int, left: int, height: int, width: int, destination: np.ndarray,
                flags: int) -> int:
    """Decode a crop of the JPEG in ``data`` into ``destination`` (out_h, out_w, 3); 0 or a negative error code."""
    return _decode_c(data.ctypes.data, data.size, top, left, height, width, destination.ctypes.data,
                     destination.shape[0], destination.shape[1], flags, 0)


def resize_into(pixels: np.ndarray, height: int, width: int, top: int, left: int, crop_height: int,
                crop_width: int, destination: np.ndarray, flags: int) -> int:
    """Resample a box of contiguous RGB ``pixels`` (height x width x 3) into ``destination``; 0 or an error code."""
    return _resize_c(pixels.ctypes.data, height, width, top, left, crop_height, crop_width,
                     destination.ctypes.data, destination.shape[0], destination.shape[1], flags)


def record_error(record_address: int, sample: int, code: int) -> None:
    """Count a failed sample in a loader's error record (the first failure keeps its index and message)."""
    _record_error_c(record_address, ERROR_RECORD_BYTES, sample, code)


def read_error_record(record: np.ndarray) -> tuple[int, int, str]:
    """(failures, first failing sample, its message) of an error record written by :func:`record_error`."""
    text = record[2:].tobytes().split(b"\0", 1)[0].decode(errors="replace")
    return int(record[0]), int(record[1]), text


def interpolation_flags(interpolation: str) -> int:
    """Flag bits for an interpolation name."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    return FILTER_AREA if interpolation == "area" else 0


def dct_scale_denominator(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """The d in {1, 2, 4, 8} the kernel decodes at: the largest with crop >= d * output in both dimensions."""
    return int(_denominator_c(crop_height, crop_width, out_height, out_width))


def check_result(code: int) -> None:
    """Raise the error a kernel call's return code stands for (with this thread's libjpeg message), if any."""
    if code == _OK:
        return
    if code == _ERR_NOMEM:
        raise MemoryError("decode_crop: out of memory")
    message = _message_c().decode(errors="replace")
    if code == _ERR_ARGS:
        raise ValueError(f"decode_crop: {message}")
    raise ValueError(f"decode_crop: cannot decode JPEG: {message}")


MAX_SIDE = 65500  # the kernel's limit on crop and output sides (DM_MAX_SIDE in _jpeg_crop.c; libjpeg's too)


def _check_geometry(box: tuple[int, int, int, int], out_size: tuple[int, int]) -> tuple[int, ...]:
    """The six integers of (box, out_size), or a one-line error naming what is wrong with them."""
    try:
        box, out_size = tuple(box), tuple(out_size)
    except TypeError:
        raise TypeError(f"box must be (top, left, height, width) and out_size (height, width), got {box!r} and "
                        f"{out_size!r}") from None
    if len(box) != 4 or len(out_size) != 2:
        raise ValueError(f"box must be (top, left, height, width) and out_size (height, width), got {box} and "
                         f"{out_size}")
    # Integers only (numpy's included): a float box would be truncated silently, a bool is a mistake.
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in box + out_size):
        raise TypeError(f"box and out_size must hold integers, got box={box}, out_size={out_size}")
    top, left, height, width = (int(v) for v in box)
    out_h, out_w = (int(v) for v in out_size)
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE and 1 <= out_h <= MAX_SIDE and 1 <= out_w <= MAX_SIDE):
        raise ValueError(f"box height/width and out_size must be in [1, {MAX_SIDE}], got box={box}, "
                         f"out_size={out_size}")
    if not (0 <= top <= MAX_SIDE and 0 <= left <= MAX_SIDE):
        raise ValueError(f"box top/left must be in [0, {MAX_SIDE}], got box={box}")
    return top, left, height, width, out_h, out_w


def _as_bytes(jpeg_bytes: bytes | np.ndarray) -> np.ndarray:
    """The encoded file as a flat uint8 array (no copy for bytes or a contiguous uint8 array)."""
    if isinstance(jpeg_bytes, (bytes, bytearray, memoryview)):
        return np.frombuffer(jpeg_bytes, np.uint8)
    if isinstance(jpeg_bytes, np.ndarray) and jpeg_bytes.dtype == np.uint8:
        return np.ascontiguousarray(jpeg_bytes).reshape(-1)
    kind = f"a {jpeg_bytes.dtype} array" if isinstance(jpeg_bytes, np.ndarray) else type(jpeg_bytes).__name__
    raise TypeError(f"jpeg_bytes must be bytes or a uint8 array of the encoded file, got {kind}")


def decode_crop(jpeg_bytes: bytes | np.ndarray, box: tuple[int, int, int, int], out_size: tuple[int, int],
                flip: bool = False, *, interpolation: str = "bicubic", flags: int = 0,
                info: np.ndarray | None = None) -> np.ndarray:
    """Decode ``box = (top, left, height, width)`` of a JPEG, resampled to ``out_size = (h, w)``: uint8 (h, w, 3).

    The loaders run exactly this code. ``interpolation`` is ``'bicubic'`` (random crops) or ``'area'`` (centre
    crops); ``flip`` mirrors the output left-right. ``flags`` adds the kernel's switches (e.g. ``NO_DCT_SCALING``,
    for tests and benchmarks). With ``info`` (int32, ``INFO_SIZE``), the kernel reports the DCT denominator used,
    whether restart intervals were spliced, the rows and columns it decoded, whether a crop index let it
    skip the Huffman decoding of what the crop does not need, and whether it resampled YCbCr planes (chroma
    from its own subsampled samples; otherwise RGB rows after libjpeg's chroma interpolation, as PIL decodes
    them). Raises ValueError naming the problem
    for a box outside the image or bytes libjpeg cannot decode, TypeError for arguments of the wrong type.
    """
    top, left, height, width, out_h, out_w = _check_geometry(box, out_size)
    data = _as_bytes(jpeg_bytes)
    out = np.empty((out_h, out_w, 3), np.uint8)
    flags = int(flags) | interpolation_flags(interpolation) | (FLIP if flip else 0)
    if info is not None and (info.dtype != np.int32 or info.size < INFO_SIZE or not info.flags.c_contiguous):
        raise ValueError(f"info must be a contiguous int32 array of at least {INFO_SIZE} elements")
    code = _decode_c(data.ctypes.data, data.size, top, left, height, width, out.ctypes.data, out_h, out_w, flags,
                     0 if info is None else info.ctypes.data)
    check_result(code)
    return out


def resize_crop(pixels: np.ndarray, box: tuple[int, int, int, int], out_size: tuple[int, int], flip: bool = False,
                *, interpolation: str = "bicubic") -> np.ndarray:
    """The same resampling for an uncompressed uint8 (H, W, 3) image (the loaders' path for raw records)."""
    top, left, height, width, out_h, out_w = _check_geometry(box, out_size)
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"pixels must be a uint8 (H, W, 3) numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 (H, W, 3), got {pixels.dtype} {pixels.shape}")
    pixels = np.ascontiguousarray(pixels)
    out = np.empty((out_h, out_w, 3), np.uint8)
    flags = interpolation_flags(interpolation) | (FLIP if flip else 0)
    check_result(_resize_c(pixels.ctypes.data, pixels.shape[0], pixels.shape[1], top, left, height, width,
                           out.ctypes.data, out_h, out_w, flags))
    return out


def add_crop_index(jpeg_bytes: bytes, spacing: int = DEFAULT_INDEX_SPACING) -> bytes:
    """The JPEG with a crop index: an APP9 segment that lets :func:`decode_crop` skip Huffman decoding.

    Without restart markers, a crop's decoder must Huffman-decode every MCU from the top of the image down to the
    crop's last row. The index records, at the start of each MCU row and every ``spacing`` pixels along it
    (rounded down to whole MCUs: 16 px for 4:2:0, 8 px for 4:4:4; at least one), where the bit stream stands
    and the DC predictors, so the kernel starts right at the crop and leaves the MCUs beside it alone. At 64 px
    it adds about 4% to a 4:2:0 file and 7% to a 4:4:4 one. Other decoders skip the segment like any APPn: the
    pixels do not change. Files that get no index (progressive, restart markers, already indexed) come back unchanged;
    bytes libjpeg cannot decode raise ValueError.
    """
    if not 1 <= spacing <= 65535:
        raise ValueError(f"crop index spacing must be in [1, 65535] pixels, got {spacing}")
    src = np.frombuffer(jpeg_bytes, np.uint8)
    dst = np.empty(src.size + 65540, np.uint8)
    message = ctypes.create_string_buffer(200)
    size = _index_add_c(src.ctypes.data, src.size, spacing, dst.ctypes.data, dst.size, message, len(message))
    if size < 0:
        raise ValueError(f"add_crop_index: cannot decode JPEG: {message.value.decode(errors='replace')}")
    return bytes(jpeg_bytes) if size == 0 else dst[:size].tobytes()

"""The crop-decode kernel against PIL (and OpenCV's area resize), its DCT scale choice, splicing, the crop index,
flips, raw records, bad input, and the ffcv decoders built on it."""

import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from dailymae_jax.data import decode_crop
from dailymae_jax.data.jpeg_crop import (INFO_SIZE, LIBJPEG_HUFFMAN, NO_DCT_SCALING, NO_INDEX, NO_SPLICE, RGB_ROWS,
                                         add_crop_index, dct_scale_denominator, resize_crop)

OUT_SIDES = (96, 256)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def _encode(rgb: np.ndarray, subsampling: str, restart_interval: int = 0, quality: int = 90) -> bytes:
    """JPEG bytes as the .beton writer makes them (OpenCV/libjpeg), with the given chroma subsampling."""
    factor = cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444 if subsampling == "444" else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor]
    if restart_interval:
        params += [cv2.IMWRITE_JPEG_RST_INTERVAL, restart_interval]
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    return data.tobytes()


@pytest.fixture(scope="module")
def photos():
    """Three real photographs at the sample dataset's geometry (longest side 500): landscape, portrait, odd."""
    from dailymae_jax.data.sample import source_photograph_paths

    paths = source_photograph_paths()
    out = []
    for name, size in (("chelsea", (500, 375)), ("astronaut", (333, 500)), ("coffee", (497, 331))):
        out.append(np.asarray(Image.open(paths[name]).convert("RGB").resize(size, Image.BICUBIC)))
    return out


def _random_boxes(rng: np.random.Generator, height: int, width: int, count: int):
    """Random boxes, with tiny crops and boxes touching each border among them."""
    for k in range(count):
        if k % 5 == 0:
            h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        else:
            h, w = int(rng.integers(16, height + 1)), int(rng.integers(16, width + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        if k % 4 == 1:
            top, left = height - h, width - w  # bottom-right corner
        elif k % 4 == 2:
            top, left = 0, 0
        out = (int(rng.integers(*OUT_SIDES, endpoint=True)), int(rng.integers(*OUT_SIDES, endpoint=True)))
        yield (top, left, h, w), out


@pytest.mark.parametrize("subsampling", ["420", "444"])
@pytest.mark.parametrize("layout", ["plain", "restart markers", "crop index"])
def test_bicubic_crops_match_pil(photos, subsampling, layout):
    rng = np.random.default_rng(7)
    for rgb in photos:
        data = _encode(rgb, subsampling, restart_interval=int(layout == "restart markers"))
        if layout == "crop index":
            data = add_crop_index(data)
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        for (top, left, h, w), out in _random_boxes(rng, *rgb.shape[:2], count=15):
            ours = decode_crop(data, (top, left, h, w), out)
            reference = np.asarray(decoded.crop((left, top, left + w, top + h)).resize(out[::-1], Image.BICUBIC))
            assert ours.shape == (*out, 3) and ours.dtype == np.uint8
            assert _psnr(ours, reference) >= 30, ((top, left, h, w), out, _psnr(ours, reference))


def _area_resize(rgb: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Reference area resampling, one axis at a time: OpenCV's INTER_AREA (exact area averaging) where an axis
    shrinks, PIL's bilinear where it grows (OpenCV's INTER_AREA turns into a near-nearest filter there)."""
    for axis in (1, 0):
        size = list(rgb.shape[1::-1])
        size[1 - axis] = out[axis]
        if out[axis] <= rgb.shape[axis]:
            rgb = cv2.resize(np.ascontiguousarray(rgb), tuple(size), interpolation=cv2.INTER_AREA)
        else:
            rgb = np.asarray(Image.fromarray(rgb).resize(tuple(size), Image.BILINEAR))
    return rgb


@pytest.mark.parametrize("subsampling", ["420", "444"])
def test_area_crops_match_pil_decode_with_area_resize(photos, subsampling):
    # PIL has no area filter (its BOX samples pixel centres): the reference is PIL's decode, same box, and
    # exact area averaging (OpenCV's INTER_AREA).
    rng = np.random.default_rng(8)
    for rgb in photos:
        data = _encode(rgb, subsampling)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        for (top, left, h, w), out in _random_boxes(rng, *rgb.shape[:2], count=10):
            ours = decode_crop(data, (top, left, h, w), out, interpolation="area")
            reference = _area_resize(decoded[top:top + h, left:left + w], out)
            assert _psnr(ours, reference) >= 30, ((top, left, h, w), out, _psnr(ours, reference))


@pytest.mark.parametrize("kind", ["progressive", "grayscale"])
def test_other_jpeg_kinds_take_libjpegs_partial_decode(photos, kind):
    image = Image.fromarray(photos[0])
    buffer = io.BytesIO()
    if kind == "progressive":
        image.save(buffer, "JPEG", quality=90, progressive=True)
    else:
        image.convert("L").save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    box, out = (37, 51, 300, 410), (128, 160)
    ours = decode_crop(data, box, out)
    reference = Image.open(io.BytesIO(data)).convert("RGB").crop((51, 37, 51 + 410, 37 + 300))
    assert _psnr(ours, np.asarray(reference.resize(out[::-1], Image.BICUBIC))) >= 30


def _grayscale_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("L").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["420", "444", "grayscale"])
@pytest.mark.parametrize("spacing", [8, 48, 16000])  # pixels: an entry every MCU, every few, one per row
def test_crop_index_decodes_exactly_what_libjpeg_decodes(photos, kind, spacing):
    # The index only decides which MCUs are Huffman-decoded: the pixels must be libjpeg's own, bit for bit, for
    # any box (borders, tiny crops, every DCT scale), both filters and flips; and any decoder must see the file
    # as before.
    rng = np.random.default_rng(11)
    for rgb in photos:
        data = _grayscale_jpeg(rgb) if kind == "grayscale" else _encode(rgb, kind)
        indexed = add_crop_index(data, spacing)
        mcu = 16 if kind == "420" else 8
        step = max(1, spacing // mcu)  # MCUs between entries
        mcus_y, mcus_x = -(-rgb.shape[0] // mcu), -(-rgb.shape[1] // mcu)
        entry_bytes = 4 + 2 * (1 if kind == "grayscale" else 3)  # bit position, DC predictor per component
        assert len(indexed) - len(data) == 4 + 20 + mcus_y * -(-mcus_x // step) * entry_bytes
        assert add_crop_index(indexed, spacing) == indexed  # already indexed: unchanged
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(indexed))),
                                      np.asarray(Image.open(io.BytesIO(data))))
        for k, (box, out) in enumerate(_random_boxes(rng, *rgb.shape[:2], count=12)):
            interpolation, flip = ("bicubic", "area")[k % 2], k % 3 == 0
            info = np.zeros(INFO_SIZE, np.int32)
            ours = decode_crop(indexed, box, out, flip, interpolation=interpolation, info=info)
            assert info[4] == 1  # the index was used
            libjpeg = decode_crop(data, box, out, flip, interpolation=interpolation, flags=LIBJPEG_HUFFMAN)
            np.testing.assert_array_equal(ours, libjpeg, err_msg=f"box {box} -> {out}")
            decode_crop(indexed, box, out, flip, interpolation=interpolation, flags=NO_INDEX, info=info)
            assert info[4] == 0


@pytest.mark.parametrize("kind", ["420", "444"])
def test_rows_decoded_in_pairs_match_libjpeg_for_every_row_count(photos, kind):
    # With the index, the crop's MCU rows are Huffman-decoded two at a time (the second row's coefficients held
    # until libjpeg asks for them); a crop of an odd number of rows ends with one row on its own. Crops of
    # 1-6 MCU rows, starting on and off an MCU row, down to the image's last row, starting mid-row between
    # index entries: libjpeg's pixels, bit for bit.
    rgb = photos[2]  # 497 x 331: a partial last MCU row and column
    data = _encode(rgb, kind)
    indexed = add_crop_index(data, 48)
    mcu = 16 if kind == "420" else 8
    height, width = rgb.shape[:2]
    for rows in range(1, 7):
        for top in (0, mcu * 3, mcu * 3 + 5, height - rows * mcu):
            for left, w in ((0, width), (70, 90), (width - 40, 40)):
                box, out = (top, left, rows * mcu, w), (40, 40)
                for flags in (NO_DCT_SCALING, 0):
                    np.testing.assert_array_equal(decode_crop(indexed, box, out, flags=flags),
                                                  decode_crop(data, box, out, flags=flags | LIBJPEG_HUFFMAN),
                                                  err_msg=f"box {box}, flags {flags}")
    # Corrupt data (a marker in the middle of the scan; the file keeps its size, so the index stays valid) fails
    # a pair whose second row holds it, and no pair above: rows past the crop's last are never read.
    scan = indexed.index(b"\xff\xda")
    cut = scan + (len(indexed) - scan) // 2
    broken = indexed[:cut] + b"\xff\xd9" + indexed[cut + 2:]

    def fails(first_row: int, rows: int) -> bool:
        try:
            decode_crop(broken, (first_row * mcu, 0, min(rows * mcu, height - first_row * mcu), width), (32, 32))
        except ValueError as error:
            assert str(error).startswith("decode_crop: cannot decode JPEG"), error
            return True
        return False

    bad = next(r for r in range(-(-height // mcu)) if fails(r, 1))  # single rows: not paired
    assert 2 <= bad and fails(bad - 1, 2) and not fails(bad - 2, 2)


def test_crop_index_is_not_added_where_it_cannot_be_used_and_bad_data_is_named(photos):
    with_markers = _encode(photos[0], "420", restart_interval=1)
    assert add_crop_index(with_markers) == with_markers
    buffer = io.BytesIO()
    Image.fromarray(photos[0]).save(buffer, "JPEG", quality=90, progressive=True)
    assert add_crop_index(buffer.getvalue()) == buffer.getvalue()
    data = _encode(photos[0], "420")
    with pytest.raises(ValueError, match="^add_crop_index: cannot decode JPEG: .+"):
        add_crop_index(data[:2000] + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="spacing"):
        add_crop_index(data, 0)
    indexed = add_crop_index(data)
    # An index that no longer matches its file (here: the file cut short) is ignored, not trusted.
    info = np.zeros(INFO_SIZE, np.int32)
    decode_crop(indexed[:-2], (300, 0, 60, 80), (32, 32), info=info)
    assert info[4] == 0
    # A corrupt index gives the one-line decode error, never a crash or an out-of-bounds read.
    start = indexed.index(b"DMJXIDX1") + 20
    corrupt = indexed[:start] + b"\xff" * 400 + indexed[start + 400:]
    with pytest.raises(ValueError, match="^decode_crop: cannot decode JPEG"):
        decode_crop(corrupt, (0, 100, 60, 80), (32, 32))


@pytest.mark.parametrize("subsampling, restart_interval", [("420", 1), ("420", 0), ("444", 0)])
def test_flips_are_exact_mirrors(photos, subsampling, restart_interval):
    # 4:2:0 at DCT scale 1/1 takes the planar resampler, everything else RGB rows: both paths flip.
    rng = np.random.default_rng(9)
    data = add_crop_index(_encode(photos[0], subsampling, restart_interval=restart_interval))
    for box, out in _random_boxes(rng, *photos[0].shape[:2], count=10):
        for interpolation in ("bicubic", "area"):
            plain = decode_crop(data, box, out, interpolation=interpolation)
            np.testing.assert_array_equal(decode_crop(data, box, out, flip=True, interpolation=interpolation),
                                          plain[:, ::-1])


def test_dct_scale_is_the_largest_power_of_two_that_covers_the_output(photos):
    for crop_h, crop_w, out_h, out_w in [(500, 500, 224, 224), (448, 500, 224, 224), (447, 500, 224, 224),
                                         (375, 500, 112, 112), (500, 500, 16, 16), (300, 100, 96, 32),
                                         (20, 20, 224, 224)]:
        d = max(k for k in (1, 2, 4, 8) if crop_h >= k * out_h and crop_w >= k * out_w) \
            if crop_h >= out_h and crop_w >= out_w else 1
        assert dct_scale_denominator(crop_h, crop_w, out_h, out_w) == d
    # The kernel decodes at that scale, and only the rows of the box.
    data = _encode(photos[0], "420")
    for box, out in [((10, 20, 360, 470), (112, 112)), ((0, 0, 375, 500), (40, 50)), ((100, 100, 50, 60), (96, 96))]:
        info = np.zeros(INFO_SIZE, np.int32)
        decode_crop(data, box, out, info=info)
        d = dct_scale_denominator(box[2], box[3], *out)
        top, h = box[0], box[2]
        assert info[0] == d
        assert info[2] == min(-(-(top + h) // d), -(-375 // d)) - top // d  # rows of the box at the DCT scale
        assert info[3] <= -(-box[3] // d) + 2 * 16  # the box's columns, widened to MCU boundaries at most


def test_dct_scaling_and_splicing_change_little(photos):
    rgb = photos[1]
    data = _encode(rgb, "420", restart_interval=1)
    box, out = (40, 30, 420, 300), (128, 96)
    info = np.zeros(INFO_SIZE, np.int32)
    fast = decode_crop(data, box, out, info=info)
    assert info[0] == 2 and info[1] == 1  # scaled by 1/2, restart intervals spliced
    slow = decode_crop(data, box, out, flags=NO_DCT_SCALING | NO_SPLICE, info=info)
    assert info[0] == 1 and info[1] == 0
    assert _psnr(fast, slow) >= 35
    # Splicing alone changes pixels only through chroma upsampling at the crop's edges.
    exact_scale = decode_crop(data, box, out, flags=NO_DCT_SCALING)
    assert _psnr(exact_scale, slow) >= 40


def test_subsampled_chroma_is_resampled_from_its_own_planes(photos):
    # Where chroma is subsampled at the DCT scale used (4:2:0 at 1/1), the kernel resamples YCbCr planes: chroma
    # from its own samples instead of libjpeg's interpolated RGB rows. Everything else takes RGB rows. Both
    # must stay close to each other (and to PIL: test_bicubic_crops_match_pil), flips included.
    rgb = photos[0]
    data420, data444, gray = _encode(rgb, "420"), _encode(rgb, "444"), _grayscale_jpeg(rgb)
    info = np.zeros(INFO_SIZE, np.int32)
    rng = np.random.default_rng(11)
    planar_seen = 0
    for (top, left, h, w), out in _random_boxes(rng, *rgb.shape[:2], count=20):
        box = (top, left, h, w)
        flip = bool(rng.integers(2))
        planes = decode_crop(data420, box, out, flip, info=info)
        assert info[5] == (info[0] == 1), (box, out, info)
        planar_seen += int(info[5])
        rows = decode_crop(data420, box, out, flip, flags=RGB_ROWS, info=info)
        assert info[5] == 0
        assert _psnr(planes, rows) >= 44, (box, out, _psnr(planes, rows))  # measured: 49 dB at least
        np.testing.assert_array_equal(decode_crop(data420, box, out, not flip), planes[:, ::-1])
        for other in (data444, gray):
            decode_crop(other, box, out, info=info)
            assert info[5] == 0
    assert planar_seen >= 10
    decode_crop(data420, (0, 0, 375, 500), (96, 96), info=info)  # DCT scale 1/2: chroma at full resolution
    assert info[0] == 2 and info[5] == 0


def test_raw_pixels_take_the_same_resampler(photos):
    rgb = photos[2]
    rng = np.random.default_rng(10)
    for (top, left, h, w), out in _random_boxes(rng, *rgb.shape[:2], count=10):
        ours = resize_crop(rgb, (top, left, h, w), out)
        reference = np.asarray(Image.fromarray(rgb[top:top + h, left:left + w]).resize(out[::-1], Image.BICUBIC))
        assert _psnr(ours, reference) >= 45  # same filter as PIL; only float rounding differs
        np.testing.assert_array_equal(resize_crop(rgb, (top, left, h, w), out, flip=True), ours[:, ::-1])


def test_bad_input_gives_clear_errors(photos):
    data = _encode(photos[0], "420")
    with pytest.raises(ValueError, match="Not a JPEG file"):
        decode_crop(b"\x89PNG\r\n\x1a\n" + bytes(100), (0, 0, 10, 10), (8, 8))
    with pytest.raises(ValueError, match="cannot decode JPEG"):
        decode_crop(data[:len(data) // 2], (300, 0, 75, 500), (64, 64))  # rows past the truncation
    with pytest.raises(ValueError, match=r"crop box \(top=300, left=0, height=100, width=500\) is outside the "
                                         r"375x500 image"):
        decode_crop(data, (300, 0, 100, 500), (64, 64))
    cmyk = io.BytesIO()
    Image.fromarray(photos[0]).convert("CMYK").save(cmyk, "JPEG")
    with pytest.raises(ValueError, match="Unsupported color conversion"):
        decode_crop(cmyk.getvalue(), (0, 0, 10, 10), (8, 8))
    with pytest.raises(ValueError, match="interpolation must be one of"):
        decode_crop(data, (0, 0, 10, 10), (8, 8), interpolation="nearest")
    with pytest.raises(ValueError, match=r"box height/width and out_size must be in \[1, 65500\]"):
        decode_crop(data, (0, 0, 0, 10), (8, 8))
    with pytest.raises(ValueError, match=r"must be in \[1, 65500\], got box=\(0, 0, 10, 10\), out_size=\(70000, 8\)"):
        decode_crop(data, (0, 0, 10, 10), (70000, 8))
    with pytest.raises(ValueError, match=r"box height/width and out_size must be in"):
        decode_crop(data, (0, 0, 2 ** 31, 10), (8, 8))  # would wrap in the kernel's int32
    with pytest.raises(ValueError, match=r"box top/left must be in \[0, 65500\]"):
        decode_crop(data, (-1, 0, 10, 10), (8, 8))
    with pytest.raises(TypeError, match="box and out_size must hold integers"):
        decode_crop(data, (0.5, 0, 10, 10), (8, 8))  # not truncated silently
    with pytest.raises(TypeError, match="box must be .* and out_size"):
        decode_crop(data, None, (8, 8))
    with pytest.raises(ValueError, match="box must be"):
        decode_crop(data, (0, 0, 10), (8, 8))
    with pytest.raises(TypeError, match="jpeg_bytes must be bytes or a uint8 array of the encoded file, got str"):
        decode_crop("photo.jpg", (0, 0, 10, 10), (8, 8))
    with pytest.raises(TypeError, match="got a float32 array"):
        decode_crop(np.zeros(100, np.float32), (0, 0, 10, 10), (8, 8))
    with pytest.raises(TypeError, match="pixels must be a uint8"):
        resize_crop(data, (0, 0, 10, 10), (8, 8))
    # numpy integers are integers; a uint8 array holds the file as well as bytes do.
    np.testing.assert_array_equal(decode_crop(np.frombuffer(data, np.uint8), np.array([0, 0, 375, 500]), (32, 32)),
                                  decode_crop(data, (0, 0, 375, 500), (32, 32)))
    # Still usable after errors (the per-thread decompressor is reset).
    assert decode_crop(data, (0, 0, 375, 500), (32, 32)).std() > 10


# ffcv decoders ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_betons(tmp_path_factory):
    """The same 28 photographs written as JPEG and as raw records."""
    from dailymae_jax.data.sample import make_sample_dataset
    from dailymae_jax.data.write import write_beton

    root = tmp_path_factory.mktemp("decode")
    make_sample_dataset(root / "images", num_images=28, seed=0, val_fraction=0.5)
    jpg, raw = root / "jpg.beton", root / "raw.beton"
    write_beton(root / "images" / "train", jpg, num_workers=1)
    write_beton(root / "images" / "train", raw, num_workers=1, write_mode="raw")
    return jpg, raw


def _all_batches(loader):
    images, labels = zip(*[(np.array(x), np.array(y)) for x, y in loader])
    return np.concatenate(images), np.concatenate(labels).reshape(-1)


def _center_crop_loader(beton, *, resolution: int, batch_size: int):
    """Every sample once, in file order, through the validation decoder (as eval_loader.EvalLoader reads them)."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import OrderOption

    from dailymae_jax.data.eval_loader import center_crop_decoder
    from dailymae_jax.data.loader import CheckedLoader

    return CheckedLoader(str(beton), batch_size=batch_size, num_workers=2, order=OrderOption.SEQUENTIAL,
                         drop_last=False, pipelines={"image": [center_crop_decoder(resolution)],
                                                     "label": [IntDecoder()]})


def _read_jpeg(beton, index: int) -> bytes:
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    ptr = int(reader.metadata["f0"][index]["data_ptr"])
    size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == ptr][0])
    return np.fromfile(beton, np.uint8, count=size, offset=ptr).tobytes()


@pytest.mark.slow  # numba compiles an ffcv pipeline
def test_center_crop_loader_matches_reference(small_betons):
    from dailymae_jax.data.decode import center_crop_box

    jpg, _ = small_betons
    images, _ = _all_batches(_center_crop_loader(jpg, resolution=64, batch_size=5))
    assert images.shape == (14, 64, 64, 3)
    for index in (0, 5, 13):
        decoded = np.asarray(Image.open(io.BytesIO(_read_jpeg(jpg, index))).convert("RGB"))
        top, left, h, w = center_crop_box(*decoded.shape[:2], 0.875)
        assert h == w == int(0.875 * min(decoded.shape[:2]))
        reference = cv2.resize(np.ascontiguousarray(decoded[top:top + h, left:left + w]), (64, 64),
                               interpolation=cv2.INTER_AREA)
        assert _psnr(images[index], reference) >= 30


@pytest.mark.slow
def test_random_crops_are_seeded_and_raw_records_decode_alike(small_betons):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import OrderOption

    from dailymae_jax.data.decode import RandomResizedCropDecoder
    from dailymae_jax.data.loader import CheckedLoader

    def run(beton, seed, flip=True):
        loader = CheckedLoader(str(beton), batch_size=7, num_workers=2, order=OrderOption.SEQUENTIAL,
                               pipelines={"image": [RandomResizedCropDecoder((48, 40), flip=flip, seed=seed)],
                                          "label": [IntDecoder()]})
        return _all_batches(loader)[0]

    jpg, raw = small_betons
    first = run(jpg, seed=3)
    assert first.shape == (14, 48, 40, 3) and first.std() > 10
    np.testing.assert_array_equal(run(jpg, seed=3), first)  # same seed, same crops and flips
    assert not np.array_equal(run(jpg, seed=4), first)
    # Raw records get the same boxes and flips (they depend on the sample and the seed only) and the same
    # resampler; only the JPEG decode differs.
    from_raw = run(raw, seed=3)
    assert min(_psnr(a, b) for a, b in zip(from_raw, first)) >= 30


@pytest.mark.slow
def test_a_corrupt_record_raises_naming_the_sample(small_betons, tmp_path):
    from ffcv.reader import Reader

    jpg, _ = small_betons
    broken = tmp_path / "broken.beton"
    content = bytearray(jpg.read_bytes())
    ptr = int(Reader(str(jpg)).metadata["f0"][6]["data_ptr"])
    content[ptr:ptr + 64] = bytes(64)  # sample 6 no longer starts with a JPEG header
    broken.write_bytes(bytes(content))
    from dailymae_jax.data.beton import BetonError

    with pytest.raises(BetonError, match=r"broken.beton: 1 sample\(s\) failed to decode; first: sample 6: Not a JPEG "
                                         r"file"):
        _all_batches(_center_crop_loader(broken, resolution=32, batch_size=4))


def test_random_flips_mirror_half_the_samples_and_only_when_asked():
    from dailymae_jax.data.decode import RandomResizedCropDecoder

    flipping = RandomResizedCropDecoder((32, 32), flip=True, seed=5).crop_params_code()
    plain = RandomResizedCropDecoder((32, 32), seed=5).crop_params_code()
    draws = [flipping(375, 500, sample, 77) for sample in range(4000)]
    rate = np.mean([flip for *_, flip in draws])
    assert 0.46 < rate < 0.54, rate  # 1/2 within 5 standard deviations (0.008)
    # The flip is drawn after the box: asking for flips leaves every box as it was, and never flips without.
    unflipped = [plain(375, 500, sample, 77) for sample in range(4000)]
    assert [d[:4] for d in draws] == [d[:4] for d in unflipped]
    assert not any(flip for *_, flip in unflipped)

"""Tests for ImageFolder -> FFCV conversion (dailymae_jax.data.write)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from dailymae_jax.data.sample import make_sample_dataset
from dailymae_jax.data.write import read_beton_info, write_beton


def _read_samples(path: Path) -> list[tuple[np.ndarray, int, int]]:
    """Decode every sample of a beton as (RGB array, label, mode: 0 jpg / 1 raw).

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


def _jpeg_blobs(path: Path) -> list[bytes]:
    """The encoded bytes of every JPEG-mode image in a beton."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = path.read_bytes()
    ptrs = [int(m["f0"]["data_ptr"]) for m in reader.metadata if int(m["f0"]["mode"]) == 0]
    return [data[p:p + sizes[p]] for p in ptrs]


@pytest.fixture(scope="module")
def sample_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "ds"
    make_sample_dataset(root, num_images=48, seed=0)
    return root / "train"


@pytest.fixture(scope="module")
def sample_beton(sample_train: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("beton") / "train.beton"
    return out, write_beton(sample_train, out, max_resolution=256)


def _expected(source: Path) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in source.iterdir())
    return [(f, label) for label, c in enumerate(classes) for f in sorted((source / c).iterdir())]


def test_roundtrip_labels_sizes_and_pixels(sample_train: Path, sample_beton: tuple[Path, object]) -> None:
    out, report = sample_beton
    expected = _expected(sample_train)
    assert report.num_written == len(expected) and report.skipped == []
    assert report.classes == sorted(p.name for p in sample_train.iterdir())
    assert report.num_classes == len(report.classes)
    assert read_beton_info(out) == {"num_samples": len(expected), "fields": ["image", "label"]}
    samples = _read_samples(out)
    for (src, label), (arr, got_label, mode) in zip(expected, samples):
        assert got_label == label and mode == 0
        with Image.open(src) as im:
            ref = np.asarray(im.convert("RGB").resize((arr.shape[1], arr.shape[0]), Image.Resampling.BOX))
        # Longest side capped at max_resolution, aspect ratio kept.
        assert max(arr.shape[:2]) == 256
        assert abs(arr.shape[1] / arr.shape[0] - im.width / im.height) < 0.02
        # Same picture: JPEG re-encoding and resampling only add small errors.
        assert np.abs(arr.astype(float) - ref).mean() < 6


def test_report_json_next_to_beton(sample_beton: tuple[Path, object]) -> None:
    out, report = sample_beton
    saved = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert saved == report.as_dict() == json.loads(report.to_json())
    assert saved["out_path"] == str(out) and saved["settings"]["chroma_subsampling"] == "420"


def test_ffcv_loader_reads_it_back(sample_train: Path, sample_beton: tuple[Path, object]) -> None:
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    out, report = sample_beton
    loader = Loader(str(out), batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [CenterCropRGBImageDecoder((64, 64), 1.0)], "label": [IntDecoder()]})
    labels = []
    for image, label in loader:
        assert image.shape == (1, 64, 64, 3)
        labels.append(int(np.asarray(label).reshape(-1)[0]))
    assert labels == [label for _, label in _expected(sample_train)]


def test_default_jpeg_is_420_and_444_is_honoured(tmp_path: Path) -> None:
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(src / "x.png")
    for chroma, sampling in (("420", 2), ("444", 0)):
        out = tmp_path / f"{chroma}.beton"
        write_beton(tmp_path / "src", out, chroma_subsampling=chroma, num_workers=1)
        (blob,) = _jpeg_blobs(out)
        assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(blob))) == sampling
    with pytest.raises(ValueError, match="chroma"):
        write_beton(tmp_path / "src", tmp_path / "bad.beton", chroma_subsampling="422")


def test_raw_and_proportion_modes(sample_train: Path, tmp_path: Path) -> None:
    write_beton(sample_train, tmp_path / "raw.beton", write_mode="raw", max_resolution=64)
    raw = _read_samples(tmp_path / "raw.beton")
    assert {mode for _, _, mode in raw} == {1}
    mixed = write_beton(sample_train, tmp_path / "mixed.beton", write_mode="proportion",
                        compress_probability=0.5, max_resolution=64)
    modes = [mode for _, _, mode in _read_samples(Path(mixed.out_path))]
    assert len(modes) == mixed.num_written and set(modes) <= {0, 1}


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """Two classes of unusual but valid images, plus broken and non-image files."""
    root = tmp_path / "odd"
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(a / "gray.png")
    rgba = np.dstack([rgb, np.full((30, 50), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(a / "rgba.png")
    Image.fromarray(rgb).convert("P").save(a / "palette.gif")
    Image.fromarray(rgb).convert("CMYK").save(a / "cmyk.jpg")
    Image.fromarray((np.arange(30 * 50, dtype=np.uint16).reshape(30, 50) * 40)).save(b / "deep16.png")
    # EXIF orientation 6: stored 50 wide x 30 high, displayed rotated by 90 degrees.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(b / "rotated.jpg", exif=exif.tobytes())
    good_jpeg = io.BytesIO()
    Image.fromarray(rgb).save(good_jpeg, "JPEG")
    (b / "truncated.jpg").write_bytes(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])
    (b / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + rng.bytes(500))
    (a / "notes.txt").write_text("not an image")
    return root


def test_odd_images_converted_and_broken_files_skipped(odd_folder: Path, tmp_path: Path) -> None:
    report = write_beton(odd_folder, tmp_path / "odd.beton", num_workers=2)
    skipped = {Path(p).name: reason for p, reason in report.skipped}
    assert set(skipped) == {"truncated.jpg", "corrupt.jpg", "notes.txt"}
    assert all(reason and "\n" not in reason for reason in skipped.values())
    assert report.num_written == 6 and report.classes == ["a", "b"]
    samples = _read_samples(tmp_path / "odd.beton")
    names = ["cmyk.jpg", "gray.png", "palette.gif", "rgba.png", "deep16.png", "rotated.jpg"]
    shapes = {name: arr.shape for name, (arr, _, _) in zip(names, samples)}
    labels = [label for _, label, _ in samples]
    assert labels == [0, 0, 0, 0, 1, 1]
    assert shapes["rotated.jpg"] == (50, 30, 3)  # transposed by the EXIF orientation
    assert all(shape == (30, 50, 3) for name, shape in shapes.items() if name != "rotated.jpg")
    # 16-bit values are rescaled to 8 bits, not clipped: the brightest pixel stays bright and the
    # gradient keeps many levels.
    deep = samples[4][0]
    assert deep.max() > 200 and len(np.unique(deep)) > 50


def test_missing_or_empty_source_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path / "nope")):
        write_beton(tmp_path / "nope", tmp_path / "x.beton")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        write_beton(tmp_path / "empty", tmp_path / "x.beton")
    (tmp_path / "junk" / "cls").mkdir(parents=True)
    (tmp_path / "junk" / "cls" / "a.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable images"):
        write_beton(tmp_path / "junk", tmp_path / "x.beton")
    assert not (tmp_path / "x.beton").exists()


def test_failure_while_writing_leaves_no_files(odd_folder: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import dailymae_jax.data.write as write

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # A file that passed validation but fails in a writer worker (e.g. changed on disk meanwhile).
    monkeypatch.setattr(write, "_validate", lambda files, num_workers: (files, []))
    with pytest.raises(RuntimeError, match="failed to decode while writing"):
        write_beton(odd_folder, out_dir / "odd.beton", num_workers=2)
    assert list(out_dir.iterdir()) == []

    # Any error inside ffcv's writer, after it started the file.
    from ffcv.writer import DatasetWriter

    def boom(self, *args, **kwargs):
        Path(self.fname).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", boom)
    with pytest.raises(OSError, match="disk full"):
        write_beton(odd_folder, out_dir / "odd.beton", num_workers=1)
    assert list(out_dir.iterdir()) == []


def test_read_beton_info_rejects_bad_files(sample_beton: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = sample_beton
    data = out.read_bytes()
    cases = {
        "missing.beton": None,
        "tiny.beton": data[:10],
        "truncated.beton": data[: len(data) // 2],
        "short_tail.beton": data[:-7],
        "foreign.beton": b"PK\x03\x04" + bytes(4096),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError, match=name):
            read_beton_info(path)

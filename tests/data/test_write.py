"""Tests for writing image sources to FFCV files (dailymae_jax.data.write, data.sources)."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from dailymae_jax.data.beton import check_beton
from dailymae_jax.data.jpeg_crop import INFO_SIZE
from dailymae_jax.data.sample import make_sample_dataset, source_photograph_paths
from dailymae_jax.data.write import report_path, write_beton

# pytest puts tests/data first on the import path when it imports these test files (its default "prepend" mode).
from beton_read import jpeg_blobs, read_samples  # noqa: E402


def _photo(size: tuple[int, int]) -> np.ndarray:
    """A real photograph (the cat from scikit-image), resized to (width, height), as RGB uint8."""
    with Image.open(source_photograph_paths()["chelsea"]) as im:
        return np.asarray(im.convert("RGB").resize(size, Image.Resampling.BICUBIC))


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
    info = check_beton(out)
    assert info.num_samples == len(expected) and info.fields == {"image": "RGBImageField", "label": "IntField"}
    samples = read_samples(out)
    for (src, label), (arr, got_label, mode) in zip(expected, samples):
        assert got_label == label and mode == 0
        with Image.open(src) as im:
            ref = np.asarray(im.convert("RGB").resize((arr.shape[1], arr.shape[0]), Image.Resampling.BOX))
        # Longest side capped at max_resolution, aspect ratio kept.
        assert max(arr.shape[:2]) == 256
        assert abs(arr.shape[1] / arr.shape[0] - im.width / im.height) < 0.02
        # Same picture: JPEG re-encoding and resampling only add small errors.
        assert np.abs(arr.astype(float) - ref).mean() < 6


def test_report_json_next_to_beton(sample_train: Path, sample_beton: tuple[Path, object]) -> None:
    out, report = sample_beton
    saved = json.loads(report_path(out).read_text())
    assert saved == report.as_dict() == json.loads(report.to_json())
    assert saved["out_path"] == str(out) and saved["num_skipped"] == 0 and saved["skipped"] == []
    assert saved["source"] == {"type": "image_folder", "path": str(sample_train)}
    # Defaults are the recipe's (longest side 500 here overridden to 256, quality 95, 4:4:4).
    assert saved["settings"]["jpeg_quality"] == 95 and saved["settings"]["chroma_subsampling"] == "444"
    assert saved["file_bytes"] == out.stat().st_size and saved["seconds"] > 0
    assert f"wrote {report.num_written} images" in report.summary()
    # No temporary files are left next to the output.
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, report_path(out).name]


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


def test_default_jpeg_is_444_and_420_is_honoured(tmp_path: Path) -> None:
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    Image.fromarray(_photo((60, 40))).save(src / "x.png")
    for chroma, sampling in ((None, 0), ("420", 2), ("444", 0)):
        out = tmp_path / f"{chroma}.beton"
        kwargs = {} if chroma is None else {"chroma_subsampling": chroma}
        write_beton(tmp_path / "src", out, num_workers=1, progress=False, **kwargs)
        (blob,) = jpeg_blobs(out)
        assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(blob))) == sampling
    with pytest.raises(ValueError, match="chroma"):
        write_beton(tmp_path / "src", tmp_path / "bad.beton", chroma_subsampling="422")


def test_restart_markers_let_crop_decoding_splice(tmp_path: Path) -> None:
    from dailymae_jax.data import decode_crop

    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    Image.fromarray(_photo((150, 200))).save(src / "x.png")  # 150 wide, 200 high
    for chroma in ("420", "444"):
        for interval in (0, 1):
            out = tmp_path / f"{chroma}-{interval}.beton"
            report = write_beton(tmp_path / "src", out, num_workers=1, progress=False, chroma_subsampling=chroma,
                                 restart_interval=interval)
            assert report.settings["restart_interval"] == interval
            (blob,) = jpeg_blobs(out)
            dri = blob.find(b"\xff\xdd")  # define-restart-interval marker: length 4, then the interval
            assert (dri > 0 and blob[dri + 4:dri + 6] == interval.to_bytes(2, "big")) if interval else dri < 0
            info = np.zeros(INFO_SIZE, np.int32)
            decoded = decode_crop(blob, (100, 10, 90, 60), (48, 32), info=info)
            assert info[1] == interval  # spliced exactly when the file has restart markers
            reference = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").crop((10, 100, 70, 190))
                                   .resize((32, 48), Image.BICUBIC), np.float64)
            assert 10 * np.log10(255 ** 2 / np.mean((decoded - reference) ** 2)) >= 30
    with pytest.raises(ValueError, match="restart_interval"):
        write_beton(tmp_path / "src", tmp_path / "bad.beton", restart_interval=-1)


def test_jpegs_get_a_crop_index_unless_disabled_or_restart_marked(tmp_path: Path) -> None:
    from dailymae_jax.data import decode_crop

    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    Image.fromarray(_photo((150, 200))).save(src / "x.png")
    for chroma, spacing, interval, step in (("420", None, 0, 4), ("444", None, 0, 8), ("444", 32, 0, 4),
                                            ("420", 0, 0, None), ("420", None, 1, None)):
        out = tmp_path / f"{chroma}-{spacing}-{interval}.beton"
        kwargs = {} if spacing is None else {"crop_index_spacing": spacing}
        report = write_beton(tmp_path / "src", out, num_workers=1, progress=False, chroma_subsampling=chroma,
                             restart_interval=interval, **kwargs)
        (blob,) = jpeg_blobs(out)
        at = blob.find(b"DMJXIDX1")
        assert (at > 0) == (step is not None)
        assert report.settings["crop_index_spacing"] == (0 if step is None else spacing or 64)
        if step is not None:
            assert blob[at - 4:at - 2] == b"\xff\xe9"  # an APP9 segment
            assert int.from_bytes(blob[at + 8:at + 10], "little") == step  # MCUs between entries
            info = np.zeros(INFO_SIZE, np.int32)
            decode_crop(blob, (100, 10, 90, 60), (48, 32), info=info)
            assert info[4] == 1
    with pytest.raises(ValueError, match="crop_index_spacing"):
        write_beton(tmp_path / "src", tmp_path / "bad.beton", crop_index_spacing=-1)


def test_raw_smart_and_proportion_modes(sample_train: Path, tmp_path: Path) -> None:
    write_beton(sample_train, tmp_path / "raw.beton", write_mode="raw", max_resolution=64, progress=False)
    raw = read_samples(tmp_path / "raw.beton")
    assert {mode for _, _, mode in raw} == {1}
    # smart: JPEG exactly for the images whose raw RGB exceeds the threshold.
    threshold = int(np.median([arr.nbytes for arr, _, _ in raw]))
    write_beton(sample_train, tmp_path / "smart.beton", write_mode="smart", smart_threshold=threshold,
                max_resolution=64, progress=False)
    smart = read_samples(tmp_path / "smart.beton")
    assert [mode for _, _, mode in smart] == [int(arr.nbytes <= threshold) for arr, _, _ in raw]
    # proportion: JPEG with probability compress_probability (ffcv draws it per image, unseeded).
    for probability, expected in [(0.0, {1}), (1.0, {0}), (0.5, {0, 1})]:
        mixed = write_beton(sample_train, tmp_path / f"mixed{probability}.beton", write_mode="proportion",
                            compress_probability=probability, max_resolution=64, progress=False)
        modes = [mode for _, _, mode in read_samples(Path(mixed.out_path))]
        assert len(modes) == mixed.num_written >= 20 and set(modes) == expected, (probability, modes)


@pytest.mark.parametrize("kwargs, match", [
    ({"write_mode": "smart"}, "needs smart_threshold"),
    ({"write_mode": "jpg", "smart_threshold": 10}, "applies only to write_mode 'smart'"),
    ({"write_mode": "png"}, r"write_mode must be one of \('jpg', 'raw', 'smart', 'proportion'\)"),
    ({"jpeg_quality": 0}, r"jpeg_quality must be in \[1, 100\]"),
    ({"max_resolution": 0}, "max_resolution must be positive"),
    ({"num_workers": 0}, "num_workers must be at least 1"),
    ({"compress_probability": 1.5}, r"compress_probability must be in \[0, 1\]"),
])
def test_bad_settings_are_rejected_before_any_work(kwargs: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        write_beton(tmp_path / "does-not-matter", tmp_path / "x.beton", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """Two classes of unusual but valid images, plus broken and non-image files."""
    root = tmp_path / "odd"
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    rgb = _photo((50, 30))
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(gray).save(a / "gray.png")
    # RGBA whose left half is fully transparent over black: should come out white there.
    rgba = np.dstack([rgb, np.full((30, 50), 255, np.uint8)])
    rgba[:, :25] = 0
    Image.fromarray(rgba, "RGBA").save(a / "rgba.png")
    # Palette image whose index 0 is transparent (GIF), set on the top rows.
    palette = Image.fromarray(rgb).quantize(colors=64)
    pal = np.asarray(palette).copy()
    pal[:10] = 0
    palette_img = Image.fromarray(pal, "P")
    palette_img.putpalette(palette.getpalette())
    palette_img.save(a / "palette.gif", transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    # 16-bit gray: the photo's gray levels scaled to the full 0..65535 range.
    deep = gray.astype(np.uint16) * 257
    Image.fromarray(deep).save(b / "deep16.png")
    # EXIF orientation 6: stored 50 wide x 30 high, displayed rotated by 90 degrees clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(b / "rotated.jpg", exif=exif.tobytes(), quality=95)
    good_jpeg = io.BytesIO()
    Image.fromarray(rgb).save(good_jpeg, "JPEG")
    (b / "truncated.jpg").write_bytes(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])
    (b / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + np.random.default_rng(0).bytes(500))
    (b / "empty.jpg").write_bytes(b"")
    # 1000x1 px: at max_resolution 500 ffcv would store it 500x0 and fail.
    Image.fromarray(np.full((1, 1000, 3), 128, np.uint8)).save(b / "thin.png")
    (a / "notes.txt").write_text("not an image")
    (a / ".hidden.jpg").write_bytes(b"ignored: hidden files are not items")
    return root


def test_odd_images_converted_and_broken_files_skipped(odd_folder: Path, tmp_path: Path) -> None:
    report = write_beton(odd_folder, tmp_path / "odd.beton", num_workers=2, write_mode="raw", progress=False)
    skipped = {Path(p).name: reason for p, reason in report.skipped}
    assert set(skipped) == {"truncated.jpg", "corrupt.jpg", "empty.jpg", "thin.png", "notes.txt"}
    assert all(reason and "\n" not in reason for reason in skipped.values())
    assert "truncated" in skipped["truncated.jpg"].lower() and "too thin" in skipped["thin.png"]
    assert report.num_skipped == 5 and json.loads(report_path(tmp_path / "odd.beton").read_text())["num_skipped"] == 5
    assert report.num_written == 6 and report.classes == ["a", "b"]
    samples = read_samples(tmp_path / "odd.beton")
    names = ["cmyk.jpg", "gray.png", "palette.gif", "rgba.png", "deep16.png", "rotated.jpg"]
    got = {name: arr.astype(float) for name, (arr, _, _) in zip(names, samples)}
    assert [label for _, label, _ in samples] == [0, 0, 0, 0, 1, 1]
    rgb = _photo((50, 30)).astype(float)
    gray = np.asarray(Image.fromarray(_photo((50, 30))).convert("L")).astype(float)
    # Grayscale and 16-bit: three equal channels with the photo's gray levels (16-bit rescaled, not clipped).
    for name in ("gray.png", "deep16.png"):
        assert got[name].shape == (30, 50, 3)
        assert np.array_equal(got[name][..., 0], got[name][..., 2])
        assert np.abs(got[name][..., 0] - gray).max() <= 1
    # CMYK: the same colours after the (lossy) CMYK JPEG round trip.
    assert np.abs(got["cmyk.jpg"] - rgb).mean() < 6
    # Transparency composited onto white; opaque pixels kept.
    assert (got["rgba.png"][:, :25] == 255).all() and np.array_equal(got["rgba.png"][:, 25:], rgb[:, 25:])
    assert (got["palette.gif"][:10] == 255).all() and np.abs(got["palette.gif"][10:] - rgb[10:]).mean() < 12
    # EXIF orientation applied: the displayed picture is the stored one rotated 90 degrees clockwise.
    assert got["rotated.jpg"].shape == (50, 30, 3)
    assert np.abs(got["rotated.jpg"] - np.rot90(rgb, k=-1)).mean() < 6


def test_missing_or_empty_source_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"does not exist.*{tmp_path / 'nope'}"):
        write_beton(tmp_path / "nope", tmp_path / "x.beton")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"no class sub-folders with files: {tmp_path / 'empty'}"):
        write_beton(tmp_path / "empty", tmp_path / "x.beton")
    (tmp_path / "junk" / "cls").mkdir(parents=True)
    (tmp_path / "junk" / "cls" / "a.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"no readable images .*1 skipped; first: .*a.jpg: UnidentifiedImageError"):
        write_beton(tmp_path / "junk", tmp_path / "x.beton", progress=False)
    assert not (tmp_path / "x.beton").exists()


def test_existing_output_is_kept_unless_overwrite(sample_train: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.beton"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=str(out)):
        write_beton(sample_train, out, overwrite=False)
    assert out.read_bytes() == b"precious"
    with pytest.raises(ValueError, match="is a folder"):
        write_beton(sample_train, tmp_path)


def _assert_failed_cleanly(out_dir: Path, expected: list[str]) -> None:
    assert sorted(p.name for p in out_dir.iterdir()) == expected


class _Timeout:
    """Fail instead of hanging: ffcv's own writer waits forever for a worker that died."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def fire(signum, frame):
            raise TimeoutError(f"write_beton still running after {self.seconds} s")
        self.previous = signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def test_image_failing_while_writing_fails_cleanly(odd_folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import dailymae_jax.data.write as write

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "odd.beton").write_bytes(b"previous version")
    real_check = write._check_items

    # A file that passed the check but fails in a writer worker (e.g. changed on disk meanwhile).
    def check_everything_ok(source, max_resolution, num_workers, progress):
        good, skipped, largest = real_check(source, max_resolution, num_workers, progress)
        return [(i, 0) for i in range(len(source))], [], largest

    monkeypatch.setattr(write, "_check_items", check_everything_ok)
    # One worker, so that the first broken item it meets is known: a/notes.txt (sorted order).
    with _Timeout(120), pytest.raises(RuntimeError, match=r"writer worker failed: RuntimeError: \S+/odd/a/notes.txt "
                                      r"failed to decode while writing \(it passed the check before\)"):
        write_beton(odd_folder, out_dir / "odd.beton", num_workers=1, progress=False)
    _assert_failed_cleanly(out_dir, ["odd.beton"])
    assert (out_dir / "odd.beton").read_bytes() == b"previous version"


def test_full_disk_in_a_worker_fails_cleanly(odd_folder: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from ffcv.memory_allocator import MemoryAllocator

    def no_space(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MemoryAllocator, "flush_page", no_space)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with _Timeout(120), pytest.raises(RuntimeError, match="writer worker failed: OSError.*No space left"):
        write_beton(odd_folder, out_dir / "odd.beton", num_workers=2, progress=False)
    _assert_failed_cleanly(out_dir, [])


def test_killed_worker_fails_cleanly(odd_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dailymae_jax.data.write as write

    parent = os.getpid()
    real_getitem = write._Samples.__getitem__

    def oom_killed(self, k):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        return real_getitem(self, k)

    monkeypatch.setattr(write._Samples, "__getitem__", oom_killed)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with _Timeout(120), pytest.raises(RuntimeError, match="died with exit code -9"):
        write_beton(odd_folder, out_dir / "odd.beton", num_workers=2, progress=False)
    _assert_failed_cleanly(out_dir, [])


def test_error_inside_ffcv_writer_leaves_no_files(odd_folder: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ffcv.writer import DatasetWriter

    def boom(self, *args, **kwargs):
        Path(self.fname).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", boom)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(OSError, match="disk full"):
        write_beton(odd_folder, out_dir / "odd.beton", num_workers=1, progress=False)
    _assert_failed_cleanly(out_dir, [])


def test_image_larger_than_ffcvs_default_page(tmp_path: Path) -> None:
    # 1800x1700 raw RGB is 9.2 MB, more than ffcv's default 8 MiB page: its worker would raise
    # and its writer wait forever. The page size follows the largest image instead.
    src = tmp_path / "big" / "c"
    src.mkdir(parents=True)
    photo = _photo((1800, 1700))
    Image.fromarray(photo).save(src / "big.png")
    Image.fromarray(_photo((300, 200))).save(src / "small.png")
    out = tmp_path / "big.beton"
    with _Timeout(120):
        write_beton(tmp_path / "big", out, write_mode="raw", max_resolution=2000, num_workers=1, progress=False)
    (big, _, mode), (small, _, _) = read_samples(out)
    assert mode == 1 and np.array_equal(big, photo)
    assert check_beton(out).page_size == 1 << 25

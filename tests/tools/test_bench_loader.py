"""tools/bench_loader.py: argument errors, and a CPU smoke run of every loader on the sample .beton.

The numbers themselves come from running the tool (docs/PERFORMANCE.md); here a tiny run checks that the command
produces a complete JSON report with every loader, memory peak and ratio.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dailymae_jax.data.sample import source_photograph_paths

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(REPO / "tools" / "bench_loader.py")]


def run_main(argv, capsys) -> tuple[int, str]:
    """The tool's main in this process: (exit code, stderr)."""
    from tools import bench_loader

    try:
        code = bench_loader.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    # As a script: the error is one line and exit code 2.
    missing = subprocess.run([*TOOL, "--beton", str(tmp_path / "none.beton"), "--res", "32", "--json",
                              str(tmp_path / "out.json")], capture_output=True, text=True)
    assert missing.returncode == 2 and "--beton: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "x.beton").write_bytes(b"")
    code, err = run_main(["--beton", str(tmp_path / "x.beton"), "--res", "32", "--json", str(tmp_path / "out.json"),
                          "--loaders", "crop_decode,dali"], capsys)
    assert code == 2 and "unknown ['dali']" in err
    code, err = run_main(["--beton", str(tmp_path / "x.beton"), "--res", "32", "--json", str(tmp_path / "out.json")],
                         capsys)
    assert code == 2 and "--beton: " in err


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--res", "0"], "--res must be at least 1, got 0"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the file (112 images)"),
    (["--scale", "0.5", "0.2"], "--scale must be two increasing positive numbers, got 0.5 0.2"),
    (["--bound-quality", "101"], "--bound-quality must be in [1, 100], got 101"),
])
def test_bad_settings_are_one_line_errors(sample_beton, tmp_path, capsys, args, message):
    out = tmp_path / "out.json"
    code, err = run_main(["--beton", str(sample_beton), "--res", "32", "--batch-size", "16", "--json", str(out),
                          *args], capsys)
    assert code == 2 and message in err, err
    assert not out.exists()


def test_bound_files_copy_the_source_quality_and_chroma(sample_beton):
    import cv2
    import numpy as np
    from PIL import Image

    from tools.bench_loader import jpeg_settings, source_jpeg_settings
    from dailymae_jax.data.prepare import _SAMPLE_CHROMA, _SAMPLE_JPEG_QUALITY

    assert source_jpeg_settings(str(sample_beton)) == (_SAMPLE_JPEG_QUALITY, _SAMPLE_CHROMA)
    photo = np.asarray(Image.open(next(iter(source_photograph_paths().values()))).convert("RGB"))
    for quality, chroma, factor in [(75, "444", cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444),
                                    (95, "420", cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)]:
        _, data = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, quality,
                                               cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor])
        assert jpeg_settings(data.tobytes()) == (quality, chroma)
    custom = io.BytesIO()  # tables no libjpeg quality gives: no quality to copy
    Image.fromarray(photo).save(custom, "JPEG", qtables=[[7] * 64, [9] * 64], subsampling=0)
    assert jpeg_settings(custom.getvalue()) == (None, "444")


LOADERS = ("crop_decode", "crop_decode_noindex", "crop_decode_only", "ffcv_stock", "pil", "bound")


@pytest.mark.slow  # six child processes, each importing ffcv (and torch) and compiling a pipeline: ~15 s each
def test_smoke_run_reports_every_loader(sample_beton, tmp_path):
    out = tmp_path / "loader.json"
    subprocess.run([*TOOL, "--beton", str(sample_beton), "--res", "32", "--batch-size", "16", "--workers", "1",
                    "--epochs", "2", "--work-dir", str(tmp_path / "bound"), "--json", str(out),
                    "--loaders", ",".join(LOADERS)], check=True, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert report["complete"] and report["settings"]["bound_quality"] == 90
    rows = {r["loader"]: r for r in report["results"]}
    assert set(rows) == set(LOADERS) and {r["res"] for r in report["results"]} == {32}
    for row in rows.values():
        assert row["img_per_s"] > 0 and row["peak_rss_mb"] > 50 and len(row["epoch_img_per_s"]) == 2
        assert (row["minor_faults_per_image"] is None) == (row["loader"] == "pil")
    assert rows["crop_decode"]["minor_faults_per_image"] >= 0 and not report["settings"]["keep_buffers"]
    for other in LOADERS[1:]:
        ratio = report["ratios"][f"crop_decode/{other}@32"]
        assert ratio["speed"] == pytest.approx(rows["crop_decode"]["img_per_s"] / rows[other]["img_per_s"], rel=0.01)
    for variant in ("crop_decode_noindex", "crop_decode_only"):  # also against the bound
        assert report["ratios"][f"{variant}/bound@32"]["speed"] == pytest.approx(
            rows[variant]["img_per_s"] / rows["bound"]["img_per_s"], rel=0.01)
    assert report["settings"]["workers"] == 1 and report["machine"]["cores"] >= 1


def test_keep_buffers_reuses_the_batch_memory_across_epochs(sample_beton):
    import numpy as np

    from tools.bench_loader import _ffcv_loader
    for keep in (False, True):
        loader = _ffcv_loader("crop_decode", str(sample_beton), 32, 16, 1, (0.2, 1.0), (3 / 4, 4 / 3), 0, keep=keep)
        # Epoch one's batches stay referenced, so ffcv's fresh allocation for epoch two cannot land on them.
        first = [images for images, _ in loader]
        second = [images for images, _ in loader]
        assert len(first) == len(second) == 7
        assert any(np.may_share_memory(a, b) for a in first for b in second) == keep


def test_report_of_a_run_stopped_between_resolutions():
    # The report written after the first of two resolutions: its rows and ratios, marked incomplete. (The smoke
    # run above measures one resolution: every further one would start six more child processes.)
    import argparse

    from tools.bench_loader import _report
    args = argparse.Namespace(res=[224, 112], json=Path("out.json"), child=None)
    runs = {("crop_decode", 224): {"rates": [100.0, 200.0, 300.0], "peak_rss_mb": 100.0},
            ("bound", 224): {"rates": [400.0, 200.0, 500.0], "peak_rss_mb": 50.0}}
    report = _report(runs, args, ["crop_decode", "bound"], {"cores": 2}, bound_quality=90, complete=False)
    assert not report["complete"] and {(r["loader"], r["res"]) for r in report["results"]} == set(runs)
    # Ratio of the medians (200 / 400), and the median of the epoch-by-epoch ratios (0.25, 1.0, 0.6).
    assert report["ratios"] == {"crop_decode/bound@224": {"speed": 0.5, "speed_epoch_paired_median": 0.6,
                                                          "peak_rss": 2.0}}
    assert report["settings"]["json"] == "out.json" and "child" not in report["settings"]

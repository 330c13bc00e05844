"""tools/bench_loader.py: argument errors, and a CPU smoke run of every loader on the sample .beton.

The numbers themselves come from running the tool (docs/PERFORMANCE.md); here a tiny run checks that the command
produces a complete JSON report with every loader, resolution, memory peak and ratio.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(REPO / "tools" / "bench_loader.py")]


def test_bad_arguments_are_one_line_errors(tmp_path):
    missing = subprocess.run([*TOOL, "--beton", str(tmp_path / "none.beton"), "--res", "32", "--json",
                              str(tmp_path / "out.json")], capture_output=True, text=True)
    assert missing.returncode == 2 and "--beton: no such file" in missing.stderr
    (tmp_path / "x.beton").write_bytes(b"")
    unknown = subprocess.run([*TOOL, "--beton", str(tmp_path / "x.beton"), "--res", "32", "--json",
                              str(tmp_path / "out.json"), "--loaders", "crop_decode,dali"], capture_output=True,
                             text=True)
    assert unknown.returncode == 2 and "unknown ['dali']" in unknown.stderr


@pytest.mark.slow  # six child processes, each compiling an ffcv pipeline
def test_smoke_run_reports_every_loader(sample_beton, tmp_path):
    out = tmp_path / "loader.json"
    subprocess.run([*TOOL, "--beton", str(sample_beton), "--res", "32", "--res", "48", "--batch-size", "16",
                    "--workers", "1", "--epochs", "2", "--work-dir", str(tmp_path / "bound"), "--json", str(out),
                    "--loaders", "crop_decode,crop_decode_noindex,crop_decode_only,ffcv_stock,pil,bound"],
                   check=True, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    rows = {(r["loader"], r["res"]): r for r in report["results"]}
    loaders = ("crop_decode", "crop_decode_noindex", "crop_decode_only", "ffcv_stock", "pil", "bound")
    assert set(rows) == {(loader, res) for loader in loaders for res in (32, 48)}
    for row in rows.values():
        assert row["img_per_s"] > 0 and row["peak_rss_mb"] > 50 and len(row["epoch_img_per_s"]) == 2
    for res in (32, 48):
        for other in loaders[1:]:
            ratio = report["ratios"][f"crop_decode/{other}@{res}"]
            assert ratio["speed"] == pytest.approx(rows[("crop_decode", res)]["img_per_s"]
                                                   / rows[(other, res)]["img_per_s"], rel=0.01)
        for variant in ("crop_decode_noindex", "crop_decode_only"):  # also against the bound
            assert report["ratios"][f"{variant}/bound@{res}"]["speed"] == pytest.approx(
                rows[(variant, res)]["img_per_s"] / rows[("bound", res)]["img_per_s"], rel=0.01)
    assert report["settings"]["workers"] == 1 and report["machine"]["cores"] >= 1

"""tools/bench_kernel_ab.py: argument errors, and a small A/B of the installed kernel against itself."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(REPO / "tools" / "bench_kernel_ab.py")]
KERNEL = importlib.util.find_spec("dailymae_jax.data._jpeg_crop").origin


def test_bad_arguments_are_one_line_errors(tmp_path, sample_beton):
    missing = subprocess.run([*TOOL, "--a", KERNEL, "--b", str(tmp_path / "none.so"), "--beton", str(sample_beton),
                              "--res", "32", "--json", str(tmp_path / "out.json")], capture_output=True, text=True)
    assert missing.returncode == 2 and "--b: no such file" in missing.stderr
    (tmp_path / "not_a_library.so").write_bytes(b"text")
    unloadable = subprocess.run([*TOOL, "--a", str(tmp_path / "not_a_library.so"), "--b", KERNEL, "--beton",
                                 str(sample_beton), "--res", "32", "--json", str(tmp_path / "out.json")],
                                capture_output=True, text=True)
    assert unloadable.returncode == 2 and "cannot load a kernel build" in unloadable.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow  # builds the kernel twice
def test_a_build_against_itself_gives_the_same_pixels(tmp_path, sample_beton):
    out = tmp_path / "ab.json"
    subprocess.run([*TOOL, "--a", KERNEL, "--b", KERNEL, "--beton", str(sample_beton), "--res", "32", "--res", "48",
                    "--images", "6", "--rounds", "2", "--json", str(out)], check=True, capture_output=True, text=True,
                   timeout=600)
    results = json.loads(out.read_text())["results"]
    assert [r["res"] for r in results] == [32, 48]
    for row in results:
        assert row["identical"] is True and row["a_ms"] > 0 and row["b_ms"] > 0 and row["a_over_b"] > 0
    only = tmp_path / "decode_only.json"
    subprocess.run([*TOOL, "--a", KERNEL, "--b", KERNEL, "--beton", str(sample_beton), "--res", "32", "--images", "3",
                    "--rounds", "1", "--flags", "64", "--json", str(only)], check=True, capture_output=True, text=True,
                   timeout=600)
    assert json.loads(only.read_text())["results"][0]["identical"] is None  # DECODE_ONLY leaves no pixels

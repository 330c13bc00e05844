"""tools/bench_decode.py: argument errors, and a small run that reports every stage of a crop decode.

The numbers come from running the tool (docs/PERFORMANCE.md); here a tiny run checks the report's shape and that
every timed call really decoded (a failing call raises instead of timing an early return).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench_decode import STAGES

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(REPO / "tools" / "bench_decode.py")]


def test_bad_arguments_are_one_line_errors(tmp_path):
    missing = subprocess.run([*TOOL, "--beton", str(tmp_path / "none.beton"), "--res", "32", "--json",
                              str(tmp_path / "out.json")], capture_output=True, text=True)
    assert missing.returncode == 2 and "--beton: no such file" in missing.stderr
    (tmp_path / "x.beton").write_bytes(b"")
    zero = subprocess.run([*TOOL, "--beton", str(tmp_path / "x.beton"), "--res", "32", "--rounds", "0", "--json",
                           str(tmp_path / "out.json")], capture_output=True, text=True)
    assert zero.returncode == 2 and "must be at least 1" in zero.stderr


@pytest.mark.slow  # decodes the sample file with every stage
def test_small_run_reports_every_stage(sample_beton, tmp_path):
    out = tmp_path / "decode.json"
    subprocess.run([*TOOL, "--beton", str(sample_beton), "--res", "32", "--res", "64", "--images", "6",
                    "--rounds", "1", "--json", str(out)], check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    rows = {(r["res"], r["stage"]): r["ms_per_image"] for r in report["results"]}
    assert set(rows) == {(res, stage) for res in (32, 64) for stage in STAGES}
    assert all(ms > 0 for ms in rows.values())
    assert report["records"]["count"] == 6 and report["records"]["mean_bytes"] > 1000

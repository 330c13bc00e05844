"""tools/write_dataset.py: recipe defaults, one-line errors with exit code 2, the printed report."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dailymae_jax.data.sample import make_sample_dataset
from dailymae_jax.data.write import RECIPE_CHROMA, RECIPE_JPEG_QUALITY, RECIPE_MAX_RESOLUTION

TOOL = Path(__file__).resolve().parents[2] / "tools" / "write_dataset.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("write_dataset_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "ds"
    make_sample_dataset(root, num_images=28, seed=1)
    (root / "train" / "coins" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root / "train"


def test_defaults_are_the_recipe() -> None:
    args = tool.build_parser().parse_args(["--source", "x", "--out", "y.beton"])
    assert (args.max_resolution, args.quality, args.chroma, args.write_mode) == (500, 95, "444", "jpg")
    assert (RECIPE_MAX_RESOLUTION, RECIPE_JPEG_QUALITY, RECIPE_CHROMA) == (500, 95, "444")
    assert args.workers >= 1 and not args.overwrite


def _exit_code_and_stderr(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        code = tool.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--quality", "0"], r"argument --quality: must be in \[1, 100\], got 0"),
    (["--quality", "high"], "argument --quality: not an integer: 'high'"),
    (["--max-resolution", "-5"], "argument --max-resolution: must be >= 1, got -5"),
    (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["--compress-probability", "2"], r"argument --compress-probability: must be in \[0, 1\], got 2.0"),
    (["--write-mode", "png"], "argument --write-mode: invalid choice: 'png'"),
    (["--chroma", "422"], "argument --chroma: invalid choice: '422'"),
    (["--restart-interval", "-1"], "argument --restart-interval: must be in \\[0, 65535\\], got -1"),
    (["--write-mode", "smart"], "--write-mode smart needs --smart-threshold BYTES"),
    (["--smart-threshold", "100"], "--smart-threshold applies only to --write-mode smart"),
    (["--split", "validation"], "apply only to --tfds"),
    (["--tfds", "imagenet2012"], "argument --tfds: not allowed with argument --source"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_one_line_exit_2(extra: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    code, err = _exit_code_and_stderr(["--source", str(tmp_path), "--out", str(tmp_path / "o.beton"), *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("write_dataset.py: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "o.beton").exists()


def test_bad_inputs_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _exit_code_and_stderr(["--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o.beton")],
                                      capsys)
    assert code == 2 and err.count("\n") == 1 and "source folder does not exist" in err
    code, err = _exit_code_and_stderr(["--out", str(tmp_path / "o.beton")], capsys)
    assert code == 2 and err.count("\n") == 1 and "one of the arguments --source --tfds is required" in err
    existing = tmp_path / "existing.beton"
    existing.write_bytes(b"keep me")
    (tmp_path / "src" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "c" / "a.png")
    code, err = _exit_code_and_stderr(["--source", str(tmp_path / "src"), "--out", str(existing)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"output file exists: {existing} (add --overwrite to replace it)" in err
    assert existing.read_bytes() == b"keep me"


def test_writes_and_prints_the_report(train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "train.beton"
    code = tool.main(["--source", str(train_dir), "--out", str(out), "--workers", "2", "--max-resolution", "128"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    report = json.loads((tmp_path / "train.beton.report.json").read_text())
    assert lines[0].startswith(f"wrote {report['num_written']} images (14 classes") and lines[0].endswith("skipped 1")
    assert lines[1].startswith(f"  skipped {train_dir / 'coins' / 'broken.jpg'}: ")
    assert lines[-1] == f"report: {out}.report.json"
    assert report["num_skipped"] == 1 and report["skipped"][0][0].endswith("broken.jpg")
    assert report["settings"]["jpeg_quality"] == 95 and report["settings"]["chroma_subsampling"] == "444"
    # Progress bars (img/s and ETA) go to stderr.
    assert "checking" in captured.err and "writing" in captured.err and "img/s" in captured.err
    # Refuses to overwrite without --overwrite, replaces with it.
    assert _exit_code_and_stderr(["--source", str(train_dir), "--out", str(out)], capsys)[0] == 2
    assert tool.main(["--source", str(train_dir), "--out", str(out), "--overwrite", "--no-progress",
                      "--max-resolution", "64"]) == 0
    assert json.loads((tmp_path / "train.beton.report.json").read_text())["settings"]["max_resolution"] == 64


def test_runs_as_a_script(tmp_path: Path) -> None:
    help_run = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--max-resolution" in help_run.stdout and "(default: 95)" in help_run.stdout
    bad = subprocess.run([sys.executable, str(TOOL), "--source", str(tmp_path), "--out", "x.beton", "--quality", "101"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--quality" in bad.stderr


def test_interrupt_leaves_nothing(train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ffcv.writer import DatasetWriter

    def ctrl_c(self, allocations):  # the last step of a write, when the temporary file is complete
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetWriter, "finalize", ctrl_c)
    out = tmp_path / "out" / "train.beton"
    assert tool.main(["--source", str(train_dir), "--out", str(out), "--workers", "2", "--no-progress"]) == 130
    assert capsys.readouterr().err == f"write_dataset.py: interrupted, nothing written to {out}\n"
    assert list(out.parent.iterdir()) == []


def test_a_report_that_cannot_be_saved_does_not_hide_the_written_file(train_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from dailymae_jax.data.beton import check_beton

    out = tmp_path / "train.beton"
    (tmp_path / "train.beton.report.json").mkdir()  # the report cannot replace a folder
    code = tool.main(["--source", str(train_dir), "--out", str(out), "--no-progress", "--max-resolution", "64"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"write_dataset.py: error: {out} was written (14 images), but its report could not be "
                          f"saved to {out}.report.json: ") and "nothing written" not in err
    assert check_beton(out).num_samples == 14  # train: half of the 28 photographs

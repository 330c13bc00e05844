"""End to end through the command line: sample .beton → loader → sharded compiled MAE steps → orbax
checkpoints → PyTorch export → reconstruction PNG. (8 devices against 1: tests/e2e/test_distributed_runs.py.)"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import main_command, run_command

# The demo recipe, shrunk to ~1 minute: 112 training images, batch 16 → 7 steps/epoch, 8 epochs = 56 steps.
SMALL = ["--config.data.sample_num_images=140", "--config.data.global_batch_size=16",
         "--config.train.epochs=8", "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=20"]
# The end-to-end runs' stages: the palindrome 128 → 96 → 128 starting at epochs 0, 3 and 5, its middle stage
# masking less, so that the reconstruction at the end of epoch 2 (128 px images; the next stage's mask ratio
# 0.6 if taken from the wrong stage) is compiled ahead of time only when it uses its own batch's stage.
STAGES = "--config.schedule.stages=((0, 128, 0.75), (3, 96, 0.6), (5, 128, 0.75))"


def run_main(workdir, sample_dir, *extra, devices=1, check=True):
    return run_command(main_command(workdir, f"--config.data.sample_dir={sample_dir}", *SMALL, *extra),
                       devices=devices, check=check)


def step_losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return np.array([row["loss"] for row in rows]), [row["step"] for row in rows]


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    result = run_main(root / "run1", root / "sample", STAGES)
    return root, result


@pytest.mark.slow
def test_demo_pipeline_end_to_end(one_device_run):
    root, result = one_device_run
    workdir = root / "run1"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 56 and summary["device_count"] == 1
    assert summary["final_loss"] < 0.85 * summary["initial_loss"]
    assert summary["compilations_during_training"] == 0
    assert [(s["start_epoch"], s["resolution"], s["mask_ratio"]) for s in summary["stages"]] == [
        (0, 128, 0.75), (3, 96, 0.6), (5, 128, 0.75)]
    assert len(summary["stage_switches"]) == 2
    assert all(s["seconds"] < 0.1 for s in summary["stage_switches"])
    assert summary["images_per_second"] > 0
    assert Path(summary["last_checkpoint"]).name == "56" and Path(summary["last_checkpoint"]).is_dir()
    # Reports: metrics per step with the documented keys, TensorBoard events, config.json.
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 57))
    assert {"loss", "lr", "grad_norm", "images_per_second", "probe_accuracy", "resolution", "mask_ratio"} <= set(rows[0])
    assert {r["resolution"] for r in rows if 21 < r["step"] <= 35} == {96}
    assert {"step_seconds", "data_wait_share", "eta_seconds"} <= set(rows[0])
    assert rows[-1]["eta_seconds"] == 0
    # TensorBoard: read the event files back with TensorBoard's own reader.
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"loss", "images_per_second", "lr", "probe_accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 57))
    np.testing.assert_allclose([e.value for e in events.Scalars("loss")], [r["loss"] for r in rows], rtol=1e-6)
    assert "reconstructions" in events.Tags()["images"]
    # Reconstructions every 3 epochs (after epochs 3 and 6 = steps 21 and 42) and at the end.
    assert sorted(p.name for p in (workdir / "reconstructions").glob("*.png")) == [
        "step_21.png", "step_42.png", "step_56.png"]
    assert json.loads((workdir / "config.json").read_text())["train"]["epochs"] == 8
    assert "Total:" in (workdir / "parameters.txt").read_text()
    # The reconstruction grid: 8 rows of 4 pictures of 128 px, with real content.
    png = np.asarray(Image.open(summary["reconstruction"]))
    assert png.shape == (8 * 130 + 2, 4 * 130 + 2, 3) and png.std() > 20
    # Exports in both layouts and file types, announced on stdout.
    for name in ("mae.pth", "mae.safetensors", "timm.pth", "timm.safetensors"):
        assert Path(summary["exports"][name]).stat().st_size > 1_000_000
        assert f"exported {name}:" in result.stdout


@pytest.mark.slow
def test_finished_workdir_is_resumed_not_retrained(one_device_run):
    root, _ = one_device_run
    before = (root / "run1" / "summary.json").read_text()
    result = run_main(root / "run1", root / "sample", STAGES)
    assert "56 steps" in result.stdout
    assert (root / "run1" / "summary.json").read_text() == before


def test_bad_config_is_one_line_and_exit_code_2(tmp_path):
    result = run_main(tmp_path / "run", tmp_path / "sample", "--config.schedule.stages=((0, 100, 0.75),)",
                      check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "schedule.stages" in errors[0] and "patch size 16" in errors[0]

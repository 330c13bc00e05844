"""tools/bench_train.py: the FLOPs accounting it reports (dailymae_jax.train.flops), its report logic, its
argument errors, and a CPU smoke run.

The GPU numbers come from running the tool on a GPU (docs/PERFORMANCE.md says how); here it runs a tiny model
on CPU, which checks that the same command produces a complete JSON report.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from dailymae_jax.model.mae import MaskedAutoencoder
from dailymae_jax.train import compile as compile_lib
from dailymae_jax.train.flops import analytic_forward_flops, analytic_step_flops
from tools import bench_train

REPO = Path(__file__).resolve().parents[2]

TINY = ["--config.model.size=tiny", "--config.model.depth=2", "--config.model.decoder_width=64",
        "--config.model.decoder_depth=1", "--config.model.decoder_heads=2", "--config.model.dtype=float32"]


def test_analytic_forward_flops_match_xla_cost_analysis():
    """The matrix-product count is what XLA counts for our forward pass, give or take elementwise work."""
    model = MaskedAutoencoder(width=128, depth=2, heads=2, patch=16, decoder_width=64, decoder_depth=2,
                              decoder_heads=2)
    batch, res = 4, 64
    images = jnp.zeros((batch, res, res, 3))
    noise = jax.random.uniform(jax.random.PRNGKey(0), (batch, (res // 16) ** 2))
    params = jax.eval_shape(lambda k: model.init(k, images, noise, 0.75), jax.random.PRNGKey(0))
    compiled = jax.jit(lambda p, x, n: model.apply(p, x, n, 0.75).loss).lower(params, images, noise).compile()
    xla = compile_lib.flops_per_step(compiled)
    analytic = batch * analytic_forward_flops(width=128, depth=2, patch=16, mlp_ratio=4.0, decoder_width=64,
                                              decoder_depth=2, resolution=res, mask_ratio=0.75)
    # XLA also counts norms, GELU, softmax and the loss (≈ 9% at these tiny widths, less at MAE-B's).
    assert 1.0 <= xla / analytic < 1.2, (xla, analytic)


def test_analytic_step_flops_of_mae_b16_at_224():
    """MAE-B/16 at 224 px: ≈ 19.6 GFLOP forward per sample (8.6 encoder on 50 tokens, 10.6 decoder on 197)."""
    settings = {"width": 768, "depth": 12, "patch": 16, "mlp_ratio": 4.0, "decoder_width": 512, "decoder_depth": 8}
    forward = analytic_forward_flops(**settings, resolution=224, mask_ratio=0.75)
    encoder = 12 * (2 * 50 * 768 * (4 * 768 + 2 * 3072) + 4 * 50 * 50 * 768)
    decoder = 8 * (2 * 197 * 512 * (4 * 512 + 2 * 2048) + 4 * 197 * 197 * 512)
    heads = 2 * 196 * 768 * 768 + 2 * 50 * 768 * 512 + 2 * 197 * 512 * 768
    assert forward == encoder + decoder + heads
    assert 19.5e9 < forward < 19.7e9
    step = analytic_step_flops(settings, resolution=224, mask_ratio=0.75, batch=2, num_classes=1000)
    assert step == 2 * (3 * forward - 2 * 196 * 768 * 768 + 4 * 768 * 1000)


def test_peak_flops_table_and_mfu():
    assert compile_lib.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert compile_lib.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM figure
    assert compile_lib.peak_bf16_flops("NVIDIA H200") == 989e12
    assert compile_lib.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert compile_lib.peak_bf16_flops("NVIDIA L40S") == 362e12  # not the L4's
    assert compile_lib.peak_bf16_flops("cpu") is None
    assert compile_lib.model_flops_utilization(49.45e12, 0.1, 989e12) == pytest.approx(0.5)
    assert compile_lib.model_flops_utilization(None, 0.1, 989e12) is None
    assert compile_lib.model_flops_utilization(1e12, 0.1, None) is None


def fake_result(framework, res, step_time, **extra):
    return {"framework": framework, "data": "synthetic", "resolution": res, "batch_size": 256,
            "step_time_median_s": step_time, "images_per_second": 256 / step_time, "peak_bf16_flops": 989e12,
            "device_kind": "NVIDIA H100 80GB HBM3", **extra}


def test_summary_pairs_each_resolution():
    settings = {"model": {"width": 768, "depth": 12, "patch": 16, "mlp_ratio": 4.0, "decoder_width": 512,
                          "decoder_depth": 8}, "mask_ratio": 0.75, "num_classes": 1000, "probe_features": "visible"}
    report = {"settings": settings, "results": [
        fake_result("jax", 224, 0.2, flops_per_step=14e12, mfu=14e12 / 0.2 / 989e12),
        fake_result("torch", 224, 0.3),
        fake_result("jax", 112, 0.05, flops_per_step=3e12, mfu=3e12 / 0.05 / 989e12),
        {"framework": "torch", "data": "synthetic", "resolution": 112, "error": "exit code 1: CUDA out of memory"},
    ]}
    report = bench_train.summarize(report)
    assert report["speedup_vs_pytorch"] == {"224": pytest.approx(1.5)}
    assert report["speedup_vs_pytorch_224"] == pytest.approx(1.5)
    assert report["device"] == "NVIDIA H100 80GB HBM3"
    torch_224 = next(r for r in report["results"] if r["framework"] == "torch" and r["resolution"] == 224)
    assert torch_224["flops_per_step"] == 14e12  # charged our step's FLOPs
    assert torch_224["mfu"] == pytest.approx(14e12 / 0.3 / 989e12)
    assert report["mfu_224"] == pytest.approx(14e12 / 0.2 / 989e12)
    assert "mfu" not in report["results"][-1]  # the failed measurement stays as it was

    again = bench_train.merge(report, [fake_result("torch", 224, 0.4)])
    assert len(again) == len(report["results"])
    assert [r["step_time_median_s"] for r in again if r["framework"] == "torch" and "error" not in r] == [0.4]


@pytest.mark.parametrize("argv, message", [
    (["--res", "100"], "--res [100]: not positive multiples of the patch size 16"),
    (["--config.model.size=giant"], "model.size: unknown size 'giant'"),
    (["--config.model.nonsense=1"], "config override"),
    (["--steps", "0"], "--steps 0: must be ≥ 1"),
    (["--data", "loader"], "--data loader needs a dataset"),
    (["--append", "--json", "/nonexistent/x.json"], "--append needs an existing --json file"),
    (["--data", "loader", "--beton", "/nonexistent/x.beton"], "--beton: data.train_path: no such file"),
])
def test_bad_arguments_name_the_culprit(argv, message, capsys):
    assert bench_train.main(argv + ["--no-torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_cpu_smoke_run_writes_a_complete_report(tmp_path, sample_beton):
    """The GPU command, shrunk: tiny model, 32 px, 2 steps, both frameworks, synthetic and loader data."""
    from dailymae_jax.data.prepare import dataset_info

    out = tmp_path / "bench.json"
    command = [sys.executable, "tools/bench_train.py", *TINY, "--res", "32", "--batch-size", "4",
               "--steps", "2", "--warmup-steps", "1", "--data", "synthetic", "loader", "--beton", str(sample_beton),
               "--config.data.num_workers=1", "--no-torch-compile", "--json", str(out)]
    # One thread per torch/OpenMP pool: on a shared 2-core CI machine more only adds contention.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["device"] == "cpu"
    assert report["software"]["jax"] == jax.__version__ and "torch" in report["software"]
    assert report["settings"]["model"]["width"] == 192 and report["settings"]["batch_size"] == 4
    assert report["command"].startswith("python tools/bench_train.py --config.model.size=tiny")
    keys = {(r["framework"], r["data"], r["resolution"]) for r in report["results"]}
    assert keys == {("jax", "synthetic", 32), ("jax", "loader", 32), ("torch", "synthetic", 32)}
    for r in report["results"]:
        assert "error" not in r, r
        assert r["images_per_second"] > 0 and math.isfinite(r["final_loss"])
        assert r["flops_per_step"] > 0 and r["flops_per_step_analytic"] > 0
        assert r["mfu"] is None and r["peak_memory_bytes"] is None  # no peak rate or memory stats on CPU
        if r["framework"] == "jax":
            assert r["compilations_during_steps"] == 0
            # XLA's count adds the optimizer and elementwise work to the matrix products (much at this size).
            assert 1.0 < r["flops_per_step"] / r["flops_per_step_analytic"] < 2.0
        if r["data"] == "loader":
            assert 0.0 <= r["data_wait_share"] <= 1.0 and r["dataset_samples"] == dataset_info(sample_beton).num_samples
    assert set(report["speedup_vs_pytorch"]) == {"32"}
    assert report["speedup_vs_pytorch_224"] is None and report["mfu_224"] is None


def test_loader_dataset_is_checked_before_anything_runs(sample_beton, capsys):
    argv = ["--data", "loader", "--beton", str(sample_beton), "--no-torch", "--batch-size", "4"]
    assert bench_train.main(argv + ["--num-classes", "10"]) == 2
    assert "--num-classes 10: " in capsys.readouterr().err
    assert bench_train.main(argv + ["--batch-size", "1024"]) == 2  # the last --batch-size wins
    assert "--batch-size 1024: larger than" in capsys.readouterr().err

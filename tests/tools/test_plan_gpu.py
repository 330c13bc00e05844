"""tools/plan_gpu.py: the demo model's pretraining step compiled for 8 NVIDIA GPUs on this (GPU-less) machine,
with cuDNN's fused attention in it; the GPU table's compiler descriptions; the report and its exit codes.

The compilation needs JAX's CUDA plugin (the test extra installs it), not a GPU.
"""

import json

import pytest
from jax.experimental import topologies

from dailymae_jax.train import plan
from dailymae_jax.train.gpus import GPUS, target_config
from tools import plan_gpu

# The demo model in bfloat16 (cuDNN's attention needs 16 bits), one 64 px bucket: 4 visible patches + cls and
# 16 + cls decoder tokens, both odd, so the padded path is the one compiled.
DEMO_ONE_BUCKET = ["--config.model.dtype=bfloat16", "--config.schedule.preset=fixed",
                   "--config.schedule.resolution=64"]


@pytest.fixture(scope="module")
def demo_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    with pytest.MonkeyPatch.context() as env:  # the tool sets these for its own process
        env.setenv("JAX_PLATFORMS", "cpu")
        env.setenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        code = plan_gpu.main(["--config", "configs/mae_demo.py", "--gpu", "h100", "--num-gpus", "8", "--json",
                              str(out), *DEMO_ONE_BUCKET])
    assert out.exists(), "planning failed (its stderr says why); the test extra installs JAX's CUDA plugin"
    return code, json.loads(out.read_text())


@pytest.mark.slow  # one CUDA compilation of the demo step: about 25 CPU-seconds
def test_demo_step_compiles_for_8_gpus_with_fused_attention(demo_plan):
    code, report = demo_plan
    assert code == 0
    assert (report["gpu"], report["num_gpus"], report["config"]) == ("h100", 8, "configs/mae_demo.py")
    (row,) = report["buckets"]
    assert (row["resolution"], row["mask_ratio"], row["per_gpu_batch"], row["grad_accum_steps"]) == (64, 0.75, 4, 1)
    assert row["attention"] == "cudnn" and row["fits"]
    # 6 blocks (4 encoder, 2 decoder): a forward and a backward fused-attention kernel each.
    assert row["fused_attention_calls"] == 12
    assert row["gemm_calls"] > 0
    assert row["peak_bytes"] == row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    assert 0 < row["peak_bytes"] < row["pool_bytes"] == int(0.75 * GPUS["h100"].memory_bytes)
    assert row["train_flops_per_image"] > 0 and row["roofline_step_s"] > 0


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_every_gpu_description_is_accepted_by_the_compiler(gpu):
    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(GPUS[gpu]),
                                            topology="1x1x8")
    assert [d.device_kind for d in topology.devices] == [GPUS[gpu].device_kind] * 8
    assert GPUS[gpu].source


def test_kernel_counts_read_custom_calls():
    text = ('%a = custom-call(...), custom_call_target="__cudnn$fmhaSoftmax"\n'
            '%b = custom-call(...), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n'
            '%c = custom-call(...), custom_call_target="__cublas$gemm"\n'
            '%d = custom-call(...), custom_call_target="__cublas$lt$matmul"\n')
    assert plan.kernel_counts(text) == (2, 2)


def test_a_bucket_that_does_not_fit_exits_2_with_one_line(monkeypatch, tmp_path, capsys):
    advice = "the 224 px bucket (mask ratio 0.75) needs 31.0 GiB per GPU ...; fits: ..."
    row = {"resolution": 224, "mask_ratio": 0.75, "grad_accum_steps": 1, "compile_s": 1.0, "argument_bytes": 1,
           "output_bytes": 1, "temp_bytes": 1, "peak_bytes": 1, "pool_bytes": 1, "headroom_bytes": 0,
           "fits": False, "fused_attention_calls": 0, "gemm_calls": 1, "train_flops_per_image": 1.0,
           "roofline_step_s": 1.0}
    monkeypatch.setattr(plan, "plan_pretraining", lambda *a, **k: ([row], advice))
    code = plan_gpu.main(["--gpu", "a100-40gb", "--json", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: {advice}\n")
    assert json.loads((tmp_path / "p.json").read_text())["buckets"] == [row]  # the plan is kept


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "h100", "--num-gpus", "12", "--config.data.global_batch_size=48"],
     "--num-gpus 12: give 1 to 8, or a multiple of 8"),
    (["--gpu", "h100", "--config.train.grad_accum_steps=3"], "train.grad_accum_steps 3 must divide"),
    (["--gpu", "h100", "--config.model.attention=flash"], "model.attention 'flash'; allowed"),
])
def test_bad_settings_exit_2_with_one_line(argv, message, capsys):
    assert plan_gpu.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err

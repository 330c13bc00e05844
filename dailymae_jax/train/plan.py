"""A pretraining run planned for NVIDIA GPUs this machine does not have (``tools/plan_gpu.py``).

JAX compiles for a described CUDA topology without its devices (deviceless ahead-of-time compilation, through
the CUDA plugin's compiler): every (resolution, mask ratio) bucket of the config is built by train/recipe.py and
compiled by train/fit.py exactly as the run builds and compiles it, on a mesh of the described devices with the
run's state shardings and donation. What it reads from each executable: XLA's memory analysis, against the
memory pool JAX would take on that GPU, and the optimized program's kernels (cuDNN fused attention, cuBLAS
GEMMs). What it cannot see: autotuning (no device to time kernels on), the CUDA context and NCCL's buffers.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import ml_collections

from dailymae_jax import config as config_lib
from dailymae_jax.data.shard import make_mesh
from dailymae_jax.errors import ConfigError
from dailymae_jax.model.build import attention_implementation, mae_settings
from dailymae_jax.checkpoint import abstract_with_shardings
from dailymae_jax.train import fit as fit_lib
from dailymae_jax.train.flops import analytic_step_flops
from dailymae_jax.train.gpus import GPUS, GpuModel, target_config
from dailymae_jax.train.recipe import pretrain_recipe
from dailymae_jax.train.state import state_sharding

# Without a device XLA cannot autotune Triton's GEMM tiles and fails ("Couldn't find output tile sizes"): the
# plan compiles the matrix products as cuBLAS calls instead. A run on the node is free to pick Triton's.
DEVICELESS_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
DEFAULT_POOL_FRACTION = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION
_FUSED_ATTENTION = re.compile(r'custom_call_target="__cudnn\$fmha')
_GEMM = re.compile(r'custom_call_target="__cublas\$')


class PlanError(RuntimeError):
    """Planning cannot start on this machine (one line: what is missing and how to get it)."""


def pool_bytes(gpu: GpuModel) -> int:
    """The memory JAX's allocator takes on ``gpu``: XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of it."""
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        fraction = float(fraction) if fraction else DEFAULT_POOL_FRACTION
    except ValueError:
        raise ConfigError(f"XLA_PYTHON_CLIENT_MEM_FRACTION {fraction!r} is not a number") from None
    return int(gpu.memory_bytes * fraction)


def cuda_mesh(gpu: GpuModel, num_gpus: int) -> jax.sharding.Mesh:
    """The run's mesh (data/shard.py) over ``num_gpus`` described ``gpu`` devices, 8 per node."""
    per_node = min(num_gpus, 8)
    if num_gpus < 1 or num_gpus % per_node:
        raise ConfigError(f"--num-gpus {num_gpus}: give 1 to 8, or a multiple of 8 (8 GPUs per node)")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(gpu),
                                                topology=f"1x{num_gpus // per_node}x{per_node}")
    except Exception as error:  # no CUDA plugin: jax names no backend "cuda"
        raise PlanError(f"cannot compile for CUDA here ({str(error).splitlines()[0][:160]}); install JAX's CUDA "
                        f"plugin: pip install 'jax-cuda13-plugin[with-cuda]=={jax.__version__}'") from None
    return make_mesh(list(topology.devices))


def kernel_counts(hlo_text: str) -> tuple[int, int]:
    """(cuDNN fused-attention calls, cuBLAS GEMM calls) in an optimized GPU program's text."""
    return len(_FUSED_ATTENTION.findall(hlo_text)), len(_GEMM.findall(hlo_text))


def plan_pretraining(config: ml_collections.ConfigDict, gpu_name: str, num_gpus: int, *,
                     num_classes: int = 1000) -> tuple[list[dict[str, Any]], str | None]:
    """One row per bucket of ``config``'s schedule compiled for ``num_gpus`` × ``gpu_name``, and the one-line
    advice when a bucket does not fit (None when all do). ``num_classes`` sizes the online probe's head."""
    if gpu_name not in GPUS:
        raise ConfigError(f"--gpu {gpu_name!r}; allowed: {', '.join(GPUS)}")
    gpu = GPUS[gpu_name]
    config_lib.validate_training(config, device_count=num_gpus)
    mesh = cuda_mesh(gpu, num_gpus)
    platform = mesh.devices.flat[0].platform
    recipe = pretrain_recipe(config, num_classes=num_classes, steps_per_epoch=1000, platform=platform)
    buckets = sorted({stage.bucket for stage in config_lib.stages(config)})
    abstract = jax.eval_shape(recipe.init_fn(buckets[0]), jax.random.PRNGKey(0))
    shardings = state_sharding(abstract, mesh)
    global_batch, pool = config.data.global_batch_size, pool_bytes(gpu)
    fits = fit_lib.compile_fitting(recipe.make_step, buckets, configured_accum=config.train.grad_accum_steps,
                                   global_batch=global_batch, mesh=mesh, pool_bytes=pool,
                                   abstract_state=abstract_with_shardings(abstract, shardings),
                                   state_shardings=shardings, compiler_options=DEVICELESS_COMPILER_OPTIONS)
    per_gpu = global_batch // num_gpus
    rows = [_row(f, gpu, config, per_gpu_batch=per_gpu, pool=pool, num_classes=num_classes,
                 attention=attention_implementation(config, platform=platform)) for f in fits]
    advice = next((fit_lib.not_fitting_message(f, pool_bytes=pool, device_kind=gpu.device_kind,
                                               per_device_batch=per_gpu, global_batch=global_batch)
                   for f in fits if not f.fits), None)
    return rows, advice


def _row(fit: fit_lib.BucketFit, gpu: GpuModel, config: ml_collections.ConfigDict, *, per_gpu_batch: int,
         pool: int, num_classes: int, attention: str) -> dict[str, Any]:
    resolution, mask_ratio = fit.bucket
    memory = fit.memory
    fused, gemms = kernel_counts(fit.executable.as_text())
    flops_per_image = analytic_step_flops(mae_settings(config), resolution=resolution, mask_ratio=mask_ratio,
                                          batch=1, num_classes=num_classes,
                                          probe_on_full_image=config.probe.features == "full")
    # Lower bound of the step time: the matrix products at the card's dense bf16 peak, or reading the step's
    # arguments and writing its outputs once at the memory bandwidth, whichever takes longer.
    compute_s = flops_per_image * per_gpu_batch / gpu.peak_bf16_flops
    traffic_s = (memory.argument + memory.output) / gpu.memory_bandwidth
    return {"resolution": resolution, "mask_ratio": mask_ratio, "per_gpu_batch": per_gpu_batch,
            "grad_accum_steps": fit.grad_accum_steps, "attention": attention,
            "compile_s": round(fit.compile_seconds, 2), "argument_bytes": memory.argument,
            "output_bytes": memory.output, "alias_bytes": memory.alias, "temp_bytes": memory.temp,
            "peak_bytes": memory.peak, "pool_bytes": pool, "headroom_bytes": pool - memory.peak, "fits": fit.fits,
            "fused_attention_calls": fused, "gemm_calls": gemms, "train_flops_per_image": flops_per_image,
            "roofline_step_s": max(compute_s, traffic_s)}

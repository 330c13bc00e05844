"""The NVIDIA GPUs a run can be planned for, as data: what XLA's GPU compiler needs to compile for one without
having it (its ``GpuDeviceInfoProto`` fields), and what the plan compares against (memory, bandwidth, peak rate).

Every number comes from NVIDIA: SM count, clock, memory, bandwidth, L2 and the dense bf16 tensor-core peak from
the product's datasheet and architecture whitepaper, shared memory and register limits from the CUDA
programming guide's table of compute capabilities, memory totals as ``nvidia-smi --query-gpu=memory.total``
prints them (MiB). ``source`` names the documents of each row.
"""

from __future__ import annotations

import dataclasses

MIB = 1 << 20
# cuDNN and CUDA runtime the deviceless compiler assumes: the oldest that JAX's CUDA 13 plugin accepts (its
# wheel requires cuDNN >= 9.12); a node runs the newer ones that pip installs beside it.
CUDNN_VERSION = (9, 12)
CUDA_RUNTIME_VERSION = (13, 0)


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """One GPU model (SXM form factor where there are several)."""

    name: str  # the --gpu name
    device_kind: str  # what jax.Device.device_kind reports on it
    compute_capability: tuple[int, int]
    sm_count: int
    clock_ghz: float  # boost clock
    memory_mib: int
    memory_bandwidth: float  # bytes/s
    l2_cache_bytes: int
    shared_memory_per_sm: int  # bytes
    shared_memory_per_block_optin: int  # bytes
    fp32_cores_per_sm: int
    peak_bf16_flops: float  # dense tensor-core FLOP/s
    source: str

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


AMPERE_SOURCE = ("NVIDIA A100 Tensor Core GPU datasheet and Ampere architecture whitepaper (SXM4); CUDA C++ "
                 "Programming Guide, compute capability 8.0")
HOPPER_SOURCE = ("NVIDIA {} Tensor Core GPU datasheet (SXM5) and Hopper architecture whitepaper; CUDA C++ "
                 "Programming Guide, compute capability 9.0")
KIB = 1024

GPUS: dict[str, GpuModel] = {g.name: g for g in (
    GpuModel("a100-40gb", "NVIDIA A100-SXM4-40GB", (8, 0), sm_count=108, clock_ghz=1.41, memory_mib=40960,
             memory_bandwidth=1555e9, l2_cache_bytes=40 * MIB, shared_memory_per_sm=164 * KIB,
             shared_memory_per_block_optin=163 * KIB, fp32_cores_per_sm=64, peak_bf16_flops=312e12,
             source=AMPERE_SOURCE),
    GpuModel("a100-80gb", "NVIDIA A100-SXM4-80GB", (8, 0), sm_count=108, clock_ghz=1.41, memory_mib=81920,
             memory_bandwidth=2039e9, l2_cache_bytes=40 * MIB, shared_memory_per_sm=164 * KIB,
             shared_memory_per_block_optin=163 * KIB, fp32_cores_per_sm=64, peak_bf16_flops=312e12,
             source=AMPERE_SOURCE),
    GpuModel("h100", "NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, clock_ghz=1.98, memory_mib=81559,
             memory_bandwidth=3.35e12, l2_cache_bytes=50 * MIB, shared_memory_per_sm=228 * KIB,
             shared_memory_per_block_optin=227 * KIB, fp32_cores_per_sm=128, peak_bf16_flops=989e12,
             source=HOPPER_SOURCE.format("H100")),
    GpuModel("h200", "NVIDIA H200", (9, 0), sm_count=132, clock_ghz=1.98, memory_mib=143771,
             memory_bandwidth=4.8e12, l2_cache_bytes=50 * MIB, shared_memory_per_sm=228 * KIB,
             shared_memory_per_block_optin=227 * KIB, fp32_cores_per_sm=128, peak_bf16_flops=989e12,
             source=HOPPER_SOURCE.format("H200")),
)}


def target_config(gpu: GpuModel) -> str:
    """XLA's ``GpuTargetConfigProto`` (text format) for ``gpu``: what ``jax.experimental.topologies`` needs to
    compile for it on a machine without it."""
    major, minor = gpu.compute_capability
    fields = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * KIB,
        "shared_memory_per_core": gpu.shared_memory_per_sm, "threads_per_core_limit": 2048,
        "core_count": gpu.sm_count, "fpus_per_core": gpu.fp32_cores_per_sm, "block_dim_limit_x": 2 ** 31 - 1,
        "block_dim_limit_y": 65535, "block_dim_limit_z": 65535, "memory_bandwidth": int(gpu.memory_bandwidth),
        "l2_cache_size": gpu.l2_cache_bytes, "clock_rate_ghz": gpu.clock_ghz, "device_memory_size": gpu.memory_bytes,
        "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin, "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    info = "\n".join(f"  {key}: {value}" for key, value in fields.items())
    return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            f'platform_name: "CUDA"\n'
            f"dnn_version_info {{ major: {CUDNN_VERSION[0]} minor: {CUDNN_VERSION[1]} }}\n"
            f"runtime_version {{ major: {CUDA_RUNTIME_VERSION[0]} minor: {CUDA_RUNTIME_VERSION[1]} }}\n"
            f'device_description_str: "{gpu.device_kind}"\n')

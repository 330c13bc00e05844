"""Plans a pretraining run for NVIDIA GPUs before booking them: every bucket compiled and sized on this machine.

Usage (any machine, no GPU needed; the CUDA plugin must be installed: pip install jax-cuda13-plugin==<jax>):

  python tools/plan_gpu.py --config configs/mae_b16.py --gpu a100-40gb --num-gpus 8 --json plan.json

``--config`` takes the same ``--config.<field>=<value>`` overrides as dailymae_jax.main. For every (resolution,
mask ratio) bucket of the config's schedule, the step is built and compiled exactly as the run does it, for the
named GPU model and count (dailymae_jax.train.plan), and one row is printed: compile seconds, per-GPU argument,
output, temporary and peak bytes, JAX's memory pool on that GPU and the headroom, cuDNN fused-attention and
cuBLAS GEMM kernels in the optimized program, the training FLOPs per image and a roofline lower bound of the
step time. ``train.grad_accum_steps=0`` plans the smallest accumulation that fits each bucket, as the run takes it.

Exit codes: 0 every bucket fits; 2 a bad argument or config, or a bucket that does not fit (one line on stderr
naming it and a setting that fits); 1 planning failed (e.g. no CUDA plugin).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: the repository root holds dailymae_jax and configs/
    sys.path.insert(0, str(REPO))

GIB = float(1 << 30)


def build_parser() -> argparse.ArgumentParser:
    from dailymae_jax.train.gpus import GPUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Any --config.<field>=<value> is applied to the config.")
    parser.add_argument("--config", default=str(REPO / "configs/mae_b16.py"), help="pretraining recipe file")
    parser.add_argument("--gpu", required=True, choices=sorted(GPUS), help="GPU model (dailymae_jax/train/gpus.py)")
    parser.add_argument("--num-gpus", type=int, default=8, help="GPUs of the run (1-8, or a multiple of 8)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the online probe's head")
    parser.add_argument("--json", type=Path, help="write the plan here as JSON")
    return parser


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("bucket", "accum", "compile s", "args GiB", "out GiB", "temp GiB", "peak GiB", "pool GiB",
              "headroom GiB", "fits", "fMHA", "GEMMs", "GFLOP/img", "roofline ms")
    lines = [header]
    for r in rows:
        lines.append((f"{r['resolution']}px/{r['mask_ratio']}", str(r["grad_accum_steps"]), f"{r['compile_s']:.1f}",
                      *(f"{r[k] / GIB:.2f}" for k in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes",
                                                      "pool_bytes", "headroom_bytes")),
                      "yes" if r["fits"] else "NO", str(r["fused_attention_calls"]), str(r["gemm_calls"]),
                      f"{r['train_flops_per_image'] / 1e9:.1f}", f"{1e3 * r['roofline_step_s']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    # Compile for the described GPUs only: JAX itself runs on the CPU (a GPU here, if any, stays untouched), and
    # the CUDA plugin's check of local CUDA libraries is skipped (there may be no driver).
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])

    from dailymae_jax.config import load_config_file
    from dailymae_jax.errors import ConfigError
    from dailymae_jax.files import write_json
    from dailymae_jax.train import plan
    from dailymae_jax.train.gpus import GPUS

    start = time.perf_counter()
    try:
        config = load_config_file(args.config, overrides)
        rows, advice = plan.plan_pretraining(config, args.gpu, args.num_gpus, num_classes=args.num_classes)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except plan.PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    gpu = GPUS[args.gpu]
    print(f"{args.num_gpus} x {gpu.device_kind}, global batch {config.data.global_batch_size}, "
          f"{time.perf_counter() - start:.0f} s to plan (cuBLAS GEMMs: no autotuning without a device)")
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, {"gpu": args.gpu, "num_gpus": args.num_gpus, "config": args.config,
                               "overrides": overrides, "device_kind": gpu.device_kind, "gpu_source": gpu.source,
                               "compiler_options": plan.DEVICELESS_COMPILER_OPTIONS, "buckets": rows})
    if advice is not None:
        print(f"error: {advice}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

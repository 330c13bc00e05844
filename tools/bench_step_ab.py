"""Our train step against the PyTorch reference (or against our step in another checkout) on one CPU, interleaved.

Usage (the CPU comparison of docs/PERFORMANCE.md: MAE ViT-S/16, decoder 256×4, batch 32, float32):

  python tools/bench_step_ab.py --config.model.size=small --config.model.decoder_width=256 \\
      --config.model.decoder_depth=4 --config.model.dtype=float32 --res 224 --batch-size 32 \\
      --sides ours torch --rounds 8 --json step_ab.json

Each side runs in its own worker process that builds its step once (ours: dailymae_jax.train.benchmark, as a
run compiles it; torch: tools/torch_mae.py's eager step, or compiled with --torch-compile) and then waits.
The sides then take turns, ``--steps-per-round`` steps each, in alternating order, so that a shared machine's
slow and fast minutes fall on both. Every step records its wall time and the CPU time of its process (all
threads). Both frameworks get the same cores (``--cores``, the process affinity: XLA sizes its thread pool
by it) and torch as many threads. ``ours@DIR`` is our step imported from another checkout DIR (for example
``git worktree add /tmp/before HEAD~1``): the gain of one change, measured the same way.

The JSON holds every step's times, the medians per side and each side's ratios to the first side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if not __package__:
    sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Any --config.<field>=<value> override of the recipe is accepted.")
    parser.add_argument("--config", default=str(REPO / "configs" / "mae_b16.py"), help="recipe with get_config()")
    parser.add_argument("--sides", nargs="+", default=["ours", "torch"],
                        help="'ours', 'ours@DIR' (our step from checkout DIR) or 'torch'; ratios are to the first")
    parser.add_argument("--res", type=int, default=224, help="resolution in px")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8, help="turns of every side")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per side before the rounds")
    parser.add_argument("--cores", type=int, nargs="+", default=None,
                        help="CPU ids every side runs on (default: all this process may use)")
    parser.add_argument("--torch-compile", action="store_true", help="torch.compile the reference (default: eager)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the online probe")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one side in this process
    return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for side in args.sides:
        name, _, tree = side.partition("@")
        if name not in ("ours", "torch") or (tree and name != "ours"):
            parser.error(f"--sides {side!r}: allowed: ours, ours@DIR, torch")
        if tree and not (Path(tree) / "dailymae_jax").is_dir():
            parser.error(f"--sides {side!r}: {tree} holds no dailymae_jax package")
    if len(set(args.sides)) != len(args.sides):
        parser.error(f"--sides {' '.join(args.sides)}: a side is named twice")
    for name in ("rounds", "steps_per_round", "batch_size", "res"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be ≥ 1")
    return args, [a for a in rest if a.startswith("--config.")]


def build_ours(config, resolution: int, batch: int, num_classes: int) -> Callable[[int], None]:
    """Our pretraining step as a run compiles it; ``run(i)`` takes step i on synthetic batch i mod 3."""
    import jax

    from dailymae_jax.data.shard import make_mesh
    from dailymae_jax.train import benchmark

    mesh = make_mesh(jax.devices()[:1])
    state, step, _ = benchmark.compile_pretrain_step(
        config, mesh=mesh, bucket=(resolution, float(config.schedule.mask_ratio)), global_batch=batch,
        num_classes=num_classes, seed=0, steps_per_epoch=1000)
    batches = benchmark.synthetic_batches(mesh, count=benchmark.SYNTHETIC_BATCHES, global_batch=batch,
                                          resolution=resolution, num_classes=num_classes, seed=1)
    holder = {"state": state}

    def run(i: int) -> None:
        holder["state"], _ = step(holder["state"], *batches[i % len(batches)])
        jax.block_until_ready(holder["state"])
    return run


def build_torch(config, resolution: int, batch: int, num_classes: int, *, compile: bool,
                threads: int) -> Callable[[int], None]:
    """The reference's step (tools/torch_mae.py) with the same model, optimizer settings and probe."""
    import torch

    from dailymae_jax.model.build import mae_settings
    from dailymae_jax.schedule import scaled_learning_rate
    from tools import torch_mae

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    settings, t = mae_settings(config), config.train
    model = torch_mae.TorchMAE(resolution=resolution, **{k: v for k, v in settings.items() if k != "dtype"})
    step = torch_mae.TorchPretrainStep(
        model, torch_mae.LinearProbe(settings["width"], num_classes), mask_ratio=float(config.schedule.mask_ratio),
        lr=scaled_learning_rate(t.base_lr, batch), weight_decay=t.weight_decay, betas=(t.b1, t.b2),
        probe_lr=config.probe.learning_rate, bf16=settings["dtype"] == "bfloat16", compile=compile,
        hflip=config.data.hflip)
    batches = [(torch.randint(0, 256, (batch, resolution, resolution, 3), dtype=torch.uint8),
                torch.randint(0, num_classes, (batch,))) for _ in range(3)]
    return lambda i: step(*batches[i % len(batches)])


def timed_steps(run: Callable[[int], None], first: int, count: int) -> dict[str, list[float]]:
    """Steps first … first + count − 1, each timed alone: wall seconds and this process's CPU seconds."""
    wall, cpu = [], []
    for i in range(first, first + count):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        run(i)
        wall.append(time.perf_counter() - tick)
        cpu.append(time.process_time() - cpu_tick)
    return {"wall_s": wall, "cpu_s": cpu}


def worker_main(args: argparse.Namespace, overrides: list[str]) -> int:
    """One side: build, warm up, say so, then run the steps each line of stdin asks for (JSON lines out)."""
    name, _, tree = args.worker.partition("@")
    if tree:  # our package from another checkout, ahead of this one's
        sys.path.insert(0, str(Path(tree).resolve()))
    from dailymae_jax.config import load_config_file

    config = load_config_file(args.config, overrides)
    if name == "ours":
        run = build_ours(config, args.res, args.batch_size, args.num_classes)
    else:
        run = build_torch(config, args.res, args.batch_size, args.num_classes, compile=args.torch_compile,
                          threads=len(os.sched_getaffinity(0)))
    done = args.warmup_steps
    for i in range(done):
        run(i)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        count = int(line)
        print(json.dumps(timed_steps(run, done, count)), flush=True)
        done += count
    return 0


def summarize(sides: Sequence[str], times: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Medians per side, and each side's median over the first side's (> 1: slower than the first)."""
    medians = {s: {k: statistics.median(v) for k, v in times[s].items()} for s in sides}
    base = medians[sides[0]]
    return {"median": medians,
            "ratio_to_first": {s: {k: medians[s][k] / base[k] for k in base} for s in sides}}


def run_sides(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Starts one worker per side on the same cores, then alternates their rounds."""
    cores = set(args.cores) if args.cores else os.sched_getaffinity(0)
    workers = {}
    for side in args.sides:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", side]
        workers[side] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         preexec_fn=lambda: os.sched_setaffinity(0, cores))
    try:
        for side, worker in workers.items():
            line = worker.stdout.readline()
            if not line:
                raise RuntimeError(f"side {side} failed before its first step (its error is above)")
            log(f"{side}: ready")
        times = {s: {"wall_s": [], "cpu_s": []} for s in args.sides}
        for r in range(args.rounds):
            for side in (args.sides if r % 2 == 0 else args.sides[::-1]):
                workers[side].stdin.write(f"{args.steps_per_round}\n")
                workers[side].stdin.flush()
                for key, values in json.loads(workers[side].stdout.readline()).items():
                    times[side][key] += values
            medians = summarize(args.sides, times)["median"]
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{s} {m['wall_s']:.2f} s wall {m['cpu_s']:.2f} s CPU" for s, m in medians.items()))
    finally:
        for worker in workers.values():
            if worker.stdin:
                worker.stdin.close()
            worker.wait(timeout=60)
    return times


def log(message: str) -> None:
    print(f"bench_step_ab: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    if args.worker:
        return worker_main(args, overrides)
    from dailymae_jax.config import load_config_file
    from dailymae_jax.errors import ConfigError
    from dailymae_jax.files import write_json
    from dailymae_jax.model.build import mae_settings

    try:
        settings = mae_settings(load_config_file(args.config, overrides))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        times = run_sides(args, argv)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report = {"benchmark": "train step, interleaved sides on one CPU", "command":
              shlex.join(["python", "tools/bench_step_ab.py", *argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "cores_used": sorted(args.cores or os.sched_getaffinity(0))},
              "settings": {"model": settings, "resolution": args.res, "batch_size": args.batch_size,
                           "rounds": args.rounds, "steps_per_round": args.steps_per_round,
                           "warmup_steps": args.warmup_steps, "torch_compile": args.torch_compile},
              "sides": args.sides, **summarize(args.sides, times), "steps": times}
    if args.json:
        write_json(args.json, report)
    print(json.dumps({k: report[k] for k in ("median", "ratio_to_first")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

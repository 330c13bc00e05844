"""Pretraining throughput of our compiled MAE train step against a PyTorch MAE on the same device, as JSON.

Usage (one GPU; the defaults are MAE-B/16, batch 256, four resolutions, both frameworks):

  python tools/bench_train.py --res 224 192 160 112 --json train_h100.json

``--config`` (default configs/mae_b16.py) takes the same ``--config.<field>=<value>`` overrides as
dailymae_jax.main, e.g. ``--config.model.size=tiny`` for a smoke test. For every resolution, in this order:

1. ours (dailymae_jax.train.benchmark): the train step built and compiled as a training run builds it (bf16
   compute, float32 master weights, donated state, AdamW, online probe), timed on synthetic uint8 batches
   already on the device; with ``--data synthetic loader`` also fed by the real TrainLoader from ``--beton``;
2. the PyTorch reference (tools/torch_mae.py: the same MAE, bf16 autocast, torch.compile, fused AdamW) at the
   same resolution and batch.

Each (framework, resolution) runs in its own subprocess: the frameworks' allocators never share the GPU (JAX
would otherwise hold 75% of it), and every peak-memory figure belongs to one measurement. Synthetic steps are
timed one by one after warm-up (host clock around a blocking step, batches rotating among three); the median is
quoted. Model FLOPs utilisation divides our compiled step's FLOPs (XLA's cost analysis, per device) by step
time and the device's peak dense bf16 rate; the reference is charged the same FLOPs, so both MFUs compare like
with like. An analytic count of the matrix products (dailymae_jax.train.flops) is reported as a cross-check.

The JSON is rewritten after every measurement, so a run cut short keeps what it measured; ``--append`` merges
into an existing file (a long sweep split over several commands).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts tools/ on sys.path, not the repository root that holds dailymae_jax, configs/
# and tools/ (imported as tools.<name>, the root is already there).
if not __package__:
    sys.path.insert(0, str(REPO))

DISTRIBUTIONS = ("numpy", "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
                 "ml-collections", "torch", "triton", "ffcv")


class BenchError(ValueError):
    """A bad argument or config value; the message is one line naming it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any --config.<field>=<value> override of the recipe is accepted as in dailymae_jax.main.")
    parser.add_argument("--config", default=str(REPO / "configs" / "mae_b16.py"),
                        help="recipe file with get_config() (default: configs/mae_b16.py)")
    parser.add_argument("--res", type=int, nargs="+", default=[224, 192, 160, 112], help="resolutions in px")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (one device)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--data", nargs="+", choices=("synthetic", "loader"), default=["synthetic"],
                        help="what feeds our step: synthetic device batches and/or the real TrainLoader")
    parser.add_argument("--beton", type=Path, default=None,
                        help="with --data loader: the .beton to read (default: config.data.train_path, else the "
                             "sample dataset built in config.data.sample_dir)")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the PyTorch reference (needs torch)")
    parser.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the reference's forward and backward")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the online probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here (else stdout only)")
    parser.add_argument("--append", action="store_true",
                        help="merge into an existing --json file measured with the same settings")
    parser.add_argument("--worker-timeout", type=float, default=None, help="seconds before a measurement is killed")
    # Internal: one measurement in this process, results to a file (the orchestrator passes these).
    parser.add_argument("--worker", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the ``--config.<field>=<value>`` overrides (everything else is an error)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, [a for a in rest if a.startswith("--config.")]


def validate(args: argparse.Namespace, config) -> None:
    """Everything that can be checked before anything is built; raises ConfigError or BenchError."""
    from dailymae_jax.model.build import compute_dtype, model_size

    patch = model_size(config).patch
    bad = [r for r in args.res if r <= 0 or r % patch]
    if bad:
        raise BenchError(f"--res {bad}: not positive multiples of the patch size {patch}; "
                         f"allowed: multiples of {patch}, e.g. 224 192 160 112")
    for name, low in (("batch_size", 1), ("steps", 1), ("num_classes", 1), ("warmup_steps", 0)):
        if getattr(args, name) < low:
            raise BenchError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be ≥ {low}")
    compute_dtype(config.model.dtype)
    accum = config.train.grad_accum_steps or 1  # 0 (the smallest that fits) is the run's choice; 1 here
    if accum < 0 or args.batch_size % accum:
        raise BenchError(f"train.grad_accum_steps {accum} does not divide --batch-size {args.batch_size}")


def log(message: str) -> None:
    print(f"bench_train: {message}", file=sys.stderr, flush=True)


def run_jax(args: argparse.Namespace, config, resolution: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Our step at one resolution (synthetic batches, then with --data loader the real loader); its backend."""
    import jax

    from dailymae_jax.data.shard import make_mesh
    from dailymae_jax.train import benchmark

    logging.basicConfig(format="bench_train: %(message)s")  # the package's progress lines look like ours
    benchmark.log.setLevel(logging.INFO)
    device = jax.devices()[0]  # one device: the comparison is one GPU against one GPU
    results = benchmark.measure_pretrain_step(
        config, mesh=make_mesh([device]), resolution=resolution, global_batch=args.batch_size,
        num_classes=args.num_classes, steps=args.steps, warmup_steps=args.warmup_steps, seed=args.seed,
        beton=args.beton if "loader" in args.data else None)
    return results, {"jax_backend": device.platform, "jax_platform_version": device.client.platform_version}


def run_torch(args: argparse.Namespace, config, resolution: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The PyTorch reference at one resolution, on synthetic device batches; and the CUDA libraries it used."""
    import torch

    from dailymae_jax.model.build import mae_settings
    from dailymae_jax.schedule import scaled_learning_rate
    from tools import torch_mae

    if config.probe.features == "full":
        raise BenchError("probe.features 'full' is not implemented by the torch reference; use 'visible'")
    t = config.train
    result = torch_mae.measure_pretrain_step(
        mae_settings(config), resolution=resolution, batch=args.batch_size, num_classes=args.num_classes,
        mask_ratio=float(config.schedule.mask_ratio), lr=scaled_learning_rate(t.base_lr, args.batch_size),
        weight_decay=t.weight_decay, betas=(t.b1, t.b2), probe_lr=config.probe.learning_rate,
        hflip=config.data.hflip, compile=args.torch_compile, steps=args.steps, warmup_steps=args.warmup_steps,
        seed=args.seed)
    log(f"torch {resolution} px: warm-up (compilation included) {result['warmup_seconds']:.1f} s, "
        f"{result['images_per_second']:.1f} img/s")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return [result], {"torch_cuda": torch.version.cuda, "torch_cudnn": cudnn}


def worker_main(args: argparse.Namespace, config) -> int:
    """One measurement in this process; its results and what only its framework can say go to --worker-out."""
    if len(args.res) != 1 or args.worker_out is None:
        raise BenchError("--worker needs exactly one --res and --worker-out")
    results, software = (run_jax if args.worker == "jax" else run_torch)(args, config, args.res[0])
    args.worker_out.write_text(json.dumps({"results": results, "software": software}))
    return 0


def worker_argv(argv: Sequence[str], beton: Path | None, framework: str, resolution: int, out: Path) -> list[str]:
    """The orchestrator's own command line, narrowed to one measurement (argparse: the last --res wins)."""
    return [sys.executable, str(Path(__file__).resolve()), *argv, *(["--beton", str(beton)] if beton else []),
            "--res", str(resolution), "--worker", framework, "--worker-out", str(out)]


def run_worker_process(argv: list[str], out: Path, timeout: float | None) -> tuple[dict[str, Any] | None, str | None]:
    """Runs one measurement writing to ``out``; its stderr streams through. Returns (output, None) or (None, error)."""
    tail: list[str] = []
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)

    def pump() -> None:  # echo live, keep the end for the report
        for line in process.stderr:
            sys.stderr.write(line)
            tail[:] = (tail + [line.rstrip()])[-15:]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        reader.join(timeout=5)
        return None, f"killed after --worker-timeout {timeout:g} s"
    reader.join(timeout=5)
    if code != 0 or not out.is_file():
        last = next((line for line in reversed(tail) if line.strip()), "")
        return None, f"exit code {code}: {last}"[:500]
    return json.loads(out.read_text()), None


def settings_of(args: argparse.Namespace, config, overrides: Sequence[str]) -> dict[str, Any]:
    """What must be equal for two measurements to sit in one table (checked by --append)."""
    from dailymae_jax.model.build import mae_settings

    return {"config": os.path.relpath(Path(args.config).resolve(), REPO), "overrides": list(overrides),
            "model": mae_settings(config), "batch_size": args.batch_size, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "mask_ratio": float(config.schedule.mask_ratio),
            "grad_accum_steps": int(config.train.grad_accum_steps), "probe_features": config.probe.features,
            "num_classes": args.num_classes, "torch_compile": args.torch_compile}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Fills in what pairs of measurements give: the reference's FLOPs and MFU (charged our step's FLOPs),
    the analytic FLOPs, speedups per resolution and the headline numbers at 224 px."""
    from dailymae_jax.train.compile import model_flops_utilization
    from dailymae_jax.train.flops import analytic_step_flops

    results = sorted(report["results"], key=lambda r: (-r["resolution"], r["data"], r["framework"]))
    ours = {r["resolution"]: r for r in results if r["framework"] == "jax" and r["data"] == "synthetic"
            and "error" not in r}
    settings, speedups = report["settings"], {}
    for r in (r for r in results if "error" not in r):
        res = r["resolution"]
        r["flops_per_step_analytic"] = analytic_step_flops(
            settings["model"], resolution=res, mask_ratio=settings["mask_ratio"], batch=r["batch_size"],
            num_classes=settings["num_classes"], probe_on_full_image=settings["probe_features"] == "full")
        step_time = r.get("step_time_median_s", r.get("step_time_mean_s"))
        if r["framework"] == "torch" and res in ours:
            r["flops_per_step"] = ours[res]["flops_per_step"]
            r["mfu"] = model_flops_utilization(r["flops_per_step"], step_time, r["peak_bf16_flops"])
            speedups[str(res)] = r["step_time_median_s"] / ours[res]["step_time_median_s"]
        r["mfu_analytic"] = model_flops_utilization(r["flops_per_step_analytic"], step_time, r["peak_bf16_flops"])
    report.update(results=results, speedup_vs_pytorch=speedups, speedup_vs_pytorch_224=speedups.get("224"),
                  mfu_224=ours[224]["mfu"] if 224 in ours else None)
    devices = [r["device_kind"] for r in results if r["framework"] == "jax" and "device_kind" in r]
    report["device"] = devices[0] if devices else report.get("device")
    return report


def merge(previous: dict[str, Any], new_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Previous results with those of the same (framework, data, resolution) replaced by the new ones."""
    key = lambda r: (r["framework"], r["data"], r["resolution"])  # noqa: E731
    replaced = {key(r) for r in new_results}
    return [r for r in previous["results"] if key(r) not in replaced] + new_results


def format_table(report: dict[str, Any]) -> str:
    rows = ["framework  data       res   img/s    step ms   MFU    MFU(an.)  peak GiB  loss"]
    pct = lambda x: f"{100 * x:5.1f}%" if x is not None else "   - "  # noqa: E731
    for r in report["results"]:
        if "error" in r:
            rows.append(f"{r['framework']:<10} {r['data']:<10} {r['resolution']:<5} error: {r['error']}")
            continue
        ms = 1e3 * r.get("step_time_median_s", r.get("step_time_mean_s"))
        mem = f"{r['peak_memory_bytes'] / 2**30:8.2f}" if r.get("peak_memory_bytes") else "       -"
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "nan"
        rows.append(f"{r['framework']:<10} {r['data']:<10} {r['resolution']:<5} {r['images_per_second']:7.1f}  "
                    f"{ms:8.1f}  {pct(r.get('mfu'))}  {pct(r.get('mfu_analytic'))}   {mem}  {loss}")
    rows.append(f"speedup vs PyTorch (step time ratio): {report['speedup_vs_pytorch']}")
    return "\n".join(rows)


def resolve_beton(args: argparse.Namespace, config) -> Path:
    """The .beton for --data loader (the config's sample dataset is built here), checked against the batch."""
    from dailymae_jax.data.prepare import dataset_info, sample_beton

    beton = args.beton or config.data.train_path or None
    if beton is None and config.data.sample_dir:  # written before any worker starts JAX (writing forks)
        beton = sample_beton(config.data.sample_dir, num_images=config.data.sample_num_images, seed=config.seed)
    if beton is None:
        raise BenchError("--data loader needs a dataset: give --beton FILE, --config.data.train_path=FILE or "
                         "--config.data.sample_dir=DIR")
    try:
        info = dataset_info(beton)
    except (FileNotFoundError, ValueError) as error:
        raise BenchError(f"--beton: {error}") from None
    if info.num_samples < args.batch_size:
        raise BenchError(f"--batch-size {args.batch_size}: larger than {beton} ({info.num_samples} images)")
    if info.num_classes > args.num_classes:
        raise BenchError(f"--num-classes {args.num_classes}: {beton} has labels up to {info.num_classes - 1}")
    return Path(beton).resolve()


def main(argv: Sequence[str] | None = None) -> int:
    from dailymae_jax.config import load_config_file
    from dailymae_jax.errors import ConfigError
    from dailymae_jax.files import write_json
    from dailymae_jax.report import software_versions

    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    try:
        config = load_config_file(args.config, overrides)
        validate(args, config)
        if args.worker:
            return worker_main(args, config)
        if "loader" in args.data:
            args.beton = resolve_beton(args, config)
        settings = settings_of(args, config, overrides)
        previous = None
        if args.append:
            if args.json is None or not args.json.is_file():
                raise BenchError("--append needs an existing --json file")
            previous = json.loads(args.json.read_text())
            if previous.get("settings") != settings:
                raise BenchError(f"--append: {args.json} was measured with other settings: {previous.get('settings')}")
        if args.torch and importlib.util.find_spec("torch") is None:
            raise BenchError("--torch: torch is not installed; install it or pass --no-torch")
    except (BenchError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    report: dict[str, Any] = {
        "benchmark": "MAE pretraining train-step throughput, ours (JAX) vs a PyTorch reference",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "tools/bench_train.py", *argv]),
        "device": previous.get("device") if previous else None, "software": software_versions(DISTRIBUTIONS),
        "settings": settings, "results": []}
    failed, new_results = False, []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for resolution in args.res:
            for framework in ["jax"] + (["torch"] if args.torch else []):
                log(f"{framework} at {resolution} px")
                start = time.perf_counter()
                out = Path(tmp) / f"{framework}_{resolution}.json"
                output, error = run_worker_process(worker_argv(argv, args.beton, framework, resolution, out), out,
                                                   args.worker_timeout)
                log(f"{framework} at {resolution} px took {time.perf_counter() - start:.0f} s"
                    + (f" and failed: {error}" if error else ""))
                if error is not None:
                    failed = True
                    new_results += [{"framework": framework, "data": d, "resolution": resolution, "error": error}
                                    for d in (args.data if framework == "jax" else ["synthetic"])]
                else:
                    new_results += output["results"]
                    report["software"].update(output["software"])
                report["results"] = merge(previous, new_results) if previous else list(new_results)
                if args.json is not None:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    write_json(args.json, summarize(report))
    print(format_table(summarize(report)))
    print(json.dumps({k: report[k] for k in ("device", "speedup_vs_pytorch_224", "mfu_224")}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

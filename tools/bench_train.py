"""Pretraining throughput of our compiled MAE train step against a PyTorch MAE on the same device, as JSON.

Usage (one GPU; the defaults are MAE-B/16, batch 256, four resolutions, both frameworks):

  python tools/bench_train.py --res 224 192 160 112 --json docs/perf/train_h100.json

Options mirror a run: ``--config`` (default configs/mae_b16.py) takes the same ``--config.<field>=<value>``
overrides as dailymae_jax.main, e.g. ``--config.model.size=tiny`` for a smoke test.

For every resolution r, in this order:

1. ours: the train step built and compiled exactly as a training run builds it (bf16 compute, float32 master
   weights, donated state, AdamW, online probe), timed on synthetic uint8 batches already on the device; with
   ``--data synthetic loader`` also fed by the real TrainLoader from ``--beton``;
2. the PyTorch reference (tools/torch_mae.py: the same MAE, bf16 autocast, torch.compile, fused AdamW) at the
   same resolution and batch.

Each (framework, resolution) runs in its own subprocess: the two frameworks' allocators never share the GPU
(JAX would otherwise hold 75% of it), and every peak-memory figure belongs to one measurement. Synthetic steps
are timed one by one after warm-up (host clock around a blocking step, batches rotating among three), and the
median is quoted. Model FLOPs utilisation divides the FLOPs of our compiled step (XLA's cost analysis, per
device) by step time and the device's peak dense bf16 rate; the reference is charged the same FLOPs, so both
MFUs compare like with like. An analytic count of the matrix products is reported beside it as a cross-check.

The JSON is rewritten after every measurement, so a run cut short keeps what it measured; ``--append`` merges
into an existing file (a long sweep split over several commands).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
# Running as `python tools/...` puts tools/ (not the repo root) on sys.path.
sys.path.insert(0, str(REPO))

FRAMEWORKS = ("jax", "torch")
DATA_SOURCES = ("synthetic", "loader")
SYNTHETIC_BATCHES = 3  # rotate among a few batches so no step reads its input from cache left by the last
DISTRIBUTIONS = ("numpy", "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
                 "ml-collections", "torch", "triton", "ffcv")


class BenchError(ValueError):
    """A bad argument or config value; the message is one line naming it."""


# --------------------------------------------------------------------------------------------------
# Arguments and config.
# --------------------------------------------------------------------------------------------------

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
    parser.add_argument("--data", nargs="+", choices=DATA_SOURCES, default=["synthetic"],
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
    parser.add_argument("--worker", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the ``--config.<field>=<value>`` overrides (everything else is an error)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, overrides


def load_config(path: str | Path, overrides: Sequence[str]):
    """The recipe with its overrides applied, parsed exactly as dailymae_jax.main parses them."""
    from absl import flags
    from ml_collections import config_flags

    if not Path(path).is_file():
        raise BenchError(f"--config: no such file {path}")
    argv = ["bench_train", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (AttributeError, KeyError) as error:
        raise BenchError(f"config override: {path} has no field {error}") from None
    except (flags.Error, TypeError, ValueError) as error:
        raise BenchError(f"config override: {error}") from None
    return values.config


def validate(args: argparse.Namespace, config) -> None:
    """Everything that can be checked before anything is built; raises BenchError naming the culprit."""
    from dailymae_jax import config as config_lib

    try:
        size = config_lib.model_size(config)
    except config_lib.ConfigError as error:
        raise BenchError(str(error)) from None
    bad = [r for r in args.res if r <= 0 or r % size.patch]
    if bad:
        raise BenchError(f"--res {bad}: not positive multiples of the patch size {size.patch}; "
                         f"allowed: multiples of {size.patch}, e.g. 224 192 160 112")
    for name in ("batch_size", "steps", "num_classes"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be ≥ 1")
    if args.warmup_steps < 0:
        raise BenchError(f"--warmup-steps {args.warmup_steps}: must be ≥ 0")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise BenchError(f"model.dtype {config.model.dtype!r}; allowed: float32, bfloat16")
    if args.batch_size % config.train.grad_accum_steps:
        raise BenchError(f"train.grad_accum_steps {config.train.grad_accum_steps} does not divide --batch-size "
                         f"{args.batch_size}")


def model_settings(config) -> dict[str, Any]:
    """The architecture being timed, as plain values (also what the torch reference is built from)."""
    from dailymae_jax import config as config_lib

    size = config_lib.model_size(config)
    m = config.model
    return {"width": size.width, "depth": size.depth, "heads": size.heads, "patch": size.patch,
            "mlp_ratio": size.mlp_ratio, "decoder_width": m.decoder_width, "decoder_depth": m.decoder_depth,
            "decoder_heads": m.decoder_heads, "norm_pix_loss": bool(m.norm_pix_loss), "dtype": m.dtype}


def build_model(config):
    """The MAE a training run builds from this config (kept equal to pretrain.build_model by a test; pretrain
    itself is not imported because it pulls in ffcv, which the synthetic benchmark must not need)."""
    import jax.numpy as jnp

    from dailymae_jax import config as config_lib
    from dailymae_jax.model.mae import mae_from_size

    m = config.model
    return mae_from_size(config_lib.model_size(config), decoder_width=m.decoder_width,
                         decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                         norm_pix_loss=m.norm_pix_loss,
                         dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32)


# --------------------------------------------------------------------------------------------------
# FLOPs and timing, shared by both frameworks.
# --------------------------------------------------------------------------------------------------

def _block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """One pre-norm block's matrix products: qkv, attention scores and mix, out projection, two MLP layers."""
    hidden = int(width * mlp_ratio)
    return 2 * tokens * width * (4 * width + 2 * hidden) + 4 * tokens * tokens * width


def analytic_forward_flops(*, width: int, depth: int, patch: int, mlp_ratio: float, decoder_width: int,
                           decoder_depth: int, resolution: int, mask_ratio: float) -> float:
    """FLOPs (2 per multiply-add) of the matrix products in one sample's MAE forward pass.

    Elementwise work (norms, GELU, softmax, loss) is left out: it is a few percent at MAE-B sizes.
    """
    length = (resolution // patch) ** 2
    visible = 1 + int(length * (1 - mask_ratio))  # cls + kept patches
    full = 1 + length  # the decoder sees every position
    patch_dim = patch * patch * 3
    embed = 2 * length * patch_dim * width  # applied to every patch, before masking
    encoder = depth * _block_flops(visible, width, mlp_ratio)
    decoder = (2 * visible * width * decoder_width + decoder_depth * _block_flops(full, decoder_width, mlp_ratio)
               + 2 * full * decoder_width * patch_dim)
    return float(embed + encoder + decoder)


def analytic_step_flops(settings: dict[str, Any], *, resolution: int, mask_ratio: float, batch: int,
                        num_classes: int, probe_on_full_image: bool = False) -> float:
    """Matrix-product FLOPs of one train step: backward costs twice the forward, except that the patch
    embedding gets no input gradient (images are not differentiated); plus the probe's forward and weight
    gradient, and DailyMAE's extra full-image encoder pass when the probe reads unmasked images."""
    kw = {k: settings[k] for k in ("width", "depth", "patch", "mlp_ratio", "decoder_width", "decoder_depth")}
    forward = analytic_forward_flops(**kw, resolution=resolution, mask_ratio=mask_ratio)
    length = (resolution // settings["patch"]) ** 2
    embed = 2 * length * settings["patch"] ** 2 * 3 * settings["width"]
    per_sample = 3 * forward - embed + 4 * settings["width"] * num_classes
    if probe_on_full_image:
        per_sample += embed + settings["depth"] * _block_flops(1 + length, settings["width"], settings["mlp_ratio"])
    return float(batch * per_sample)


def time_steps(run_step: Callable[[int], None], warmup: int, steps: int) -> tuple[list[float], float]:
    """Calls ``run_step(i)`` (which must block until the step is done) warmup + steps times.

    Returns the timed steps' seconds and the warm-up's total seconds (compilation and autotuning land there).
    """
    start = time.perf_counter()
    for i in range(warmup):
        run_step(i)
    warmup_seconds = time.perf_counter() - start
    times = []
    for i in range(warmup, warmup + steps):
        tick = time.perf_counter()
        run_step(i)
        times.append(time.perf_counter() - tick)
    return times, warmup_seconds


def step_stats(times: Sequence[float], batch: int) -> dict[str, float]:
    median = statistics.median(times)
    return {"step_time_median_s": median, "step_time_min_s": min(times), "step_time_max_s": max(times),
            "images_per_second": batch / median}


def log(message: str) -> None:
    print(f"bench_train: {message}", file=sys.stderr, flush=True)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------
# Workers: one framework, one resolution, in this process.
# --------------------------------------------------------------------------------------------------

def run_jax(args: argparse.Namespace, config, resolution: int) -> list[dict[str, Any]]:
    """Our step at one resolution: synthetic device batches, then (if asked) the real loader."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dailymae_jax.data.shard import DATA_AXIS, make_mesh
    from dailymae_jax.model.probe import LinearProbe
    from dailymae_jax.train import compile as compile_lib
    from dailymae_jax import schedule as schedule_lib
    from dailymae_jax.train.state import create_state, init_state, make_optimizer, make_probe_optimizer
    from dailymae_jax.train.steps import PretrainStepConfig, make_pretrain_step

    device = jax.devices()[0]
    mesh = make_mesh([device])  # one device: the comparison is one GPU against one GPU
    batch = args.batch_size
    mask_ratio = float(config.schedule.mask_ratio)
    model = build_model(config)
    probe = LinearProbe(num_classes=args.num_classes)
    # The recipe's schedule over a nominal long run: its value does not change the work of a step.
    lr_schedule = schedule_lib.learning_rate_schedule(
        peak_lr=schedule_lib.scaled_learning_rate(config.train.base_lr, batch), total_steps=100_000,
        warmup_steps=1_000, min_lr=config.train.min_lr)
    tx = make_optimizer(learning_rate=lr_schedule, weight_decay=config.train.weight_decay, b1=config.train.b1,
                        b2=config.train.b2)
    probe_tx = make_probe_optimizer(config.probe.learning_rate)
    init = functools.partial(init_state, model=model, probe=probe, tx=tx, probe_tx=probe_tx, resolution=resolution,
                             mask_ratio=mask_ratio)
    state, state_shardings = create_state(init, jax.random.PRNGKey(args.seed), mesh)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

    def make_step(bucket):
        return make_pretrain_step(model, probe, tx, probe_tx, lr_schedule, PretrainStepConfig(
            mask_ratio=bucket[1], patch=model.patch, hflip=config.data.hflip,
            grad_accum_steps=config.train.grad_accum_steps, probe_on_full_image=config.probe.features == "full"))

    bucket = (resolution, mask_ratio)
    executables, compile_seconds = compile_lib.compile_buckets(
        make_step, [bucket], abstract_state=abstract_state, state_shardings=state_shardings, mesh=mesh,
        global_batch=batch, resolution_of=lambda b: b[0])
    step = executables[bucket]
    flops = compile_lib.flops_per_step(step)
    log(f"jax {resolution} px: compiled in {compile_seconds[bucket]:.1f} s on {device.device_kind}, "
        f"{(flops or 0) / 1e9:.3g} GFLOP per step")
    peak = compile_lib.peak_bf16_flops(device.device_kind)

    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

    @functools.partial(jax.jit, out_shardings=(batch_sharding, batch_sharding))
    def synthetic_batch(key):
        image_key, label_key = jax.random.split(key)
        images = jax.random.randint(image_key, (batch, resolution, resolution, 3), 0, 256, jnp.int32)
        return images.astype(jnp.uint8), jax.random.randint(label_key, (batch,), 0, args.num_classes, jnp.int32)

    batches = [synthetic_batch(k) for k in jax.random.split(jax.random.PRNGKey(args.seed + 1), SYNTHETIC_BATCHES)]
    holder = {"state": state, "metrics": None}

    def run_step(i: int) -> None:
        images, labels = batches[i % len(batches)]
        holder["state"], holder["metrics"] = step(holder["state"], images, labels)
        jax.block_until_ready(holder["state"])

    counter = compile_lib.CompilationCounter()
    with counter:
        times, warmup_seconds = time_steps(run_step, args.warmup_steps, args.steps)
    common = {"framework": "jax", "resolution": resolution, "batch_size": batch,
              "device_kind": device.device_kind, "platform": device.platform,
              "flops_per_step": flops, "peak_bf16_flops": peak,
              "compile_seconds": compile_seconds[bucket]}
    synthetic = {**common, "data": "synthetic", "steps": args.steps, **step_stats(times, batch),
                 "warmup_seconds": warmup_seconds, "compilations_during_steps": counter.count,
                 "final_loss": _finite_or_none(float(holder["metrics"]["loss"]))}
    synthetic["mfu"] = compile_lib.model_flops_utilization(flops, synthetic["step_time_median_s"], peak)
    synthetic["peak_memory_bytes"] = _jax_peak_memory(device)
    log(f"jax {resolution} px synthetic: {synthetic['images_per_second']:.1f} img/s, "
        f"{1e3 * synthetic['step_time_median_s']:.1f} ms per step")
    results = [synthetic]

    if "loader" in args.data:
        results.append(_time_jax_loader(args, config, resolution, mask_ratio, mesh, step, holder, common))
    return results


def _jax_peak_memory(device) -> int | None:
    stats = device.memory_stats()  # None on CPU
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _time_jax_loader(args, config, resolution, mask_ratio, mesh, step, holder, common) -> dict[str, Any]:
    """Steps fed by the real TrainLoader, as the training loop feeds them (no per-step wait)."""
    import jax

    from dailymae_jax.data.loader import CropSpec, EpochOrder, TrainLoader
    from dailymae_jax.data.prepare import dataset_info
    from dailymae_jax.data.shard import BatchSharding
    from dailymae_jax.train import compile as compile_lib
    from dailymae_jax.schedule import Stage

    info = dataset_info(args.beton)
    order = EpochOrder(info.num_samples, args.batch_size, args.seed)
    epochs = -(-(args.warmup_steps + args.steps) // order.steps_per_epoch)
    start = time.perf_counter()
    loader = TrainLoader(args.beton, stages=(Stage(0, resolution, mask_ratio),), order=order,
                         sharding=BatchSharding(mesh), num_workers=config.data.num_workers,
                         crop=CropSpec(tuple(config.data.crop_scale), tuple(config.data.crop_ratio)))
    loader_warmup = time.perf_counter() - start
    log(f"jax {resolution} px: loader pipeline ready in {loader_warmup:.1f} s")
    batches = loader.batches(0, 0, epochs)
    counter = compile_lib.CompilationCounter()
    try:
        with counter:
            for _ in range(args.warmup_steps):
                b = next(batches)
                holder["state"], holder["metrics"] = step(holder["state"], b.images, b.labels)
            jax.block_until_ready(holder["state"])
            wait = 0.0
            start = time.perf_counter()
            for _ in range(args.steps):
                tick = time.perf_counter()
                b = next(batches)
                wait += time.perf_counter() - tick
                holder["state"], holder["metrics"] = step(holder["state"], b.images, b.labels)
            jax.block_until_ready(holder["state"])
            wall = time.perf_counter() - start
    finally:
        batches.close()
    mean = wall / args.steps
    log(f"jax {resolution} px loader: {args.batch_size / mean:.1f} img/s, data wait {100 * wait / wall:.0f}%")
    return {**common, "data": "loader", "steps": args.steps, "step_time_mean_s": mean,
            "images_per_second": args.batch_size / mean, "data_wait_share": wait / wall,
            "loader_warmup_seconds": loader_warmup, "num_workers": config.data.num_workers,
            "dataset": str(args.beton), "dataset_samples": info.num_samples,
            "compilations_during_steps": counter.count,
            "final_loss": _finite_or_none(float(holder["metrics"]["loss"])),
            "mfu": compile_lib.model_flops_utilization(common["flops_per_step"], mean, common["peak_bf16_flops"]),
            "peak_memory_bytes": _jax_peak_memory(jax.devices()[0])}


def run_torch(args: argparse.Namespace, config, resolution: int) -> list[dict[str, Any]]:
    """The PyTorch reference at one resolution, on synthetic device batches."""
    import torch

    sys.path.insert(0, str(TOOLS))
    import torch_mae

    from dailymae_jax.train import compile as compile_lib
    from dailymae_jax import schedule as schedule_lib

    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    # float32 matrix products (outside autocast) may use TF32, as JAX's default precision does on GPU.
    torch.set_float32_matmul_precision("high")
    s = model_settings(config)
    if config.probe.features == "full":
        raise BenchError("probe.features 'full' is not implemented by the torch reference; use 'visible'")
    model = torch_mae.TorchMAE(
        width=s["width"], depth=s["depth"], heads=s["heads"], patch=s["patch"], resolution=resolution,
        mlp_ratio=s["mlp_ratio"], decoder_width=s["decoder_width"], decoder_depth=s["decoder_depth"],
        decoder_heads=s["decoder_heads"], norm_pix_loss=s["norm_pix_loss"]).to(device)
    probe = torch_mae.LinearProbe(s["width"], args.num_classes).to(device)
    batch = args.batch_size
    step = torch_mae.TorchPretrainStep(
        model, probe, mask_ratio=float(config.schedule.mask_ratio),
        lr=schedule_lib.scaled_learning_rate(config.train.base_lr, batch), weight_decay=config.train.weight_decay,
        betas=(config.train.b1, config.train.b2), probe_lr=config.probe.learning_rate,
        bf16=s["dtype"] == "bfloat16", compile=args.torch_compile, hflip=config.data.hflip)
    batches = [(torch.randint(0, 256, (batch, resolution, resolution, 3), dtype=torch.uint8, device=device),
                torch.randint(0, args.num_classes, (batch,), device=device)) for _ in range(SYNTHETIC_BATCHES)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    holder = {}

    def run_step(i: int) -> None:
        images, labels = batches[i % len(batches)]
        holder["loss"] = step(images, labels)
        if cuda:
            torch.cuda.synchronize()

    times, warmup_seconds = time_steps(run_step, args.warmup_steps, args.steps)
    log(f"torch {resolution} px: warm-up (compilation included) {warmup_seconds:.1f} s, "
        f"{batch / statistics.median(times):.1f} img/s")
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    result = {"framework": "torch", "data": "synthetic", "resolution": resolution, "batch_size": batch,
              "steps": args.steps, "device_kind": name, "platform": device.type, **step_stats(times, batch),
              "warmup_seconds": warmup_seconds, "torch_compile": args.torch_compile,
              "final_loss": _finite_or_none(float(holder["loss"])),
              "peak_bf16_flops": compile_lib.peak_bf16_flops(name) if cuda else None,
              "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
              "parameters": torch_mae.parameter_count(model)}
    return [result]


def worker_main(args: argparse.Namespace, config) -> int:
    if len(args.res) != 1 or args.worker_out is None:
        raise BenchError("--worker needs exactly one --res and --worker-out")
    run = run_jax if args.worker == "jax" else run_torch
    results = run(args, config, args.res[0])
    args.worker_out.write_text(json.dumps({"results": results, "software": worker_software(args.worker)}))
    return 0


def worker_software(framework: str) -> dict[str, Any]:
    """What only the framework itself can say: its backend and CUDA libraries."""
    if framework == "jax":
        import jax

        device = jax.devices()[0]
        return {"jax_backend": device.platform, "jax_platform_version": device.client.platform_version}
    import torch

    return {"torch_cuda": torch.version.cuda,
            "torch_cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}


# --------------------------------------------------------------------------------------------------
# The orchestrator: one subprocess per (framework, resolution), interleaved; the JSON report.
# --------------------------------------------------------------------------------------------------

def worker_argv(args: argparse.Namespace, overrides: Sequence[str], framework: str, resolution: int,
                out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), f"--config={Path(args.config).resolve()}", *overrides,
            "--res", str(resolution), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
            "--warmup-steps", str(args.warmup_steps), "--data", *args.data, "--num-classes", str(args.num_classes),
            "--seed", str(args.seed), "--torch-compile" if args.torch_compile else "--no-torch-compile",
            "--worker", framework, "--worker-out", str(out)]
    if args.beton is not None:
        argv += ["--beton", str(args.beton)]
    return argv


def run_worker_process(argv: list[str], timeout: float | None) -> tuple[dict[str, Any] | None, str | None]:
    """Runs one measurement; its stderr streams through. Returns (its output, None) or (None, the error)."""
    out = Path(argv[argv.index("--worker-out") + 1])
    tail: list[str] = []
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)

    def pump() -> None:  # echo live, keep the end for the report
        assert process.stderr is not None
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
    return {"config": os.path.relpath(Path(args.config).resolve(), REPO), "overrides": list(overrides),
            "model": model_settings(config), "batch_size": args.batch_size, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "mask_ratio": float(config.schedule.mask_ratio),
            "grad_accum_steps": int(config.train.grad_accum_steps), "probe_features": config.probe.features,
            "num_classes": args.num_classes, "torch_compile": args.torch_compile}


def software_versions() -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0:
            versions["nvidia_driver"] = smi.stdout.strip().splitlines()[0].split(",")[-1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return versions


def result_key(result: dict[str, Any]) -> tuple[str, str, int]:
    return result["framework"], result["data"], result["resolution"]


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Fills in what pairs of measurements give: the reference's FLOPs and MFU (charged our step's FLOPs),
    the analytic FLOPs, speedups per resolution and the headline numbers at 224 px."""
    from dailymae_jax.train import compile as compile_lib

    results = sorted(report["results"], key=lambda r: (-r["resolution"], r["data"], r["framework"]))
    ours = {r["resolution"]: r for r in results if r["framework"] == "jax" and r["data"] == "synthetic"
            and "error" not in r}
    settings = report["settings"]
    speedups = {}
    for r in results:
        if "error" in r:
            continue
        res = r["resolution"]
        r["flops_per_step_analytic"] = analytic_step_flops(
            settings["model"], resolution=res, mask_ratio=settings["mask_ratio"], batch=r["batch_size"],
            num_classes=settings["num_classes"], probe_on_full_image=settings["probe_features"] == "full")
        step_time = r.get("step_time_median_s", r.get("step_time_mean_s"))
        if r["framework"] == "torch" and res in ours:
            r["flops_per_step"] = ours[res]["flops_per_step"]
            r["mfu"] = compile_lib.model_flops_utilization(r["flops_per_step"], step_time, r["peak_bf16_flops"])
        r["mfu_analytic"] = compile_lib.model_flops_utilization(r["flops_per_step_analytic"], step_time,
                                                                r["peak_bf16_flops"])
        if r["framework"] == "torch" and res in ours:
            speedups[str(res)] = r["step_time_median_s"] / ours[res]["step_time_median_s"]
    report["results"] = results
    report["speedup_vs_pytorch"] = speedups
    report["speedup_vs_pytorch_224"] = speedups.get("224")
    report["mfu_224"] = ours[224]["mfu"] if 224 in ours else None
    devices = [r["device_kind"] for r in results if r["framework"] == "jax" and "device_kind" in r]
    report["device"] = devices[0] if devices else report.get("device")
    return report


def merge(previous: dict[str, Any], new_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Previous results with those of the same (framework, data, resolution) replaced by the new ones."""
    replaced = {result_key(r) for r in new_results}
    return [r for r in previous["results"] if result_key(r) not in replaced] + new_results


def format_table(report: dict[str, Any]) -> str:
    rows = ["framework  data       res   img/s    step ms   MFU    MFU(an.)  peak GiB  loss"]
    for r in report["results"]:
        if "error" in r:
            rows.append(f"{r['framework']:<10} {r['data']:<10} {r['resolution']:<5} error: {r['error']}")
            continue
        ms = 1e3 * r.get("step_time_median_s", r.get("step_time_mean_s"))
        pct = lambda x: f"{100 * x:5.1f}%" if x is not None else "   - "
        mem = f"{r['peak_memory_bytes'] / 2**30:8.2f}" if r.get("peak_memory_bytes") else "       -"
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "nan"
        rows.append(f"{r['framework']:<10} {r['data']:<10} {r['resolution']:<5} {r['images_per_second']:7.1f}  "
                    f"{ms:8.1f}  {pct(r.get('mfu'))}  {pct(r.get('mfu_analytic'))}   {mem}  {loss}")
    rows.append(f"speedup vs PyTorch (step time ratio): {report['speedup_vs_pytorch']}")
    return "\n".join(rows)


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    from dailymae_jax.report import write_json

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, report)


def resolve_beton(args: argparse.Namespace, config) -> Path:
    """The .beton for --data loader, checked against the batch and the probe; builds the sample dataset if
    that is what the config asks for."""
    from dailymae_jax.data.prepare import dataset_info, sample_beton

    if args.beton is not None:
        beton = args.beton
    elif config.data.train_path:
        beton = Path(config.data.train_path)
    elif config.data.sample_dir:
        # Written here, before any worker starts JAX (writing forks worker processes).
        beton = sample_beton(config.data.sample_dir, num_images=config.data.sample_num_images, seed=config.seed)
    else:
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
    args, overrides = parse_args(argv)
    try:
        config = load_config(args.config, overrides)
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
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    frameworks = ["jax"] + (["torch"] if args.torch else [])
    if args.torch:
        try:
            importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            print("error: --torch: torch is not installed; install it or pass --no-torch", file=sys.stderr)
            return 2
    report: dict[str, Any] = {
        "benchmark": "MAE pretraining train-step throughput, ours (JAX) vs a PyTorch reference",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "tools/bench_train.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": previous.get("device") if previous else None,
        "software": software_versions(),
        "settings": settings,
        "results": [],
    }
    failed = False
    new_results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for resolution in args.res:
            for framework in frameworks:
                log(f"{framework} at {resolution} px")
                out = Path(tmp) / f"{framework}_{resolution}.json"
                start = time.perf_counter()
                output, error = run_worker_process(worker_argv(args, overrides, framework, resolution, out),
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
                write_report(args.json, summarize(report))
    print(format_table(report))
    print(json.dumps({k: report[k] for k in ("device", "speedup_vs_pytorch_224", "mfu_224")}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

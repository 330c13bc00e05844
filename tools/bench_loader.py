"""Loader throughput and memory: our crop decode against stock ffcv, a PIL process pool and a decode-only bound.

Usage:
  python tools/bench_loader.py --beton FILE --res 224 [--res 112 ...] --batch-size 256 --workers 2 \\
      --epochs 5 --json OUT [--loaders crop_decode,ffcv_stock,pil,bound] [--keep-buffers]

Loaders (RandomResizedCrop with --scale/--ratio to R x R, every one over the whole file each epoch):
  crop_decode  ours: dailymae_jax.data.decode.RandomResizedCropDecoder (crop + DCT-scaled decode, bicubic)
  crop_decode_noindex  the same, ignoring the files' crop index (not run unless named in --loaders)
  crop_decode_only     the same, stopped before resampling (the destination is left as it is): what decoding
               the crop's MCUs alone costs, a floor for any crop decoder at that DCT scale (not run unless named)
  ffcv_stock   ffcv's RandomResizedCropRGBImageDecoder on the same file (full decode, crop, area resize)
  pil          PIL decode + crop + bicubic resize in a pool of --workers processes, each building whole
               batches (what a torchvision ImageFolder DataLoader does), arrays sent back through pipes
  bound        ffcv's SimpleRGBImageDecoder on a file of JPEGs already at R x R (random crops of the same
               images, same quality and chroma subsampling): decoding only, the floor no crop decoder can beat

Each (resolution, loader) runs in its own child process, so that peak RSS is per loader. For one resolution
all children start, build their loader and run one untimed warm-up epoch (numba compilation, page cache);
then the timed epochs alternate between the loaders, round-robin (the machine's load drifts: epoch-level
interleaving keeps the comparison fair). img_per_s is the median over the --epochs timed epochs (ratios also
give the median of the per-epoch ratios, epoch e of one loader against epoch e of the other);
peak_rss_mb the child's peak resident memory (sampled every 20 ms, the pool's workers added for pil; the
kernel's ru_maxrss where larger); minor_faults_per_image the median over the timed epochs of the child's minor
page faults per image (null for pil, whose pool's faults the parent cannot count).

ffcv allocates a loader's batch buffers (batches_ahead + 2 batches) afresh at every epoch, so a short epoch pays
for first-touching them: at the sample's 13 batches of 256, about 14 page faults per image at 224 px, for every
ffcv loader alike. --keep-buffers makes every ffcv loader keep its buffers from one epoch to the next, which is
what an epoch of ImageNet's size amounts to (there the fresh buffers are a fraction of a percent of the images).

Output JSON: {"results": [{"loader", "res", "img_per_s", "peak_rss_mb", "minor_faults_per_image", ...}],
"ratios": {...}, "complete": bool, "settings": {...}, "machine": {...}}, rewritten after each resolution
("complete" is false until the last).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# Run as a script, Python puts tools/ on sys.path, not the repository root that holds dailymae_jax, configs/
# and tools/ (imported as tools.<name>, the root is already there).
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOADERS = ("crop_decode", "ffcv_stock", "pil", "bound")
EXTRA_LOADERS = ("crop_decode_noindex", "crop_decode_only")


# ----------------------------------------------------------------------------------------------------------
# Memory sampling


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the resident memory of this process plus the given child processes every 20 ms."""

    def __init__(self) -> None:
        self.children: list[int] = []
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = _rss_kb(me) + sum(_rss_kb(pid) for pid in list(self.children))
            self.peak_kb = max(self.peak_kb, total)
            time.sleep(0.02)

    def stop(self) -> float:
        """Peak in MiB (the kernel's own peak for this process, if larger)."""
        self._stop.set()
        self._thread.join()
        own_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(self.peak_kb, own_peak_kb) / 1024


# ----------------------------------------------------------------------------------------------------------
# The PIL baseline (module level so that pool workers can run it)

_PIL_STATE: dict = {}


def image_records(beton: str) -> tuple[np.ndarray, dict[int, int], np.ndarray]:
    """(the image field's per-sample metadata, record size by data pointer, the file mapped as bytes)."""
    from ffcv.reader import Reader

    reader = Reader(beton)
    meta = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    return meta, sizes, np.memmap(beton, np.uint8, mode="r")


def jpeg_records(beton: str, count: int) -> list[np.ndarray]:
    """The first ``count`` JPEG-encoded images of ``beton``'s image field, as byte arrays."""
    meta, sizes, file = image_records(beton)
    out = []
    for field in meta:
        if field["mode"] == 0:
            ptr = int(field["data_ptr"])
            out.append(np.array(file[ptr:ptr + sizes[ptr]]))
            if len(out) == count:
                break
    return out


def loader_boxes(records: list[np.ndarray], scale: tuple[float, float], ratio: tuple[float, float],
                 seed: int) -> list[tuple[int, int, int, int]]:
    """One RandomResizedCrop box (top, left, height, width) per JPEG record, drawn as crop_decode's loader draws
    them (the kernel benchmarks time the loader's own boxes)."""
    import math

    from PIL import Image

    from dailymae_jax.data.decode import random_resized_crop_box

    np.random.seed(seed)  # random_resized_crop_box is numba code: it draws from numba's copy of numpy's generator
    boxes = []
    for data in records:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            width, height = image.size
        boxes.append(tuple(random_resized_crop_box(height, width, scale[0], scale[1], math.log(ratio[0]),
                                                   math.log(ratio[1]))))
    return boxes


def _pil_init(beton: str, res: int, scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    meta, sizes, file = image_records(beton)
    _PIL_STATE.update(file=file, meta=meta, sizes=sizes, res=res, scale=scale, ratio=ratio)


def _pil_batch(args: tuple[int, np.ndarray]) -> np.ndarray:
    """One batch as a torchvision ImageFolder pipeline makes it: decode, RandomResizedCrop (bicubic), flip."""
    import math

    from PIL import Image

    seed, indices = args
    st = _PIL_STATE
    rng = np.random.default_rng(seed)
    res = st["res"]
    log_lo, log_hi = math.log(st["ratio"][0]), math.log(st["ratio"][1])
    out = np.empty((len(indices), res, res, 3), np.uint8)
    for k, index in enumerate(indices):
        field = st["meta"][index]
        ptr = int(field["data_ptr"])
        data = st["file"][ptr:ptr + st["sizes"][ptr]]
        if field["mode"] == 0:
            image = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
        else:
            image = Image.fromarray(np.asarray(data).reshape(int(field["height"]), int(field["width"]), 3))
        width, height = image.size
        area = width * height
        box = None
        for _ in range(10):
            target = area * rng.uniform(*st["scale"])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                box = (left, top, left + w, top + h)
                break
        if box is None:
            box = (0, 0, width, height)
        image = image.crop(box).resize((res, res), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        out[k] = np.asarray(image)
    return out


# ----------------------------------------------------------------------------------------------------------
# One measurement (runs in a child process)


def keep_buffers(loader) -> None:
    """Make an ffcv ``loader`` allocate its batch buffers once, where ffcv allocates them at every epoch.

    Safe for a consumer that drops each batch before taking the next epoch's first (the benchmark counts them):
    a kept slot is overwritten by the next epoch's batches.
    """
    graph = loader.graph
    allocate, kept = graph.allocate_memory, {}

    def allocate_once(batch_size: int, slots: int):
        if (batch_size, slots) not in kept:
            kept[(batch_size, slots)] = allocate(batch_size, slots)
        return kept[(batch_size, slots)]

    graph.allocate_memory = allocate_once


def _ffcv_loader(kind: str, beton: str, res: int, batch: int, workers: int, scale, ratio, seed: int,
                 keep: bool = False):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from dailymae_jax.data.decode import RandomResizedCropDecoder
    from dailymae_jax.data.jpeg_crop import DECODE_ONLY, NO_INDEX
    from dailymae_jax.data.loader import CheckedLoader

    if kind in ("crop_decode", "crop_decode_noindex", "crop_decode_only"):
        decoder = RandomResizedCropDecoder((res, res), scale=scale, ratio=ratio, flip=True, seed=seed)
        # The kernel flags its numba code is compiled with.
        decoder.flags |= {"crop_decode_noindex": NO_INDEX, "crop_decode_only": DECODE_ONLY}.get(kind, 0)
        cls = CheckedLoader
    elif kind == "ffcv_stock":
        decoder, cls = RandomResizedCropRGBImageDecoder((res, res), scale=scale, ratio=ratio), Loader
    else:  # bound
        decoder, cls = SimpleRGBImageDecoder(), Loader
    # ffcv's defaults otherwise (os_cache=False: a bounded in-process page cache, batches_ahead=3).
    loader = cls(beton, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, seed=seed,
                 drop_last=True, pipelines={"image": [decoder], "label": [IntDecoder()]})
    if keep:
        keep_buffers(loader)
    return loader


class _Epochs:
    """One loader in a child process: ``run()`` iterates one epoch and returns its img/s."""

    def __init__(self, spec: dict, memory: PeakMemory):
        self.spec = spec
        self.epoch = 0
        kind, res = spec["loader"], spec["res"]
        scale, ratio = tuple(spec["scale"]), tuple(spec["ratio"])
        if kind == "pil":
            import multiprocessing

            from ffcv.reader import Reader

            self.num_samples = int(Reader(spec["beton"]).num_samples)
            self.pool = multiprocessing.get_context("fork").Pool(
                spec["workers"], initializer=_pil_init, initargs=(spec["beton"], res, scale, ratio))
            memory.children = [p.pid for p in self.pool._pool]  # noqa: SLF001 (the pool's worker processes)
        else:
            beton = spec["bound_betons"][str(res)] if kind == "bound" else spec["beton"]
            self.loader = _ffcv_loader(kind, beton, res, spec["batch_size"], spec["workers"], scale, ratio,
                                       spec["seed"], keep=spec["keep_buffers"])

    def _batches(self):
        if self.spec["loader"] != "pil":
            return (images for images, _labels in self.loader)
        batch = self.spec["batch_size"]
        order = np.random.default_rng([self.spec["seed"], self.epoch]).permutation(self.num_samples)
        tasks = [(self.spec["seed"] * 1_000_003 + self.epoch * 10_007 + b, order[b * batch:(b + 1) * batch])
                 for b in range(self.num_samples // batch)]
        return self.pool.imap(_pil_batch, tasks)

    def run(self) -> dict:
        """One epoch: {"img_per_s", "minor_faults_per_image" (None for pil: its pool's faults are not ours)}."""
        faults, start, count = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), 0
        for images in self._batches():
            count += len(images)
        rate = count / (time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        self.epoch += 1
        return {"img_per_s": rate, "minor_faults_per_image": None if self.spec["loader"] == "pil" else faults / count}


def serve(spec: dict) -> None:
    """Child process: build the loader, run the warm-up epoch, then one epoch per 'run' line on stdin."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the replies

    def reply(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    memory = PeakMemory()
    epochs = _Epochs(spec, memory)
    epochs.run()  # warm-up: compilation, page cache, pool start-up
    reply({"ready": True})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        reply(epochs.run())
    reply({"peak_rss_mb": memory.stop()})


class _Child:
    def __init__(self, spec: dict):
        self.name = f"{spec['loader']} at {spec['res']} px"
        self.proc = subprocess.Popen([sys.executable, __file__, "--beton", spec["beton"], "--res", str(spec["res"]),
                                      "--json", os.devnull, "--child", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: the child process failed (exit {self.proc.wait()})")
        return json.loads(line)

    def send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()


# ----------------------------------------------------------------------------------------------------------
# Bound files: JPEGs already at the output size


def source_jpeg_settings(beton: str) -> tuple[int | None, str]:
    """:func:`jpeg_settings` of the first JPEG record of ``beton`` ((None, '420') without one)."""
    first = jpeg_records(beton, 1)
    return jpeg_settings(first[0].tobytes()) if first else (None, "420")


def jpeg_settings(data: bytes) -> tuple[int | None, str]:
    """(quality, chroma subsampling '444'/'420') of a JPEG file, for the bound files to copy.

    The quality is the q in [1, 100] whose libjpeg quantization tables (as OpenCV, the writer's encoder, scales
    them) equal the file's; None if no q does (another encoder, custom tables).
    """
    import cv2
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        sampling = image.layer[0][1:3] if hasattr(image, "layer") else (2, 2)
        tables = image.quantization
    chroma = "444" if tuple(sampling) == (1, 1) else "420"
    probe = np.zeros((16, 16, 3), np.uint8)
    for quality in range(1, 101):
        _, encoded = cv2.imencode(".jpg", probe, [cv2.IMWRITE_JPEG_QUALITY, quality])
        with Image.open(io.BytesIO(encoded.tobytes())) as image:
            if image.quantization == tables:
                return quality, chroma
    return None, chroma


def write_bound_beton(beton: str, res: int, out_dir: Path, quality: int, chroma: str, scale, ratio,
                      seed: int) -> str:
    """A .beton of R x R JPEGs: one RandomResizedCrop of every image of ``beton`` at ``quality`` and ``chroma``
    subsampling (the source's: :func:`source_jpeg_settings`)."""
    from PIL import Image

    from dailymae_jax.data.write import write_beton

    out = out_dir / f"bound{res}.beton"
    stat = os.stat(beton)
    signature = json.dumps({"beton": os.path.abspath(beton), "size": stat.st_size, "mtime": stat.st_mtime,
                            "res": res, "quality": quality, "chroma": chroma, "scale": list(scale),
                            "ratio": list(ratio), "seed": seed})
    stamp = out_dir / f"bound{res}.json"
    if out.is_file() and stamp.is_file() and stamp.read_text() == signature:
        return str(out)  # written by an earlier run from the same file and settings
    _pil_init(beton, res, scale, ratio)
    folder = out_dir / f"bound{res}" / "images" / "all"
    folder.mkdir(parents=True, exist_ok=True)
    n = len(_PIL_STATE["meta"])
    for start in range(0, n, 256):
        indices = np.arange(start, min(n, start + 256))
        for index, image in zip(indices, _pil_batch((seed + start, indices))):
            Image.fromarray(image).save(folder / f"{index:07d}.png", compress_level=1)
    write_beton(folder.parent, out, max_resolution=res, jpeg_quality=quality, num_workers=2,
                chroma_subsampling=chroma, progress=False)
    stamp.write_text(signature)
    return str(out)


# ----------------------------------------------------------------------------------------------------------


def _machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "ffcv": version("ffcv"),
            "pillow": version("pillow"), "load_average_at_start": os.getloadavg()}


def _check_settings(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    loaders: list[str]) -> tuple[int | None, str]:
    """One-line errors (parser.error) for settings that cannot run; the bound files' (quality, chroma)."""
    for name in ("res", "batch_size", "workers", "epochs"):
        values = args.res if name == "res" else [getattr(args, name)]
        if min(values) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {min(values)}")
    for name in ("scale", "ratio"):
        low, high = getattr(args, name)
        if not 0 < low <= high:
            parser.error(f"--{name} must be two increasing positive numbers, got {low} {high}")
    from dailymae_jax.data.beton import BetonError, check_beton

    try:
        info = check_beton(args.beton)
    except BetonError as error:
        parser.error(f"--beton: {error}")
    if info.fields.get("image") != "RGBImageField":
        parser.error(f"--beton: {args.beton} has no RGBImageField named 'image' (fields: {info.fields})")
    if args.batch_size > info.num_samples:
        parser.error(f"--batch-size {args.batch_size} is larger than the file ({info.num_samples} images): an "
                     f"epoch would have no batch")
    quality, chroma = source_jpeg_settings(args.beton)
    if args.bound_quality is not None:
        if not 1 <= args.bound_quality <= 100:
            parser.error(f"--bound-quality must be in [1, 100], got {args.bound_quality}")
        quality = args.bound_quality
    elif quality is None and "bound" in loaders:
        parser.error(f"--beton: cannot tell the JPEG quality of {args.beton} (no JPEG record, or tables other than "
                     f"libjpeg's): pass --bound-quality")
    return quality, chroma


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beton", required=True)
    parser.add_argument("--res", type=int, action="append", required=True, help="output side (repeatable)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per loader (after one warm-up epoch)")
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--scale", type=float, nargs=2, default=(0.2, 1.0))
    parser.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3))
    parser.add_argument("--bound-quality", type=int, default=None,
                        help="JPEG quality of the bound files (default: the source's, read from its first JPEG's "
                             "quantization tables)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where bound files go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-buffers", action="store_true",
                        help="every ffcv loader keeps its batch buffers across epochs (see above)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:  # a loader's child process, driven through stdin/stdout
        serve(json.loads(args.child))
        return 0

    loaders = [name for name in args.loaders.split(",") if name]
    unknown = sorted(set(loaders) - set(LOADERS + EXTRA_LOADERS))
    if unknown:
        parser.error(f"--loaders: unknown {unknown}; allowed: {', '.join(LOADERS + EXTRA_LOADERS)}")
    if not Path(args.beton).is_file():
        parser.error(f"--beton: no such file {args.beton}")

    quality, chroma = _check_settings(parser, args, loaders)

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    bound_betons = {}
    if "bound" in loaders:
        for res in args.res:
            print(f"writing the {res} px bound file (quality {quality}, {chroma}) ...", file=sys.stderr, flush=True)
            bound_betons[str(res)] = write_bound_beton(args.beton, res, work_dir, quality, chroma,
                                                       tuple(args.scale), tuple(args.ratio), args.seed)

    from dailymae_jax.files import write_json

    machine = _machine()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], dict] = {}
    for res in args.res:
        children = {}
        for kind in loaders:  # started one after the other: warm-ups do not overlap
            spec = {"loader": kind, "res": res, "batch_size": args.batch_size, "workers": args.workers,
                    "beton": args.beton, "bound_betons": bound_betons, "scale": list(args.scale),
                    "ratio": list(args.ratio), "seed": args.seed, "keep_buffers": args.keep_buffers}
            children[kind] = _Child(spec)
            children[kind].reply()  # ready
        rates: dict[str, list[float]] = {kind: [] for kind in loaders}
        faults: dict[str, list[float | None]] = {kind: [] for kind in loaders}
        for epoch in range(args.epochs):
            shift = epoch % len(loaders)  # rotate, so that no loader always runs first
            for kind in loaders[shift:] + loaders[:shift]:
                measured = children[kind].send("run")
                rates[kind].append(measured["img_per_s"])
                faults[kind].append(measured["minor_faults_per_image"])
            print(f"{res} px, epoch {epoch}: " + ", ".join(f"{k} {rates[k][-1]:.0f}" for k in loaders) + " img/s",
                  file=sys.stderr, flush=True)
        for kind, child in children.items():
            peak = child.send("stop")["peak_rss_mb"]
            child.proc.wait()
            runs[(kind, res)] = {"rates": rates[kind], "peak_rss_mb": peak, "faults": faults[kind]}
            print(f"{kind:12s} {res:4d} px: median {statistics.median(rates[kind]):.0f} img/s, "
                  f"peak RSS {peak:.0f} MiB", file=sys.stderr, flush=True)
        # After every resolution: a run stopped later keeps what it measured.
        report = _report(runs, args, loaders, machine, bound_quality=quality, complete=res == args.res[-1])
        write_json(args.json, report)

    print(json.dumps({"results": [{k: r[k] for k in ("loader", "res", "img_per_s", "peak_rss_mb")}
                                  for r in report["results"]], "ratios": report["ratios"]}, indent=1))
    return 0


def _report(runs: dict[tuple[str, int], dict], args: argparse.Namespace, loaders: list[str], machine: dict, *,
            bound_quality: int | None, complete: bool) -> dict:
    """The output JSON for the (loader, resolution) runs measured so far."""
    results = []
    for (kind, res), run in runs.items():
        counted = [f for f in run.get("faults", []) if f is not None]
        results.append({"loader": kind, "res": res, "img_per_s": round(statistics.median(run["rates"]), 1),
                        "peak_rss_mb": round(run["peak_rss_mb"], 1),
                        "minor_faults_per_image": round(statistics.median(counted), 2) if counted else None,
                        "epoch_img_per_s": [round(r, 1) for r in run["rates"]]})
    table = {(r["loader"], r["res"]): r for r in results}
    ratios = {}
    # crop_decode against every other loader; its variants (index off, decoding only) against the bound.
    pairs = [("crop_decode", other) for other in ("ffcv_stock", "pil", "bound") + EXTRA_LOADERS]
    pairs += [(extra, "bound") for extra in EXTRA_LOADERS]
    for res in args.res:
        for mine, other in pairs:
            if (mine, res) in table and (other, res) in table:
                ours, theirs = table[(mine, res)], table[(other, res)]
                # Epochs e of both loaders ran back to back: their ratio is less exposed to the machine's drift.
                paired = [a / b for a, b in zip(ours["epoch_img_per_s"], theirs["epoch_img_per_s"])]
                ratios[f"{mine}/{other}@{res}"] = {
                    "speed": round(ours["img_per_s"] / theirs["img_per_s"], 3),
                    "speed_epoch_paired_median": round(statistics.median(paired), 3),
                    "peak_rss": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3)}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
    settings.update(loaders=loaders, bound_quality=bound_quality)
    return {"results": results, "ratios": ratios, "complete": complete, "settings": settings,
            "machine": {**machine, "load_average_at_end": os.getloadavg()}}


if __name__ == "__main__":
    sys.exit(main())

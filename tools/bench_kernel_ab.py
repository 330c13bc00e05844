"""Interleaved A/B of two builds of the crop-decode kernel, loaded side by side in one process, one thread.

    python tools/bench_kernel_ab.py --a BASE.so --b NEW.so --beton FILE --res 224 [--res 112 ...] \\
        [--images 300] [--rounds 11] [--flags 0] --json OUT

A build of another commit, for --a:

    git worktree add ../base COMMIT && (cd ../base && python setup.py -q build_ext --inplace)
    # --a ../base/dailymae_jax/data/_jpeg_crop.cpython-311-x86_64-linux-gnu.so

For the first --images JPEG records and the loader's RandomResizedCrop box for each (--scale/--ratio, seeded),
both builds' ``dm_decode_crop`` decode every box to R x R with --flags (0: what the loader runs; 64: decoding
only). Rounds alternate which build goes first; each round times all records once per build (thread CPU time).
Reported per size: the median ms per image of each build, their ratio A/B (above 1: B is faster), the median of
the rounds' own ratios, and whether both builds gave the same pixels for every record (null with DECODE_ONLY,
which leaves the output untouched). Small kernel changes are a few percent: compare builds in one run, never across runs.
Output JSON: {"results": [{"res", "a_ms", "b_ms", "a_over_b", "paired_median", "identical"}], "settings": {...}}.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Run as a script, Python puts tools/ on sys.path, not the repository root that holds dailymae_jax, configs/
# and tools/ (imported as tools.<name>, the root is already there).
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _bind(path: str):
    """dm_decode_crop of the library at ``path`` (loaded privately: two builds' symbols do not clash)."""
    from dailymae_jax.data.jpeg_crop import DECODE_CROP_ARGTYPES

    function = ctypes.CDLL(str(Path(path).resolve())).dm_decode_crop
    function.argtypes = DECODE_CROP_ARGTYPES
    function.restype = ctypes.c_int32
    return function


def compare(builds: list, records: list[np.ndarray], boxes: list, res: int, rounds: int, flags: int) -> dict:
    """Median ms per image of each build at output size ``res``, and whether their pixels agree."""
    from dailymae_jax.data.jpeg_crop import DECODE_ONLY

    outputs = [np.empty((res, res, 3), np.uint8) for _ in builds]

    def decode(i: int, data: np.ndarray, box) -> None:
        out = outputs[i]
        code = builds[i](data.ctypes.data, data.size, *box, out.ctypes.data, res, res, flags, None)
        if code != 0:
            raise RuntimeError(f"build {'AB'[i]}: dm_decode_crop failed with code {code} on box {box}")

    def run(i: int) -> float:
        start = time.thread_time()
        for data, box in zip(records, boxes):
            decode(i, data, box)
        return (time.thread_time() - start) / len(records) * 1e3

    identical = None
    if not flags & DECODE_ONLY:
        identical = True
        for data, box in zip(records, boxes):
            decode(0, data, box)
            decode(1, data, box)
            identical &= bool(np.array_equal(outputs[0], outputs[1]))
    run(0), run(1)  # warm-up: thread state, caches
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i].append(run(i))
    a, b = statistics.median(times[0]), statistics.median(times[1])
    return {"res": res, "a_ms": round(a, 4), "b_ms": round(b, 4), "a_over_b": round(a / b, 4),
            "paired_median": round(statistics.median(x / y for x, y in zip(*times)), 4), "identical": identical}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="the baseline build (.so)")
    parser.add_argument("--b", required=True, help="the build under test (.so)")
    parser.add_argument("--beton", required=True)
    parser.add_argument("--res", type=int, action="append", required=True, help="output side (repeatable)")
    parser.add_argument("--images", type=int, default=300, help="JPEG records to use (the first ones)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--flags", type=int, default=0, help="dm_decode_crop flags (data/jpeg_crop.py)")
    parser.add_argument("--scale", type=float, nargs=2, default=(0.2, 1.0))
    parser.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True, type=Path)
    args = parser.parse_args(argv)
    for name in ("a", "b", "beton"):
        if not Path(getattr(args, name)).is_file():
            parser.error(f"--{name}: no such file {getattr(args, name)}")
    if args.images < 1 or args.rounds < 1 or min(args.res) < 1:
        parser.error("--images, --rounds and --res must be at least 1")
    try:
        builds = [_bind(args.a), _bind(args.b)]
    except (OSError, AttributeError) as error:  # not a shared library, or not the kernel
        parser.error(f"cannot load a kernel build: {error}")

    from tools.bench_loader import jpeg_records, loader_boxes

    from dailymae_jax.files import write_json

    records = jpeg_records(args.beton, args.images)
    if not records:
        parser.error(f"--beton: {args.beton} has no JPEG-encoded images")
    boxes = loader_boxes(records, tuple(args.scale), tuple(args.ratio), args.seed)
    results = []
    for res in args.res:
        row = compare(builds, records, boxes, res, args.rounds, args.flags)
        results.append(row)
        print(f"{res:4d} px  A {row['a_ms']:.4f} ms  B {row['b_ms']:.4f} ms  A/B {row['a_over_b']:.3f} "
              f"(paired {row['paired_median']:.3f})  identical {row['identical']}", file=sys.stderr, flush=True)
    report = {"results": results,
              "settings": vars(args)}  # write_json writes paths as strings
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

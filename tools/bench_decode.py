"""Where one crop decode's time goes: the C kernel called directly on a .beton's JPEG records, one thread.

    python tools/bench_decode.py --beton FILE --res 224 [--res 112 ...] [--images 300] [--rounds 7] --json OUT

For the first --images JPEG records and one RandomResizedCrop box each (--scale/--ratio, seeded, the boxes the
loader draws), it times these stages per image (thread CPU time, median over --rounds interleaved rounds):

  crop                     decode_crop as the loader runs it: partial decode, then resampling
  crop_rgb_rows            the same, resampling libjpeg's RGB rows (interpolated chroma) where the kernel would
                           resample YCbCr planes (4:2:0 at DCT scale 1/1)
  crop_no_index            the same, ignoring the file's crop index (our Huffman decoder from the top down)
  crop_libjpeg_huffman     the same with libjpeg's own Huffman decoder (what the kernel did before the index)
  crop_decode_only         the same call stopped before resampling
  resample_only            the resampler alone, on the crop's pixels already decoded at the DCT scale the
                           kernel picks (1/1, 1/2, 1/4 or 1/8 of the crop)
  resample_pil_bicubic     PIL's bicubic on the same pixels as resample_only, to R x R (antialiased: the
                           reference decode_crop is tested against)
  resample_cv2_cubic       OpenCV's cubic and linear on the same pixels: a fixed 4 and 2 taps, no antialiasing
  resample_cv2_linear      (they alias where the crop is larger than the output); linear is about the least
                           work any resize does
  resample_cv2_area        OpenCV's area averaging on the same pixels (ffcv_stock's resize); OpenCV on one thread
  entropy_to_crop_bottom   Huffman decoding of every MCU down to the crop's last row (a 1x1 box there, full
                           DCT scale, no splicing, libjpeg's Huffman decoder): what libjpeg cannot skip in a
                           file without restart markers or crop index
  entropy_whole_file       the same down to the image's last row
  full_decode              the whole image at full scale to RGB rows (libjpeg's own decode), no resampling
  bound_decode             decoding a JPEG of the crop already at R x R (same quality and chroma subsampling,
                           encoded by PIL): the per-image work of bench_loader's `bound`

This explains bench_loader's ratios (which add the loader's own overhead and two workers sharing the cores).
Output JSON: {"results": [{"res", "stage", "ms_per_image"}], "settings": {...}, "records": {...}}.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Run as a script, Python puts tools/ on sys.path, not the repository root that holds dailymae_jax, configs/
# and tools/ (imported as tools.<name>, the root is already there).
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("crop", "crop_rgb_rows", "crop_no_index", "crop_libjpeg_huffman", "crop_decode_only", "resample_only",
          "resample_pil_bicubic", "resample_cv2_cubic", "resample_cv2_linear", "resample_cv2_area",
          "entropy_to_crop_bottom", "entropy_whole_file", "full_decode", "bound_decode")


def _time_per_image(run, items) -> float:
    start = time.thread_time()
    for item in items:
        run(*item)
    return (time.thread_time() - start) / len(items) * 1e3


def measure(records: list[np.ndarray], res: int, rounds: int, scale, ratio, seed: int,
            quality: int) -> dict[str, float]:
    """Median ms per image of every stage at output size ``res``."""
    import cv2
    from PIL import Image, JpegImagePlugin

    from tools.bench_loader import loader_boxes

    from dailymae_jax.data import jpeg_crop

    boxes = loader_boxes(records, scale, ratio, seed)
    pixels, bounds = [], []
    for data, (top, left, h, w) in zip(records, boxes):
        with Image.open(io.BytesIO(data.tobytes())) as image:
            sampling = JpegImagePlugin.get_sampling(image)
            rgb = np.asarray(image.convert("RGB"))
        crop = Image.fromarray(rgb[top:top + h, left:left + w])
        d = jpeg_crop.dct_scale_denominator(h, w, res, res)
        scaled = crop.reduce(d) if d > 1 else crop  # the resampler's input size
        small = io.BytesIO()
        crop.resize((res, res), Image.BICUBIC).save(small, "JPEG", quality=quality, subsampling=sampling)
        pixels.append((rgb.shape[0], rgb.shape[1], np.ascontiguousarray(np.asarray(scaled))))
        bounds.append(np.frombuffer(small.getvalue(), np.uint8))

    out = np.empty((res, res, 3), np.uint8)
    tiny = np.empty((1, 1, 3), np.uint8)
    only = jpeg_crop.DECODE_ONLY
    whole = jpeg_crop.DECODE_ONLY | jpeg_crop.NO_DCT_SCALING | jpeg_crop.RGB_ROWS  # libjpeg's full RGB decode
    entropy = whole | jpeg_crop.NO_SPLICE | jpeg_crop.NO_INDEX | jpeg_crop.LIBJPEG_HUFFMAN
    no_index, libjpeg = jpeg_crop.NO_INDEX, jpeg_crop.NO_INDEX | jpeg_crop.LIBJPEG_HUFFMAN

    checked = jpeg_crop.check_result
    cv2.setNumThreads(1)  # one thread, like the kernel (thread CPU time would miss a pool's work)
    scaled_images = [(Image.fromarray(c),) for _, _, c in pixels]

    def opencv(interpolation):
        return (lambda c: cv2.resize(c, (res, res), dst=out, interpolation=interpolation),
                [(c,) for _, _, c in pixels])

    calls = {
        "crop": (lambda d, b: checked(jpeg_crop.decode_into(d, *b, out, 0)), list(zip(records, boxes))),
        "crop_rgb_rows": (lambda d, b: checked(jpeg_crop.decode_into(d, *b, out, jpeg_crop.RGB_ROWS)),
                          list(zip(records, boxes))),
        "crop_no_index": (lambda d, b: checked(jpeg_crop.decode_into(d, *b, out, no_index)),
                          list(zip(records, boxes))),
        "crop_libjpeg_huffman": (lambda d, b: checked(jpeg_crop.decode_into(d, *b, out, libjpeg)),
                                 list(zip(records, boxes))),
        "crop_decode_only": (lambda d, b: checked(jpeg_crop.decode_into(d, *b, out, only)),
                             list(zip(records, boxes))),
        "resample_only": (lambda c: checked(jpeg_crop.resize_into(c, c.shape[0], c.shape[1], 0, 0, c.shape[0],
                                                                  c.shape[1], out, 0)),
                          [(c,) for _, _, c in pixels]),
        "resample_pil_bicubic": (lambda image: image.resize((res, res), Image.BICUBIC), scaled_images),
        "resample_cv2_cubic": opencv(cv2.INTER_CUBIC),
        "resample_cv2_linear": opencv(cv2.INTER_LINEAR),
        "resample_cv2_area": opencv(cv2.INTER_AREA),
        "entropy_to_crop_bottom": (lambda d, b: checked(jpeg_crop.decode_into(d, b[0] + b[2] - 1, b[1], 1, 1,
                                                                              tiny, entropy)),
                                   list(zip(records, boxes))),
        "entropy_whole_file": (lambda d, hw: checked(jpeg_crop.decode_into(d, hw[0] - 1, 0, 1, 1, tiny, entropy)),
                               [(d, p[:2]) for d, p in zip(records, pixels)]),
        "full_decode": (lambda d, hw: checked(jpeg_crop.decode_into(d, 0, 0, hw[0], hw[1], out, whole)),
                        [(d, p[:2]) for d, p in zip(records, pixels)]),
        "bound_decode": (lambda d: checked(jpeg_crop.decode_into(d, 0, 0, res, res, out, whole)),
                         [(d,) for d in bounds]),
    }
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for stage, (run, items) in calls.items():  # warm-up: thread state, page cache, first-call costs
        _time_per_image(run, items[:10])
    for r in range(rounds):
        order = STAGES[r % len(STAGES):] + STAGES[:r % len(STAGES)]  # rotate, so that no stage always runs first
        for stage in order:
            run, items = calls[stage]
            times[stage].append(_time_per_image(run, items))
    return {stage: statistics.median(values) for stage, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beton", required=True)
    parser.add_argument("--res", type=int, action="append", required=True, help="output side (repeatable)")
    parser.add_argument("--images", type=int, default=300, help="JPEG records to use (the first ones)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--scale", type=float, nargs=2, default=(0.2, 1.0))
    parser.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3))
    parser.add_argument("--bound-quality", type=int, default=90, help="JPEG quality of the bound's files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True, type=Path)
    args = parser.parse_args(argv)
    if not Path(args.beton).is_file():
        parser.error(f"--beton: no such file {args.beton}")
    if args.images < 1 or args.rounds < 1 or min(args.res) < 1:
        parser.error("--images, --rounds and --res must be at least 1")

    from tools.bench_loader import jpeg_records

    from dailymae_jax.files import write_json

    records = jpeg_records(args.beton, args.images)
    if not records:
        parser.error(f"--beton: {args.beton} has no JPEG-encoded images")
    results = []
    for res in args.res:
        stages = measure(records, res, args.rounds, tuple(args.scale), tuple(args.ratio), args.seed,
                         args.bound_quality)
        for stage, ms in stages.items():
            results.append({"res": res, "stage": stage, "ms_per_image": round(ms, 4)})
            print(f"{res:4d} px  {stage:24s} {ms:.3f} ms", file=sys.stderr, flush=True)
    report = {"results": results,
              "settings": vars(args),  # write_json writes paths as strings
              "records": {"count": len(records), "mean_bytes": round(float(np.mean([r.size for r in records])), 1)}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

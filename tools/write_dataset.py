"""Write an image dataset to an FFCV .beton file: an ImageFolder split or a prepared TFDS split.

  python tools/write_dataset.py --source data/imagenet/train --out data/train.beton
  python tools/write_dataset.py --tfds imagenet2012 --split train --data-dir ~/tensorflow_datasets --out train.beton

Defaults are the DailyMAE recipe's files: longest side 500 px, JPEG quality 95, chroma 4:4:4. Unreadable
images are skipped; the list (path, reason) goes to <out>.report.json. The file is written under a
temporary name and renamed only on success. Exit codes: 0 written, 2 bad arguments or unusable source,
1 failure while writing, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

# Run as a script, Python puts tools/ on sys.path, not the repository root that holds dailymae_jax, configs/
# and tools/ (imported as tools.<name>, the root is already there).
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dailymae_jax.data.write import (  # noqa: E402
    CHROMA_SUBSAMPLINGS, CROP_INDEX_SPACING, RECIPE_CHROMA, RECIPE_JPEG_QUALITY, RECIPE_MAX_RESOLUTION, WRITE_MODES,
    ReportError, report_path, write_beton)

_SHOW_SKIPPED = 10  # skipped items printed; all are in the report file


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value
    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="write_dataset.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", type=Path, help="an ImageFolder split: <source>/<class>/<images>")
    src.add_argument("--tfds", metavar="NAME", help="a prepared TFDS dataset (array_record), e.g. imagenet2012; "
                     "needs tensorflow-datasets (the 'tfds' extra), not TensorFlow")
    parser.add_argument("--split", default="train", help="with --tfds: the split")
    parser.add_argument("--data-dir", type=Path, default=None, help="with --tfds: TFDS data_dir (default: TFDS's)")
    parser.add_argument("--image-key", default="image", help="with --tfds: the image feature")
    parser.add_argument("--label-key", default="label", help="with --tfds: the label feature")
    parser.add_argument("--out", required=True, type=Path, help="output .beton path")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--max-resolution", type=_int_in(1), default=RECIPE_MAX_RESOLUTION,
                        help="longest side in pixels; larger images are downscaled")
    parser.add_argument("--quality", type=_int_in(1, 100), default=RECIPE_JPEG_QUALITY, help="JPEG quality")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="jpg",
                        help="jpg: all JPEG; raw: all uncompressed; smart: JPEG above --smart-threshold; "
                        "proportion: JPEG with probability --compress-probability")
    parser.add_argument("--smart-threshold", type=_int_in(0), default=None,
                        help="with --write-mode smart: JPEG-compress images whose raw RGB exceeds this many bytes "
                        "(e.g. 206432)")
    parser.add_argument("--compress-probability", type=_probability, default=0.5,
                        help="with --write-mode proportion: probability that an image is JPEG-compressed")
    parser.add_argument("--chroma", choices=CHROMA_SUBSAMPLINGS, default=RECIPE_CHROMA,
                        help="JPEG chroma subsampling: 444 (full colour resolution) or 420")
    parser.add_argument("--restart-interval", type=_int_in(0, 65535), default=0,
                        help="JPEG restart marker every N MCUs (0: none); 1 lets crop decoding skip the data outside "
                        "each crop (see docs/PERFORMANCE.md for speed and size)")
    parser.add_argument("--crop-index-spacing", type=_int_in(0, 65535), default=CROP_INDEX_SPACING,
                        help="JPEGs without restart markers get a crop index (an APP9 segment other decoders skip) "
                        "with an entry every N pixels of each MCU row, which lets crop decoding skip the rows above "
                        "and the MCUs beside a crop (0: none)")
    parser.add_argument("--workers", type=_int_in(1), default=_default_workers(), help="processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the beton, print a summary and the skipped items; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write_mode == "smart" and args.smart_threshold is None:
        parser.error("--write-mode smart needs --smart-threshold BYTES (e.g. 206432)")
    if args.smart_threshold is not None and args.write_mode != "smart":
        parser.error("--smart-threshold applies only to --write-mode smart")
    if args.tfds is None and any(getattr(args, k) != parser.get_default(k)
                                 for k in ("split", "data_dir", "image_key", "label_key")):
        parser.error("--split, --data-dir, --image-key and --label-key apply only to --tfds")
    if args.out.exists() and not args.out.is_dir() and not args.overwrite:
        parser.error(f"output file exists: {args.out} (add --overwrite to replace it)")
    try:
        if args.tfds is not None:
            from dailymae_jax.data.sources import TfdsSource

            source = TfdsSource(args.tfds, args.split, args.data_dir, image_key=args.image_key,
                                label_key=args.label_key)
        else:
            source = args.source
        report = write_beton(source, args.out, max_resolution=args.max_resolution, jpeg_quality=args.quality,
                             num_workers=args.workers, write_mode=args.write_mode,
                             smart_threshold=args.smart_threshold, compress_probability=args.compress_probability,
                             chroma_subsampling=args.chroma, restart_interval=args.restart_interval,
                             crop_index_spacing=args.crop_index_spacing, overwrite=args.overwrite,
                             progress=not args.no_progress)
    except (ValueError, FileExistsError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except ReportError as exc:  # the beton itself is complete: say so, not "nothing written"
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:
        print(f"{parser.prog}: error while writing, nothing written to {args.out}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted, nothing written to {args.out}", file=sys.stderr)
        return 130
    print(report.summary())
    for name, reason in report.skipped[:_SHOW_SKIPPED]:
        print(f"  skipped {name}: {reason}")
    if report.num_skipped > _SHOW_SKIPPED:
        print(f"  ... and {report.num_skipped - _SHOW_SKIPPED} more")
    print(f"report: {report_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert an ImageFolder split (<class>/<images>) into an FFCV .beton file.

Usage: python tools/write_dataset.py --source DIR --out FILE.beton [options]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Running as `python tools/...` puts tools/ (not the repo root) on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dailymae_jax.data.write import CHROMA_SUBSAMPLINGS, WRITE_MODES, write_beton  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the beton, print the report as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, type=Path, help="one split folder: <class>/<images>")
    parser.add_argument("--out", required=True, type=Path, help="output .beton path")
    parser.add_argument("--max-resolution", type=int, default=500, help="longest side after downscaling")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="jpg")
    parser.add_argument("--smart-threshold", type=int, default=None,
                        help="with --write-mode smart: JPEG-compress images whose raw size exceeds this many bytes")
    parser.add_argument("--compress-probability", type=float, default=0.5,
                        help="with --write-mode proportion: fraction of images JPEG-compressed")
    parser.add_argument("--chroma", choices=CHROMA_SUBSAMPLINGS, default="420", help="JPEG chroma subsampling")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        report = write_beton(args.source, args.out, max_resolution=args.max_resolution,
                             jpeg_quality=args.quality, num_workers=args.workers, write_mode=args.write_mode,
                             smart_threshold=args.smart_threshold,
                             compress_probability=args.compress_probability, chroma_subsampling=args.chroma)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())

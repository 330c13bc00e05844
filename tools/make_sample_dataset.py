"""Build the embedded sample ImageFolder (train/val) from photographs shipped in installed wheels.

Usage: python tools/make_sample_dataset.py --out DIR [--num-images N] [--seed S] [--val-fraction F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a script, Python puts tools/ on sys.path, not the repository root that holds dailymae_jax, configs/
# and tools/ (imported as tools.<name>, the root is already there).
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dailymae_jax.data.sample import make_sample_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the dataset, print its summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--num-images", type=int, default=600, help="total images over both splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    try:
        summary = make_sample_dataset(args.out, num_images=args.num_images, seed=args.seed,
                                      val_fraction=args.val_fraction)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a pretraining checkpoint to PyTorch: the official MAE layout or timm's VisionTransformer.

Usage: python tools/export_torch.py --workdir DIR [--step N] --format mae|timm --out FILE.pth|FILE.safetensors
                                    [--resolution R] [--sample-out FILE.npz [--sample-size N] [--mask-ratio M]]

--format mae writes {'model': state_dict} with the encoder and decoder keys of the official MAE pretraining
checkpoints; --format timm writes the encoder keys of timm.models.vision_transformer.VisionTransformer.
A .pth holds plain tensors (torch.load(..., weights_only=True)); a .safetensors file is read without torch.
The fixed sin-cos position tables are written for --resolution (default: the run's schedule.resolution).

--sample-out also writes a reference batch computed by the JAX model, to check the export with: images
(uint8 N×H×W×3, centre squares of the sample photographs), noise (the masking noise), mask, mask_ratio, loss,
pred (decoder predictions), features_cls and features_mean (encoder outputs on the unmasked images after the
final norm), pixel_mean and pixel_std. See dailymae_jax.export.reference_batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, Python puts tools/ on sys.path, not the repository root that holds dailymae_jax, configs/
# and tools/ (imported as tools.<name>, the root is already there).
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dailymae_jax import export  # noqa: E402
from dailymae_jax.checkpoint import CheckpointDamagedError  # noqa: E402
from dailymae_jax.pretrained import load_run  # noqa: E402

SUFFIXES = (".pth", ".safetensors")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse adds a usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, restore the checkpoint, write the export (and the reference batch)."""
    parser = _Parser(prog="export_torch.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path, help="a pretraining workdir (checkpoints/ inside)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--format", required=True, choices=export.FORMATS, help="mae or timm key layout")
    parser.add_argument("--out", required=True, type=Path, help="output file, .pth or .safetensors")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size the position tables are written for (default: schedule.resolution)")
    parser.add_argument("--sample-out", type=Path, default=None, help="also write a reference batch (.npz)")
    parser.add_argument("--sample-size", type=int, default=8, help="images in the reference batch (1 to 14)")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="mask ratio of the reference batch (default: schedule.mask_ratio)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference batch's masking noise")
    args = parser.parse_args(argv)
    if args.out.suffix not in SUFFIXES:
        parser.error(f"--out {args.out}: the name must end in .pth or .safetensors")
    if args.sample_out is not None and args.sample_out.suffix != ".npz":
        parser.error(f"--sample-out {args.sample_out}: the name must end in .npz")
    if not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir} does not exist")
    _check_values(parser, args)

    try:
        # Everything that depends on the run is checked before anything is written.
        run = load_run(args.workdir, args.step)
        resolution = args.resolution or run.resolution
        if resolution % run.model.patch:
            raise ValueError(f"--resolution {resolution} is not a multiple of the patch size {run.model.patch}")
        mask_ratio = run.config["schedule"]["mask_ratio"] if args.mask_ratio is None else args.mask_ratio
        if args.sample_out is not None and not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"the run's schedule.mask_ratio {mask_ratio}; give --mask-ratio in (0, 1)")
        grid = (resolution // run.model.patch,) * 2
        state = export.to_state_dict(run.params, fmt=args.format, width=run.model.width,
                                     decoder_width=run.model.decoder_width, grid=grid)
        path = export.save_state_dict(state, args.out, fmt=args.format)
        print(f"exported step {run.step} of {args.workdir} ({args.format}, {resolution} px, {len(state)} tensors): "
              f"{path}")
        if args.sample_out is not None:
            images = export.reference_images(args.sample_size, resolution)
            batch = export.reference_batch(run.params, run.model, images, mask_ratio=float(mask_ratio),
                                           seed=args.seed)
            sample = export.save_reference_batch(batch, args.sample_out)
            print(f"reference batch ({len(images)} images, mask ratio {mask_ratio}, loss {batch['loss']:.6f}): "
                  f"{sample}")
    except (FileNotFoundError, ValueError) as error:
        print(f"export_torch.py: error: {error}", file=sys.stderr)
        return 2
    except CheckpointDamagedError as error:
        print(f"export_torch.py: error: {error}", file=sys.stderr)
        return 1
    return 0


def _check_values(parser: _Parser, args: argparse.Namespace) -> None:
    """The arguments' own ranges (one line, exit 2), before the checkpoint is read or anything written."""
    if args.resolution is not None and args.resolution <= 0:
        parser.error(f"--resolution {args.resolution}: must be a positive multiple of the patch size")
    if args.step is not None and args.step < 0:
        parser.error(f"--step {args.step}: must be ≥ 0")
    if args.mask_ratio is not None and not 0.0 < args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio {args.mask_ratio}: allowed: 0 < ratio < 1")
    if args.sample_out is None and (args.mask_ratio is not None or args.sample_size != 8):
        parser.error("--mask-ratio and --sample-size describe the reference batch: give --sample-out too")
    if args.sample_out is not None:
        from dailymae_jax.data.sample import source_photograph_paths

        photos = len(source_photograph_paths())
        if not 1 <= args.sample_size <= photos:
            parser.error(f"--sample-size {args.sample_size}: allowed: 1 to {photos} (one per sample photograph)")
    for flag, path in (("--out", args.out), ("--sample-out", args.sample_out)):
        if path is not None and path.is_dir():
            parser.error(f"{flag} {path} is a directory")
    if args.sample_out is not None and args.sample_out.resolve() == args.out.resolve():
        parser.error("--sample-out must differ from --out")


if __name__ == "__main__":
    sys.exit(main())

"""Entry point: ``python -m dailymae_jax.main --config=configs/<recipe>.py --workdir=DIR``.

Any config field can be overridden on the command line, e.g. ``--config.train.epochs=2``. The recipes live
in configs/: mae_b16.py (the paper's ViT-B/16) and mae_demo.py (a small run on the sample data) pretrain;
finetune_b16.py / finetune_demo.py and linprobe_b16.py / linprobe_demo.py evaluate a pretrained encoder
(``config.task`` picks the task). Running again with the same workdir resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file with a get_config(), e.g. configs/mae_demo.py; override fields with "
    "--config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, summary.json and exports; "
                               "an existing one is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from dailymae_jax.config import ConfigError, validate

    config = _CONFIG.value
    try:
        validate(config)  # before any data is written or compiled
        if config.task in ("finetune", "linprobe"):
            return _run_classifier(config, _WORKDIR.value)
        from dailymae_jax.train import pretrain
        pretrain.train_beton(config)  # builds the sample data, if asked, before JAX starts threads
        summary = pretrain.run(config, _WORKDIR.value)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"summary: {_WORKDIR.value}/summary.json — {summary['steps']} steps, loss "
          f"{summary['initial_loss']:.4f} → {summary['final_loss']:.4f}, "
          f"{summary['images_per_second']:.1f} img/s, {summary['compilations_during_training']} compilations "
          "during training")
    for name, path in summary.get("exports", {}).items():
        print(f"exported {name}: {path}")
    if "reconstruction" in summary:
        print(f"reconstructions: {summary['reconstruction']}")


def _run_classifier(config, workdir: str) -> None:
    """The finetune and linprobe tasks (train/finetune.py, train/linprobe.py)."""
    from dailymae_jax.train import finetune, linprobe

    task = {"finetune": finetune, "linprobe": linprobe}[config.task]
    task.prepare_data(config)  # writes the sample .beton files, if asked, before JAX starts threads
    summary = task.run(config, workdir)
    print(f"summary: {workdir}/summary.json — {summary['steps']} steps, val top-1 {summary['val_top1']:.4f} "
          f"top-5 {summary['val_top5']:.4f} over {summary['val_count']} images at {summary['val_resolution']} px "
          f"(chance {summary['chance_top1']:.4f}), {summary['compilations_during_training']} compilations "
          "during training")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()

"""Linear probing of the demo pretraining run on the sample dataset, in a few CPU minutes.

Launch (after `make demo`, which pretrains into runs/demo):

  python -m dailymae_jax.main --config=configs/linprobe_demo.py --workdir=runs/linprobe_demo \
      --config.init.workdir=runs/demo

Expected (measured on 2 CPU cores shared with other jobs): 140 steps, val top-1 0.976, top-5 1.000 over the
124 validation images (chance 0.071); 1.4 CPU-minutes (user), 3 minutes wall; 0 compilations during training.
"""

import ml_collections

from configs import linprobe_b16


def get_config() -> ml_collections.ConfigDict:
    c = linprobe_b16.get_config()
    c.data.sample_dir = "data/sample"
    c.data.global_batch_size = 32
    c.data.num_workers = 2

    c.model.size = "tiny"
    c.model.depth = 4
    c.model.dtype = "float32"

    c.init.workdir = "runs/demo"

    c.train.epochs = 10
    c.train.warmup_epochs = 1
    # LARS moves each weight matrix by lr · 0.001 · ‖W‖ per step, whatever the gradient's size: MAE's lr 6.4
    # suits its ~7,000 steps; the demo's 140 steps need a larger one (lr = 100 · 32 / 256 = 12.5).
    c.train.base_lr = 100.0
    c.train.log_every_steps = 10

    c.schedule.resolution = 128
    c.eval.resolutions = (128,)
    c.eval.global_batch_size = 64

    c.checkpoint.every_steps = 1000
    return c

"""A small MAE pretraining on the embedded sample dataset: the whole pipeline in a few CPU minutes.

Launch:

  python -m dailymae_jax.main --config=configs/mae_demo.py --workdir=runs/demo

On first use it cuts the sample dataset from the photographs shipped in scikit-image, scikit-learn and
matplotlib into data/sample/ and writes data/sample/train.beton. Then it pretrains a 4-block ViT (width 192,
patch 16) with a three-stage palindrome 128 → 96 → 128 px.

Expected on 2 CPU cores: about 3 minutes; summary.json shows final_loss clearly below initial_loss
(≈1.0 → ≈0.7), compilations_during_training = 0; the workdir gets checkpoints, a reconstruction PNG and
PyTorch exports (export/mae.pth, export/timm.safetensors, ...).
"""

import ml_collections

from configs import mae_b16


def get_config() -> ml_collections.ConfigDict:
    c = mae_b16.get_config()
    c.data.sample_dir = "data/sample"
    c.data.global_batch_size = 32
    c.data.num_workers = 2

    c.model.size = "tiny"
    c.model.depth = 4
    c.model.decoder_width = 128
    c.model.decoder_depth = 2
    c.model.decoder_heads = 4
    c.model.dtype = "float32"  # CPUs gain nothing from bfloat16

    c.train.epochs = 9
    c.train.warmup_epochs = 1
    c.train.base_lr = 1.5e-3  # a higher rate than the recipe's so the loss falls within a few hundred steps
    c.train.log_every_steps = 10

    c.schedule.preset = "palindrome"  # 128 → 96 → 128, three equal stages
    c.schedule.resolution = 128

    c.report.reconstruction_every_epochs = 3

    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2
    return c

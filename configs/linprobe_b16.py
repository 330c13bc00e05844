"""Linear probing of MAE-Base/16 on ImageNet-1K (MAE's protocol).

Launch (one 8-GPU node):

  python -m dailymae_jax.main --config=configs/linprobe_b16.py --workdir=runs/linprobe_b16 \
      --config.data.train_path=/data/imagenet_train_500_90.beton \
      --config.data.val_path=/data/imagenet_val_500_90.beton --config.init.workdir=runs/mae_b16

Expected: val top-1 ≈ 67.8 (MAE ViT-B after 1600 pretraining epochs; ViT-L 76.0, ViT-H 77.2). Frozen
encoder, normed cls token → BatchNorm (no affine) → linear head; LARS (momentum 0.9, trust coefficient 0.001),
batch 16384, blr 0.1 (lr = 6.4), wd 0, 90 epochs with 10 warmup, cosine to 0; RandomResizedCrop + flip.
"""

import ml_collections

from configs import finetune_b16


def get_config() -> ml_collections.ConfigDict:
    c = finetune_b16.get_config()
    c.task = "linprobe"
    c.data.global_batch_size = 16384
    c.eval.global_batch_size = 1024

    c.model.global_pool = False  # the probe reads the cls token
    c.model.drop_path = 0.0
    del c["augment"]  # no Three Augmentation, Mixup or label smoothing

    c.train.epochs = 90
    c.train.warmup_epochs = 10
    c.train.base_lr = 0.1
    c.train.min_lr = 0.0
    c.train.weight_decay = 0.0
    c.train.momentum = 0.9
    for unused in ("b1", "b2", "layer_decay"):
        del c.train[unused]
    return c

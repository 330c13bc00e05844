"""Finetuning MAE-Base/16 on ImageNet-1K: the MAE recipe with DailyMAE's Three Augmentation.

Launch (one 8-GPU node; both .beton files come from tools/write_dataset.py):

  python -m dailymae_jax.main --config=configs/finetune_b16.py --workdir=runs/finetune_b16 \
      --config.data.train_path=/data/imagenet_train_500_90.beton \
      --config.data.val_path=/data/imagenet_val_500_90.beton --config.init.workdir=runs/mae_b16

From an official MAE or timm checkpoint instead: --config.init.source=file --config.init.format=mae
--config.init.path=mae_pretrain_vit_base.pth.

Expected: val top-1 ≈ 82.6–83.6 at 224 px with the standardized centre crop (DailyMAE 82.62 after 800
pretraining epochs; official MAE 83.6 after 1600; the official ViT-B weights finetuned in DailyMAE's FFCV
toolkit with Three Augmentation: 83.12). Values follow MAE's finetuning recipe: 100 epochs, batch 1024,
AdamW (0.9, 0.999), blr 5e-4 (lr = blr·batch/256 = 2e-3), layer decay 0.65, wd 0.05, drop path 0.1,
5 warmup epochs, cosine to 1e-6, label smoothing 0.1, mixup 0.8, cutmix 1.0 (switch 0.5), global average
pooling with fc_norm. ViT-L: --config.model.size=large --config.train.epochs=50 --config.train.base_lr=1e-3
--config.train.layer_decay=0.75 --config.model.drop_path=0.2.

Progressive resolution during finetuning: --config.schedule.stages='((0, 160), (30, 192), (60, 224))'.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "finetune"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.train_path = ""  # .beton with fields 'image' and 'label'
    c.data.val_path = ""  # validation .beton, same label indices
    c.data.sample_dir = ""  # if set and a path is empty: the sample dataset's train/val split
    c.data.sample_num_images = 600
    c.data.global_batch_size = 1024
    c.data.num_workers = 10
    c.data.crop_scale = (0.08, 1.0)  # DeiT III / MAE finetuning RandomResizedCrop
    c.data.crop_ratio = (3 / 4, 4 / 3)
    c.data.hflip = True

    c.model = ml_collections.ConfigDict()
    c.model.size = "base"
    c.model.width = ml_collections.config_dict.placeholder(int)
    c.model.depth = ml_collections.config_dict.placeholder(int)
    c.model.heads = ml_collections.config_dict.placeholder(int)
    c.model.patch = ml_collections.config_dict.placeholder(int)
    c.model.num_classes = ml_collections.config_dict.placeholder(int)  # None: max training label + 1
    c.model.global_pool = True  # mean of patch tokens → fc_norm → head (MAE finetuning)
    c.model.drop_path = 0.1
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"  # cuDNN fused attention on CUDA, XLA elsewhere; or "cudnn", "xla"

    # Where the encoder comes from (see dailymae_jax/pretrained.py): "pretrain" (our workdir), "file"
    # (an official MAE / timm PyTorch checkpoint) or "scratch".
    c.init = ml_collections.ConfigDict()
    c.init.source = "pretrain"
    c.init.workdir = ""
    c.init.step = ml_collections.config_dict.placeholder(int)  # None: the latest checkpoint
    c.init.path = ""
    c.init.format = "mae"

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 100
    c.train.warmup_epochs = 5
    c.train.base_lr = 5e-4  # lr = base_lr · global_batch / 256
    c.train.min_lr = 1e-6
    c.train.weight_decay = 0.05
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.layer_decay = 0.65
    c.train.log_every_steps = 50
    c.train.compilation_cache_dir = ""

    c.augment = ml_collections.ConfigDict()
    c.augment.three_augment = True  # per sample one of grayscale, solarize, Gaussian blur
    c.augment.color_jitter = 0.3  # DeiT III's brightness/contrast/saturation strength; 0 turns it off
    c.augment.mixup_alpha = 0.8
    c.augment.cutmix_alpha = 1.0
    c.augment.mixup_switch_prob = 0.5
    c.augment.mixup_prob = 1.0
    c.augment.label_smoothing = 0.1

    # Training resolution: schedule.resolution, or stages ((start_epoch, resolution), ...) for progressive
    # resolution; each resolution is one ahead-of-time compiled step.
    c.schedule = ml_collections.ConfigDict()
    c.schedule.resolution = 224
    c.schedule.stages = ()

    # Standardized validation: centre square of 0.875·min(H, W) resized to each resolution; the first one
    # is reported as val_top1 / val_top5.
    c.eval = ml_collections.ConfigDict()
    c.eval.resolutions = (224,)
    c.eval.crop_ratio = 0.875
    c.eval.global_batch_size = 1024
    c.eval.every_epochs = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep = 2
    c.distributed = common.distributed()
    return c

"""MAE-Base/16 pretraining on ImageNet-1K: the DailyMAE recipe (800 epochs, palindrome resolution).

Launch (one 8-GPU node; the .beton comes from tools/write_dataset.py):

  python -m dailymae_jax.main --config=configs/mae_b16.py --workdir=runs/mae_b16 \
      --config.data.train_path=/data/imagenet_train_500_90.beton

Expected: 800 epochs in about 18 h on 8×A100 in DailyMAE's PyTorch code; finetuned top-1 ≈ 82.6–83.6
(DailyMAE 82.62, official MAE 83.6 at 1600 epochs). Final pretraining loss (norm_pix) ≈ 0.40–0.42.
Values follow the official MAE recipe: effective batch 4096, blr 1.5e-4 (lr = blr·batch/256 = 2.4e-3),
AdamW (0.9, 0.95), wd 0.05, 40 warmup epochs, cosine to 0, mask ratio 0.75, norm_pix_loss.

Other progressive schedules: --config.schedule.preset=scheme1 … scheme6, palindrome_low, linear, fixed.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "pretrain"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.train_path = ""  # .beton with fields 'image' and 'label'
    c.data.sample_dir = ""  # if set and train_path is empty: build the sample dataset here first
    c.data.sample_num_images = 600
    c.data.global_batch_size = 4096
    c.data.num_workers = 10
    c.data.crop_scale = (0.2, 1.0)
    c.data.crop_ratio = (3 / 4, 4 / 3)
    c.data.hflip = True

    c.model = ml_collections.ConfigDict()
    c.model.size = "base"
    # Optional overrides of the named size (None = the size's value).
    c.model.width = ml_collections.config_dict.placeholder(int)
    c.model.depth = ml_collections.config_dict.placeholder(int)
    c.model.heads = ml_collections.config_dict.placeholder(int)
    c.model.patch = ml_collections.config_dict.placeholder(int)
    c.model.decoder_width = 512
    c.model.decoder_depth = 8
    c.model.decoder_heads = 16
    c.model.norm_pix_loss = True
    c.model.dtype = "bfloat16"  # compute dtype; master weights stay float32
    c.model.attention = "auto"  # cuDNN fused attention on CUDA, XLA elsewhere; or "cudnn", "xla"

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 800
    c.train.warmup_epochs = 40
    c.train.base_lr = 1.5e-4  # lr = base_lr · global_batch / 256
    c.train.min_lr = 0.0
    c.train.weight_decay = 0.05
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.grad_accum_steps = 0  # 0: the smallest accumulation that fits each bucket in GPU memory (docs/GPU.md)
    c.train.log_every_steps = 50
    c.train.compilation_cache_dir = ""  # JAX persistent compilation cache; empty = off

    # Progressive resolution: a named preset scaled to train.epochs and schedule.resolution, or explicit
    # stages ((start_epoch, resolution, mask_ratio), ...) that take precedence.
    c.schedule = ml_collections.ConfigDict()
    c.schedule.preset = "scheme5"  # palindrome 224 → 192 → 224, boundaries at epochs 200 and 400
    c.schedule.resolution = 224
    c.schedule.mask_ratio = 0.75
    c.schedule.stages = ()

    c.probe = ml_collections.ConfigDict()
    c.probe.learning_rate = 1e-3
    c.probe.features = "visible"  # "visible": free, from the training pass; "full": DailyMAE's extra pass

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep = 3

    c.export = ml_collections.ConfigDict()
    c.export.formats = ("mae", "timm")  # written to <workdir>/export/ at the end of the run

    c.report = ml_collections.ConfigDict()
    c.report.num_reconstructions = 8
    c.report.reconstruction_every_epochs = 50  # PNG + TensorBoard image; 0 = only at the end of the run

    c.distributed = common.distributed()
    return c

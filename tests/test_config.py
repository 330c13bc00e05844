"""The finetune and linprobe recipes validate, and bad values give one-line errors naming the key."""

import pytest

from configs import finetune_b16, finetune_demo, linprobe_b16, linprobe_demo
from dailymae_jax.config import ConfigError, finetune_stages, validate


@pytest.fixture
def pretrain_workdir(tmp_path):
    """A workdir that looks like a finished pretraining run (one complete checkpoint folder)."""
    (tmp_path / "checkpoints" / "12" / "state").mkdir(parents=True)
    return str(tmp_path)


def demo_config(workdir):
    config = finetune_demo.get_config()
    config.init.workdir = workdir
    return config


@pytest.mark.parametrize("module", [finetune_b16, finetune_demo, linprobe_b16, linprobe_demo])
def test_recipes_validate(module, pretrain_workdir):
    config = module.get_config()
    config.data.sample_dir = config.data.sample_dir or "data/sample"
    config.init.workdir = pretrain_workdir
    validate(config)
    validate(config, device_count=8)


def test_finetune_stages_default_and_progressive():
    config = demo_config("unused")
    assert [(s.start_epoch, s.resolution, s.mask_ratio) for s in finetune_stages(config)] == [(0, 128, 0.0)]
    config.schedule.stages = ((0, 96), (4, 128))
    assert [(s.start_epoch, s.resolution) for s in finetune_stages(config)] == [(0, 96), (4, 128)]


@pytest.mark.parametrize("key,value,message", [
    ("init.source", "imagenet", "init.source 'imagenet'; allowed: pretrain, file, scratch"),
    ("init.workdir", "", "init.workdir: missing"),
    ("schedule.stages", ((0, 100),), "schedule.stages: resolution 100 is not divisible by the patch size 16; allowed: positive multiples of 16"),
    ("schedule.stages", ((1, 128),), "schedule.stages: the first stage must start at epoch 0"),
    ("schedule.stages", ((0, 96), (20, 128)), "stage starts at epoch 20 but train.epochs is 10"),
    ("eval.resolutions", (120,), "eval.resolutions: 120 is not a positive multiple of the patch size 16"),
    ("eval.resolutions", (), "eval.resolutions: empty"),
    ("eval.global_batch_size", 12, "eval.global_batch_size 12 is not divisible by the device count 8"),
    ("train.layer_decay", 1.5, "train.layer_decay 1.5 must lie in [0.0, 1.0]"),
    ("augment.label_smoothing", 1.0, "augment.label_smoothing 1.0 must lie in [0.0, 1.0)"),
    ("augment.cutmix_alpha", -1.0, "augment.cutmix_alpha -1.0 must be ≥ 0"),
    ("model.num_classes", 1, "model.num_classes 1 must be ≥ 2"),
])
def test_bad_finetune_values_name_the_key(key, value, message, pretrain_workdir):
    config = demo_config(pretrain_workdir)
    section, field = key.split(".")
    with config.unlocked():
        config[section][field] = value
    with pytest.raises(ConfigError) as error:
        validate(config, device_count=8)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_init_sources_are_checked_before_anything_runs(tmp_path):
    config = demo_config(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="^init.workdir: no checkpoint in .*empty/checkpoints; run the pretrain"):
        validate(config)
    config.init.source = "file"
    with pytest.raises(ConfigError, match="init.path: missing"):
        validate(config)
    config.init.path = str(tmp_path / "x.pth")
    with pytest.raises(ConfigError, match="init.path: no such file"):
        validate(config)
    config.init.format = "jax"
    with pytest.raises(ConfigError, match="init.format 'jax'; allowed: mae, timm"):
        validate(config)
    config.init.source = "scratch"
    validate(config)


@pytest.mark.parametrize("key, value, message", [
    ("schedule.resolution", 100, "schedule.resolution 100 is not divisible by the patch size 16"),
    ("schedule.mask_ratio", 1.0, "schedule.stages: mask ratio 1.0 must lie in (0, 1)"),
    ("schedule.stages", ((0, 128, 0.75), (0, 96, 0.75)), "start epochs must be strictly increasing"),
    ("schedule.stages", ((0, 128, 0.75), (1, 100, 0.75)), "schedule.stages: resolution 100 is not divisible"),
    ("schedule.stages", ((0, 128),), "schedule.stages: (0, 128) is not (start_epoch, resolution, mask_ratio)"),
    ("model.dtype", "float16", "model.dtype 'float16'; allowed: float32, bfloat16"),
    ("probe.features", "cls", "probe.features 'cls'; allowed: visible, full"),
])
def test_bad_pretraining_values_name_the_key(key, value, message):
    from configs import mae_demo

    config = mae_demo.get_config()
    section, field = key.split(".")
    with config.unlocked():
        config[section][field] = value
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert message in str(error.value) and "\n" not in str(error.value)

"""The recipes validate, and bad values (of every task) give one-line errors naming the key."""

import os
from pathlib import Path

import pytest

from configs import finetune_b16, finetune_demo, linprobe_b16, linprobe_demo
from dailymae_jax.config import ConfigError, check_workdir, finetune_stages, validate


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

    assert_one_line_error(mae_demo.get_config(), key, value, message)


def assert_one_line_error(config, key, value, message):
    section, field = key.split(".")
    with config.unlocked():
        config[section][field] = value
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("key, value, message", [
    ("data.crop_scale", (0.0, 0.0), "data.crop_scale (0.0, 0.0) must be (low, high) with 0 < low <= high <= 1"),
    ("data.crop_scale", (0.5, 0.2), "data.crop_scale (0.5, 0.2) must be (low, high)"),
    ("data.crop_scale", (0.2, 1.5), "data.crop_scale (0.2, 1.5) must be (low, high)"),
    ("data.crop_scale", (0.2,), "data.crop_scale (0.2,) must be two numbers"),
    ("data.crop_ratio", (0.0, 1.0), "data.crop_ratio (0.0, 1.0) must be (low, high) with 0 < low <= high"),
    ("data.crop_ratio", (4 / 3, 3 / 4), "data.crop_ratio (1.333"),
    ("data.crop_ratio", (0.75, float("inf")), "data.crop_ratio (0.75, inf) must be finite"),
    ("train.log_every_steps", 0, "train.log_every_steps 0 must be an integer ≥ 1"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps 0 must be an integer ≥ 1"),
    ("checkpoint.keep", 0, "checkpoint.keep 0 must be an integer ≥ 1"),
])
@pytest.mark.parametrize("task", ["pretrain", "finetune", "linprobe"])
def test_every_task_checks_the_crop_and_the_cadences(task, key, value, message, pretrain_workdir):
    from configs import mae_demo

    config = {"pretrain": mae_demo, "finetune": finetune_demo, "linprobe": linprobe_demo}[task].get_config()
    config.data.sample_dir = config.data.sample_dir or "data/sample"
    if task != "pretrain":
        config.init.workdir = pretrain_workdir
    assert_one_line_error(config, key, value, message)


def test_pretraining_draws_at_least_one_reconstruction():
    from configs import mae_demo

    config = mae_demo.get_config()
    config.data.sample_dir = config.data.sample_dir or "data/sample"
    assert_one_line_error(config, "report.num_reconstructions", 0, "report.num_reconstructions 0 must be an integer ≥ 1")


def test_workdir_must_be_a_writable_directory(tmp_path, monkeypatch):
    check_workdir(tmp_path / "new" / "run")  # created later, under a writable directory
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"file is a file, not a directory$"):
        check_workdir(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"file/run: .*file is a file, not a directory$"):
        check_workdir(tmp_path / "file" / "run")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root writes anyway: make access() answer as for anyone else
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == read_only
                            else real_access(path, mode))
    with pytest.raises(ConfigError, match=r"read-only is not writable$"):
        check_workdir(read_only)
    with pytest.raises(ConfigError, match=r"read-only/run is not writable \(.*, where it would be created\)"):
        check_workdir(read_only / "run")


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_a_batch_larger_than_the_dataset_stops_before_compiling(task, tmp_path, sample_beton, monkeypatch):
    from configs import mae_demo
    from dailymae_jax.train import classify, finetune, pretrain
    from dailymae_jax.train import compile as compile_lib

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the batch was checked")

    monkeypatch.setattr(compile_lib, "compile_buckets", no_compiling)
    config = (mae_demo if task == "pretrain" else finetune_demo).get_config()
    with config.unlocked():
        config.data.train_path = str(sample_beton)
        config.data.global_batch_size = 1024
        if task == "finetune":
            config.data.val_path = str(sample_beton)
            config.init.source = "scratch"
    with pytest.raises(ConfigError, match=r"^data.global_batch_size 1024 is larger than the \d+ images of .*"
                                          r"train.beton; allowed: at most \d+$"):
        if task == "pretrain":
            pretrain.Pretraining(config, tmp_path / "run")
        else:
            classify.run(config, tmp_path / "run", finetune.build_parts)
    assert not (tmp_path / "run" / "checkpoints").exists()

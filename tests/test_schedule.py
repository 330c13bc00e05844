"""Schedules against MAE's learning-rate formulas and the DailyMAE authors' table of schemes (arXiv 2404.00509)."""

import math

import pytest

from dailymae_jax import schedule
from dailymae_jax.schedule import Stage


def mae_lr(step, peak, total, warmup, min_lr=0.0):
    """MAE's per-iteration schedule, written out independently of the code under test."""
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / (total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("total,warmup,min_lr", [(1000, 40, 0.0), (800, 100, 1e-6), (50, 5, 0.0)])
def test_learning_rate_matches_mae_formula(total, warmup, min_lr):
    fn = schedule.learning_rate_schedule(peak_lr=2.4e-3, total_steps=total, warmup_steps=warmup, min_lr=min_lr)
    for step in [0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total]:
        assert float(fn(step)) == pytest.approx(mae_lr(step, 2.4e-3, total, warmup, min_lr), rel=1e-5, abs=1e-9)


def test_linear_scaling_rule():
    assert schedule.scaled_learning_rate(1.5e-4, 4096) == pytest.approx(2.4e-3)


# The DailyMAE authors' schemes for 800 epochs (arXiv 2404.00509), typed in from their table.
AUTHORS_TABLE = {
    "scheme1": [(0, 160, 0.50), (200, 192, 0.66), (400, 224, 0.75)],
    "scheme2": [(0, 160, 0.75), (200, 192, 0.75), (400, 224, 0.75)],
    "scheme3": [(0, 224, 0.75), (200, 192, 0.75), (400, 160, 0.75)],
    "scheme4": [(0, 160, 0.75), (200, 192, 0.80), (400, 224, 0.85)],
    "scheme5": [(0, 224, 0.75), (200, 192, 0.75), (400, 224, 0.75)],
    "scheme6": [(0, 224, 0.75), (200, 192, 0.75), (400, 224, 0.85)],
}


@pytest.mark.parametrize("name", sorted(AUTHORS_TABLE))
def test_presets_reproduce_the_authors_schemes(name):
    stages = schedule.preset_stages(name, epochs=800, base_resolution=224, patch=16)
    assert [(s.start_epoch, s.resolution, s.mask_ratio) for s in stages] == AUTHORS_TABLE[name]


def test_demo_palindrome_and_other_presets():
    demo = schedule.preset_stages("palindrome", epochs=9, base_resolution=128, patch=16)
    assert [(s.start_epoch, s.resolution) for s in demo] == [(0, 128), (3, 96), (6, 128)]
    low = schedule.preset_stages("palindrome_low", epochs=800, base_resolution=224, patch=16)
    assert [s.resolution for s in low] == [160, 224, 160]
    ramp = schedule.preset_stages("linear", epochs=800, base_resolution=224, patch=16)
    assert [(s.start_epoch, s.resolution) for s in ramp] == [(0, 160), (100, 176), (200, 192), (300, 208),
                                                             (400, 224)]
    assert schedule.preset_stages("fixed", epochs=5, base_resolution=224, patch=16) == (Stage(0, 224, 0.75),)
    for name in schedule.PRESETS:  # every preset is valid at any run length, resolutions on the patch grid
        for epochs in (1, 3, 800):
            stages = schedule.preset_stages(name, epochs=epochs, base_resolution=224, patch=16)
            schedule.validate_stages(stages, patch=16, epochs=epochs)


def test_stage_at():
    stages = (Stage(0, 224, 0.75), Stage(200, 192, 0.75), Stage(400, 224, 0.85))
    assert [schedule.stage_at(stages, e).start_epoch for e in (0, 199, 200, 399, 400, 799)] == [0, 0, 200, 200,
                                                                                                   400, 400]


@pytest.mark.parametrize("stages,message", [
    ((Stage(0, 100, 0.75),), "not divisible by the patch size"),
    ((Stage(0, 96, 1.0),), "must lie in (0, 1)"),
    ((Stage(0, 96, 0.75), Stage(0, 128, 0.75)), "strictly increasing"),
    ((Stage(1, 96, 0.75),), "must start at epoch 0"),
    ((Stage(0, 96, 0.75), Stage(9, 128, 0.75)), "train.epochs is 5"),
])
def test_invalid_stages_name_the_problem(stages, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        schedule.validate_stages(stages, patch=16, epochs=5)


def test_classifier_stages_must_not_mask():
    schedule.validate_stages((Stage(0, 96, 0.0), Stage(2, 128, 0.0)), patch=16, epochs=5, masked=False)
    with pytest.raises(ValueError, match="mask ratio 0.75 of a classifier stage must be 0"):
        schedule.validate_stages((Stage(0, 96, 0.75),), patch=16, epochs=5, masked=False)
    with pytest.raises(ValueError, match="positive multiples of 16"):
        schedule.validate_stages((Stage(0, 0, 0.0),), patch=16, epochs=5, masked=False)


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="scheme1"):
        schedule.preset_stages("nope", epochs=10, base_resolution=224, patch=16)

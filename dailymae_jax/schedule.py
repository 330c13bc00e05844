"""Schedules: learning rate per step, and progressive-resolution stages per epoch.

Progressive resolution (DailyMAE §3): training is split into stages, each with an input resolution and a
mask ratio, that change at epoch boundaries. A stage list is plain data, ``((start_epoch, resolution,
mask_ratio), ...)``; the named presets below build such lists for any run length, so the authors' schemes
that were defined for 800 epochs (boundaries at epochs 200 and 400) keep their shape in a 3-epoch demo.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import optax


@dataclasses.dataclass(frozen=True)
class Stage:
    """One progressive-resolution stage: from ``start_epoch`` on, train at ``resolution`` with ``mask_ratio``."""

    start_epoch: int
    resolution: int
    mask_ratio: float

    @property
    def bucket(self) -> tuple[int, float]:
        """What a compiled step depends on: stages sharing a bucket share one executable."""
        return (self.resolution, self.mask_ratio)


# Each preset is a list of (fraction of the run at which the stage starts, resolution relative to the
# base resolution, mask ratio). The authors' runs are 800 epochs with the ramp over epochs 0-400 and stage
# boundaries at 200 and 400, i.e. at 1/4 and 1/2 of the run; resolutions 160/192/224 are 5/7, 6/7 and 1
# of the base 224.
_LOW, _MID, _HIGH = 160 / 224, 192 / 224, 1.0
# A mask ratio of None means "the configured mask ratio".
PRESETS: dict[str, tuple[tuple[float, float, float | None], ...]] = {
        "fixed": ((0.0, _HIGH, None),),
        "scheme1": ((0.0, _LOW, 0.50), (0.25, _MID, 0.66), (0.5, _HIGH, 0.75)),  # ~49 visible tokens throughout
        "scheme2": ((0.0, _LOW, 0.75), (0.25, _MID, 0.75), (0.5, _HIGH, 0.75)),  # low→high, fixed mask
        "scheme3": ((0.0, _HIGH, 0.75), (0.25, _MID, 0.75), (0.5, _LOW, 0.75)),  # high→low
        "scheme4": ((0.0, _LOW, 0.75), (0.25, _MID, 0.80), (0.5, _HIGH, 0.85)),  # low→high, rising mask
        "scheme5": ((0.0, _HIGH, 0.75), (0.25, _MID, 0.75), (0.5, _HIGH, 0.75)),  # palindrome high→low→high
        "scheme6": ((0.0, _HIGH, 0.75), (0.25, _MID, 0.75), (0.5, _HIGH, 0.85)),  # palindrome, final mask 0.85
        # low→high→low: the other reading of "palindrome"; ends at low resolution (cheapest last epochs).
        "palindrome_low": ((0.0, _LOW, None), (0.25, _HIGH, None), (0.5, _LOW, None)),
        # Equal thirds, high→low→high: the demo's default shape (every stage gets the same number of epochs).
        "palindrome": ((0.0, _HIGH, None), (1 / 3, _LOW, None), (2 / 3, _HIGH, None)),
        # Linear ramp low→high over the first half of the run, one stage per resolution step of one patch.
        "linear": (),
}


def round_to_patch(resolution: float, patch: int) -> int:
    """The nearest multiple of ``patch`` (at least one patch)."""
    return max(patch, int(round(resolution / patch)) * patch)


def preset_stages(name: str, *, epochs: int, base_resolution: int, patch: int,
                                    mask_ratio: float = 0.75) -> tuple[Stage, ...]:
    """Builds the stages of preset ``name`` for a run of ``epochs`` epochs at ``base_resolution``.

    Stage starts are rounded to whole epochs and resolutions to multiples of ``patch``; stages that collapse
    onto the same start epoch keep the later one. ``mask_ratio`` is used by the presets without a ratio of
    their own (fixed, palindrome, palindrome_low, linear); the authors' schemes carry their own ratios.
    """
    if name not in PRESETS:
        raise ValueError(f"schedule.preset: unknown preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
    if base_resolution <= 0 or base_resolution % patch:
        raise ValueError(f"schedule.resolution {base_resolution} is not divisible by the patch size {patch}; "
                         f"allowed: positive multiples of {patch}")
    if name == "linear":
        low = round_to_patch(base_resolution * _LOW, patch)
        resolutions = list(range(low, base_resolution + 1, patch))
        rows = [(0.5 * i / max(len(resolutions) - 1, 1), r / base_resolution, None)
                for i, r in enumerate(resolutions)]
    else:
        rows = PRESETS[name]
    by_epoch: dict[int, Stage] = {}
    for fraction, relative_resolution, ratio in rows:
        ratio = mask_ratio if ratio is None else ratio
        start = min(epochs - 1, int(round(fraction * epochs))) if epochs > 0 else 0
        by_epoch[start] = Stage(start, round_to_patch(relative_resolution * base_resolution, patch), ratio)
    return merge_repeats(tuple(by_epoch[e] for e in sorted(by_epoch)))


def merge_repeats(stages: Sequence[Stage]) -> tuple[Stage, ...]:
    """Drops stages identical to their predecessor (nothing changes at their boundary)."""
    out: list[Stage] = []
    for stage in stages:
        if not out or out[-1].bucket != stage.bucket:
            out.append(stage)
    return tuple(out)


def stage_at(stages: Sequence[Stage], epoch: int) -> Stage:
    """The stage in force during ``epoch`` (stages sorted by start epoch, the first starting at 0)."""
    current = stages[0]
    for stage in stages:
        if stage.start_epoch <= epoch:
            current = stage
    return current


def validate_stages(stages: Sequence[Stage], *, patch: int, epochs: int, masked: bool = True) -> None:
    """Raises ValueError with one line naming what is wrong.

    ``masked``: pretraining stages, whose mask ratio must lie in (0, 1); classifier stages (finetuning, linear
    probing) see every patch, so theirs must be 0.
    """
    if not stages:
        raise ValueError("schedule.stages: empty; give at least one (start_epoch, resolution, mask_ratio)")
    if stages[0].start_epoch != 0:
        raise ValueError(f"schedule.stages: the first stage must start at epoch 0, got {stages[0].start_epoch}")
    for previous, stage in zip(stages, stages[1:]):
        if stage.start_epoch <= previous.start_epoch:
            raise ValueError("schedule.stages: start epochs must be strictly increasing, got "
                             f"{previous.start_epoch} then {stage.start_epoch}")
    for stage in stages:
        if stage.resolution <= 0 or stage.resolution % patch:
            raise ValueError(f"schedule.stages: resolution {stage.resolution} is not divisible by the patch size "
                             f"{patch}; allowed: positive multiples of {patch}")
        if masked and not 0.0 < stage.mask_ratio < 1.0:
            raise ValueError(f"schedule.stages: mask ratio {stage.mask_ratio} must lie in (0, 1)")
        if not masked and stage.mask_ratio != 0.0:
            raise ValueError(f"schedule.stages: mask ratio {stage.mask_ratio} of a classifier stage must be 0")
        if stage.start_epoch >= max(epochs, 1):
            raise ValueError(f"schedule.stages: stage starts at epoch {stage.start_epoch} "
                             f"but train.epochs is {epochs}")


def learning_rate_schedule(*, peak_lr: float, total_steps: int, warmup_steps: int,
                           min_lr: float = 0.0) -> Callable[[int], float]:
    """Linear warmup from 0 to ``peak_lr``, then a half-cycle cosine down to ``min_lr``, stepped per iteration.

    This is MAE's per-iteration schedule: lr = peak·t/warmup during warmup, then
    min_lr + (peak − min_lr)·½·(1 + cos(π·(t − warmup)/(total − warmup))).
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)


def scaled_learning_rate(base_lr: float, global_batch: int) -> float:
    """MAE's linear scaling rule: lr = blr · batch / 256 (batch = effective batch, accumulation included)."""
    return base_lr * global_batch / 256


def run_learning_rate(train: Any, *, global_batch: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate schedule of a run, from its ``train`` config block (every task builds it here).

    Peak ``base_lr · global_batch / 256``, ``warmup_epochs`` of linear warmup, then a half-cycle cosine to
    ``min_lr`` at the end of ``epochs``; stepped per iteration.
    """
    return learning_rate_schedule(peak_lr=scaled_learning_rate(train.base_lr, global_batch),
                                  total_steps=train.epochs * steps_per_epoch,
                                  warmup_steps=int(train.warmup_epochs * steps_per_epoch), min_lr=train.min_lr)

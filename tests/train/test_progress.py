"""Progress reports: window means via clu.metrics, ETA, MFU and the data-bound warning."""

import jax.numpy as jnp
import numpy as np
import pytest

from dailymae_jax.train.progress import Progress, Window, format_duration


def step_metrics(loss, lr):
    return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(2 * loss), "probe_loss": jnp.float32(1.0),
            "probe_accuracy": jnp.float32(0.25), "lr": jnp.float32(lr)}


def test_window_means_last_lr_and_eta():
    progress = Progress(total_steps=100, device_kind="cpu")
    losses = [1.0, 0.5, 0.25, 0.125]
    for i, loss in enumerate(losses):
        progress.add(step_metrics(loss, lr=i * 1e-3), images=16, data_wait_seconds=0.0)
    scalars, window = progress.flush(step=4, bucket=(64, 0.75))
    assert scalars["loss"] == pytest.approx(np.mean(losses))
    assert scalars["grad_norm"] == pytest.approx(2 * np.mean(losses))
    assert scalars["lr"] == pytest.approx(3e-3)
    assert window.steps == 4 and window.images == 64
    assert scalars["eta_seconds"] == pytest.approx(window.step_seconds * 96)
    assert "mfu" not in scalars  # no peak FLOP rate for CPUs
    # The next window starts empty.
    progress.add(step_metrics(9.0, lr=1.0), images=16, data_wait_seconds=0.0)
    assert progress.flush(step=5, bucket=(64, 0.75))[0]["loss"] == pytest.approx(9.0)


def test_mfu_uses_the_compiled_flops_and_the_device_peak():
    now = [0.0]
    progress = Progress(total_steps=10, flops_per_step={(224, 0.75): 989e12 * 0.5},
                        device_kind="NVIDIA H100 80GB HBM3", clock=lambda: now[0])
    progress.add(step_metrics(1.0, 0.0), images=8, data_wait_seconds=0.0)
    progress.add(step_metrics(1.0, 0.0), images=8, data_wait_seconds=0.0)
    now[0] = 2.0  # two steps in two seconds, each doing half the H100's peak FLOPs per second
    scalars, _ = progress.flush(step=2, bucket=(224, 0.75))
    assert scalars["mfu"] == pytest.approx(0.5)
    assert scalars["images_per_second"] == pytest.approx(8.0) and scalars["eta_seconds"] == pytest.approx(8.0)


def test_data_bound_warning_threshold():
    assert Progress.data_bound_warning(Window(10, 160, 10.0, 1.0)) is None
    warning = Progress.data_bound_warning(Window(10, 160, 10.0, 6.0))
    assert warning.startswith("data-bound: the loop waited 60% of its time")


@pytest.mark.parametrize("seconds, text", [(42, "42s"), (760, "12m40s"), (11100, "3h05m"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text

"""Progress reports: window means via clu.metrics, ETA, MFU and the data-bound warning."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, cpu_env
from dailymae_jax.train.progress import Progress, Window, format_duration
from tools.launch_local import free_port


NAMES = ("loss", "grad_norm", "probe_loss", "probe_accuracy", "lr")


def step_metrics(loss, lr):
    return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(2 * loss), "probe_loss": jnp.float32(1.0),
            "probe_accuracy": jnp.float32(0.25), "lr": jnp.float32(lr)}


def test_window_means_last_lr_and_eta():
    progress = Progress(total_steps=100, metric_names=NAMES, device_kind="cpu")
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
    progress = Progress(total_steps=10, metric_names=NAMES, flops_per_step={(224, 0.75): 989e12 * 0.5},
                        device_kind="NVIDIA H100 80GB HBM3", clock=lambda: now[0])
    progress.add(step_metrics(1.0, 0.0), images=8, data_wait_seconds=0.0)
    progress.add(step_metrics(1.0, 0.0), images=8, data_wait_seconds=0.0)
    now[0] = 2.0  # two steps in two seconds, each doing half the H100's peak FLOPs per second
    scalars, _ = progress.flush(step=2, bucket=(224, 0.75))
    assert scalars["mfu"] == pytest.approx(0.5)
    assert scalars["images_per_second"] == pytest.approx(8.0) and scalars["eta_seconds"] == pytest.approx(8.0)


def test_excluded_time_leaves_the_window_and_the_line_shows_the_task_metrics():
    now = [0.0]
    progress = Progress(total_steps=10, metric_names=("loss", "grad_norm", "train_top1", "lr"), device_kind="cpu",
                        clock=lambda: now[0], line_metrics=(("train_top1", "train top-1"),))
    metrics = {"loss": jnp.float32(2.0), "grad_norm": jnp.float32(1.0), "train_top1": jnp.float32(0.5),
               "lr": jnp.float32(1e-3)}
    progress.add(metrics, images=8, data_wait_seconds=0.5)
    now[0] = 3.0
    progress.exclude(2.0)  # e.g. a validation pass inside the window: not training time
    scalars, window = progress.flush(step=1, bucket=64)
    assert window.seconds == pytest.approx(1.0) and scalars["images_per_second"] == pytest.approx(8.0)
    assert scalars["data_wait_share"] == pytest.approx(0.5) and scalars["train_top1"] == pytest.approx(0.5)
    line = progress.line(1, 0, 2, scalars)
    assert line.startswith("step 1/10 (10%) epoch 1/2: loss 2.0000 lr 1.00e-03 train top-1 0.500 | 8 img/s")
    progress.add(metrics, images=8, data_wait_seconds=0.0)
    now[0] = 4.0
    assert progress.flush(step=2, bucket=64)[1].seconds == pytest.approx(1.0)  # the exclusion was that window's


def test_data_bound_warning_threshold():
    assert Progress.data_bound_warning(Window(10, 160, 10.0, 1.0)) is None
    warning = Progress.data_bound_warning(Window(10, 160, 10.0, 6.0))
    assert warning.startswith("data-bound: the loop waited 60% of its time")


@pytest.mark.parametrize("seconds, text", [(42, "42s"), (760, "12m40s"), (11100, "3h05m"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


# Two processes of one device each. Process 1 stands for one still compiling its steps: it reaches the warm-up 40 s
# after process 0, longer than XLA's CPU collectives wait for a peer at their first use (30 s, not configurable).
SKEWED_START = """
import sys, time
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dailymae_jax import distributed
from dailymae_jax.train.progress import Progress

process_id, address = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(address, num_processes=2, process_id=process_id, initialization_timeout=120)
mesh = Mesh(jax.devices(), ("data",))  # starting the backends waits for every process: skew comes after
if process_id == 1:
    time.sleep(40)
Progress(total_steps=1, metric_names=("loss", "grad_norm", "lr"), device_kind="cpu").warm_up(NamedSharding(mesh, P()))
distributed.barrier("training")
x = jax.jit(lambda: jnp.ones(2), out_shardings=NamedSharding(mesh, P("data")))()
print("total", float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)))
"""


@pytest.mark.slow
def test_warm_up_waits_for_a_process_that_is_still_compiling():
    # A warm-up that makes a cross-process collective before the pre-training barrier (device_put checks that every
    # process passed the same value) gives up after 30 s while another process is still compiling, which ends a
    # multi-process run such as test_killing_one_process_ends_the_other's. Warm-up must make no collective; the
    # barrier does the waiting.
    address = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen([sys.executable, "-c", SKEWED_START, str(i), address], cwd=REPO, env=cpu_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    try:
        outputs = [p.communicate(timeout=150) for p in processes]  # about 45 s when it works
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        outputs = [p.communicate() for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0 and "total 2.0" in out, err[-3000:]

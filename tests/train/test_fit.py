"""train/fit.py: the memory fit of compiled steps and the accumulation search, on stand-in executables (the
compiled CUDA programs are checked in tests/tools/test_plan_gpu.py)."""

import jax
import pytest

from dailymae_jax.errors import ConfigError
from dailymae_jax.train import fit as fit_lib
from dailymae_jax.data.shard import make_mesh

GIB = 1 << 30


class FakeExecutable:
    """A compiled step whose memory analysis says ``temp`` bytes, beside 1 GiB of donated state."""

    def __init__(self, temp: int):
        self.temp = temp

    def memory_analysis(self):
        return type("Stats", (), dict(argument_size_in_bytes=GIB + 100, output_size_in_bytes=GIB + 4,
                                      alias_size_in_bytes=GIB, temp_size_in_bytes=self.temp))()


def compiler(gib_per_accum: dict[int, float]):
    """compile_one for fit_bucket: the temporary memory depends on the accumulation; records the calls."""
    calls = []

    def compile_one(bucket, accum):
        calls.append(accum)
        return FakeExecutable(int(gib_per_accum[accum] * GIB)), 0.5

    return compile_one, calls


def test_peak_counts_donated_outputs_once():
    memory = fit_lib.step_memory(FakeExecutable(7))
    assert memory.peak == GIB + 100 + 4 + 7


def test_accumulation_candidates():
    assert fit_lib.accumulation_candidates(0, 12) == [1, 2, 3, 4, 6, 12]
    assert fit_lib.accumulation_candidates(2, 8) == [2, 4, 8]


def test_configured_accumulation_that_fits_compiles_once():
    compile_one, calls = compiler({1: 2.0})
    fit = fit_lib.fit_bucket(compile_one, (224, 0.75), configured_accum=1, per_device_batch=8, pool_bytes=4 * GIB)
    assert (fit.fits, fit.grad_accum_steps, calls) == (True, 1, [1])


def test_configured_accumulation_that_does_not_fit_finds_the_advice():
    compile_one, calls = compiler({1: 8.0, 2: 5.0, 4: 2.0})
    fit = fit_lib.fit_bucket(compile_one, (224, 0.75), configured_accum=1, per_device_batch=8, pool_bytes=4 * GIB)
    assert (fit.fits, fit.grad_accum_steps, fit.fitting_accum, calls) == (False, 1, 4, [1, 2, 4])
    message = fit_lib.not_fitting_message(fit, pool_bytes=4 * GIB, device_kind="NVIDIA A100-SXM4-40GB",
                                          per_device_batch=8, global_batch=64)
    assert message == ("the 224 px bucket (mask ratio 0.75) needs 9.0 GiB per GPU at train.grad_accum_steps=1, "
                       "over the 4.0 GiB memory pool of NVIDIA A100-SXM4-40GB; fits: "
                       "--config.train.grad_accum_steps=4 (2 images per GPU per micro-batch, global batch 64 kept), "
                       "or 0 for the smallest that fits each bucket")
    with pytest.raises(ConfigError, match="^the 224 px bucket .* fits: --config.train.grad_accum_steps=4 "):
        fit_lib.require_fit([fit], pool_bytes=4 * GIB, device_kind="NVIDIA A100-SXM4-40GB", per_device_batch=8,
                            global_batch=64)


def test_accumulation_zero_takes_the_smallest_that_fits():
    compile_one, calls = compiler({1: 8.0, 2: 2.0})
    fit = fit_lib.fit_bucket(compile_one, (192, 0.75), configured_accum=0, per_device_batch=8, pool_bytes=4 * GIB)
    assert (fit.fits, fit.grad_accum_steps, fit.fitting_accum, calls) == (True, 2, 2, [1, 2])
    fit_lib.require_fit([fit], pool_bytes=4 * GIB, device_kind="x", per_device_batch=8, global_batch=64)


def test_nothing_fits_says_so():
    compile_one, calls = compiler({1: 9.0, 2: 8.0})
    fit = fit_lib.fit_bucket(compile_one, (224, 0.75), configured_accum=0, per_device_batch=2, pool_bytes=4 * GIB)
    assert (fit.fits, fit.grad_accum_steps, fit.fitting_accum) == (False, 2, None)
    message = fit_lib.not_fitting_message(fit, pool_bytes=4 * GIB, device_kind="x", per_device_batch=2,
                                          global_batch=16)
    assert message.endswith("; no accumulation fits: use a smaller model or a GPU with more memory")


def test_without_a_pool_the_configured_accumulation_is_taken():
    compile_one, calls = compiler({1: 100.0})
    fit = fit_lib.fit_bucket(compile_one, (224, 0.75), configured_accum=0, per_device_batch=8, pool_bytes=None)
    assert (fit.fits, fit.grad_accum_steps, calls) == (True, 1, [1])
    assert fit_lib.device_pool_bytes(make_mesh(jax.devices()[:1])) is None  # CPUs: no pool to fit

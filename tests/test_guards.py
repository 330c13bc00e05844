"""What stops a run on purpose: non-finite metrics and termination signals (the loop's use of both is tested
end to end in tests/e2e)."""

import os
import signal
import time

import pytest

from dailymae_jax.guards import NonFiniteError, SignalGuard, check_finite


def test_signal_guard_turns_sigint_into_a_flag():
    previous = signal.getsignal(signal.SIGINT)
    with SignalGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)  # without the guard: KeyboardInterrupt
        time.sleep(0.01)
        assert guard.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is previous


def test_check_finite_names_the_first_bad_step_and_metric():
    check_finite([(1, {"loss": 1.0, "grad_norm": 2.0})])
    with pytest.raises(NonFiniteError, match="^grad_norm is inf at step 3$"):
        check_finite([(2, {"loss": 1.0, "grad_norm": 2.0}), (3, {"loss": 1.0, "grad_norm": float("inf")}),
                      (4, {"loss": float("nan"), "grad_norm": 1.0})])
    with pytest.raises(NonFiniteError, match="^loss is nan at step 5$"):
        check_finite([(5, {"loss": float("nan"), "grad_norm": float("nan")})])

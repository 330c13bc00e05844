"""What stops a run early on purpose: non-finite numbers and termination signals.

Both end the run without losing completed work. A non-finite loss or gradient is caught before the next
checkpoint is written, so every checkpoint on disk holds finite numbers; a SIGTERM or SIGINT (a scheduler's
preemption, a Ctrl-C) lets the current step finish, saves a checkpoint at that exact data position and
exits, so the same command resumes where the run stopped.
"""

from __future__ import annotations

import signal
import threading
import types
from typing import Iterable, Mapping

import numpy as np


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm of a step is NaN or infinite."""

    def __init__(self, step: int, name: str, value: float):
        self.step = step
        super().__init__(f"{name} is {value} at step {step}")


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; the exit code follows the shell's 128 + N."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved at {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"stopped by {name} after step {step}; {where}; run the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def check_finite(rows: Iterable[tuple[int, Mapping[str, float]]], keys: tuple[str, ...] = ("loss", "grad_norm"),
                 ) -> None:
    """Raises NonFiniteError for the first (step, metrics) row whose ``keys`` are not all finite."""
    for step, metrics in rows:
        for key in keys:
            value = float(metrics[key])
            if not np.isfinite(value):
                raise NonFiniteError(step, key, value)


class SignalGuard:
    """Turns SIGTERM and SIGINT into a flag the training loop polls between steps.

    A step in flight is never cut short: the loop finishes it, saves, and raises ``Interrupted``. A second
    signal while the checkpoint is being written is remembered too, not acted on, so the save completes.
    Previous handlers come back on exit. Outside the main thread (where Python cannot install handlers) it
    does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; leave its handlers alone
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def poll(self, step: int) -> int | None:
        """The signal to stop on after ``step``, if one has arrived (a multi-process guard agrees on the step)."""
        del step
        return self.signum

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

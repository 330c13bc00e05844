"""Multi-process runs on JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program on its own devices: it decodes its share of each global batch, the
compiled steps communicate through XLA's collectives, orbax writes checkpoints collectively, and process 0
alone writes metrics, summaries and exports. This module decides who the processes are and starts the runtime:

* ``resolve(config)`` reads ``config.distributed`` (an explicit coordinator address, process count and id, as
  tools/launch_local.py passes them) or, when those are unset, the environment of a Slurm step launched by
  ``srun`` with more than one task. Anything else is a single-process run, for which nothing changes.
* ``initialize(processes, config)`` calls ``jax.distributed.initialize`` with bounded timeouts: a process that
  dies (kill -9, a lost node) stops sending heartbeats, and the runtime ends every other process within
  ``distributed.heartbeat_timeout`` seconds instead of leaving them blocked in a collective.
* ``signal_guard()`` makes SIGTERM/SIGINT stop all processes after the same step (see AgreedSignalGuard).

It must run before anything starts JAX's backends (``jax.devices()``, any computation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
import time
import types
from pathlib import Path
from typing import Callable, Mapping, Sequence

import ml_collections

from dailymae_jax import rendezvous
from dailymae_jax.errors import ConfigError
from dailymae_jax.guards import SignalGuard

log = logging.getLogger(__name__)

# srun sets these for every task of a step; sbatch's batch script alone has no SLURM_STEP_NUM_TASKS, so a
# plain `python -m dailymae_jax.main` inside an allocation stays a single-process run.
_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_STEP_NODELIST")
# The coordinator port of a Slurm job when none is configured: fixed per job, so every task computes the same
# one, and below Linux's ephemeral range (32768-60999) so it does not collide with outgoing connections.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 10000


class DistributedError(RuntimeError):
    """The processes of a run could not be started together; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Processes:
    """Who this process is in the run."""

    num_processes: int
    process_id: int
    coordinator_address: str | None  # host:port of process 0's coordination service; None when alone
    source: str  # "single", "config" or "slurm": where the values came from

    @property
    def is_main(self) -> bool:
        """Process 0 writes what a run leaves for people (metrics, summary, exports) and builds sample data."""
        return self.process_id == 0

    @property
    def multi(self) -> bool:
        return self.num_processes > 1


SINGLE = Processes(1, 0, None, "single")
_barrier_timeout = 300.0  # barrier()'s default: distributed.initialization_timeout once initialize() ran


def resolve(config: ml_collections.ConfigDict, environ: Mapping[str, str] | None = None) -> Processes:
    """This process's place in the run, from ``config.distributed`` or a Slurm step; no JAX involved.

    Raises ConfigError (one line naming the field) for values that cannot work together.
    """
    environ = os.environ if environ is None else environ
    d = config.get("distributed")
    if d is None:  # a config from before multi-process runs existed
        return SINGLE
    address = d.coordinator_address.strip()
    num, process_id = int(d.num_processes), int(d.process_id)
    if num < 0:
        raise ConfigError(f"distributed.num_processes {num} must be ≥ 0 (0: from Slurm, or a single process)")
    for key in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        if d[key] <= 0:
            raise ConfigError(f"distributed.{key} {d[key]} must be a positive number of seconds")
    slurm = _slurm_step(environ)
    if num == 0:
        if slurm is None or slurm[0] == 1:
            return SINGLE
        num = slurm[0]
        process_id = slurm[1] if process_id < 0 else process_id
        address = address or slurm[2]
        source = "slurm"
    elif num == 1:
        return SINGLE
    else:
        if process_id < 0 and slurm is not None:
            process_id = slurm[1]
        source = "config"
    if not 0 <= process_id < num:
        raise ConfigError(f"distributed.process_id {process_id} must lie in [0, {num}) for "
                          f"distributed.num_processes {num}")
    if not re.fullmatch(r"\S+:\d+", address):
        raise ConfigError(f"distributed.coordinator_address {address!r}: give host:port of process 0 "
                          f"(e.g. 10.0.0.1:20001) for a run of {num} processes")
    return Processes(num, process_id, address, source)


def _slurm_step(environ: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(task count, task id, coordinator host:port) of the srun step this process belongs to, if any."""
    if not all(environ.get(k) for k in _SLURM_VARIABLES):
        return None
    try:
        num, process_id, job = (int(environ[k]) for k in ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_JOB_ID"))
    except ValueError:
        return None
    port = _SLURM_PORT_BASE + job % _SLURM_PORT_SPAN
    return num, process_id, f"{first_host(environ['SLURM_STEP_NODELIST'])}:{port}"


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-004,7],cpu1' → 'gpu003' (zero padding kept)."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges, maxsplit=1)[0]


def wait_for_file(path: str | Path, processes: Processes, timeout: float, poll_seconds: float = 0.5) -> Path:
    """Blocks until ``path`` exists, which process 0 writes (atomically, by rename); raises after ``timeout``.

    Used for the sample dataset: only process 0 builds it (two processes writing one folder would race), and
    it does so before JAX starts, so the others cannot wait on a JAX barrier yet.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise DistributedError(
                f"process {processes.process_id} waited {timeout:.0f} s for {path}, which process 0 builds; "
                "the sample dataset must be on a filesystem all processes share (or set data.train_path)")
        time.sleep(poll_seconds)
    return path


def start(config: ml_collections.ConfigDict, build_data: Callable[[], object],
          sample_files: Sequence[Path] = ()) -> Processes:
    """Resolves the processes, has the data built, then starts the runtime; returns who we are.

    ``build_data`` (which writes the sample dataset if the config asks for it) runs before JAX starts its
    threads, because writing forks worker processes. Only process 0 builds the sample dataset; the others wait
    for its ``sample_files`` first, then find them built. Files the config names need no building, so every
    process just checks them. Every task starts this way.
    """
    processes = resolve(config)
    if not processes.is_main:
        for path in sample_files:
            wait_for_file(path, processes, timeout=config.distributed.initialization_timeout)
    build_data()
    initialize(processes, config)
    return processes


def initialize(processes: Processes, config: ml_collections.ConfigDict) -> None:
    """Starts JAX's distributed runtime for a multi-process run; does nothing for a single process.

    Must run before JAX's backends start. On CPU the cross-process collectives are gloo over TCP (JAX's
    default since 0.4.36; set here so an older default cannot silently leave processes unconnected).
    """
    if not processes.multi:
        return
    d = config.distributed
    log.info("joining %d-process run as process %d via %s (%s); a process that stops sending heartbeats "
             "ends the others within %s s", processes.num_processes, processes.process_id,
             processes.coordinator_address, processes.source, d.heartbeat_timeout)
    # Meet over a plain socket first (before JAX is even imported): JAX's runtime aborts (SIGABRT) when a
    # process never registers.
    (host, port), bind = _split(processes.coordinator_address), bind_address(processes.coordinator_address)
    try:
        rendezvous.meet(host, port, _split(bind)[0], processes.process_id, processes.num_processes,
                        float(d.initialization_timeout))
    except rendezvous.RendezvousError as error:
        raise DistributedError(_join_failure(processes, config, str(error))) from None
    import jax

    if _backends_started():
        raise DistributedError("jax.distributed must start before JAX's backends; something used JAX too early")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=processes.coordinator_address, num_processes=processes.num_processes,
            process_id=processes.process_id, coordinator_bind_address=bind,
            cluster_detection_method="deactivate",  # the values above are final; all local devices are ours
            initialization_timeout=int(d.initialization_timeout),
            heartbeat_timeout_seconds=int(d.heartbeat_timeout),
            shutdown_timeout_seconds=int(d.shutdown_timeout))
    except Exception as error:  # the runtime raises XlaRuntimeError with a multi-line gRPC status
        raise DistributedError(_join_failure(processes, config, " ".join(str(error).split())[:300])) from error
    global _barrier_timeout
    _barrier_timeout = float(d.initialization_timeout)
    _orbax_barriers_through_the_coordination_service()
    if not is_main():
        # One console log per run: the others report warnings and errors only.
        logging.getLogger().setLevel(logging.WARNING)
    _exit_at_once_on_uncaught_errors(processes, config)


def _join_failure(processes: Processes, config: ml_collections.ConfigDict, detail: str) -> str:
    return (f"process {processes.process_id} of {processes.num_processes} could not join the run at "
            f"{processes.coordinator_address} within distributed.initialization_timeout="
            f"{config.distributed.initialization_timeout} s{f' ({detail})' if detail else ''}; start all "
            "processes with the same coordinator address and process count, each with its own process id")


def _split(address: str) -> tuple[str, int]:
    """'host:port' or '[v6 address]:port' → (host without brackets, port)."""
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def bind_address(address: str) -> str:
    """Where process 0's coordination service listens: the coordinator address itself when its host is an IP
    address or ``localhost`` (tools/launch_local.py's 127.0.0.1 stays on loopback), else the address the host
    name resolves to. A name that resolves to a loopback address here (some /etc/hosts map a node's own name to
    127.0.1.1, while the other nodes resolve it to the real one) keeps JAX's default: every interface."""
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host.strip("[]"))
        return address
    if host == "localhost":
        return address
    try:
        resolved = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, UnicodeError):
        resolved = None
    if resolved is None or resolved.is_loopback:
        log.warning("coordinator host %s resolves to %s here: listening on every interface", host, resolved)
        return f"[::]:{port}"
    return f"{resolved}:{port}"


def _exit_at_once_on_uncaught_errors(processes: Processes, config: ml_collections.ConfigDict) -> None:
    """Makes an unexpected exception end this process without JAX's shutdown barrier.

    Errors that every process meets at the same step (a NaN, a signal, a config error) are caught by ``main``
    and exit normally: all processes reach the shutdown barrier together. An uncaught exception is this
    process's alone, and the others are likely blocked in a collective it will never join; waiting for them at
    the barrier would hang everyone for ``shutdown_timeout``. Leaving at once instead stops our heartbeats (or,
    on process 0, the coordination service), and the runtime ends the others within ``heartbeat_timeout``.
    """
    previous = sys.excepthook

    def hook(kind, error, trace) -> None:
        previous(kind, error, trace)  # the traceback
        detail = " ".join(str(error).split())[:300]
        print(f"error: process {processes.process_id} of {processes.num_processes} failed ({kind.__name__}: "
              f"{detail}); exiting at once, so that the others stop within distributed.heartbeat_timeout="
              f"{config.distributed.heartbeat_timeout} s (a failed collective usually means another process "
              "died first: see its log)", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)

    sys.excepthook = hook


def _orbax_barriers_through_the_coordination_service() -> None:
    """Makes orbax wait for the other processes through the coordination service, with its timeouts.

    By default orbax synchronises processes (creating the checkpoint directory, finishing a save) with a device
    collective; on CPU, XLA's first use of a collective gives up after 30 s if another process is late, which a
    slow loader warm-up on a busy machine exceeds. orbax reads the choice from an absl flag, so it can only be
    set once flags are parsed (always, under ``main``).
    """
    import orbax.checkpoint  # noqa: F401  (defines the flag)
    from absl import flags

    if flags.FLAGS.is_parsed():
        flags.FLAGS.experimental_orbax_use_distributed_barrier = True
    else:
        log.warning("absl flags are not parsed: orbax keeps its collective barriers (30 s skew limit on CPU)")


def barrier(name: str, timeout: float | None = None) -> None:
    """Waits until every process arrives here (through the coordination service, not a device collective).

    Called before the first training step: processes reach it after different amounts of loader warm-up and
    compilation, and XLA's CPU collectives give up on a peer after 30 s at their first use; past this barrier
    they start together. Does nothing in a single-process run.
    """
    from jax._src import distributed as jax_distributed  # the client has no public handle

    client = jax_distributed.global_state.client
    if client is None:
        return
    timeout = _barrier_timeout if timeout is None else timeout
    start = time.monotonic()
    try:
        client.wait_at_barrier(f"dailymae_{name}", timeout_in_ms=int(timeout * 1000))
    except Exception as error:
        detail = " ".join(str(error).split())[:200]
        raise DistributedError(f"process {jax_distributed.global_state.process_id} waited "
                               f"{time.monotonic() - start:.0f} s at {name!r} for the other processes ({detail})"
                               ) from error


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public API tells; jax.distributed.initialize checks the same

    return xla_bridge.backends_are_initialized()


def is_main() -> bool:
    """True in process 0 (and in every single-process run)."""
    import jax

    return jax.process_index() == 0


def signal_guard() -> SignalGuard:
    """The training loop's stop-on-signal guard: per process alone, agreed across processes otherwise."""
    import jax

    return AgreedSignalGuard() if jax.process_count() > 1 else SignalGuard()


class AgreedSignalGuard(SignalGuard):
    """Stops every process after the same step when any of them receives SIGTERM or SIGINT.

    Processes must stop together: one that saves and exits while another runs one more step leaves that
    step's collectives waiting forever. JAX's preemption service does the agreeing: it catches SIGTERM itself
    (so Python must not install a SIGTERM handler here), tells the other processes through the coordination
    service, and ``poll(step)`` turns true on all of them at the same step, the first one no process has yet
    passed. SIGINT (Ctrl-C) is re-raised as SIGTERM to enter the same protocol; it is still reported as SIGINT.
    """

    SIGNALS = (signal.SIGINT,)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def __enter__(self) -> "AgreedSignalGuard":
        from jax._src import distributed as jax_distributed

        if jax_distributed.global_state.preemption_sync_manager is None:
            raise DistributedError("JAX's preemption service is off (jax_enable_preemption_service); "
                                   "multi-process runs need it to stop all processes at the same step")
        super().__enter__()
        return self

    def poll(self, step: int) -> int | None:
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            return self.signum or signal.SIGTERM
        return None

"""Starts a multi-process run on this machine, each process with its own simulated CPU devices.

  python tools/launch_local.py --num-processes 2 --devices-per-process 4 -- \
      --config=configs/mae_demo.py --workdir=runs/demo_2x4

runs ``python -m dailymae_jax.main <main args>`` P times with ``--config.distributed.*`` pointing every process
at a coordinator on 127.0.0.1 (a free port), and ``JAX_PLATFORMS=cpu`` with D host-platform devices each: the
same program a multi-node GPU run executes, for testing on one machine. Every output line is prefixed with its
process, ``[p1] ...``. The launcher exits with 0 when all processes succeed, else with the code of the first process to fail.

It does not kill the other processes when one fails: JAX's runtime does that (within
``distributed.heartbeat_timeout`` seconds), and that is what a real cluster relies on. SIGINT and SIGTERM sent to
the launcher are passed on to every process as SIGTERM, which stops them all after the same step with a
checkpoint (see docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one process: CPU only, ``devices`` simulated devices (other XLA flags kept)."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # lines from several processes interleave as they happen
    return env


def process_command(main_args: list[str], *, process_id: int, num_processes: int, address: str) -> list[str]:
    return [sys.executable, "-m", "dailymae_jax.main", *main_args,
            f"--config.distributed.coordinator_address={address}",
            f"--config.distributed.num_processes={num_processes}",
            f"--config.distributed.process_id={process_id}"]


def _forward(stream: IO[str], prefix: str, out: IO[str]) -> None:
    for line in stream:
        out.write(prefix + line)
        out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help="-- then the arguments of dailymae_jax.main")
    args = parser.parse_args(argv)
    main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num-processes and --devices-per-process must be ≥ 1")
    if not main_args:
        parser.error("give the arguments of dailymae_jax.main after --, e.g. -- --config=configs/mae_demo.py "
                     "--workdir=runs/demo")
    address = f"127.0.0.1:{args.port or free_port()}"
    env = process_env(args.devices_per_process)

    processes: list[subprocess.Popen] = []
    forwarders: list[threading.Thread] = []
    for process_id in range(args.num_processes):
        cmd = process_command(main_args, process_id=process_id, num_processes=args.num_processes, address=address)
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, bufsize=1)
        processes.append(process)
        print(f"launch_local: process {process_id} of {args.num_processes} is pid {process.pid} "
              f"({args.devices_per_process} CPU devices, coordinator {address})", file=sys.stderr, flush=True)
        for stream, out in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
            thread = threading.Thread(target=_forward, args=(stream, f"[p{process_id}] ", out), daemon=True)
            thread.start()
            forwarders.append(thread)

    def pass_on(signum: int, frame: object) -> None:
        del signum, frame
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, pass_on)
    signal.signal(signal.SIGTERM, pass_on)

    failed: list[tuple[int, int]] = []  # (process, exit code) in the order the failures happened
    running = set(range(len(processes)))
    while running:
        for process_id in sorted(running):
            code = processes[process_id].poll()
            if code is not None:
                running.discard(process_id)
                if code != 0:
                    failed.append((process_id, code))
        time.sleep(0.1)
    for thread in forwarders:
        thread.join(timeout=5)
    if not failed:
        return 0
    described = ", then ".join(f"process {i} {_describe(c)}" for i, c in failed)
    print(f"launch_local: {described}", file=sys.stderr, flush=True)
    code = failed[0][1]
    return code if code > 0 else 128 - code  # killed by signal N → the shell's 128 + N


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


if __name__ == "__main__":
    sys.exit(main())

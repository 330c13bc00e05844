"""Every process of a run meets at process 0's coordinator address before JAX's runtime starts.

JAX's runtime aborts the process (SIGABRT, a C++ stack) when not all processes register within its timeout.
Meeting first, over a plain TCP socket on the same address and port, turns a process that never comes into a
``RendezvousError`` on every process that did: process 0 waits ``timeout`` seconds for the others' hellos, then
tells them to go on (or closes on them, naming the missing ones); each other process retries connecting until
the same deadline. The socket is closed before JAX's coordination service binds the port; the others close
their ends first, so the port is left free of lingering connections on process 0's side.
"""

from __future__ import annotations

import socket
import time

_GO = b"go\n"
_RETRY_SECONDS = 0.2


class RendezvousError(RuntimeError):
    """Not every process arrived in time; the message (one line) says which, or that process 0 never answered."""


def meet(host: str, port: int, bind_host: str, process_id: int, num_processes: int, timeout: float) -> None:
    """Returns once all ``num_processes`` processes have arrived; raises RendezvousError after ``timeout`` s.

    Process 0 listens on ``bind_host:port``; the others connect to ``host:port``."""
    deadline = time.monotonic() + timeout
    if process_id == 0:
        try:
            _gather(bind_host, port, num_processes, deadline, timeout)
        except OSError as error:  # the port is taken, or the address is not this machine's
            raise RendezvousError(f"cannot listen on {bind_host}:{port} ({error.strerror or error})") from None
    else:
        _arrive(host, port, process_id, num_processes, deadline, timeout)


def _gather(bind_host: str, port: int, num_processes: int, deadline: float, timeout: float) -> None:
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    arrived: dict[int, socket.socket] = {}
    with socket.create_server((bind_host, port), family=family, dualstack_ipv6=bind_host == "::") as server:
        try:
            while len(arrived) < num_processes - 1:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(1, num_processes)) - set(arrived))
                    raise RendezvousError(f"process{'es' if len(missing) > 1 else ''} "
                                          f"{', '.join(map(str, missing))} of {num_processes} did not arrive within "
                                          f"{timeout:g} s")
                server.settimeout(remaining)
                try:
                    connection, _ = server.accept()
                except socket.timeout:
                    continue
                peer = _hello(connection, num_processes, deadline)
                if peer is None or peer in arrived:
                    connection.close()  # a stray connection or a second process with the same id
                    continue
                arrived[peer] = connection
            for connection in arrived.values():
                connection.sendall(_GO)
            for connection in arrived.values():  # they close first: no TIME_WAIT on this side of the port
                connection.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    connection.recv(16)
                except OSError:
                    pass
        finally:
            for connection in arrived.values():
                connection.close()


def _hello(connection: socket.socket, num_processes: int, deadline: float) -> int | None:
    """The process id a newcomer announces (``"<id> <count>\\n"``), or None for anything else."""
    connection.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        words = connection.recv(64).decode("ascii").split()
        peer, count = int(words[0]), int(words[1])
    except (OSError, UnicodeError, ValueError, IndexError):
        return None
    return peer if count == num_processes and 0 < peer < num_processes else None


def _arrive(host: str, port: int, process_id: int, num_processes: int, deadline: float, timeout: float) -> None:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RendezvousError(f"no answer from process 0 at {host}:{port} within {timeout:g} s")
        try:
            connection = socket.create_connection((host, port), timeout=remaining)
        except OSError:
            time.sleep(min(_RETRY_SECONDS, max(0.0, deadline - time.monotonic())))
            continue
        with connection:
            connection.sendall(f"{process_id} {num_processes}\n".encode("ascii"))
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                answer = connection.recv(16)
            except OSError:
                answer = b""
        if answer == _GO:
            return
        raise RendezvousError(f"process 0 at {host}:{port} gave up waiting for the others within {timeout:g} s")

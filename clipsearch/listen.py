"""Several server processes on one port, each accepting from a listening socket of its own.

uvicorn's `--workers` hands every worker the same listening socket, and whichever worker
wakes first takes the next connection: with long-lived keep-alive clients the shares come
out unequal (256 connections over 4 workers measured 28 / 54 / 70 / 104), and the busiest
worker sets the tail latency. With SO_REUSEPORT (Linux) each worker listens on a socket of
its own bound to the same port, and the kernel spreads new connections over them by hash.

uvicorn's own supervisor (`Multiprocess`: restarts, health checks, signals) still runs the
workers: it is given a `WorkerSocket`, which every worker process turns into a fresh socket
of its own as it unpickles its arguments. The socket is bound then and listens only once
uvicorn starts serving it, after the app's start-up, so no connection waits on a worker that
is still loading its model.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

logger = logging.getLogger(__name__)


def reuse_port_available() -> bool:
    """SO_REUSEPORT spreads connections over the sockets only on Linux (BSDs and macOS have
    the option with other semantics)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


class WorkerSocket:
    """Stands in for the listening socket in uvicorn's supervisor: pickled into each worker
    process, it comes out there as a new socket bound to (host, port) with SO_REUSEPORT."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return bind_reuse_port, (self.host, self.port)


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening (asyncio's
    `create_server(sock=...)` calls listen() when it starts serving). Exits with uvicorn's
    start-up failure status when the port cannot be bound, so the supervisor stops instead
    of restarting the worker."""
    from uvicorn.config import STARTUP_FAILURE

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        logger.error("cannot bind %s:%d: %s", host, port, exc)
        sys.exit(STARTUP_FAILURE)
    return sock


def run_workers(config: Any) -> None:
    """Run `config.workers` server processes under uvicorn's supervisor, each with a listening
    socket of its own. The port is first bound here without SO_REUSEPORT, as uvicorn would
    (which fails if anything listens there already, and logs the address), then let go."""
    from uvicorn.supervisors import Multiprocess

    probe = config.bind_socket()
    port = probe.getsockname()[1]
    probe.close()
    Multiprocess(config, sockets=[WorkerSocket(config.host, port)]).run()  # type: ignore[list-item]


_TCP_STATES = {"ESTABLISHED": "01", "LISTEN": "0A"}


def port_sockets(port: int, state: str = "LISTEN") -> dict[int, set[int]]:
    """Linux diagnostics for tests and benchmarks: the TCP sockets on local `port` in `state`
    (by inode, from /proc/net/tcp*) and the pids of the processes holding each (from
    /proc/*/fd; processes this user cannot read are left out)."""
    code = _TCP_STATES[state]
    inodes: dict[int, set[int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == code:
                    inodes[int(cols[9])] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # gone, or not ours to read
            continue
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                inodes[int(link[8:-1])].add(int(pid))
    return inodes

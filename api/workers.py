"""`recsys serve --workers N`: uvicorn's worker supervisor, each worker listening on its own
``SO_REUSEPORT`` socket, so the kernel spreads new connections over the workers.

uvicorn's workers share the one socket the supervisor binds, and whichever worker wakes first
accepts every connection waiting: measured with 4 keep-alive ingestion clients, all 4 landed
on one of the 2 workers in most phases (one core did every write while the other only
followed the store). On the quiet 2-core machine (u1, 100 ratings a POST, 6 s phases, the two
alternated three times): one shared socket 70.1k, 74.5k (all 4 on one worker) and 87.9k
ratings/s (split); a socket per worker 84.1k, 95.2k (split) and 81.3k (the hash put all 4 on
one worker: with 4 connections that happens 1 time in 8). With a socket per worker, all bound to the same address with
``SO_REUSEPORT``, Linux picks the worker of each new connection from a hash of its addresses,
whoever is awake. Everything else is uvicorn's supervisor as it is: health checks, restarts
of dead workers, SIGHUP replacing the workers one at a time (a replacement binds its own
socket before the old worker goes), SIGTTIN / SIGTTOU.

Two servers must not share a port by accident (``SO_REUSEPORT`` would let a second
``recsys serve`` on the same port take half the connections): the supervisor first binds the
address without the option, which fails while anything listens there, and only then starts
the workers. Where ``SO_REUSEPORT`` does not balance (not Linux), the shared socket is kept.
"""

from __future__ import annotations

import logging
import socket
import sys

from uvicorn import Config
from uvicorn.supervisors import multiprocess

#: whether per-worker sockets spread connections here (Linux balances SO_REUSEPORT sockets;
#: other systems accept the option without balancing, or lack it)
BALANCES = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (IPv6 when ``host`` has a colon), inheritable,
    with ``SO_REUSEADDR`` and, with ``reuse_port``, ``SO_REUSEPORT``; the server listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class PortInUseError(RuntimeError):
    """The address `recsys serve` was asked to listen on is taken."""


def check_free(host: str, port: int) -> None:
    """`PortInUseError` naming the address when something listens on it already (a bind
    without ``SO_REUSEPORT`` fails even against sockets that have it)."""
    try:
        listening_socket(host, port, reuse_port=False).close()
    except OSError as exc:
        raise PortInUseError(f"cannot listen on {host}:{port}: {exc.strerror} (another server there?)") from None


class OwnSocketProcess(multiprocess.Process):
    """A uvicorn worker that binds its own ``SO_REUSEPORT`` socket in the child process."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # runs in the worker
        own = listening_socket(self.config.host, self.config.port, reuse_port=True)
        super().target([own])


def run_workers(config: Config) -> None:
    """Run ``config.workers`` worker processes under uvicorn's supervisor until it is told to
    stop, each on its own ``SO_REUSEPORT`` socket where that balances (module docstring),
    else on one shared socket as ``uvicorn.run`` would; so also for port 0 (any free port:
    each worker would get its own)."""
    if not BALANCES or config.port == 0:
        multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    check_free(config.host, config.port)
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d, a socket per worker (Press CTRL+C to "
                                            "quit)", config.host, config.port)
    # uvicorn's supervisor makes its workers (first ones, restarts, SIGHUP replacements, SIGTTIN
    # additions) from its module's `Process`: in this supervisor process, ours
    multiprocess.Process = OwnSocketProcess
    multiprocess.Multiprocess(config, sockets=[]).run()


__all__ = ["BALANCES", "OwnSocketProcess", "PortInUseError", "check_free", "listening_socket", "run_workers"]

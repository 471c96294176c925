"""`api.workers`: a listening socket per `recsys serve` worker, so that the kernel spreads
the clients' connections over the workers, and never a port shared by accident."""

from __future__ import annotations

import socket
import threading

import pytest

from api.workers import BALANCES, PortInUseError, check_free, listening_socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not BALANCES, reason="SO_REUSEPORT balances connections on Linux only")
def test_connections_are_spread_over_sockets_that_share_the_port():
    port = _free_port()
    workers = [listening_socket("127.0.0.1", port, reuse_port=True) for _ in range(2)]
    accepted = [0, 0]

    def accept(k: int) -> None:
        workers[k].settimeout(0.5)
        while True:
            try:
                conn, _ = workers[k].accept()
            except (TimeoutError, OSError):
                return
            accepted[k] += 1
            conn.close()

    for w in workers:
        w.listen(128)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
    threads = [threading.Thread(target=accept, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    for w in workers:
        w.close()
    assert sum(accepted) == 64
    assert min(accepted) > 0  # all 64 on one socket by chance: probability 2^-63


def test_a_port_something_listens_on_is_refused_naming_the_address():
    port = _free_port()
    taken = listening_socket("127.0.0.1", port, reuse_port=BALANCES)
    taken.listen(1)
    try:
        with pytest.raises(PortInUseError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_free("127.0.0.1", port)
    finally:
        taken.close()
    check_free("127.0.0.1", port)  # free again

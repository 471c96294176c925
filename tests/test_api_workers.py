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


class _RecordingSupervisor:
    """Stands in for uvicorn's `Multiprocess`: records what it was given, starts nothing."""

    runs: list = []

    def __init__(self, config, sockets) -> None:
        self.config, self.sockets = config, sockets

    def run(self) -> None:
        from uvicorn.supervisors import multiprocess

        _RecordingSupervisor.runs.append((self.config.port, [s.getsockname()[1] for s in self.sockets],
                                          multiprocess.Process))
        for s in self.sockets:
            s.close()


@pytest.fixture
def recording_supervisor(monkeypatch):
    from uvicorn.supervisors import multiprocess

    _RecordingSupervisor.runs = []
    monkeypatch.setattr(multiprocess, "Multiprocess", _RecordingSupervisor)
    monkeypatch.setattr(multiprocess, "Process", multiprocess.Process)  # restored after the test
    return _RecordingSupervisor.runs


def test_workers_bind_their_own_sockets_except_on_port_zero(recording_supervisor):
    from uvicorn import Config

    from api.workers import OwnSocketProcess, run_workers

    port = _free_port()
    run_workers(Config("api.app:create_app", factory=True, host="127.0.0.1", port=port, workers=2))
    run_workers(Config("api.app:create_app", factory=True, host="127.0.0.1", port=0, workers=2))
    (first_port, first_sockets, first_process), (zero_port, zero_sockets, _) = recording_supervisor
    if BALANCES:  # no shared socket: each worker process binds its own
        assert first_port == port and first_sockets == [] and first_process is OwnSocketProcess
    else:
        assert first_sockets == [port]
    assert zero_port == 0 and len(zero_sockets) == 1 and zero_sockets[0] != 0  # any free port, one for all

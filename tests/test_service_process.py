"""The service as users run it: `recsys serve` in its own process(es), spoken to over HTTP;
the durability promise, checked by SIGKILL while a client is ingesting; several processes on
one store (two servers, or one server with two workers) agreeing on every acknowledged rating;
a chunked oversize body refused over the wire; a malformed artefact refused at startup with a
one-line message."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest

from recsys.artefact import save_artefact
from recsys.models import build_model
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    train = make_ratings(n_users=40, n_items=30, n=700)
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, {"embedding_size": 8, "n_blocks": 2})
    Trainer(TrainConfig(epochs=10, progress=False)).fit(model, train)
    return save_artefact(tmp_path_factory.mktemp("art") / "mf", model, train)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, db, workers: int = 1, **env_settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RECSYS_API_KEY": KEY, **env_settings}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recsys.cli", "serve", "--model", str(model_dir), "--db", str(db),
             "--port", str(self.port), "--workers", str(workers), "--quiet"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("server did not become ready in 60 s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def test_real_server_answers_over_http(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "ratings.db")
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.get("/health").json() == {"status": "ok"}
            pred = http.get("/v1/predict", params={"user": "0", "item": "1"}).json()
            assert pred["path"] == "model"
            res = http.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "web", "item": "1", "rating": 4}]})
            assert res.status_code == 200
            assert http.get("/v1/users/web").json()["n_ratings"] == 1
            # SIGHUP reloads the model (replaying the store) instead of ending the process
            server.proc.send_signal(signal.SIGHUP)
            time.sleep(1.5)
            assert server.proc.poll() is None
            assert http.get("/v1/users/web").json()["n_ratings"] == 1
    finally:
        server.kill()


def test_sigkill_loses_no_acknowledged_rating_and_duplicates_none(model_dir, tmp_path):
    db = tmp_path / "ratings.db"
    server = Server(model_dir, db)
    acked: list[str] = []
    stop = threading.Event()

    def ingest() -> None:
        n = 0
        with httpx.Client(base_url=server.url, timeout=5) as http:
            while not stop.is_set():
                event = f"e{n}"
                body = {"ratings": [{"user": f"user-{n % 7}", "item": str(n % 30), "rating": 1 + n % 5,
                                     "event_id": event}]}
                try:
                    if http.post("/v1/ratings", headers=AUTH, json=body).status_code == 200:
                        acked.append(event)
                except httpx.HTTPError:
                    return  # the server died mid-request: this one was never acknowledged
                n += 1

    client = threading.Thread(target=ingest)
    client.start()
    deadline = time.monotonic() + 20
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.kill()  # SIGKILL while the client is still sending
    stop.set()
    client.join(timeout=10)
    assert len(acked) >= 20, "the client got too few acknowledgements to test anything"

    with sqlite3.connect(db) as conn:
        stored = [e for (e,) in conn.execute("SELECT event_id FROM ratings")]
    assert set(acked) <= set(stored), "an acknowledged rating was lost"
    assert len(stored) == len(set(stored)), "a rating was stored twice"

    server = Server(model_dir, db)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            # retrying what the client sent is harmless: event ids make it idempotent
            def sent(n: int) -> dict:
                return {"user": f"user-{n % 7}", "item": str(n % 30), "rating": 1 + n % 5, "event_id": f"e{n}"}

            retry = {"ratings": [sent(int(e[1:])) for e in acked[:50]]}
            res = http.post("/v1/ratings", headers=AUTH, json=retry).json()
            assert (res["accepted"], res["duplicates"]) == (0, len(retry["ratings"]))
            per_user = {f"user-{k}": 0 for k in range(7)}
            for e in stored:
                per_user[f"user-{int(e[1:]) % 7}"] += 1
            for user, count in per_user.items():
                assert http.get(f"/v1/users/{user}").json()["n_ratings"] == count  # all replayed and applied
    finally:
        server.kill()


def write_concurrently(urls: list[str], writers: int = 8, per_writer: int = 20) -> list[int]:
    """``writers`` threads, each sending ``per_writer`` single-rating POSTs for user "shared"
    over a fresh connection each (so every worker gets some), alternating between ``urls``;
    returns every acknowledged seq."""
    acked: list[int] = []
    failures: list[str] = []

    def write(w: int) -> None:
        for k in range(per_writer):
            url = urls[(w + k) % len(urls)]
            body = {"ratings": [{"user": "shared", "item": str((w + k) % 30), "rating": 3, "event_id": f"{w}-{k}"}]}
            res = httpx.post(f"{url}/v1/ratings", headers=AUTH, json=body, timeout=30)
            if res.status_code != 200:
                failures.append(res.text)
                continue
            acked.append(res.json()["ratings"][0]["seq"])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    return acked


def test_two_servers_on_one_store_converge_on_every_acknowledged_rating(model_dir, tmp_path):
    """Two `recsys serve` processes share one SQLite store: writes to both are stored once
    each, in one gapless log; each server answers a read with min_seq at once, and without
    it converges by its follower (polling every 50 ms)."""
    db = tmp_path / "ratings.db"
    a, b = Server(model_dir, db), Server(model_dir, db)
    try:
        acked = write_concurrently([a.url, b.url])
        assert sorted(acked) == list(range(1, 161))
        for server in (a, b):
            info = httpx.get(f"{server.url}/v1/users/shared", params={"min_seq": 160}, timeout=10).json()
            assert info["n_live_ratings"] == 160
        # one more write through a; b sees it by its follower alone
        seq = httpx.post(f"{a.url}/v1/ratings", headers=AUTH, timeout=10, json={"ratings": [
            {"user": "late", "item": "1", "rating": 5}]}).json()["ratings"][0]["seq"]
        start = time.monotonic()
        while httpx.get(f"{b.url}/v1/users/late", timeout=10).status_code == 404:
            assert time.monotonic() - start < 10, "the other server never applied the write"
            time.sleep(0.005)
        assert httpx.get(f"{b.url}/ready", timeout=10).json()["applied_seq"] >= seq
        assert httpx.get(f"{a.url}/v1/users/shared/recommendations", params={"k": 5}).status_code == 200
    finally:
        a.kill()
        b.kill()


def test_a_server_with_two_workers_applies_every_acknowledged_rating_in_each_worker(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "ratings.db", workers=2)
    try:
        acked = write_concurrently([server.url])
        assert sorted(acked) == list(range(1, 161))
        count_by_worker: dict[int, int] = {}
        deadline = time.monotonic() + 30
        while len(count_by_worker) < 2:  # fresh connections until both workers have answered
            assert time.monotonic() < deadline, "only one worker ever answered"
            with httpx.Client(base_url=server.url, timeout=10) as http:  # one connection: one worker
                n = http.get("/v1/users/shared", params={"min_seq": max(acked)}).json()["n_live_ratings"]
                count_by_worker[http.get("/ready").json()["worker_pid"]] = n
        assert set(count_by_worker.values()) == {160}
        # each worker listens on its own socket: a second server on the port is refused, in one line
        second = subprocess.run([sys.executable, "-m", "recsys.cli", "serve", "--model", str(model_dir), "--db",
                                 str(tmp_path / "other.db"), "--port", str(server.port), "--workers", "2"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        # a reload answered by one worker is followed by the other: both end on generation 2
        res = httpx.post(f"{server.url}/v1/admin/reload", headers=AUTH, json={}, timeout=60)
        assert res.status_code == 200
        deadline = time.monotonic() + 30
        by_worker: dict[int, int] = {}
        while len(by_worker) < 2 or set(by_worker.values()) != {2}:
            assert time.monotonic() < deadline, by_worker
            ready = httpx.get(f"{server.url}/ready", timeout=10).json()
            by_worker[ready["worker_pid"]] = ready["generation"]
    finally:
        server.kill()
    # the supervisor was SIGKILLed (no chance to stop its workers): they stop by themselves
    deadline = time.monotonic() + 30
    while alive := [pid for pid in by_worker if _running(pid)]:
        assert time.monotonic() < deadline, f"workers {alive} outlived their supervisor"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_chunked_body_over_the_limit_is_refused_over_the_wire(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "ratings.db", RECSYS_MAX_BODY_BYTES="2000")
    try:
        def chunks():
            yield b'{"ratings": ['
            for _ in range(2000):
                yield b'{"user": "c", "item": "1", "rating": 3},'
            yield b'{"user": "c", "item": "1", "rating": 3}]}'

        res = httpx.post(f"{server.url}/v1/ratings", headers=AUTH, content=chunks(), timeout=10)
        assert res.status_code == 413 and "over 2000 bytes" in res.json()["detail"]
        res = httpx.post(f"{server.url}/v1/ratings", content=chunks(), timeout=10)
        assert res.status_code == 401  # no key: refused before the body
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/ready", timeout=10).json()["applied_seq"] == 0  # nothing stored
    finally:
        server.kill()


def test_a_malformed_artefact_stops_serve_with_one_line(model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "ids.json").write_text('{"users": 5, "items": null}')  # JSON, but not ids
    res = subprocess.run([sys.executable, "-m", "recsys.cli", "serve", "--model", str(broken), "--db",
                          str(tmp_path / "db"), "--port", str(free_port())], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("recsys: error:") and str(broken) in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

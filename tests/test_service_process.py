"""The service as users run it: `recsys serve` in its own process, spoken to over HTTP; and
the durability promise, checked by SIGKILL while a client is ingesting."""

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
    def __init__(self, model_dir, db) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RECSYS_API_KEY": KEY}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recsys.cli", "serve", "--model", str(model_dir), "--db", str(db),
             "--port", str(self.port), "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
            # retrying everything the client sent is harmless: event ids make it idempotent
            retry = {"ratings": [{"user": "user-0", "item": "0", "rating": 1, "event_id": e} for e in acked[:50]]}
            assert http.post("/v1/ratings", headers=AUTH, json=retry).json()["accepted"] == 0
            per_user = {f"user-{k}": 0 for k in range(7)}
            for e in stored:
                per_user[f"user-{int(e[1:]) % 7}"] += 1
            for user, count in per_user.items():
                assert http.get(f"/v1/users/{user}").json()["n_ratings"] == count  # all replayed and applied
    finally:
        server.kill()

"""The service under concurrent writers: every acknowledged rating applied exactly once, in
the store's order, readable at once by the writer (read-your-writes); two services on one
store (two workers) converge, and a read with ``min_seq`` sees a write made through the other
at once."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import Settings, create_app
from api.service import Service, StaleRead
from recsys.artefact import save_artefact
from recsys.models import DEFAULT_RANKER, build_model
from recsys.recommender import Recommender
from recsys.store import NewRating, RatingStore
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
WRITERS, PER_WRITER = 8, 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """MF with the default ranker beside it: both learn every ingested rating."""
    train = make_ratings(n_users=40, n_items=30, n=700)
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, {"embedding_size": 8, "n_blocks": 2})
    Trainer(TrainConfig(epochs=10, progress=False)).fit(model, train)
    ranker = build_model(DEFAULT_RANKER, train.n_users, train.n_items, train.rating_scale)
    ranker.fit(train)
    return save_artefact(tmp_path_factory.mktemp("art") / "mf", model, train, ranker=ranker)


def run_writers(post, user_of) -> None:
    """WRITERS threads, each sending PER_WRITER single-rating POSTs; every one must be
    acknowledged and readable by its writer right after (read-your-writes)."""
    errors: list[str] = []

    def write(w: int) -> None:
        for k in range(PER_WRITER):
            user = user_of(w, k)
            res = post(user, str((w * 7 + k) % 30), float(1 + (w + k) % 5), f"{w}-{k}")
            if res is not None:
                errors.append(res)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def rebuilt_from_store(model_dir, db) -> Recommender:
    with RatingStore(db) as store:
        rec = Recommender.load(model_dir, warm=False)
        rec.replay(store.replay(), store.users())
    return rec


def test_concurrent_single_rating_writers_are_all_applied_once_in_store_order(model_dir, tmp_path):
    """8 clients x 20 single-rating POSTs for one new user (the case that used to lose 20-40
    of 160): the user, the store, the applied cursor and a model rebuilt from the store agree
    exactly, and the live model's rows are the store's rows in seq order."""
    db = tmp_path / "db"
    with TestClient(create_app(Settings(model=model_dir, db=db, api_key=KEY))) as c:
        def post(user, item, rating, event):
            res = c.post("/v1/ratings", headers=AUTH,
                         json={"ratings": [{"user": user, "item": item, "rating": rating, "event_id": event}]})
            if res.status_code != 200:
                return f"{res.status_code} {res.text}"
            seq = res.json()["ratings"][0]["seq"]
            info = c.get("/v1/users/newcomer").json()
            if info["n_live_ratings"] < 1 or c.app.state.service.applied_seq < seq:
                return f"acknowledged seq {seq} is not applied yet"
            return None

        run_writers(post, lambda w, k: "newcomer")
        total = WRITERS * PER_WRITER
        assert c.get("/v1/users/newcomer").json()["n_live_ratings"] == total
        assert c.get("/ready").json()["applied_seq"] == total
        recs = c.get("/v1/users/newcomer/recommendations", params={"k": 30}).json()["items"]
        live = c.app.state.service.live()
        n_train = len(live.train)
        live_rows = (live.ratings.users[n_train:], live.ratings.items[n_train:], live.ratings.values[n_train:])
        pairs = [("newcomer", str(i)) for i in range(30)]
        live_preds = [p.rating for p in live.predict_many(pairs)]
    with RatingStore(db) as store:
        stored = list(store.replay())
    assert [r.seq for r in stored] == list(range(1, total + 1))
    rated = {r.item for r in stored}
    assert not rated & {p["item"] for p in recs}  # nothing the user rated is recommended
    rebuilt = rebuilt_from_store(model_dir, db)
    assert rebuilt.n_ingested == total
    for live_array, rebuilt_array in zip(live_rows, (rebuilt.ratings.users[n_train:], rebuilt.ratings.items[n_train:],
                                                     rebuilt.ratings.values[n_train:]), strict=True):
        np.testing.assert_array_equal(live_array, rebuilt_array)
    # a new user is a fold-in (a solve over all their ratings): same ratings, same prediction
    np.testing.assert_allclose(live_preds, [p.rating for p in rebuilt.predict_many(pairs)], atol=1e-6)


def test_concurrent_writers_of_many_users_match_the_store_per_user(model_dir, tmp_path):
    """Trained users (online SGD) and new users (fold-in) written at once: per-user counts
    are the store's, the live rows are the store's in seq order."""
    db = tmp_path / "db"
    with TestClient(create_app(Settings(model=model_dir, db=db, api_key=KEY))) as c:
        def post(user, item, rating, event):
            res = c.post("/v1/ratings", headers=AUTH,
                         json={"ratings": [{"user": user, "item": item, "rating": rating, "event_id": event}]})
            return None if res.status_code == 200 else f"{res.status_code} {res.text}"

        run_writers(post, lambda w, k: str(w) if k % 2 else f"new-{k % 3}")
        with RatingStore(db) as store:
            stored = list(store.replay())
        per_user: dict[str, int] = {}
        for r in stored:
            per_user[r.user] = per_user.get(r.user, 0) + 1
        for user, n in per_user.items():
            assert c.get(f"/v1/users/{user}").json()["n_live_ratings"] == n, user
        live = c.app.state.service.live()
        n_train = len(live.train)
        assert [live.user_ids.raw(int(u)) for u in live.ratings.users[n_train:]] == [r.user for r in stored]
        assert [live.item_ids.raw(int(i)) for i in live.ratings.items[n_train:]] == [r.item for r in stored]


def test_two_services_on_one_store_converge_and_min_seq_reads_see_the_other_s_writes(model_dir, tmp_path):
    """Two `Service`s on one store stand for two workers: what one accepts the other applies
    by its follower within one poll interval plus the apply, or at once for ``wait_for``."""
    settings = dict(model=model_dir, db=tmp_path / "db", api_key=KEY, follow_interval_s=0.05)
    a, b = Service(Settings(**settings)), Service(Settings(**settings))
    a.open()
    b.open()
    try:
        b._stop.set()  # b's follower is stopped: only wait_for can bring it up to date
        b._follower.join()
        stored = a.ingest([NewRating("via-a", "1", 4.0), NewRating("via-a", "2", 2.0)])
        assert b.live().last_seq == 0
        b.wait_for(stored[-1].seq)
        assert b.live().user_info("via-a").n_live_ratings == 2
        with pytest.raises(StaleRead, match="not committed"):
            b.wait_for(stored[-1].seq + 10)
        assert b.create_user("empty-via-b")
        # a's follower runs: a write through b (and a user created through b) reaches a
        b.ingest([NewRating("via-b", "3", 5.0)])
        deadline = time.monotonic() + 10
        while a.live().last_seq < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.live().user_info("via-b").n_live_ratings == 1
        deadline = time.monotonic() + 10
        while "empty-via-b" not in a.live().user_ids and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.live().user_info("empty-via-b").path == "fallback"
        assert not a.create_user("empty-via-b")
        assert a.live().last_seq == b.live().last_seq == 3
    finally:
        a.close()
        b.close()


def test_a_reload_swaps_in_a_model_caught_up_with_writes_made_while_it_loaded(model_dir, tmp_path):
    service = Service(Settings(model=model_dir, db=tmp_path / "db", api_key=KEY))
    service.open()
    try:
        stop = threading.Event()
        sent: list[int] = []

        def write() -> None:
            k = 0
            while not stop.is_set():
                sent.append(service.ingest([NewRating("during-reload", str(k % 30), 3.0)])[0].seq)
                k += 1

        writer = threading.Thread(target=write)
        writer.start()
        for _ in range(2):
            service.reload()
        stop.set()
        writer.join()
        live = service.live()
        assert live.last_seq == sent[-1] and live.user_info("during-reload").n_live_ratings == len(sent)
    finally:
        service.close()


def wait_until(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.01)


def test_a_reload_through_one_service_is_followed_by_the_other_and_by_a_restart(model_dir, tmp_path):
    import shutil

    other = tmp_path / "retrained"
    shutil.copytree(model_dir, other)
    settings = dict(model=model_dir, db=tmp_path / "db", api_key=KEY)
    a, b = Service(Settings(**settings)), Service(Settings(**settings))
    a.open()
    b.open()
    try:
        a.ingest([NewRating("kept", "1", 4.0)])
        a.reload(other)
        assert a.generation == 1 and a.settings.model == other
        wait_until(lambda: b.generation == 1 and b.settings.model == other)
        assert b.live().user_info("kept").n_live_ratings == 1  # the followed model replayed the store
        # a chosen artefact that cannot be loaded: both keep serving, count it and move on
        with RatingStore(tmp_path / "db") as store:
            store.choose_model(str(tmp_path / "missing"))
        wait_until(lambda: a.generation == b.generation == 2)
        assert a.settings.model == b.settings.model == other
        assert a.live().predict("kept", "2").rating is not None
    finally:
        a.close()
        b.close()
    restarted = Service(Settings(**settings))  # e.g. a worker uvicorn restarts: the latest loadable choice
    with RatingStore(tmp_path / "db") as store:
        store.choose_model(str(other))
    restarted.open()
    try:
        assert restarted.settings.model == other and restarted.generation == 3
    finally:
        restarted.close()

"""The REST service through FastAPI's TestClient: every route, every error status, cold start,
idempotent durable ingestion, restart replay and hot reload."""

from __future__ import annotations

import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from api.app import Settings, create_app
from recsys.artefact import save_artefact
from recsys.models import build_model
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    train = make_ratings(n_users=40, n_items=30, n=700)
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale,
                        {"embedding_size": 8, "n_blocks": 2})
    result = Trainer(TrainConfig(epochs=20, progress=False)).fit(model, train)
    path = tmp_path_factory.mktemp("art") / "mf"
    save_artefact(path, model, train, {"training": {"train_config": {"learning_rate": 0.015, "lr_decay": 0.95,
                                                                      "epochs": len(result.history)}}})
    return path


def make_client(model_dir, db, **kw) -> TestClient:
    return TestClient(create_app(Settings(model=model_dir, db=db, api_key=KEY, **kw)))


@pytest.fixture
def client(model_dir, tmp_path):
    with make_client(model_dir, tmp_path / "ratings.db") as c:
        yield c


def test_health_ready_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready == {"model": True, "store": True, "applied_seq": 0, "skipped": 0, "artefact": ready["artefact"],
                     "generation": 0, "worker_pid": os.getpid()} and ready["artefact"].endswith("mf")
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/v1/predict", "/v1/users/{user}/recommendations", "/v1/ratings", "/v1/users",
                  "/v1/users/{user}", "/health", "/ready", "/metrics"):
        assert route in paths


def test_predict_one_known_pair(client):
    res = client.get("/v1/predict", params={"user": "0", "item": "1"})
    assert res.status_code == 200
    body = res.json()
    assert body["path"] == "model" and 1 <= body["rating"] <= 5


def test_predict_batch_and_size_limit(model_dir, tmp_path):
    with make_client(model_dir, tmp_path / "db", max_batch=3) as c:
        res = c.post("/v1/predict", json={"pairs": [{"user": "0", "item": "1"}, {"user": "nobody", "item": "2"}]})
        assert res.status_code == 200
        preds = res.json()["predictions"]
        assert [p["path"] for p in preds] == ["model", "fallback"]
        too_many = {"pairs": [{"user": "0", "item": "1"}] * 4}
        assert c.post("/v1/predict", json=too_many).status_code == 422  # the schema says at most 3


def test_unknown_item_is_404_with_message(client):
    res = client.get("/v1/predict", params={"user": "0", "item": "no-such-item"})
    assert res.status_code == 404 and "unknown item id 'no-such-item'" in res.json()["detail"]


def test_bad_input_is_422_never_500(client):
    assert client.get("/v1/predict", params={"user": "0"}).status_code == 422
    assert client.get("/v1/predict", params={"user": "0", "item": "1", "explain": -1}).status_code == 422
    assert client.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "0", "item": "1"}]}).status_code == 422
    bad_scale = {"ratings": [{"user": "0", "item": "1", "rating": 9}]}
    res = client.post("/v1/ratings", headers=AUTH, json=bad_scale)
    assert res.status_code == 422 and "outside the scale" in res.json()["detail"]
    assert client.post("/v1/ratings", headers=AUTH, content=b"{not json").status_code == 422


def test_recommendations_exclude_rated_items(client, model_dir):
    from recsys.artefact import load_artefact

    train = load_artefact(model_dir).train
    u = train.user_ids.index("0")
    rated = {train.item_ids.raw(i) for i in train.items[train.users == u]}
    res = client.get("/v1/users/0/recommendations", params={"k": 5})
    items = [p["item"] for p in res.json()["items"]]
    assert res.status_code == 200 and len(items) == 5 and not rated & set(items)
    assert client.get("/v1/users/0/recommendations", params={"k": 1000}).status_code == 422  # k <= max_k


def test_writes_need_the_key(client):
    body = {"ratings": [{"user": "0", "item": "1", "rating": 4}]}
    assert client.post("/v1/ratings", json=body).status_code == 401
    assert client.post("/v1/ratings", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.post("/v1/users", json={"user": "x"}).status_code == 401


def test_writes_refused_when_no_key_is_configured(model_dir, tmp_path):
    with TestClient(create_app(Settings(model=model_dir, db=tmp_path / "db"))) as c:
        res = c.post("/v1/users", json={"user": "x"}, headers=AUTH)
        assert res.status_code == 403 and "RECSYS_API_KEY" in res.json()["detail"]


def test_read_auth_can_be_required(model_dir, tmp_path):
    with make_client(model_dir, tmp_path / "db", read_auth=True) as c:
        assert c.get("/v1/predict", params={"user": "0", "item": "1"}).status_code == 401
        assert c.get("/v1/predict", params={"user": "0", "item": "1"}, headers=AUTH).status_code == 200


def test_cold_start_user_goes_from_fallback_to_fold_in(client):
    assert client.post("/v1/users", json={"user": "newbie"}, headers=AUTH).status_code == 201
    assert client.post("/v1/users", json={"user": "newbie"}, headers=AUTH).status_code == 200
    info = client.get("/v1/users/newbie").json()
    assert info == {"user": "newbie", "known": False, "n_ratings": 0, "n_training_ratings": 0,
                    "n_live_ratings": 0, "path": "fallback"}
    before = client.get("/v1/predict", params={"user": "newbie", "item": "3"}).json()
    assert before["path"] == "fallback"
    res = client.post("/v1/ratings", headers=AUTH, json={"ratings": [
        {"user": "newbie", "item": "1", "rating": 5}, {"user": "newbie", "item": "2", "rating": 1}]})
    assert res.status_code == 200 and res.json()["accepted"] == 2
    after = client.get("/v1/predict", params={"user": "newbie", "item": "3"}).json()
    assert after["path"] == "fold-in" and after["rating"] != before["rating"]
    assert client.get("/v1/users/newbie").json()["n_ratings"] == 2
    recs = client.get("/v1/users/newbie/recommendations", params={"k": 3}).json()
    assert recs["path"] == "fold-in" and {"1", "2"}.isdisjoint(p["item"] for p in recs["items"])


def test_unknown_user_reads(client):
    assert client.get("/v1/users/ghost").status_code == 404
    recs = client.get("/v1/users/ghost/recommendations", params={"k": 2}).json()
    assert recs["path"] == "fallback" and len(recs["items"]) == 2


def test_known_user_learns_online(client):
    before = client.get("/v1/predict", params={"user": "0", "item": "5"}).json()["rating"]
    client.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "0", "item": "5", "rating": 5}] * 3})
    after = client.get("/v1/predict", params={"user": "0", "item": "5"}).json()
    assert after["path"] == "online" and after["rating"] > before


def test_event_ids_make_retries_idempotent(client):
    body = {"ratings": [{"user": "u-retry", "item": "1", "rating": 4, "event_id": "evt-1"}]}
    first = client.post("/v1/ratings", headers=AUTH, json=body).json()
    second = client.post("/v1/ratings", headers=AUTH, json=body).json()
    assert (first["accepted"], first["duplicates"]) == (1, 0)
    assert (second["accepted"], second["duplicates"]) == (0, 1)
    assert second["ratings"][0]["seq"] == first["ratings"][0]["seq"]
    assert client.get("/v1/users/u-retry").json()["n_ratings"] == 1


def test_restart_replays_the_store(model_dir, tmp_path):
    db = tmp_path / "ratings.db"
    with make_client(model_dir, db) as c:
        c.post("/v1/users", json={"user": "lonely"}, headers=AUTH)
        c.post("/v1/ratings", headers=AUTH, json={"ratings": [
            {"user": "fresh", "item": "1", "rating": 5}, {"user": "fresh", "item": "4", "rating": 2}]})
        before = c.get("/v1/predict", params={"user": "fresh", "item": "3"}).json()
    with make_client(model_dir, db) as c:
        after = c.get("/v1/predict", params={"user": "fresh", "item": "3"}).json()
        assert after == before
        assert c.get("/v1/users/fresh").json()["n_ratings"] == 2
        assert c.get("/v1/users/lonely").json()["path"] == "fallback"


def test_reload_swaps_the_model_and_keeps_live_ratings(client, model_dir):
    client.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "r1", "item": "1", "rating": 5}]})
    res = client.post("/v1/admin/reload", headers=AUTH, json={})
    assert res.status_code == 200 and res.json()["replayed"] >= 1
    assert client.get("/v1/users/r1").json()["n_ratings"] == 1
    bad = client.post("/v1/admin/reload", headers=AUTH, json={"model": str(model_dir) + "-missing"})
    assert bad.status_code == 404 and "no such model directory" in bad.json()["detail"]
    assert client.get("/v1/predict", params={"user": "0", "item": "1"}).status_code == 200


def test_metrics_count_requests_and_ingestion(client):
    client.get("/v1/predict", params={"user": "0", "item": "1"})
    client.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "m", "item": "1", "rating": 3}]})
    text = client.get("/metrics").text
    assert 'recsys_requests_total{route="/v1/predict",status="200"}' in text
    assert "recsys_request_seconds_bucket" in text
    assert "recsys_ingested_ratings_total 1.0" in text


def test_oversized_body_is_413(model_dir, tmp_path):
    with make_client(model_dir, tmp_path / "db", max_body_bytes=100) as c:
        body = {"ratings": [{"user": "0", "item": "1", "rating": 4}] * 10}
        assert c.post("/v1/ratings", headers=AUTH, json=body).status_code == 413


@pytest.fixture(scope="module")
def rec_model_dir(tmp_path_factory):
    train = make_ratings(n_users=40, n_items=30, n=700)
    model = build_model("rec", train.n_users, train.n_items, train.rating_scale,
                        {"embedding_size": 8, "hidden_size": 16, "prototypes": 4, "fanouts": (4, 2)})
    Trainer(TrainConfig(epochs=2, batch_size=64, optimizer="adam", learning_rate=0.01, progress=False)).fit(model, train)
    return save_artefact(tmp_path_factory.mktemp("art") / "rec", model, train)


def test_evidence_chain_model_serves_new_users_without_retraining(rec_model_dir, tmp_path):
    with make_client(rec_model_dir, tmp_path / "db") as c:
        assert c.get("/v1/predict", params={"user": "0", "item": "1"}).json()["path"] == "model"
        before = c.get("/v1/predict", params={"user": "rec-new", "item": "3"}).json()
        assert before["path"] == "fallback"
        res = c.post("/v1/ratings", headers=AUTH, json={"ratings": [
            {"user": "rec-new", "item": "1", "rating": 5}, {"user": "rec-new", "item": "2", "rating": 5}]})
        assert res.status_code == 200
        after = c.get("/v1/predict", params={"user": "rec-new", "item": "3"}).json()
        assert after["path"] == "model" and after["rating"] != before["rating"]
        assert c.get("/v1/users/rec-new").json()["n_ratings"] == 2
        assert c.post("/v1/users", json={"user": "rec-empty"}, headers=AUTH).status_code == 201
        assert c.get("/v1/users/rec-empty").json()["path"] == "fallback"
        recs = c.get("/v1/users/rec-new/recommendations", params={"k": 3}).json()
        assert len(recs["items"]) == 3 and {"1", "2"}.isdisjoint(p["item"] for p in recs["items"])
    with make_client(rec_model_dir, tmp_path / "db") as c:  # restart: replayed into the live ratings
        assert c.get("/v1/predict", params={"user": "rec-new", "item": "3"}).json() == after


def test_predictions_and_recommendations_carry_explanations(client):
    res = client.get("/v1/predict", params={"user": "0", "item": "1", "explain": 3}).json()
    assert res["explanation_method"] == "newton" and 1 <= len(res["explanation"]) <= 3
    effects = [e["effect"] for e in res["explanation"]]
    assert effects == sorted(effects, key=abs, reverse=True)
    for e in res["explanation"]:
        assert e["user"] == "0" or e["item"] == "1"  # only ratings sharing the user or the item
    recs = client.get("/v1/users/0/recommendations", params={"k": 2, "explain": 2}).json()
    assert all(len(p["explanation"]) == 2 for p in recs["items"])
    fallback = client.get("/v1/predict", params={"user": "stranger", "item": "1", "explain": 3}).json()
    assert fallback["explanation"] is None and "fallback" in fallback["explanation_method"]


def test_ratings_received_online_explain_later_predictions(client):
    client.post("/v1/ratings", headers=AUTH, json={"ratings": [
        {"user": "explained", "item": "1", "rating": 5, "timestamp": 1700000000},
        {"user": "explained", "item": "2", "rating": 1, "timestamp": 1700000001}]})
    res = client.get("/v1/predict", params={"user": "explained", "item": "3", "explain": 5}).json()
    assert res["path"] == "fold-in" and "newton" in res["explanation_method"]
    own = [e for e in res["explanation"] if e["user"] == "explained"]
    assert {(e["item"], e["rating"], e["timestamp"]) for e in own} == {("1", 5.0, 1700000000), ("2", 1.0, 1700000001)}
    client.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "0", "item": "3", "rating": 5}]})
    res = client.get("/v1/predict", params={"user": "0", "item": "4", "explain": 50}).json()
    assert res["path"] == "online" and any(e["item"] == "3" and e["user"] == "0" for e in res["explanation"])


def test_not_ready_until_model_and_store_are_open(model_dir, tmp_path):
    app = create_app(Settings(model=model_dir, db=tmp_path / "db", api_key=KEY))
    c = TestClient(app)  # no lifespan: nothing loaded yet
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 503
    assert c.get("/v1/predict", params={"user": "0", "item": "1"}).status_code == 503


def test_the_service_object_owns_the_ingest_sequence(model_dir, tmp_path):
    """`Service.ingest`: validate (nothing stored on a bad rating), store, apply under the
    apply lock, count; `Service.create_user` likewise. The routes only call them."""
    from api.app import NotReady, Service
    from recsys.store import NewRating

    service = Service(Settings(model=model_dir, db=tmp_path / "db", api_key=KEY))
    with pytest.raises(NotReady):
        service.live()
    service.open()
    try:
        with pytest.raises(ValueError, match="outside the scale"):
            service.ingest([NewRating("svc", "1", 4.0, None, None), NewRating("svc", "2", 9.0, None, None)])
        assert list(service.store.replay()) == []  # nothing stored
        stored = service.ingest([NewRating("svc", "1", 4.0, None, "e1"), NewRating("svc", "2", 2.0, None, None)])
        assert [s.duplicate for s in stored] == [False, False] and service.live().last_seq == stored[-1].seq
        assert service.ingest([NewRating("svc", "1", 4.0, None, "e1")])[0].duplicate
        assert service.live().user_info("svc").n_live_ratings == 2
        assert service.create_user("svc-empty") and not service.create_user("svc-empty")
        assert service.live().user_info("svc-empty").path == "fallback"
        assert "recsys_ingested_ratings_total 2.0" in generate_latest(service.metrics.registry).decode()
    finally:
        service.close()


def test_online_sgd_of_the_service_is_logged_into_the_artefact_s_rollback_log(tmp_path):
    """With a rollback log in the artefact, the service's online SGD is `online_sgd` logging
    into it (grown to cover every live row); the model moves as without a log."""
    from recsys.explain.rollback import RollbackCallback
    from recsys.recommender import Recommender
    from recsys.store import NewRating

    train = make_ratings(n_users=40, n_items=30, n=700)
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, {"embedding_size": 8, "n_blocks": 2})
    cb = RollbackCallback(mode="exact")
    Trainer(TrainConfig(epochs=5, progress=False), callbacks=[cb]).fit(model, train)
    logged = save_artefact(tmp_path / "logged", model, train, rollback=cb.log)
    plain = save_artefact(tmp_path / "plain", model, train)
    a, b = Recommender.load(logged), Recommender.load(plain)
    new = [NewRating("0", "5", 5.0, None, None), NewRating("fresh", "1", 4.0, None, None),
           NewRating("1", "7", 1.0, None, None)]
    assert a.add_ratings(new) == b.add_ratings(new) == 3
    log = a.artefact.rollback
    assert log.n_examples == len(a.ratings) == len(train) + 3
    rows = log.rows(len(train) + np.arange(3))
    assert np.abs(rows[:, [0, 2]]).sum() > 0  # the trained users' online updates are logged
    assert np.abs(rows[:, 1]).sum() == 0  # a fold-in is no gradient step
    pairs = [("0", "5"), ("1", "7"), ("fresh", "3"), ("2", "2")]
    assert [p.path for p in a.predict_many(pairs)] == ["online", "online", "fold-in", "model"]
    np.testing.assert_allclose([p.rating for p in a.predict_many(pairs)], [p.rating for p in b.predict_many(pairs)],
                               atol=1e-5)


def test_a_read_answer_is_valid_json_with_the_values_json_dumps_gives_and_null_for_non_finite_floats():
    import json

    from api.app import ReadResponse

    answer = {"user": "é", "rating": 3.25, "effect": 1e-7, "items": [{"score": -0.5}], "none": None}
    assert json.loads(ReadResponse(answer).body) == answer
    assert json.loads(ReadResponse({"rating": float("nan"), "score": float("inf")}).body) == \
        {"rating": None, "score": None}

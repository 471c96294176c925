"""The service's edges, as a hostile client would try them: bodies over the limit (declared or
streamed), auth before the body, strict types, non-finite ratings, one id rule everywhere,
event ids reused with another payload, reloads of malformed artefacts and of stores holding
rows the model cannot map, readiness only once warm, and limits stated in the OpenAPI
document."""

from __future__ import annotations

import asyncio
import json
import shutil
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from api.app import Settings, create_app
from api.limits import Guard
from recsys.artefact import save_artefact
from recsys.models import build_model
from recsys.store import NewRating, RatingStore
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    train = make_ratings(n_users=40, n_items=30, n=700)
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, {"embedding_size": 8, "n_blocks": 2})
    Trainer(TrainConfig(epochs=5, progress=False)).fit(model, train)
    return save_artefact(tmp_path_factory.mktemp("art") / "mf", model, train)


@pytest.fixture
def client(model_dir, tmp_path):
    with TestClient(create_app(Settings(model=model_dir, db=tmp_path / "db", api_key=KEY))) as c:
        yield c


# ---------------------------------------------------------------------------- the guard, at the ASGI level
def call_guard(guard: Guard, method: str, path: str, headers: dict[str, str], chunks: list[bytes]):
    """Send one request through ``guard`` with its body in ``chunks``; returns (status, body,
    how many chunks the guard pulled, whether the inner app ran)."""
    pulled = [0]
    ran = [False]
    sent: list[dict] = []

    async def receive():
        pulled[0] += 1
        k = pulled[0] - 1
        return {"type": "http.request", "body": chunks[k], "more_body": k + 1 < len(chunks)}

    async def send(message):
        sent.append(message)

    async def inner(scope, receive, send):
        ran[0] = True
        body = b""
        while True:
            m = await receive()
            body += m["body"]
            if not m["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    guard.app = inner
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], pulled[0], ran[0]


def make_guard(**kw) -> Guard:
    seen = []
    return Guard(None, key=lambda: KEY, read_auth=kw.get("read_auth", False), max_body_bytes=kw.get("limit", 100),
                 observe=lambda *a: seen.append(a))


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit_before_the_route_parses_it():
    chunks = [b"x" * 40] * 1000  # 40 kB in 40-byte chunks, no Content-Length
    status, body, pulled, ran = call_guard(make_guard(limit=100), "POST", "/v1/ratings", AUTH, chunks)
    assert status == 413 and b"over 100 bytes" in body
    assert pulled == 3 and not ran  # 120 bytes read: the third chunk passed the limit; the route never ran


def test_a_declared_length_over_the_limit_is_refused_without_reading():
    status, _, pulled, ran = call_guard(make_guard(limit=100), "POST", "/v1/ratings",
                                        {**AUTH, "Content-Length": "101"}, [b"x" * 101])
    assert status == 413 and pulled == 0 and not ran


def test_auth_is_checked_before_a_byte_of_the_body_is_read():
    for headers, code in (({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": "Basic x"}, 401)):
        status, _, pulled, ran = call_guard(make_guard(), "POST", "/v1/ratings", headers, [b"x" * 10_000])
        assert (status, pulled, ran) == (code, 0, False)
    # reads are open unless read_auth; then the same rule holds for POST /v1/predict
    assert call_guard(make_guard(), "POST", "/v1/predict", {}, [b"{}"])[0] == 200
    status, _, pulled, _ = call_guard(make_guard(read_auth=True), "POST", "/v1/predict", {}, [b"x" * 10_000])
    assert (status, pulled) == (401, 0)


def test_a_body_within_the_limit_reaches_the_route_whole():
    status, body, _, ran = call_guard(make_guard(limit=100), "POST", "/v1/ratings", AUTH, [b"a" * 50, b"b" * 50])
    assert status == 200 and ran and body == b"a" * 50 + b"b" * 50


def test_a_chunked_oversize_body_through_the_app_is_413(model_dir, tmp_path):
    with TestClient(create_app(Settings(model=model_dir, db=tmp_path / "db", api_key=KEY, max_body_bytes=500))) as c:
        def chunks():
            for _ in range(100):
                yield b'{"user": "c", "item": "1", "rating": 3},'

        assert c.post("/v1/ratings", headers=AUTH, content=chunks()).status_code == 413
        assert c.post("/v1/predict", content=chunks()).status_code == 413
        assert c.get("/ready").json()["applied_seq"] == 0


# ---------------------------------------------------------------------------- strict bodies
@pytest.mark.parametrize("rating", ["4", True, "NaN", None, [4], {"v": 4}])
def test_a_rating_that_is_not_a_json_number_is_422(client, rating):
    res = client.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "s", "item": "1", "rating": rating}]})
    assert res.status_code == 422 and res.json()["detail"][0]["loc"][-1] == "rating"


def test_an_integer_rating_is_a_number(client):
    res = client.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "s", "item": "1", "rating": 4}]})
    assert res.status_code == 200 and res.json()["ratings"][0]["rating"] == 4.0


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_ratings_are_422_with_a_clear_message(client, literal):
    body = '{"ratings": [{"user": "s", "item": "1", "rating": ' + literal + '}]}'
    res = client.post("/v1/ratings", headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert res.status_code == 422
    assert res.json()["detail"][0]["msg"] == "Input should be a finite number"


def test_strict_timestamps_and_explain(client):
    res = client.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "s", "item": "1", "rating": 4,
                                                                      "timestamp": "1700000000"}]})
    assert res.status_code == 422
    assert client.post("/v1/predict", json={"pairs": [{"user": "0", "item": "1"}], "explain": True}).status_code == 422


# ---------------------------------------------------------------------------- ids
LONG = "x" * 129


@pytest.mark.parametrize("bad", [LONG, "a/b", "tab\there", "nul\x00", "del\x7f", ""])
def test_one_id_rule_on_bodies_queries_and_paths(client, bad):
    rate = client.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": bad, "item": "1", "rating": 3}]})
    assert rate.status_code == 422
    assert client.post("/v1/users", headers=AUTH, json={"user": bad}).status_code == 422
    assert client.post("/v1/predict", json={"pairs": [{"user": bad, "item": "1"}]}).status_code == 422
    assert client.get("/v1/predict", params={"user": bad, "item": "1"}).status_code == 422
    event = client.post("/v1/ratings", headers=AUTH,
                        json={"ratings": [{"user": "u", "item": "1", "rating": 3, "event_id": bad}]})
    assert event.status_code == 422
    if "/" not in bad and bad:  # a '/' cannot be one path segment: the router answers 404
        segment = quote(bad, safe="")
        assert client.get(f"/v1/users/{segment}").status_code == 422
        assert client.get(f"/v1/users/{segment}/recommendations").status_code == 422


def test_an_id_at_the_limit_is_accepted_everywhere(client):
    longest = "y" * 128
    assert client.post("/v1/users", headers=AUTH, json={"user": longest}).status_code == 201
    assert client.get(f"/v1/users/{longest}").json()["user"] == longest
    assert client.get(f"/v1/users/{longest}/recommendations", params={"k": 2}).status_code == 200


# ---------------------------------------------------------------------------- event ids
def test_an_event_id_reused_with_another_payload_is_409_and_the_same_payload_is_a_duplicate(client):
    first = {"user": "ev", "item": "1", "rating": 4, "event_id": "evt-9"}
    assert client.post("/v1/ratings", headers=AUTH, json={"ratings": [first]}).json()["accepted"] == 1
    again = client.post("/v1/ratings", headers=AUTH, json={"ratings": [first]})
    assert again.status_code == 200 and again.json()["duplicates"] == 1
    changed = client.post("/v1/ratings", headers=AUTH, json={"ratings": [
        {"user": "ev", "item": "2", "rating": 5, "event_id": "fresh"}, {**first, "rating": 2}]})
    assert changed.status_code == 409 and "event_id 'evt-9' is already stored" in changed.json()["detail"]
    assert client.get("/v1/users/ev").json()["n_live_ratings"] == 1  # nothing of the conflicting request


# ---------------------------------------------------------------------------- reload and startup
def test_reload_with_a_malformed_artefact_is_422_and_the_old_model_keeps_serving(client, model_dir, tmp_path):
    before = client.get("/v1/predict", params={"user": "0", "item": "1"}).json()
    for name, text in (("ids.json", '{"users": 5, "items": null}'), ("ids.json", "{not json"),
                       ("model.json", "[]"), ("weights.safetensors", "garbage")):
        broken = tmp_path / f"broken-{name}-{len(text)}"
        shutil.copytree(model_dir, broken)
        (broken / name).write_text(text)
        res = client.post("/v1/admin/reload", headers=AUTH, json={"model": str(broken)})
        assert res.status_code == 422 and str(broken) in res.json()["detail"], (name, res.text)
    assert client.get("/v1/predict", params={"user": "0", "item": "1"}).json() == before
    assert client.post("/v1/admin/reload", headers=AUTH, json={}).status_code == 200


def test_a_stored_rating_the_model_cannot_map_is_skipped_and_reported_never_fatal(model_dir, tmp_path):
    db = tmp_path / "db"
    with RatingStore(db) as store:  # e.g. accepted by an earlier artefact that knew item "gone"
        store.add([NewRating("old", "1", 4.0), NewRating("old", "gone", 5.0), NewRating("old", "2", 9.0),
                   NewRating("old", "3", 2.0)])
    with TestClient(create_app(Settings(model=model_dir, db=db, api_key=KEY))) as c:  # startup is not blocked
        ready = c.get("/ready").json()
        assert (ready["applied_seq"], ready["skipped"]) == (4, 2)
        assert c.get("/v1/users/old").json()["n_live_ratings"] == 2
        assert "recsys_skipped_ratings 2.0" in c.get("/metrics").text
        res = c.post("/v1/admin/reload", headers=AUTH, json={}).json()
        assert (res["replayed"], res["skipped"]) == (2, 2)
        assert [(e["seq"], e["item"]) for e in res["skipped_examples"]] == [(2, "gone"), (3, "2")]
        assert "unknown item id 'gone'" in res["skipped_examples"][0]["reason"]
        assert "outside the scale" in res["skipped_examples"][1]["reason"]
        # the follower moves past such a row too (written by another process, say)
        with RatingStore(db) as store:
            store.add([NewRating("old", "gone", 3.0), NewRating("old", "4", 3.0)])
        seq = 6
        assert c.get("/v1/users/old", params={"min_seq": seq}).json()["n_live_ratings"] == 3
        assert c.get("/ready").json()["skipped"] == 3


def test_ready_means_the_first_explained_request_builds_nothing(model_dir, tmp_path, monkeypatch):
    """Above `warm_below` the explainer precomputes no rows (a 10^7-rating model); the
    service's warm-up request still builds its index before /ready, so the first explained
    request does not."""
    from recsys.models.mf import explain

    monkeypatch.setattr(explain.MFExplainer, "warm_below", 0)
    built = []
    original = explain.NewtonInfluence.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(explain.NewtonInfluence, "__init__", counting)
    with TestClient(create_app(Settings(model=model_dir, db=tmp_path / "db", api_key=KEY))) as c:
        assert c.get("/ready").status_code == 200 and built == [1]
        res = c.get("/v1/predict", params={"user": "3", "item": "4", "explain": 3}).json()
        assert res["explanation"] and built == [1]


# ---------------------------------------------------------------------------- the OpenAPI document
def test_the_openapi_document_states_every_limit(model_dir, tmp_path):
    settings = Settings(model=model_dir, db=tmp_path / "db", api_key=KEY, max_batch=7, max_k=9, max_explain=4,
                        max_body_bytes=12345)
    with TestClient(create_app(settings)) as c:
        doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    paths = doc["paths"]
    assert schemas["RatingsIn"]["properties"]["ratings"]["maxItems"] == 7
    assert schemas["PredictBatchIn"]["properties"]["pairs"]["maxItems"] == 7
    assert schemas["PredictBatchIn"]["properties"]["explain"]["maximum"] == 4
    rec_params = {p["name"]: p for p in paths["/v1/users/{user}/recommendations"]["get"]["parameters"]}
    assert rec_params["k"]["schema"]["maximum"] == 9 and rec_params["explain"]["schema"]["maximum"] == 4
    for user_schema in (rec_params["user"]["schema"], schemas["RatingIn"]["properties"]["user"],
                        schemas["PairIn"]["properties"]["item"], schemas["UserIn"]["properties"]["user"]):
        assert user_schema["maxLength"] == 128 and user_schema["pattern"] == r"^[^/\x00-\x1f\x7f]{1,128}$"
    for route in ("/v1/ratings", "/v1/users", "/v1/admin/reload", "/v1/predict"):
        assert "12345 bytes" in paths[route]["post"]["responses"]["413"]["description"]
    for route in ("/v1/ratings", "/v1/users", "/v1/admin/reload"):
        assert paths[route]["post"]["security"] == [{"HTTPBearer": []}]
    assert "12345 bytes" in doc["info"]["description"] and json.dumps(doc)


def test_a_write_the_model_swapped_in_meanwhile_cannot_apply_is_409_not_acknowledged(model_dir, tmp_path,
                                                                                        monkeypatch):
    """Validated against the live model, stored, then a reload swaps in a model that has no
    such item before the apply: the write is answered 409 (stored, not applied), never 200."""
    from api.service import NotApplied, Service

    fewer = make_ratings(n_users=40, n_items=20, n=500)  # items "0".."19" only
    small = build_model("mf", fewer.n_users, fewer.n_items, fewer.rating_scale, {"embedding_size": 4, "n_blocks": 1})
    Trainer(TrainConfig(epochs=2, progress=False)).fit(small, fewer)
    fewer_dir = save_artefact(tmp_path / "fewer", small, fewer)
    service = Service(Settings(model=model_dir, db=tmp_path / "db", api_key=KEY))
    service.open()
    try:
        add = service.store.add

        def add_then_reload(new, *args, **kwargs):
            stored = add(new, *args, **kwargs)
            service.reload(fewer_dir)
            return stored

        monkeypatch.setattr(service.store, "add", add_then_reload)
        with pytest.raises(NotApplied, match=r"stored as seq \[1\].*unknown item id '25'"):
            service.ingest([NewRating("racer", "25", 4.0)])
        assert service.live().n_skipped == 1 and service.live().last_seq == 1
    finally:
        service.close()


def test_bad_settings_stop_serve_with_one_line_naming_each(model_dir, tmp_path, monkeypatch, capsys):
    from recsys.cli import main

    monkeypatch.setenv("RECSYS_FOLLOW_INTERVAL_S", "0")
    monkeypatch.setenv("RECSYS_MAX_K", "many")
    assert main(["serve", "--model", str(model_dir), "--db", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recsys: error:") and len(err.strip().splitlines()) == 1
    assert "RECSYS_FOLLOW_INTERVAL_S: Input should be greater than 0" in err and "RECSYS_MAX_K" in err

"""The fast path for ``POST /v1/ratings`` (`api.fast_writes.FastRatings`) answers exactly as
the FastAPI route does: the same bodies (valid ones, ones the service refuses, and many the
schema refuses, with various content types and keys), posted in the same order to an app
with it and one without, give the same status, headers and body, the same stored rows and
the same request counts in the metrics; bodies the model accepts never reach FastAPI's
route, the rest do."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from api.app import Settings, create_app
from tests.test_api_fast_reads import AUTH, KEY, Served, request_counts, small_artefacts

JSON = (b"content-type", b"application/json")


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    return small_artefacts(tmp_path_factory.mktemp("fast-writes"))


def rating(j: int, **extra) -> dict:
    return {"user": f"u{j % 7}", "item": str(j % 30), "rating": 1 + j % 5, "timestamp": 1000 + j, **extra}


def body(*ratings: dict) -> bytes:
    return json.dumps({"ratings": list(ratings)}).encode()


def raw(user: str = '"u1"', item: str = '"3"', value: str = "4", tail: str = ', "timestamp": 5') -> bytes:
    return f'{{"ratings": [{{"user": {user}, "item": {item}, "rating": {value}{tail}}}]}}'.encode()


#: bodies the model accepts (some then refused by the service: unknown item, off scale, 409)
ACCEPTED = [
    body(*(rating(j) for j in range(100))),
    body(rating(1, event_id="e1"), rating(2, event_id="e2")),
    body(rating(1, event_id="e1")),  # a retry: a duplicate
    body(rating(1, event_id="e1", rating=2)),  # the same event id, another payload: 409
    body(rating(3, item="no-such-item")),  # 404
    body(rating(3, rating=7)), body(rating(3, rating=0.5)), body(rating(3, rating=-0.0)),  # 422 off scale
    body(rating(4, rating=4.5), rating(5, rating=1.0000000000000002), rating(6, rating=5)),
    body(rating(7, timestamp=0), rating(8, timestamp=2**53 - 1), rating(9, timestamp=None)),
    body({"user": "new-user", "item": "4", "rating": 3, "timestamp": 12}),
    raw(value="3.0e0"), raw(value="0.4e1"), raw(tail=', "timestamp": 5.0'), raw(tail=', "timestamp": 5, "timestamp": 6'),
    raw(value="4, \"rating\": 2"), raw(user='"\\u00e9t\\u00e9"'), raw(user='"\\ud83d\\ude00"'), raw(user='"a b+c%20"'),
    raw(user='"' + "x" * 128 + '"'), raw(tail=', "event_id": "' + "e" * 128 + '"'), raw(tail=""),
    b' \n\t{"ratings" : [ {"user":"u2","item":"5","rating":2,"timestamp":9} ] } \n',
    "{\"ratings\": [{\"user\": \"\u00fcber\", \"item\": \"1\", \"rating\": 2, \"timestamp\": 3}]}".encode(),
]
#: bodies the model refuses: FastAPI's route answers (422, or 400)
REFUSED = [
    b"", b"null", b"[]", b"{}", b'{"ratings": []}', b'{"ratings": {}}', b'{"ratings": null}', b"not json",
    body(*(rating(j) for j in range(1001))), raw(value='"4"'), raw(value="true"), raw(value="null"),
    raw(value="NaN"), raw(value="Infinity"), raw(value="-Infinity"), raw(value="1e400"), raw(value="[4]"),
    raw(user="1"), raw(user='""'), raw(user='"a/b"'), raw(user='"a\\u0000"'), raw(user='"a\\u007f"'),
    raw(user='"' + "x" * 129 + '"'), raw(user='"\\ud800"'), raw(user='"\\udc00x"'), raw(item="null"),
    raw(tail=', "timestamp": -1'), raw(tail=f', "timestamp": {2**53}'), raw(tail=', "timestamp": "5"'),
    raw(tail=', "timestamp": true'), raw(tail=', "timestamp": 1.5'), raw(tail=', "event_id": ""'),
    raw(tail=', "event_id": 5'), raw(tail=', "extra": 1'), raw(tail=', "timestamp": 5}, 7, {"a": 1'),
    b'{"ratings": [{"item": "3", "rating": 4}]}', b'{"ratings": [{"user": "u", "rating": 4}]}',
    b'{"ratings": [{"user": "u", "item": "3"}]}', b'{"ratings": [], "more": 1}', raw() + b" x", raw() + b"{}",
    b"\xef\xbb\xbf" + raw(), raw().decode().encode("utf-16"), raw().decode().encode("utf-32"),
    raw(user='"\xff"'.encode("latin-1").decode("latin-1")).replace(b"\xc3\xbf", b"\xff"), b'{"ratings": [1, 2]}',
    b"[" * 5000 + b"]" * 5000,
]
CONTENT_TYPES = [None, b"application/json; charset=utf-8", b"text/plain", b"application/merge-patch+json",
                 b"APPLICATION/JSON", b"application/json ", b""]


def both(artefact, tmp_path, **settings) -> tuple[Served, Served]:
    def app(name: str, fast: bool):
        return create_app(Settings(model=artefact, db=tmp_path / f"{name}.sqlite3", api_key=KEY, **settings),
                          fast_writes=fast)
    return Served(app("fast", True)), Served(app("slow", False))


def same_answer(got: tuple, want: tuple, sent: bytes) -> None:
    if b'"timestamp"' not in sent or b'"timestamp": null' in sent or b'"timestamp":null' in sent:
        # stored at "now": the two apps may store different seconds
        got, want = ((s, h, re.sub(rb'"timestamp":\d+', b'"timestamp":T', b)) for s, h, b in (got, want))
    assert got == want, sent[:200]


async def compare(fast: Served, slow: Served, requests: list[tuple[list, bytes]], min_stored: int) -> None:
    await fast.start()
    await slow.start()
    try:
        for headers, sent in requests:
            got = await fast.request("POST", b"/v1/ratings", headers, sent)
            want = await slow.request("POST", b"/v1/ratings", headers, sent)
            same_answer(got, want, sent)
        metrics = [request_counts((await s.request("GET", b"/metrics"))[2]) for s in (fast, slow)]
        assert metrics[0] == metrics[1]
        stores = [s.app.state.service.store.committed_after(0, 100_000) for s in (fast, slow)]
        assert [(r.seq, r.user, r.item, r.rating, r.event_id) for r in stores[0]] == \
               [(r.seq, r.user, r.item, r.rating, r.event_id) for r in stores[1]]
        assert len(stores[0]) >= min_stored
    finally:
        await fast.stop()
        await slow.stop()


def test_every_ratings_post_is_answered_as_the_route_answers_it(artefacts, tmp_path):
    requests = [([AUTH, JSON], b) for b in ACCEPTED + REFUSED]
    requests += [([AUTH, (b"content-type", t)] if t is not None else [AUTH], b) for t in CONTENT_TYPES
                 for b in (ACCEPTED[1], ACCEPTED[10], REFUSED[9])]
    requests += [([JSON], ACCEPTED[1]), ([(b"authorization", b"Bearer nope"), JSON], ACCEPTED[1]),
                 ([AUTH, JSON, (b"content-type", b"text/plain")], ACCEPTED[10]),
                 ([AUTH, (b"content-type", b"text/plain"), JSON], ACCEPTED[10])]
    asyncio.run(compare(*both(artefacts["mf+ranker"], tmp_path), requests, 100))


def test_small_limits_and_a_ranker_alone_are_answered_alike(artefacts, tmp_path):
    requests = [([AUTH, JSON], b) for b in ACCEPTED[:12] + REFUSED[:12]]
    asyncio.run(compare(*both(artefacts["mf+ranker"], tmp_path / "small", max_batch=5, max_body_bytes=2000),
                        requests, 5))
    asyncio.run(compare(*both(artefacts["ranker"], tmp_path / "ranker"), requests, 100))


def test_accepted_bodies_skip_fastapi_and_the_rest_reach_it(artefacts, tmp_path):
    fast, _ = both(artefacts["mf+ranker"], tmp_path)
    reached = []
    for route in fast.app.router.routes:
        if getattr(route, "path", None) == "/v1/ratings":
            def handle(scope, receive, send, original=route.handle):
                reached.append(scope["path"])
                return original(scope, receive, send)
            route.handle = handle

    async def run() -> None:
        await fast.start()
        try:
            for sent, status in ((ACCEPTED[0], 200), (ACCEPTED[4], 404), (ACCEPTED[5], 422)):
                assert (await fast.request("POST", b"/v1/ratings", [AUTH, JSON], sent))[0] == status
            assert reached == []
            assert (await fast.request("POST", b"/v1/ratings", [AUTH, JSON], REFUSED[9]))[0] == 422
            assert (await fast.request("POST", b"/v1/ratings", [AUTH], ACCEPTED[1]))[0] == 422
            fast.app.state.fast_writes.enabled = False
            assert (await fast.request("POST", b"/v1/ratings", [AUTH, JSON], ACCEPTED[0]))[0] == 200
            assert len(reached) == 3
        finally:
            await fast.stop()

    asyncio.run(run())

"""The fast path for GET reads (`api.fast_reads.FastReads`) answers exactly as the FastAPI
routes do: the same requests (valid ones and many invalid or unusual ones, sent as raw bytes)
to an app with it and one without give the same status, headers and body, and the same
request counts in the metrics; plain requests never reach FastAPI's route, unusual ones do."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from urllib.parse import unquote

import pytest

from api.app import Settings, create_app
from api.fast_reads import MAX_MIN_SEQ, NOT_PLAIN, bounded_int, parse_query, path_id
from recsys.artefact import save_artefact
from recsys.models import DEFAULT_RANKER, build_model
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings

KEY = "s3cret"
AUTH = (b"authorization", f"Bearer {KEY}".encode())
#: users created online through POST /v1/ratings, ids a plain query cannot all carry
ODD_USERS = ["a b", "50%", "\u00e9", "+5", "5.0", "05", " 5", "u~x.y", "x" * 128, "a+b", "a&b", "q=1", "h#1"]


def small_artefacts(root) -> dict:
    """Two artefacts under folder ``root`` trained on small synthetic ratings: ``mf+ranker``
    (MF with the default ranker beside it) and ``ranker`` (the ranker alone)."""
    train = make_ratings(n_users=40, n_items=30, n=700)
    mf = build_model("mf", train.n_users, train.n_items, train.rating_scale, {"embedding_size": 8, "n_blocks": 2})
    Trainer(TrainConfig(epochs=10, progress=False)).fit(mf, train)
    ranker = build_model(DEFAULT_RANKER, train.n_users, train.n_items, train.rating_scale)
    ranker.fit(train)
    meta = {"training": {"train_config": {"learning_rate": 0.015, "epochs": 10}}}
    return {"mf+ranker": save_artefact(root / "mf", mf, train, meta, ranker=ranker),
            "ranker": save_artefact(root / "ranker", ranker, train)}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    return small_artefacts(tmp_path_factory.mktemp("fast"))


class Served:
    """One app driven in-process through raw ASGI messages (so the query string and path
    reach it byte for byte, as uvicorn hands them over)."""

    def __init__(self, app) -> None:
        self.app = app
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        assert message["type"] == "lifespan.startup.complete", message

    async def stop(self) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()
        await self._lifespan

    async def request(self, method: str, target: bytes, headers=(), body: bytes = b"") -> tuple:
        """``(status, headers, body)`` of ``method target`` (``target``: raw path and query)."""
        raw_path, _, query = target.partition(b"?")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": unquote(raw_path.decode("ascii")), "raw_path": raw_path,
                 "query_string": query, "root_path": "", "client": ("127.0.0.1", 5000),
                 "server": ("127.0.0.1", 8000), "state": {},
                 "headers": [(b"host", b"test"), *headers,
                             *([(b"content-length", str(len(body)).encode())] if body else [])]}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)

        out: list[dict] = []

        async def send(message):
            out.append(message)

        await self.app(scope, receive, send)
        start = next(m for m in out if m["type"] == "http.response.start")
        return start["status"], start["headers"], b"".join(m.get("body", b"") for m in out
                                                             if m["type"] == "http.response.body")


def both(artefact: Path, tmp_path: Path, **settings) -> tuple[Served, Served]:
    """The same service with the fast path and without (own stores, same artefact)."""
    def app(name: str, fast: bool):
        return create_app(Settings(model=artefact, db=tmp_path / f"{name}.sqlite3", api_key=KEY, **settings),
                          fast_reads=fast)
    return Served(app("fast", True)), Served(app("slow", False))


async def write_same(apps: tuple[Served, Served]) -> None:
    """The same writes to both: ratings from users with odd ids (explicit timestamps, so the
    answers match), and a user with no rating."""
    ratings = [{"user": u, "item": str(j % 30), "rating": 1 + j % 5, "timestamp": 1000 + j}
               for j, u in enumerate(ODD_USERS)] + [{"user": "1", "item": "7", "rating": 5, "timestamp": 999}]
    for served in apps:
        status, _, body = await served.request("POST", b"/v1/ratings", [AUTH, (b"content-type", b"application/json")],
                                               json.dumps({"ratings": ratings}).encode())
        assert status == 200, body
        status, _, body = await served.request("POST", b"/v1/users", [AUTH, (b"content-type", b"application/json")],
                                               b'{"user": "newbie"}')
        assert status == 201, body


PREDICT_QUERIES = [
    # plain
    b"user=1&item=2", b"user=1&item=2&explain=5", b"item=2&user=1&explain=0", b"user=1&item=2&explain=50",
    b"user=1&item=2&min_seq=0", b"user=1&item=2&min_seq=1", b"user=1&item=2&explain=3&min_seq=14",
    b"user=1&item=2&foo=bar", b"_=17&user=1&item=2", b"user=1&item=2&k=3", b"user=1&item=2&flag",
    b"user=nobody&item=3&explain=2", b"user=newbie&item=3&explain=2", b"user=u~x.y&item=4&explain=4",
    b"user=5.0&item=4&explain=4", b"user=05&item=4&explain=4", b"user=" + b"x" * 128 + b"&item=8&explain=1",
    b"user=1&item=no-such-item", b"user=1&item=2&min_seq=999", b"user=1&item=2&min_seq=" + str(MAX_MIN_SEQ).encode(),
    # unusual encodings of valid values (the FastAPI route answers them)
    b"user=a+b&item=2&explain=2", b"user=a%20b&item=2&explain=2", b"user=50%25&item=2", b"user=%C3%A9&item=2",
    b"user=%2B5&item=2&explain=1", b"user=%205&item=2", b"user=1&item=%32", b"us%65r=1&item=2",
    b"user=1&item=2&explain=%35", b"user=a%26b&item=2", b"user=q%3D1&item=2", b"user=h%231&item=2",
    b"user=1&item=2&", b"&user=1&item=2", b"user=1&&item=2", b"user=1&item=2&explain=05",
    b"user=1&item=2&explain=+5", b"user=1&item=2&explain=%2B5", b"user=1&item=2&explain=%205",
    b"user=1&item=2&explain=5%20", b"user=1&item=2&explain=5.0", b"user=1&item=2&explain=1_0",
    b"user=1&item=2&explain=%EF%BC%95", b"user=1&item=2&min_seq=00",
    # invalid
    b"", b"user=1", b"item=2", b"user=&item=2", b"user=1&item=", b"user&item=2", b"user=1&user=2&item=2",
    b"user=1&item=2&explain=5&explain=6", b"user=1&item=2&explain=-1", b"user=1&item=2&explain=51",
    b"user=1&item=2&explain=abc", b"user=1&item=2&explain=", b"user=1&item=2&explain=1e1",
    b"user=1&item=2&explain=99999999999999999999999", b"user=1&item=2&min_seq=-1",
    b"user=1&item=2&min_seq=" + str(MAX_MIN_SEQ + 1).encode(), b"user=1&item=2&min_seq=1.5",
    b"user=a/b&item=2", b"user=a%2Fb&item=2", b"user=%01&item=2", b"user=%7F&item=2", b"user=a%0Ab&item=2",
    b"user=" + b"x" * 129 + b"&item=2", b"user=%ED%A0%80&item=2", b"user=%FF&item=2", b"user=\xc3\xa9&item=2",
    b"user=1=2&item=2", b"user=1;item=2", b"user=1&item=2;explain=3", b"user=1&item=2&explain=true",
]
RECOMMENDATION_TARGETS = [
    b"/v1/users/1/recommendations", b"/v1/users/1/recommendations?k=1", b"/v1/users/1/recommendations?k=100",
    b"/v1/users/1/recommendations?k=10&explain=3", b"/v1/users/1/recommendations?k=7&explain=10",
    b"/v1/users/1/recommendations?k=3&min_seq=2", b"/v1/users/1/recommendations?user=2&item=3",
    b"/v1/users/nobody/recommendations?k=4&explain=2", b"/v1/users/newbie/recommendations?explain=1",
    b"/v1/users/a%20b/recommendations?k=2&explain=2", b"/v1/users/a b/recommendations?k=2",
    b"/v1/users/50%25/recommendations?k=2", b"/v1/users/%2B5/recommendations", b"/v1/users/+5/recommendations",
    b"/v1/users/%C3%A9/recommendations?k=2", b"/v1/users/q=1/recommendations", b"/v1/users/a&b/recommendations",
    b"/v1/users/" + b"x" * 128 + b"/recommendations?k=2", b"/v1/users/" + b"x" * 129 + b"/recommendations",
    b"/v1/users/1/recommendations?k=0", b"/v1/users/1/recommendations?k=101", b"/v1/users/1/recommendations?k=",
    b"/v1/users/1/recommendations?k=+3", b"/v1/users/1/recommendations?k=3.0", b"/v1/users/1/recommendations?k=03",
    b"/v1/users/1/recommendations?k=3&k=4", b"/v1/users/1/recommendations?explain=51",
    b"/v1/users/1/recommendations?min_seq=999", b"/v1/users/1/recommendations?min_seq=-2",
    b"/v1/users/%01/recommendations", b"/v1/users/a%7Fb/recommendations", b"/v1/users/%2F/recommendations",
    b"/v1/users//recommendations", b"/v1/users/1/recommendations/", b"/v1/users/recommendations",
    b"/v1/users/1/2/recommendations", b"/v1/users/%ED%A0%80/recommendations",
]
USER_TARGETS = [
    b"/v1/users/1", b"/v1/users/1?min_seq=3", b"/v1/users/1?min_seq=999", b"/v1/users/1?min_seq=x",
    b"/v1/users/nobody", b"/v1/users/newbie", b"/v1/users/a%20b", b"/v1/users/50%25", b"/v1/users/%C3%A9",
    b"/v1/users/" + b"x" * 128, b"/v1/users/" + b"x" * 129, b"/v1/users/%01", b"/v1/users/", b"/v1/users/1/",
    b"/v1/users/1?min_seq=1&min_seq=2", b"/v1/users/1?foo=%ZZ", b"/v1/users", b"/v1/users/recommendations",
]
OTHER = [("HEAD", b"/v1/predict?user=1&item=2"), ("PUT", b"/v1/predict?user=1&item=2"),
         ("POST", b"/v1/users/1/recommendations"), ("GET", b"/v1/predict/?user=1&item=2"),
         ("GET", b"/v1/ratings"), ("GET", b"/health"), ("GET", b"/nowhere?user=1")]
TARGETS = ([("GET", b"/v1/predict?" + q) for q in PREDICT_QUERIES] + [("GET", t) for t in RECOMMENDATION_TARGETS]
           + [("GET", t) for t in USER_TARGETS] + OTHER)


def fuzzed_targets(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Random requests assembled from names and values near the edges of what is plain."""
    rng = random.Random(seed)
    names = [b"user", b"item", b"explain", b"k", b"min_seq", b"foo", b"", b"us%65r", b"USER"]
    values = [b"1", b"2", b"0", b"5", b"50", b"51", b"100", b"101", b"-1", b"+1", b"%2B1", b"01", b"1.0", b" 1",
              b"%201", b"", b"a+b", b"%C3%A9", b"%FF", b"x" * 128, b"x" * 129, b"nobody", b"newbie", b"%00",
              b"a/b", b"=", b"3%3D", b"4611686018427387904", b"4611686018427387905", b"1e3", b"true"]
    paths = [b"/v1/predict", b"/v1/users/1/recommendations", b"/v1/users/2", b"/v1/users/nobody/recommendations",
             b"/v1/users/a%20b", b"/v1/users/%FF/recommendations"]
    out = []
    for _ in range(n):
        pairs = []
        for _ in range(rng.randint(0, 5)):
            name, value = rng.choice(names), rng.choice(values)
            pairs.append(name if rng.random() < 0.05 else name + b"=" + value)
        out.append(("GET", rng.choice(paths) + b"?" + b"&".join(pairs)))
    return out


def request_counts(metrics_text: bytes) -> list[str]:
    return sorted(line for line in metrics_text.decode().splitlines() if line.startswith("recsys_requests_total{"))


async def compare(fast: Served, slow: Served, targets, headers=(), start: bool = True) -> None:
    if start:
        await fast.start()
        await slow.start()
    try:
        if start:
            await write_same((fast, slow))
        for method, target in targets:
            got, want = await fast.request(method, target, headers), await slow.request(method, target, headers)
            assert got == want, (method, target)
        if start:
            metrics = [request_counts((await s.request("GET", b"/metrics"))[2]) for s in (fast, slow)]
            assert metrics[0] == metrics[1]
    finally:
        if start:
            await fast.stop()
            await slow.stop()


def test_every_read_is_answered_as_the_route_answers_it(artefacts, tmp_path):
    asyncio.run(compare(*both(artefacts["mf+ranker"], tmp_path), TARGETS + fuzzed_targets(400)))


def test_reads_with_the_key_required_and_a_ranker_alone_are_answered_alike(artefacts, tmp_path):
    asyncio.run(compare(*both(artefacts["mf+ranker"], tmp_path / "auth", read_auth=True), TARGETS))
    asyncio.run(compare(*both(artefacts["mf+ranker"], tmp_path / "key", read_auth=True), TARGETS, [AUTH]))
    asyncio.run(compare(*both(artefacts["ranker"], tmp_path / "ranker"), TARGETS))  # predictions: a 400


def test_reads_before_the_model_is_loaded_are_the_same_503(artefacts, tmp_path):
    asyncio.run(compare(*both(artefacts["mf+ranker"], tmp_path), TARGETS, start=False))


def test_plain_reads_skip_fastapi_and_the_rest_reach_it(artefacts, tmp_path):
    fast, _ = both(artefacts["mf+ranker"], tmp_path)
    reached = []
    for route in fast.app.router.routes:
        if route.path in ("/v1/predict", "/v1/users/{user}/recommendations", "/v1/users/{user}"):
            def handle(scope, receive, send, original=route.handle, path=route.path):
                reached.append(path)
                return original(scope, receive, send)
            route.handle = handle

    async def run() -> None:
        await fast.start()
        try:
            plain = [b"/v1/predict?user=1&item=2&explain=5", b"/v1/predict?user=nobody&item=zz",
                     b"/v1/users/1/recommendations?k=10&explain=3&min_seq=0", b"/v1/users/1?foo=1"]
            for target in plain:
                assert (await fast.request("GET", target))[0] in (200, 404)
            assert reached == []
            for target in (b"/v1/predict?user=1&item=2&explain=%35", b"/v1/users/1/recommendations?k=03",
                           b"/v1/users/%C3%A9"):
                await fast.request("GET", target)
            assert reached == ["/v1/predict", "/v1/users/{user}/recommendations", "/v1/users/{user}"]
        finally:
            await fast.stop()

    asyncio.run(run())


def test_what_counts_as_plain():
    names = frozenset({"user", "item"})
    assert parse_query(b"user=1&item=a.b~c&other=x", names) == {"user": b"1", "item": b"a.b~c"}
    assert parse_query(b"", names) == {}
    for query in (b"user=1&user=2", b"user=", b"user", b"user=a+b", b"user=a%20b", b"user=1&", b"user=1=2",
                  b"user=a;b", b"user=\xc3\xa9", b"user=a/b", b"user=a b", b"other=%20"):
        assert parse_query(query, names) is None, query
    assert bounded_int(None, 7, 0, 9) == 7 and bounded_int(b"9", 7, 0, 9) == 9 and bounded_int(b"0", 7, 0, 9) == 0
    for raw in (b"10", b"-1", b"+1", b"01", b"1.0", b" 1", b"1_0", b"", "\uff15".encode()):
        assert bounded_int(raw, 7, 0, 9) is NOT_PLAIN, raw
    assert path_id("a b%") == "a b%" and path_id("x" * 128)
    for segment in ("", "x" * 129, "a/b", "\u00e9", "a\x7fb", "a\nb"):
        assert path_id(segment) is None, segment

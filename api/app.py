"""The REST service: thin FastAPI routes over `api.service.Service`, which holds the live
`recsys.recommender.Recommender` and the `recsys.store.RatingStore` and applies the store's log
to the model in commit order (see its docstring: writes are acknowledged only once applied;
a background follower picks up what other workers and processes wrote).

``create_app(settings)`` builds the app; its lifespan opens the store, loads the artefact,
replays every stored rating into it (rows it cannot apply are skipped and reported, never
fatal), warms it (one explained prediction and recommendation), moves it out of the garbage
collector's reach (`api.heap.FrozenModelHeap`: a full collection walked the whole model, 0.4 s
at 10^7 ratings; redone after every model swap) and only then answers ``/ready`` with 200. A
worker of ``recsys serve --workers N`` shuts down by itself when its supervisor dies
(`api.supervision`), instead of serving on as an orphan.
``create_app()`` with no argument reads ``RECSYS_*`` variables: it is the factory each uvicorn
worker of ``recsys serve --workers N`` calls.

In front of every route sits `api.limits.Guard` (pure ASGI): the API key is checked before
the body is read (writes always; reads too with ``RECSYS_READ_AUTH=true``), the body is
counted as it arrives and refused with a 413 once over ``max_body_bytes`` (chunked bodies
too), then the route runs. A plain GET read (``/v1/predict``, a user's recommendations, a
user) is answered by `api.fast_reads.FastReads` through the same response functions as its
route, without FastAPI's per-request parameter solving; anything it does not handle exactly
(any invalid or unusual input) goes to the FastAPI route (always with
``create_app(..., fast_reads=False)``, or once ``app.state.fast_reads.enabled`` is False).
Likewise ``POST /v1/ratings`` with a body its model accepts is answered by
`api.fast_writes.FastRatings` through the route's own function (``fast_writes``,
``app.state.fast_writes``); every refused body goes to the route, for FastAPI's 422.
Every limit is in the OpenAPI document: ids (`ID_RULE`), entries per request, ``k``,
explanation length, body bytes.

``POST /v1/admin/reload`` (or SIGHUP to a single-worker server; with several workers, SIGHUP
to the main process restarts the workers one by one) loads a new artefact, replays the store
into it and swaps it in; a malformed artefact is a 422 and the old model keeps serving.

Recommendations come from the artefact's ranking model (its ranker, or the model itself when
it ranks), each item with the ranker's ``score`` and the predicted ``rating`` where a rating
model is loaded (null otherwise); a user with no interaction gets the popularity list (path
``popularity``). Rating predictions (``/v1/predict``) of a ranker-only artefact are a 400
("this model ranks; it predicts no ratings").
"""


import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Response, status
from fastapi import HTTPException as FastAPIHTTPException
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool

from api.fast_reads import DEFAULT_K, FastReads
from api.fast_writes import FastRatings
from api.heap import FrozenModelHeap
from api.limits import Guard
from api.schemas import (
    ID_PATTERN,
    ID_RULE,
    MAX_ID_LENGTH,
    CreatedOut,
    PredictBatchOut,
    PredictionOut,
    Problem,
    RatingsOut,
    ReadyOut,
    RecommendationsOut,
    ReloadIn,
    ReloadOut,
    UserIn,
    UserOut,
    bounded_models,
)
from api.service import NotApplied, NotReady, Service, Settings, StaleRead
from api.supervision import stop_when_orphaned, supervisor_pid
from recsys.errors import ArtefactError, UnknownIdError
from recsys.recommender import NoRatingModelError, Prediction, Recommender
from recsys.store import EventIdConflictError

__all__ = ["NotReady", "Service", "Settings", "create_app"]

log = logging.getLogger("recsys.api")


class ReadResponse(JSONResponse):
    """A read's answer (a dict of plain values) rendered by pydantic-core's serializer: the
    same JSON values as `JSONResponse`'s ``json.dumps`` (a float may be spelled differently,
    ``1e-7`` for ``1e-07``; a non-finite float becomes ``null`` where ``json.dumps`` raised)
    at a third of the CPU (10 -> 3 us for an explained prediction, 69 -> 20 us for ten
    explained recommendations)."""

    def render(self, content: object) -> bytes:
        return to_json(content, inf_nan_mode="null")  # valid JSON whatever the floats


def create_app(settings: Settings | None = None, *, fast_reads: bool = True, fast_writes: bool = True) -> FastAPI:
    """The app (module docstring); ``fast_reads`` False sends every read, ``fast_writes``
    False every ``POST /v1/ratings``, through FastAPI's routing (the answers are the same;
    for comparisons)."""
    settings = settings or Settings()
    service = Service(settings)

    def reload_on_signal() -> None:
        try:
            service.reload()
            app.openapi_schema = None
        except ArtefactError as exc:  # the model serving now keeps serving
            log.error("reload on SIGHUP failed: %s", exc)

    heap = FrozenModelHeap(lambda: service.recommender)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        supervisor = supervisor_pid()  # a worker of `recsys serve --workers N` (api/supervision.py)
        orphan_watch = asyncio.create_task(stop_when_orphaned(supervisor)) if supervisor is not None else None
        await asyncio.to_thread(service.open)
        heap.refreeze()  # the loaded, warmed model out of the collector's reach (api/heap.py)
        frozen = asyncio.create_task(heap.follow())  # and every model swapped in later
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, reload_on_signal))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
            pass
        yield
        frozen.cancel()
        if orphan_watch is not None:
            orphan_watch.cancel()
        service.close()

    limits = (f"Limits: ids (users, items, event ids; paths, queries and bodies alike) {ID_RULE}; at most "
              f"{settings.max_batch} ratings or pairs per request; k at most {settings.max_k}; at most "
              f"{settings.max_explain} explanation entries; request bodies at most {settings.max_body_bytes} "
              "bytes (413, counted as they arrive, chunked bodies too). Writes need 'Authorization: Bearer "
              f"<key>'{' and so do reads' if settings.read_auth else ''}, checked before the body is read. "
              "Consistency: a write is acknowledged once the worker answering it has applied it; another "
              "worker applies it within about "
              f"{settings.follow_interval_s * 1000:.0f} ms plus the time to apply, or at once for a read "
              "that passes min_seq (a seq from a write's reply).")
    app = FastAPI(title="recsys", version="1", lifespan=lifespan,
                  description="Recommendations and rating predictions explained by the interactions and ratings "
                              f"behind them.\n\n{limits}")
    app.state.service = service
    metrics = service.metrics

    counters: dict[tuple[str, int], object] = {}  # labelled children, looked up once (labels() costs µs)
    histograms: dict[str, object] = {}

    def observe(route: str, code: int, seconds: float) -> None:
        counter = counters.get((route, code))
        if counter is None:
            counter = counters[route, code] = metrics.requests.labels(route, str(code))
        histogram = histograms.get(route)
        if histogram is None:
            histogram = histograms[route] = metrics.latency.labels(route)
        counter.inc()
        histogram.observe(seconds)

    # ------------------------------------------------------------------ errors
    def problem(code: int):
        async def handler(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=code)
        return handler

    for exc_type, code in ((UnknownIdError, 404), (ValueError, 422), (NoRatingModelError, 400), (NotReady, 503),
                           (EventIdConflictError, 409), (NotApplied, 409), (StaleRead, 409)):
        app.add_exception_handler(exc_type, problem(code))

    def handler_for(exc: Exception):
        """The app's handler for ``exc``, looked up along its class's MRO as Starlette's
        exception middleware does (up to, not including, `Exception`: that one is the
        server-error middleware's); None when there is none."""
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler = app.exception_handlers.get(cls)
            if handler is not None:
                return handler
        return None

    @app.exception_handler(405)
    async def method_not_allowed(request: Request, exc: FastAPIHTTPException) -> JSONResponse:
        """405 with every method the path answers in ``Allow`` (GET and POST /v1/predict are
        two routes; the router would name only the first)."""
        methods = sorted({m for route in app.router.routes if getattr(route, "methods", None)
                          and route.path_regex.match(request.url.path) for m in route.methods})
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": ", ".join(methods)})

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with where and what, without echoing the input (it may be NaN, or huge)."""
        return JSONResponse({"detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                                        for e in exc.errors()]}, status_code=422)

    # ------------------------------------------------------------------ dependencies
    bearer = HTTPBearer(auto_error=False, description="the service's API key (RECSYS_API_KEY)")

    # dependencies are `async def`: a plain `def` one would cost a thread-pool round trip each
    async def authorised(_: Annotated[object, Depends(bearer)]) -> None:
        """Declares the key in the OpenAPI document; `Guard` has checked it already."""

    MinSeq = Annotated[int | None, Query(
        ge=0, le=2**62, description="answer only once this worker has applied the store up to this seq (a seq "
                                    "from a write's reply): read-your-writes across workers; 409 when the store "
                                    "has not committed it")]

    async def live(min_seq: int | None) -> Recommender:
        """The live model, caught up to ``min_seq`` first when asked (in the thread pool: it
        may wait on the apply lock)."""
        if min_seq is not None and service.applied_seq < min_seq:
            await run_in_threadpool(service.wait_for, min_seq)
        return service.live()

    async def answer(small: bool, work, *args) -> JSONResponse:
        """Run ``work(*args)`` on the event loop when it is ``small`` (well under a
        millisecond: cheaper than a thread-pool round trip), else in the thread pool so
        that it does not hold up other requests; render its dict as JSON."""
        return ReadResponse(work(*args) if small else await run_in_threadpool(work, *args))

    auth = [Depends(authorised)]
    reads = auth if settings.read_auth else []
    writes = auth
    AnId = Annotated[str, PathParam(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN, description=ID_RULE)]
    QueryId = Annotated[str, Query(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN, description=ID_RULE)]
    Explain = Annotated[int, Query(ge=0, le=settings.max_explain, description="explanation entries per prediction")]
    PredictBatchIn, RatingsIn = bounded_models(settings.max_batch, settings.max_explain)

    invalid_request = {422: {"model": Problem, "description": "the request does not match this document "
                                                            "(detail: the list of what is wrong where), or a "
                                                            "rating off the model's scale"}}
    unparsable = {400: {"model": Problem, "description": "the body cannot be read as JSON"}}
    too_large = {**unparsable, **invalid_request, 413: {"model": Problem, "description": f"request body over {settings.max_body_bytes} bytes"}}
    unauthorised = {401: {"model": Problem, "description": "no 'Authorization: Bearer <key>' header"},
                    403: {"model": Problem, "description": "wrong key, or writes disabled (no key configured)"}}
    not_ready = {503: {"model": Problem, "description": "the model is not loaded yet"}}
    stale = {409: {"model": Problem, "description": "min_seq is not committed yet"}}
    read_problems = {**not_ready, **stale, **invalid_request, **(unauthorised if settings.read_auth else {})}
    unknown = {404: {"model": Problem, "description": "an item (or user) id nobody has heard of"}}
    no_rating_model = {400: {"model": Problem, "description": "the model ranks; it predicts no ratings"}}

    # Read answers are built as plain dicts and rendered once by JSONResponse: returning the
    # pydantic models would have FastAPI dump, re-validate and dump them again. They keep to
    # the documented models field for field (schemathesis checks every response against them).
    def out(p: Prediction) -> dict:
        return p.__dict__

    # ------------------------------------------------------------------ ops
    @app.get("/health", tags=["ops"])
    def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], response_model=ReadyOut, responses={503: {"model": ReadyOut}})
    def ready():
        """Readiness: model loaded, replayed and warmed (its explainers' caches built), store
        open; with how far the model has applied the store and how many stored ratings it
        could not apply."""
        rec, store = service.recommender, service.store
        body = {"model": rec is not None, "store": store is not None, "applied_seq": service.applied_seq,
                "skipped": service.skipped, "artefact": str(service.settings.model),
                "generation": service.generation, "worker_pid": os.getpid()}
        return JSONResponse(body, status_code=200 if rec is not None and store is not None else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics_text():
        """Request counts, latency histogram, ratings applied, the applied seq and skipped
        stored ratings (Prometheus text format)."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ reads
    # The GET reads' answers, shared by their routes and `FastReads` (which calls them with
    # parameters it has validated as the routes declare them).
    async def predict_response(user: str, item: str, explain: int, min_seq: int | None) -> JSONResponse:
        rec = await live(min_seq)
        return await answer(True, lambda: out(rec.predict(user, item, explain=explain)))

    async def recommendations_response(user: str, k: int, explain: int, min_seq: int | None) -> JSONResponse:
        rec = await live(min_seq)

        def work() -> dict:
            r = rec.recommend(user, k, explain=explain)
            return {"user": r.user, "path": r.path, "items": [out(p) for p in r.items]}

        return await answer(k * (1 + explain) <= 64, work)  # k=10, explain=3: on the loop

    async def user_response(user: str, min_seq: int | None) -> JSONResponse:
        rec = await live(min_seq)
        return await answer(True, lambda: rec.user_info(user).__dict__)

    # read handlers are `async def` (no thread-pool round trip for small answers, see `answer`)
    @app.get("/v1/predict", response_model=PredictionOut, dependencies=reads,
             responses={**unknown, **no_rating_model, **read_problems})
    async def predict(user: QueryId, item: QueryId, explain: Explain = 0, min_seq: MinSeq = None) -> PredictionOut:
        """Predict one rating, optionally with the top-`explain` training ratings behind it."""
        return await predict_response(user, item, explain, min_seq)

    @app.post("/v1/predict", response_model=PredictBatchOut, dependencies=reads,
              responses={**unknown, **no_rating_model, **read_problems, **too_large})
    async def predict_batch(body: PredictBatchIn, min_seq: MinSeq = None) -> PredictBatchOut:
        """Predict the ratings of up to `max_batch` (user, item) pairs."""
        rec = await live(min_seq)
        pairs = [(p.user, p.item) for p in body.pairs]
        return await answer(len(pairs) <= 4, lambda: {"predictions": [
            out(p) for p in rec.predict_many(pairs, explain=body.explain)]})

    @app.get("/v1/users/{user}/recommendations", response_model=RecommendationsOut, dependencies=reads,
             responses=read_problems)
    async def recommendations(user: AnId,
                              k: Annotated[int, Query(ge=1, le=settings.max_k, description="list length")] = DEFAULT_K,
                              explain: Explain = 0, min_seq: MinSeq = None) -> RecommendationsOut:
        """Top-k items the user has not rated, ranked by the ranking model (popularity for a user
        with no interaction), each with the ranker's score, the predicted rating where a rating
        model is loaded, and its explanation when asked (the user's interactions that most
        raised the item's score, in score units)."""
        return await recommendations_response(user, k, explain, min_seq)

    @app.get("/v1/users/{user}", response_model=UserOut, dependencies=reads, responses={**unknown, **read_problems})
    async def get_user(user: AnId, min_seq: MinSeq = None) -> UserOut:
        """What the service knows about a user."""
        return await user_response(user, min_seq)

    # ------------------------------------------------------------------ writes
    @app.post("/v1/ratings", response_model=RatingsOut, dependencies=writes,
              responses={**unknown, **unauthorised, **too_large, **not_ready,
                         409: {"model": Problem, "description": "an event_id already stored with another payload "
                                                                "(nothing of the request is stored)"}})
    def add_ratings(body: RatingsIn) -> RatingsOut:
        """Store ratings durably (committed before the reply) and apply them to the model
        (applied before the reply); each rating's `seq` can be passed as `min_seq` to reads."""
        return ratings_response(body)

    def ratings_response(body: RatingsIn) -> Response:
        """The answer of ``POST /v1/ratings`` (shared by the route and `FastRatings`)."""
        stored = service.ingest(body.ratings)  # the validated RatingIn objects, as the store reads them
        return Response(RatingsOut.render(stored), media_type="application/json")

    @app.post("/v1/users", response_model=CreatedOut, dependencies=writes, status_code=201,
              responses={200: {"model": CreatedOut, "description": "the user already existed"},
                         **unauthorised, **too_large, **not_ready})
    def create_user(body: UserIn, response: Response) -> CreatedOut:
        """Create a user with no ratings (answered by the fallback until they rate); 200 and
        ``created: false`` when the user already exists."""
        created = service.create_user(body.user)
        if not created:
            response.status_code = status.HTTP_200_OK
        return CreatedOut(user=body.user, created=created)

    @app.post("/v1/admin/reload", response_model=ReloadOut, dependencies=writes,
              responses={**unauthorised, **too_large, **not_ready,
                         404: {"model": Problem, "description": "no such artefact directory"},
                         422: {"model": Problem, "description": "the artefact is malformed (or the body does not "
                                                                "match this document); the model serving now "
                                                                "keeps serving"}})
    def reload(body: ReloadIn | None = None) -> ReloadOut:
        """Load an artefact (default: the configured one), replay the store into it (stored
        ratings it cannot apply are skipped and reported), warm it, swap it in."""
        service.live()
        path = Path(body.model) if body and body.model else None
        if path is not None and not path.is_dir():
            return JSONResponse({"detail": f"{path}: no such model directory"}, status_code=404)
        try:
            fresh = service.reload(path)
        except ArtefactError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        app.openapi_schema = None  # the document states the live model's rating scale
        rec = fresh.recommender
        return ReloadOut(model=str(service.settings.model), replayed=rec.n_ingested, skipped=rec.n_skipped,
                         skipped_examples=rec.skipped_examples)

    def openapi() -> dict:
        """FastAPI's document, with the live model's rating scale on `RatingIn.rating`; for
        a ranker-only model, without ``/v1/predict`` (which then answers only 400)."""
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)
            rec = service.recommender
            if rec is not None and rec.rater is None:
                del doc["paths"]["/v1/predict"]
                doc["info"]["description"] += (" This model ranks; it predicts no ratings: /v1/predict is "
                                               "not offered (it answers 400).")
            if rec is not None:
                lo, hi = rec.model.rating_scale
                rating = doc["components"]["schemas"]["RatingIn"]["properties"]["rating"]
                rating["minimum"], rating["maximum"] = float(lo), float(hi)
                rating["description"] += f"; this model's scale: {lo:g} to {hi:g} (422 outside)"
        return app.openapi_schema

    app.openapi = openapi

    fast = None
    if fast_reads:
        gets = {route.path: route for route in app.router.routes if "GET" in (getattr(route, "methods", None) or ())}
        fast = FastReads(predict=predict_response, recommendations=recommendations_response, user=user_response,
                         routes=gets, handler_for=handler_for, max_explain=settings.max_explain,
                         max_k=settings.max_k)
    app.state.fast_reads = fast
    fast_body = None
    if fast_writes:
        post = next(route for route in app.router.routes if getattr(route, "path", None) == "/v1/ratings")
        fast_body = FastRatings(model=RatingsIn, respond=ratings_response, route=post, handler_for=handler_for)
    app.state.fast_writes = fast_body
    app.add_middleware(Guard, key=settings.key, read_auth=settings.read_auth,
                       max_body_bytes=settings.max_body_bytes, observe=observe, fast=fast, fast_body=fast_body)
    return app

"""The REST service: thin FastAPI routes over `Service`, which holds the live
`recsys.recommender.Recommender` and the `recsys.store.RatingStore` and owns the sequences
that touch both (`Service.ingest`: validate, store durably, apply under the apply lock,
count; `Service.create_user`; `Service.reload`).

``create_app(settings)`` builds the app; its lifespan loads the artefact, opens the store and
replays every stored rating into the model, so nothing acknowledged is lost across restarts.
Handlers are plain ``def`` functions (FastAPI runs them in its thread pool), so model work
never blocks the event loop. Writes need ``Authorization: Bearer $RECSYS_API_KEY``; reads
are open unless ``RECSYS_READ_AUTH=true``. ``POST /v1/admin/reload`` (or SIGHUP) loads a new
artefact, replays the store into it and swaps it in; requests in flight finish on the old
one.

Recommendations come from the artefact's ranking model (its ranker, or the model itself when
it ranks), each item with the ranker's ``score`` and the predicted ``rating`` where a rating
model is loaded (null otherwise); a user with no interaction gets the popularity list (path
``popularity``). Ingested ratings are folded into the ranker at once. Rating predictions
(``/v1/predict``) of a ranker-only artefact are a 400 ("this model ranks; it predicts no
ratings").
"""


import asyncio
import hmac
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.schemas import (
    CreatedOut,
    PredictBatchIn,
    PredictBatchOut,
    PredictionOut,
    Problem,
    RatingsIn,
    RatingsOut,
    RecommendationsOut,
    ReloadIn,
    ReloadOut,
    StoredOut,
    UserIn,
    UserOut,
)
from recsys.errors import ArtefactError, UnknownIdError
from recsys.recommender import NoRatingModelError, Prediction, Recommender
from recsys.store import NewRating, RatingStore, StoredRating

log = logging.getLogger("recsys.api")


class Settings(BaseSettings):
    """Service settings, from ``RECSYS_*`` environment variables (or arguments)."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", protected_namespaces=())

    model: Path = Path("model")  # artefact directory (RECSYS_MODEL)
    db: Path = Path("recsys-ratings.sqlite3")  # rating store (RECSYS_DB)
    api_key: str | None = None  # RECSYS_API_KEY; with none set, writes are refused (403)
    api_key_file: Path | None = None  # or read the key from this file
    read_auth: bool = False  # require the key for reads too
    max_batch: int = 1000  # ratings or pairs per request
    max_body_bytes: int = 1 << 20
    max_k: int = 100
    device: str = "cpu"

    def key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip() or None
        return None


class Metrics:
    """Prometheus metrics of one app (its own registry, so apps in tests don't collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("recsys_requests_total", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("recsys_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        self.ingested = Counter("recsys_ingested_ratings_total", "ratings stored and applied",
                                registry=self.registry)


class Service:
    """What the routes reach through dependencies: the live recommender and the store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.recommender: Recommender | None = None
        self.store: RatingStore | None = None
        self.metrics = Metrics()
        self._reload_lock = threading.Lock()
        self._apply_lock = threading.Lock()

    def open(self) -> None:
        self.store = RatingStore(self.settings.db)
        self.recommender = self._load(self.settings.model)

    def _load(self, path: Path) -> Recommender:
        rec = Recommender.load(path, device=self.settings.device)
        start = time.perf_counter()
        n = rec.replay(self.store.replay(), self.store.users())
        log.info("loaded %s and replayed %d stored ratings in %.2f s", path, n, time.perf_counter() - start)
        return rec

    def reload(self, path: Path | None = None) -> tuple[Path, int]:
        with self._reload_lock:
            path = path or self.settings.model
            fresh = self._load(path)
            with self._apply_lock:  # catch up with ratings applied while loading, then swap
                fresh.add_ratings(self.store.replay(after_seq=fresh.last_seq))
                self.recommender = fresh
            self.settings.model = path
            return path, fresh.n_ingested

    def ingest(self, new: list[NewRating]) -> list[StoredRating]:
        """The durable-ingest sequence: validate against the live model (unknown items,
        off-scale values: nothing is stored), store durably (committed before anything
        else), apply to the live model under the apply lock (so a reload's catch-up cannot
        interleave), count. Returns what the store holds for each rating (duplicates by
        event id flagged)."""
        self.live().validate(new)
        stored = self.store.add(new)
        with self._apply_lock:
            applied = self.live().add_ratings(stored)
        self.metrics.ingested.inc(applied)
        return stored

    def create_user(self, user: str) -> bool:
        """Create a user with no ratings: durable first (re-created on replay), then in the
        live model under the apply lock; False when the user already existed."""
        self.store.add_user(user)
        with self._apply_lock:
            return self.live().add_user(user)

    def live(self) -> Recommender:
        """The recommender serving now (`NotReady` before the model is loaded)."""
        if self.recommender is None or self.store is None:
            raise NotReady("model not loaded yet")
        return self.recommender

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


class NotReady(RuntimeError):
    """The service has no model (or store) yet: answered 503."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(service.open)
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, service.reload))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
            pass
        yield
        service.close()

    app = FastAPI(title="recsys", version="1", lifespan=lifespan,
                  description="Recommendations and rating predictions explained by the interactions and ratings "
                              "behind them.")
    app.state.service = service
    problem = {404: {"model": Problem}, 413: {"model": Problem}}
    predict_problem = {**problem, 400: {"model": Problem, "description": "the model ranks; it predicts no ratings"}}

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            response = JSONResponse({"detail": f"request body over {settings.max_body_bytes} bytes"}, status_code=413)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        service.metrics.requests.labels(name, str(response.status_code)).inc()
        service.metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(UnknownIdError)
    async def unknown_id(_: Request, exc: UnknownIdError):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(NoRatingModelError)
    async def no_rating_model(_: Request, exc: NoRatingModelError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def recommender() -> Recommender:
        rec = service.recommender
        if rec is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "model not loaded yet")
        return rec

    @app.exception_handler(NotReady)
    async def not_ready(_: Request, exc: NotReady):
        return JSONResponse({"detail": str(exc)}, status_code=503)

    def check_key(request: Request) -> None:
        key = settings.key()
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing 'Authorization: Bearer <key>' header",
                                headers={"WWW-Authenticate": "Bearer"})
        if key is None or not hmac.compare_digest(header[7:].encode(), key.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong API key" if key else "writes are disabled: "
                                "no API key is configured (set RECSYS_API_KEY)")

    def read_access(request: Request) -> None:
        if settings.read_auth:
            check_key(request)

    Rec = Annotated[Recommender, Depends(recommender)]
    reads = [Depends(read_access)]
    writes = [Depends(check_key)]

    def out(p: Prediction) -> PredictionOut:
        return PredictionOut(**p.__dict__)

    def bounded(n: int) -> None:
        if n > settings.max_batch:
            raise HTTPException(413,
                                f"{n} entries in one request; the limit is {settings.max_batch}")

    @app.get("/health", tags=["ops"])
    def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"model": Problem}})
    def ready():
        """Readiness: model loaded and store open."""
        ok = service.recommender is not None and service.store is not None
        body = {"model": service.recommender is not None, "store": service.store is not None}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics():
        """Request counts, latency histogram and ingested ratings (Prometheus text format)."""
        return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/predict", response_model=PredictionOut, dependencies=reads, responses=predict_problem)
    def predict(rec: Rec, user: Annotated[str, Query(min_length=1, max_length=128)],
                item: Annotated[str, Query(min_length=1, max_length=128)],
                explain: Annotated[int, Query(ge=0, le=50)] = 0) -> PredictionOut:
        """Predict one rating, optionally with the top-`explain` training ratings behind it."""
        return out(rec.predict(user, item, explain=explain))

    @app.post("/v1/predict", response_model=PredictBatchOut, dependencies=reads, responses=predict_problem)
    def predict_batch(rec: Rec, body: PredictBatchIn) -> PredictBatchOut:
        bounded(len(body.pairs))
        preds = rec.predict_many([(p.user, p.item) for p in body.pairs], explain=body.explain)
        return PredictBatchOut(predictions=[out(p) for p in preds])

    @app.get("/v1/users/{user}/recommendations", response_model=RecommendationsOut, dependencies=reads,
             responses=problem)
    def recommendations(rec: Rec, user: str, k: Annotated[int, Query(ge=1)] = 10,
                        explain: Annotated[int, Query(ge=0, le=50)] = 0) -> RecommendationsOut:
        """Top-k items the user has not rated, ranked by the ranking model (popularity for a user
        with no interaction), each with the ranker's score, the predicted rating where a rating
        model is loaded, and its explanation when asked (the user's interactions that most
        raised the item's score, in score units)."""
        if k > settings.max_k:
            raise HTTPException(413, f"k={k}; the limit is {settings.max_k}")
        r = rec.recommend(user, k, explain=explain)
        return RecommendationsOut(user=r.user, path=r.path, items=[out(p) for p in r.items])

    @app.post("/v1/ratings", response_model=RatingsOut, dependencies=writes, responses=problem)
    def add_ratings(rec: Rec, body: RatingsIn) -> RatingsOut:
        """Store ratings durably (committed before the reply), then apply them to the model."""
        bounded(len(body.ratings))
        stored = service.ingest([NewRating(r.user, r.item, r.rating, r.timestamp, r.event_id) for r in body.ratings])
        return RatingsOut(accepted=sum(not s.duplicate for s in stored), duplicates=sum(s.duplicate for s in stored),
                          ratings=[StoredOut(**s.__dict__) for s in stored])

    @app.post("/v1/users", response_model=CreatedOut, dependencies=writes, status_code=201,
              responses={200: {"model": CreatedOut, "description": "the user already existed"}})
    def create_user(rec: Rec, body: UserIn, response: Response) -> CreatedOut:
        """Create a user with no ratings (answered by the fallback until they rate); 200 and
        ``created: false`` when the user already exists."""
        created = service.create_user(body.user)
        if not created:
            response.status_code = status.HTTP_200_OK
        return CreatedOut(user=body.user, created=created)

    @app.get("/v1/users/{user}", response_model=UserOut, dependencies=reads, responses=problem)
    def get_user(rec: Rec, user: str) -> UserOut:
        """What the service knows about a user."""
        return UserOut(**rec.user_info(user).__dict__)

    @app.post("/v1/admin/reload", response_model=ReloadOut, dependencies=writes,
              responses={422: {"model": Problem}})
    def reload(body: ReloadIn | None = None) -> ReloadOut:
        """Load an artefact (default: the configured one), replay the store into it, swap."""
        try:
            path, n = service.reload(Path(body.model) if body and body.model else None)
        except ArtefactError as exc:
            raise HTTPException(422, str(exc)) from None
        return ReloadOut(model=str(path), replayed=n)

    return app

"""`Service`: what the routes reach, the live `recsys.recommender.Recommender` and the
`recsys.store.RatingStore`, and the one sequence that moves the first along the second.

**The store is the truth; the model follows it.** Every change (a rating, a user created with
no rating) is committed to the store first, where it gets its place in the log (``seq`` for
ratings, a row position for users). The live model applies the log strictly in that order,
through one cursor (`Recommender.last_seq`), under the apply lock: `catch_up` applies
everything committed after the cursor. There is no other way into the model, so each
committed rating is applied exactly once and in commit order, whoever wrote it.

- A write (`ingest`, `create_user`) commits, then catches the model up to (at least) its own
  rows before it is acknowledged: after an acknowledged POST, reads of the same worker see it
  (read-your-writes). Concurrent writers batch naturally: the first to take the apply lock
  applies everything committed so far, the others find the cursor past their rows.
- A background follower polls the store every ``follow_interval_s`` (default 0.05 s; two
  indexed lookups) and catches up when something new was committed: rows written through
  other workers or processes on the same store. So a worker is at most one interval plus
  the time to apply the new rows behind the store; a read that must see a given write
  passes ``min_seq`` (the write's ``seq``) and is answered only once the worker has applied
  it.
- A rating the model cannot apply (an item it does not know: the store may hold rows an
  earlier artefact accepted) is skipped, counted and reported (``/ready``, the reload
  response, ``recsys_skipped_ratings``), never blocking startup, reload or the follower. A
  write whose own row this model then cannot apply (a reload swapped models between its
  validation and its apply) is answered 409, not acknowledged as applied.
- `reload` loads the new artefact beside the live one (the old one keeps serving; a bad
  artefact is an `ArtefactError`, answered 422), replays the store into it, warms it, then
  under the apply lock catches it up and swaps it in.
- **One model for every process on the store.** A successful reload records the artefact's
  path in the store as a new generation (`RatingStore.choose_model`); every other worker's
  follower sees the generation move and reloads the same path in the background (its old
  model serving meanwhile). A worker that starts (or is restarted by uvicorn) loads the
  store's chosen model, falling back to ``settings.model`` when none was chosen. A worker
  that cannot load a chosen artefact keeps its model, logs why and counts it
  (``recsys_reload_failures_total``); ``/ready`` says which artefact and generation each
  worker serves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from recsys.errors import ArtefactError, RecsysError, UnknownIdError
from recsys.recommender import Recommender
from recsys.store import RatingLike, RatingStore, StoredRating
from recsys.threads import limit_compute_threads

log = logging.getLogger("recsys.api")


class Settings(BaseSettings):
    """Service settings, from ``RECSYS_*`` environment variables (or arguments)."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", protected_namespaces=())

    model: Path = Path("model")  # artefact directory (RECSYS_MODEL)
    db: Path = Path("recsys-ratings.sqlite3")  # rating store (RECSYS_DB)
    api_key: str | None = None  # RECSYS_API_KEY; with none set, writes are refused (403)
    api_key_file: Path | None = None  # or read the key from this file
    read_auth: bool = False  # require the key for reads too
    max_batch: int = Field(1000, ge=1)  # ratings or pairs per request
    max_body_bytes: int = Field(1 << 20, ge=64)  # bytes of a request body, counted as they arrive
    max_k: int = Field(100, ge=1)  # recommendations per request
    max_explain: int = Field(50, ge=0)  # explanation entries per prediction
    follow_interval_s: float = Field(0.05, gt=0, le=60)  # how often a worker polls the store for others' writes
    device: str = "cpu"
    # threads torch and numpy's BLAS use within one request (recsys.threads.limit_compute_threads):
    # requests already run side by side on every core, so more threads only spin against them
    compute_threads: int = Field(1, ge=1)

    def key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip() or None
        return None


class NotReady(RuntimeError):
    """The service has no model (or store) yet: answered 503."""


class NotApplied(RecsysError):
    """A write was stored but the model now serving cannot apply it: answered 409."""


class StaleRead(RecsysError):
    """A read asked for a ``min_seq`` the store has not committed: answered 409."""


class Metrics:
    """Prometheus metrics of one app (its own registry, so apps in tests don't collide)."""

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("recsys_requests_total", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("recsys_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        self.ingested = Counter("recsys_ingested_ratings_total",
                                "ratings applied to this worker's live model since it started (any writer)",
                                registry=self.registry)
        Gauge("recsys_applied_seq", "seq of the last stored rating the live model has applied",
              registry=self.registry).set_function(lambda: service.applied_seq)
        self.reload_failures = Counter("recsys_reload_failures_total",
                                       "reloads of a chosen artefact this worker could not load", registry=self.registry)
        Gauge("recsys_model_generation", "generation of the artefact this worker serves (see /ready)",
              registry=self.registry).set_function(lambda: service.generation)
        Gauge("recsys_skipped_ratings", "stored ratings the live model could not apply (unknown item, off scale)",
              registry=self.registry).set_function(lambda: service.skipped)


@dataclass
class Loaded:
    """A recommender and how far it has followed the store's users (position of the last)."""

    recommender: Recommender
    users_cursor: int = 0


class Service:
    """The live recommender, the store, and the sequences that touch both (module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: RatingStore | None = None
        self._live: Loaded | None = None
        self.metrics = Metrics(self)
        self._reload_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        self._restore_threads: Callable[[], None] | None = None
        #: the generation of the store's chosen model this worker serves (0: none chosen yet)
        self.generation = 0
        self._model_reloader: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def recommender(self) -> Recommender | None:
        return None if self._live is None else self._live.recommender

    def open(self) -> None:
        """Open the store, load, replay and warm the model, start following the store."""
        self._restore_threads = limit_compute_threads(self.settings.compute_threads)
        self.store = RatingStore(self.settings.db)
        chosen = self.store.chosen_model()
        if chosen is not None:
            self.generation, path = chosen[0], Path(chosen[1])
            self.settings.model = path
        self._live = self._load(self.settings.model)
        self._follower = threading.Thread(target=self._follow, name="store-follower", daemon=True)
        self._follower.start()

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=5)
        if self._model_reloader is not None:
            self._model_reloader.join(timeout=60)
        if self.store is not None:
            self.store.close()
        if self._restore_threads is not None:  # the process's thread counts as they were before `open`
            self._restore_threads()
            self._restore_threads = None

    def live(self) -> Recommender:
        """The recommender serving now (`NotReady` before the model is loaded)."""
        live = self._live
        if live is None or self.store is None:
            raise NotReady("model not loaded yet")
        return live.recommender

    @property
    def applied_seq(self) -> int:
        return 0 if self._live is None else self._live.recommender.last_seq

    @property
    def skipped(self) -> int:
        return 0 if self._live is None else self._live.recommender.n_skipped

    def _load(self, path: Path) -> Loaded:
        """Load the artefact at ``path`` (any failure: `ArtefactError` naming it), replay the
        store into it (skipping what it cannot map) and warm it."""
        start = time.perf_counter()
        try:
            rec = Recommender.load(path, device=self.settings.device)
        except ArtefactError:
            raise
        except Exception as exc:  # a malformed file: say which artefact and what, never a 500
            raise ArtefactError(f"cannot load the model at {path}: {type(exc).__name__}: {exc}") from exc
        loaded = Loaded(rec)
        n = self._apply_new(loaded)
        self._warm(rec)
        log.info("loaded %s, replayed %d stored ratings (%d skipped) and warmed it in %.2f s", path, n,
                 rec.n_skipped, time.perf_counter() - start)
        if rec.n_skipped:
            log.warning("%d stored ratings cannot be applied to %s, e.g. %s", rec.n_skipped, path,
                        rec.skipped_examples[:3])
        return loaded

    @staticmethod
    def _warm(rec: Recommender) -> None:
        """Answer one explained prediction and one explained recommendation before serving,
        so that whatever the first request would build (explainers' indexes and caches,
        compiled kernels) is built now and ``/ready`` means ready."""
        train = rec.train
        if not len(train):
            return
        user, item = train.user_ids.raw(int(train.users[0])), train.item_ids.raw(int(train.items[0]))
        if rec.rater is not None:
            rec.predict(user, item, explain=1)
        rec.recommend(user, 1, explain=1)

    # ------------------------------------------------------------------ following the store
    def _apply_new(self, loaded: Loaded, until_seq: int = 0, *, users: bool = True) -> int:
        """Apply to ``loaded`` the users (unless ``users`` is False) and ratings committed
        after its cursors (the ratings: everything committed, or at least up to ``until_seq``
        when given); returns how many ratings were applied. Callers hold the apply lock or own
        ``loaded`` alone.

        The rows come from `RatingStore.committed_after`: those this process committed from
        memory, others' from the file, in log order, so a request applies every row
        committed before it in one batch (those of concurrent requests of its group commit
        too: they then find the cursor past their rows)."""
        for position, user in self.store.new_users(loaded.users_cursor) if users else ():
            loaded.recommender.add_user(user)
            loaded.users_cursor = position
        rec = loaded.recommender
        applied = 0
        while True:
            rows = self.store.committed_after(rec.last_seq)
            if not rows:
                return applied
            applied += rec.replay(rows)
            if until_seq and rec.last_seq >= until_seq:
                return applied

    def catch_up(self, until_seq: int = 0, until_user: int = 0) -> int:
        """Under the apply lock, apply everything the store committed after the live model's
        cursors (nothing when they are already at ``until_seq`` and ``until_user``; with
        ``until_seq``, at least the log up to it); returns how many ratings were applied.
        Asked for ratings only (``until_seq`` without ``until_user``: a write's or a read's
        ``min_seq``), it leaves the users created without ratings to the follower and to
        `create_user`: a rating creates its user anyway, and the query would cost every write."""
        with self._apply_lock:
            live = self._live
            if live is None or self.store is None:
                raise NotReady("model not loaded yet")
            if (until_seq or until_user) and until_seq <= live.recommender.last_seq \
                    and until_user <= live.users_cursor:
                return 0
            applied = self._apply_new(live, until_seq, users=bool(until_user) or not until_seq)
        if applied:
            self.metrics.ingested.inc(applied)
        return applied

    def _follow(self) -> None:
        """The background follower: poll the store's cursors, catch up when they moved;
        reload (in its own thread) when another process chose a new model."""
        while not self._stop.wait(self.settings.follow_interval_s):
            try:
                live = self._live
                if live is not None and (self.store.last_seq() > live.recommender.last_seq
                                         or self.store.last_user() > live.users_cursor):
                    self.catch_up()
                chosen = self.store.chosen_model()
                if chosen is not None and chosen[0] > self.generation and (
                        self._model_reloader is None or not self._model_reloader.is_alive()):
                    self._model_reloader = threading.Thread(target=self._follow_model, args=chosen,
                                                            name="model-follower", daemon=True)
                    self._model_reloader.start()
            except Exception:  # keep following; the next poll retries
                log.exception("following the rating store failed")

    def _follow_model(self, generation: int, path: str) -> None:
        """Serve the model another process chose (generation ``generation``)."""
        try:
            self.reload(Path(path), generation=generation)
        except ArtefactError as exc:
            with self._reload_lock:
                self.generation = max(self.generation, generation)  # not retried; the old model serves
            self.metrics.reload_failures.inc()
            log.error("cannot serve the model chosen through another process (generation %d): %s", generation, exc)

    def wait_for(self, min_seq: int) -> None:
        """Return once the live model has applied the store up to ``min_seq`` (catching up
        now if it has not); `StaleRead` when the store has not committed that seq."""
        if self.live().last_seq >= min_seq:
            return
        self.catch_up(until_seq=min_seq)
        if self.live().last_seq < min_seq:
            raise StaleRead(f"min_seq={min_seq} is not committed yet: the store holds ratings up to seq "
                            f"{self.store.last_seq()}")

    # ------------------------------------------------------------------ writes
    def ingest(self, new: Sequence[RatingLike]) -> list[StoredRating]:
        """Validate against the live model (unknown items, off-scale values: nothing is
        stored), store durably (an event id reused with another payload: `EventIdConflictError`,
        nothing stored), catch the live model up to these rows, and only then return what the
        store holds for each rating (duplicates flagged)."""
        self.live().validate(new)
        stored = self.store.add(new)
        fresh = [s.seq for s in stored if not s.duplicate]
        self.catch_up(until_seq=max(s.seq for s in stored))
        if fresh:
            live = self.live()
            lost = set(live.skipped_seqs(fresh[0], fresh[-1]))
            if lost:
                try:
                    live.validate([s for s in stored if s.seq in lost])
                    reason = "see /ready"
                except (UnknownIdError, ValueError) as exc:
                    reason = str(exc)
                raise NotApplied(f"stored as seq {sorted(lost)}, but the model now serving (reloaded meanwhile) "
                                 f"cannot apply them ({reason}); they stay in the store")
        return stored

    def create_user(self, user: str) -> bool:
        """Create a user with no ratings: durable first, then caught up like a rating; False
        when the user already existed (in the store or the model)."""
        existed = user in self.live().user_ids  # e.g. a user who has rated already
        created = self.store.add_user(user)
        self.catch_up(until_user=self.store.last_user())
        return created and not existed

    # ------------------------------------------------------------------ reload
    def reload(self, path: Path | None = None, *, generation: int | None = None) -> Loaded:
        """Load ``path`` (default: the configured artefact) beside the live model, then swap
        it in caught up with the store; `ArtefactError` leaves the live model serving.
        Without ``generation`` (a reload asked of this process) the path is recorded in the
        store as a new generation, which the other processes follow; with it (following
        one), nothing is recorded and a generation already served is not loaded again."""
        with self._reload_lock:
            if generation is not None and generation <= self.generation:
                return self._live
            path = path or self.settings.model
            fresh = self._load(path)
            if generation is None:
                generation = self.store.choose_model(str(path))
            self.generation = max(self.generation, generation)
            with self._apply_lock:  # catch up with what was committed while loading, then swap
                applied = self._apply_new(fresh)
                self._live = fresh
            if applied:
                self.metrics.ingested.inc(applied)
            self.settings.model = path
            return fresh

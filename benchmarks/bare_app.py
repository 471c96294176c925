"""The bare serving stack: a minimal FastAPI + SQLite app doing the same work per request as
``recsys serve``, with none of recsys's code, as the floor `serve_latency.py` measures the
service against (same run, same machine, same number of uvicorn workers).

It reads a ``recsys train`` artefact's files directly (safetensors + ``ids.json``; no
``recsys`` import) and answers:

- ``GET /v1/predict?user=&item=&explain=``: the biased-MF prediction ``μ + b_u + b_i +
  p_u·q_i / K`` (K factor blocks) and, with ``explain=k``, the ``k`` training ratings sharing
  the user or the item with the largest ``|effect|``, where a rating's effect is its residual
  times a dot product with the prediction's other side (``q_j·q_i`` for the user's ratings,
  ``p_v·p_u`` for the item's): one gather, one ``[m, D] @ [D]`` product and a top-k over the
  ~100-300 candidates, the shape of the work recsys's cached Newton explanation does;
- ``GET /v1/users/{user}/recommendations?k=&explain=``: EASE scores ``x_u·B`` (the gathered
  rows of the ranker's dense ``B`` for the user's rated items, weighted 1 or 0.5 by liked or
  not), the user's rated items masked, an ``argpartition`` top-k, the MF predicted rating of
  each, and with ``explain=e`` each item's ``e`` largest shares ``x_uj·B_ji``; artefacts
  without a dense EASE ranker rank by the MF scores ``Q @ p_u``;
- ``POST /v1/ratings`` ``{"ratings": [{"user", "item", "rating", "timestamp"?,
  "event_id"?}]}``: validated by pydantic, inserted into SQLite (WAL, ``synchronous=FULL``)
  and committed before the reply (writers serialised by a lock per process and an exclusive
  file lock across workers), then appended to the worker's in-memory rated lists (which the
  recommendations mask);
- ``GET /v1/users/{user}``, ``GET /health``, ``GET /ready``.

Reads are ``async def`` (sub-millisecond numpy work is cheaper on the event loop than through
the thread pool); the write is a ``def`` (its fsync runs in the thread pool). Unknown ids
are 404. Numpy's BLAS runs one thread per worker, as recsys serve's does. Settings from the
environment: ``BARE_MODEL`` (artefact folder), ``BARE_DB`` (SQLite file). Run as a user
would::

    BARE_MODEL=/path/to/artefact BARE_DB=/tmp/bare.sqlite3 \\
        uvicorn bare_app:app --app-dir benchmarks --workers 2 --port 8001
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load_file
from threadpoolctl import threadpool_limits


class Artefact:
    """The arrays one worker serves from (float32 tables, CSR lists of training ratings)."""

    def __init__(self, folder: Path) -> None:
        weights = load_file(str(folder / "weights.safetensors"))
        meta = json.loads((folder / "model.json").read_text())
        ids = json.loads((folder / "ids.json").read_text())
        self.n_blocks = int(meta.get("config", {}).get("n_blocks", 1))
        self.P = np.ascontiguousarray(weights["user_factors.weight"], dtype=np.float32)
        self.Q = np.ascontiguousarray(weights["item_factors.weight"], dtype=np.float32)
        self.bu = weights["user_bias.weight"].mean(1).astype(np.float32)
        self.bi = weights["item_bias.weight"].mean(1).astype(np.float32)
        self.mu = float(weights["global_mean"])
        self.lo, self.hi = (float(x) for x in meta["rating_scale"])
        self.users: list[str] = [str(u) for u in ids["users"]]
        self.items: list[str] = [str(i) for i in ids["items"]]
        self.user_index = {u: k for k, u in enumerate(self.users)}
        self.item_index = {i: k for k, i in enumerate(self.items)}
        self.titles: list[str | None] = list(ids.get("item_titles") or [None] * len(self.items))
        r = load_file(str(folder / "ratings.safetensors"))
        self.r_user, self.r_item = r["users"].astype(np.int64), r["items"].astype(np.int64)
        self.r_value = r["values"].astype(np.float32)
        self.r_time = r["timestamps"].astype(np.int64) if "timestamps" in r else np.zeros(len(self.r_user), np.int64)
        pred = self.mu + self.bu[self.r_user] + self.bi[self.r_item] + \
            np.einsum("md,md->m", self.P[self.r_user], self.Q[self.r_item]) / self.n_blocks
        self.residual = (self.r_value - pred).astype(np.float32)
        self.by_user = _csr(self.r_user, len(self.users))
        self.by_item = _csr(self.r_item, len(self.items))
        ranker = folder / "ranker" / "weights.safetensors"
        b = load_file(str(ranker)).get("weights") if ranker.exists() else None
        self.B = b if b is not None and b.shape == (len(self.items), len(self.items)) else None
        self.popularity = np.bincount(self.r_item, minlength=len(self.items)).astype(np.float32)
        #: items each user rated online (this worker's), on top of the training ratings
        self.live: dict[int, list[int]] = {}

    def predict(self, u: int, i: int) -> float:
        raw = self.mu + float(self.bu[u]) + float(self.bi[i]) + float(self.P[u] @ self.Q[i]) / self.n_blocks
        return min(max(raw, self.lo), self.hi)

    def explain(self, u: int, i: int, k: int) -> list[dict]:
        (us, ue), (is_, ie) = self.by_user[1][u], self.by_item[1][i]
        rows = np.concatenate([self.by_user[0][us:ue], self.by_item[0][is_:ie]])
        n_user = ue - us
        effect = np.empty(len(rows), np.float32)
        effect[:n_user] = self.Q[self.r_item[rows[:n_user]]] @ self.Q[i]
        effect[n_user:] = self.P[self.r_user[rows[n_user:]]] @ self.P[u]
        effect *= self.residual[rows]
        return self._top_rows(rows, effect, k)

    def _top_rows(self, rows: np.ndarray, effect: np.ndarray, k: int) -> list[dict]:
        k = min(k, len(rows))
        if k == 0:
            return []
        top = np.argpartition(-np.abs(effect), k - 1)[:k]
        top = top[np.argsort(-np.abs(effect[top]))]
        return [{"user": self.users[self.r_user[z]], "item": self.items[self.r_item[z]],
                 "title": self.titles[self.r_item[z]], "rating": float(self.r_value[z]),
                 "timestamp": int(self.r_time[z]), "effect": float(effect[j])}
                for j, z in ((int(j), int(rows[j])) for j in top)]

    def rated(self, u: int) -> np.ndarray:
        s, e = self.by_user[1][u]
        rows = self.by_user[0][s:e]
        live = self.live.get(u)
        items = self.r_item[rows]
        return np.concatenate([items, np.asarray(live, np.int64)]) if live else items

    def recommend(self, u: int, k: int, explain: int) -> list[dict]:
        s, e = self.by_user[1][u]
        rows = self.by_user[0][s:e]
        rated = self.rated(u)
        if self.B is not None:
            weight = np.where(self.r_value[rows] >= 4.0, 1.0, 0.5).astype(np.float32)
            gathered = self.B[self.r_item[rows]]  # [m, n_items]
            scores = weight @ gathered
        else:
            gathered, weight = None, None
            scores = self.Q @ self.P[u] / self.n_blocks + self.bi
        scores[rated] = -np.inf
        k = min(k, len(scores) - len(np.unique(rated)))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top])]
        out = []
        for i in top.tolist():
            entry = {"user": self.users[u], "item": self.items[i], "title": self.titles[i],
                     "rating": self.predict(u, i), "score": float(scores[i]), "path": "model"}
            if explain:
                effect = weight * gathered[:, i] if gathered is not None else \
                    (self.Q[self.r_item[rows]] @ self.Q[i]) * self.residual[rows]
                entry["explanation"] = self._top_rows(rows, effect, explain)
            out.append(entry)
        return out


def _csr(keys: np.ndarray, n: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Rows sorted by ``keys`` and each key's ``(start, end)`` in them."""
    order = np.argsort(keys, kind="stable")
    bounds = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=bounds[1:])
    return order, list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


class Store:
    """SQLite WAL, ``synchronous=FULL``, one commit per request, writers serialised."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS ratings (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                          "user TEXT NOT NULL, item TEXT NOT NULL, rating REAL NOT NULL, timestamp INTEGER NOT NULL, "
                          "event_id TEXT UNIQUE, received_at REAL NOT NULL)")
        self.lock = threading.Lock()
        self.lock_file = open(path.with_name(path.name + ".lock"), "a+b")  # noqa: SIM115

    def add(self, rows: list[tuple]) -> None:
        with self.lock:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX)
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.executemany("INSERT INTO ratings(user, item, rating, timestamp, event_id, received_at) "
                                      "VALUES (?, ?, ?, ?, ?, ?)", rows)
                self.conn.execute("COMMIT")
            finally:
                fcntl.flock(self.lock_file, fcntl.LOCK_UN)


Id = Field(min_length=1, max_length=128)


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Id
    item: str = Id
    rating: float = Field(allow_inf_nan=False)
    timestamp: int | None = Field(None, ge=0)
    event_id: str | None = Field(None, min_length=1, max_length=128)


class RatingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratings: list[RatingIn] = Field(min_length=1, max_length=1000)


# one BLAS thread per worker, as recsys serve runs: the workers already use every core, and a
# multi-threaded gather-and-multiply spins against them (10x the CPU of one thread at 10^7)
threadpool_limits(1)
model = Artefact(Path(os.environ["BARE_MODEL"]))
store = Store(Path(os.environ["BARE_DB"]))
app = FastAPI(title="bare")


def _user(raw: str) -> int:
    u = model.user_index.get(raw)
    if u is None:
        raise HTTPException(404, f"unknown user {raw!r}")
    return u


def _item(raw: str) -> int:
    i = model.item_index.get(raw)
    if i is None:
        raise HTTPException(404, f"unknown item {raw!r}")
    return i


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@app.get("/ready")
async def ready() -> dict:
    return {"model": True, "store": True}


@app.get("/v1/predict")
async def predict(user: str = Query(min_length=1, max_length=128), item: str = Query(min_length=1, max_length=128),
                  explain: int = Query(0, ge=0, le=50)) -> dict:
    u, i = _user(user), _item(item)
    out = {"user": user, "item": item, "title": model.titles[i], "rating": model.predict(u, i), "path": "model"}
    if explain:
        out["explanation"] = model.explain(u, i, explain)
    return out


@app.get("/v1/users/{user}/recommendations")
async def recommendations(user: str, k: int = Query(10, ge=1, le=100), explain: int = Query(0, ge=0, le=50)) -> dict:
    u = _user(user)
    return {"user": user, "path": "model", "items": model.recommend(u, k, explain)}


@app.get("/v1/users/{user}")
async def get_user(user: str) -> dict:
    u = _user(user)
    s, e = model.by_user[1][u]
    live = len(model.live.get(u, ()))
    return {"user": user, "known": True, "n_ratings": e - s + live, "n_training_ratings": e - s,
            "n_live_ratings": live, "path": "model"}


@app.post("/v1/ratings")
def add_ratings(body: RatingsIn) -> dict:
    now = time.time()
    rows, applied = [], []
    for r in body.ratings:
        i = _item(r.item)
        if not model.lo <= r.rating <= model.hi:
            raise HTTPException(422, f"rating {r.rating} outside {model.lo:g}..{model.hi:g}")
        rows.append((r.user, r.item, r.rating, int(now) if r.timestamp is None else r.timestamp, r.event_id, now))
        applied.append((model.user_index.get(r.user), i))
    store.add(rows)
    for u, i in applied:
        if u is not None:
            model.live.setdefault(u, []).append(i)
    return {"accepted": len(rows), "duplicates": 0}

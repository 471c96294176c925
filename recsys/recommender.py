"""`Recommender`: the serving facade over one trained artefact plus the ratings received
since (pure Python; the HTTP layer in ``api/`` only validates, calls it and maps errors).

Every answer says which *path* produced it:

- ``model``: the trained model, for a user and item it was trained on;
- ``fold-in``: MF for a user it was not trained on, from that user's live ratings (a ridge
  solve on the fixed item factors, redone whenever the user rates something);
- ``online``: a trained user whose live ratings were applied by online SGD steps;
- ``fallback``: no rating of the user (or item) is known: the bias-only prediction.

Online ratings are applied in arrival order. Unknown *items* are an error (`UnknownIdError`):
MF has no vector for an item nobody has rated, and inventing one would be a guess.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recsys.artefact import Artefact, load_artefact
from recsys.errors import UnknownIdError
from recsys.models.mf import MatrixFactorization
from recsys.models.rec.model import EvidenceChainModel
from recsys.ratings import IdMap, Ratings
from recsys.store import NewRating, StoredRating


@dataclass
class Prediction:
    user: str
    item: str
    rating: float
    path: str
    title: str | None = None
    explanation: list[dict] | None = None
    explanation_method: str | None = None


@dataclass
class Recommendation:
    user: str
    path: str
    items: list[Prediction] = field(default_factory=list)


@dataclass
class UserInfo:
    user: str
    known: bool
    n_ratings: int
    n_training_ratings: int
    n_live_ratings: int
    path: str


class Recommender:
    """Predictions, recommendations, explanations and online ingestion for one artefact."""

    #: online SGD passes over a trained user's new ratings (at the final training rate)
    online_passes = 3

    def __init__(self, artefact: Artefact, *, device: str = "cpu") -> None:
        self.artefact = artefact
        self.model = artefact.model.to(device)
        self.train = artefact.train
        self.user_ids: IdMap = artefact.user_ids
        self.item_ids: IdMap = artefact.item_ids
        self._lock = threading.RLock()
        self._train_counts = self.train.user_counts()
        self._live: dict[int, tuple[list[int], list[float]]] = {}  # user -> (items, ratings)
        # every rating applied online, in order: (user, item, rating, timestamp); they become
        # explanation candidates after the training ratings (example ids len(train), ...)
        self._live_log: list[tuple[int, int, float, int]] = []
        self._explained: Ratings | None = None
        self._stale_users: set[int] = set()
        self._stale_items: set[int] = set()
        self._created: set[int] = set()
        self._seen_seq = 0
        self.n_ingested = 0
        cfg = artefact.metadata.get("training", {}).get("train_config", {})
        lr, decay, epochs = cfg.get("learning_rate", 0.01), cfg.get("lr_decay", 1.0), cfg.get("epochs", 1)
        self._online_lr = float(lr) * float(decay) ** max(0, int(epochs) - 1)
        self.loaded_at = time.time()
        self.newton = None
        if isinstance(self.model, MatrixFactorization):
            from recsys.explain.influence import NewtonInfluence

            self.newton = NewtonInfluence(self.model, self.train)
            if len(self.train) <= self.warm_below:
                self.newton.warm()
        elif isinstance(self.model, EvidenceChainModel):
            self.model.warm()  # the compiled inference kernels, before the first request

    #: precompute every row's explanation vectors at load when the training set is this small
    warm_below = 200_000

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> Recommender:
        return cls(load_artefact(path, device=device), device=device)

    # ------------------------------------------------------------------ ids
    def _item(self, raw: object) -> int:
        i = self.item_ids.get(raw)
        if i is None:
            raise UnknownIdError("item", raw)
        return i

    def _user(self, raw: object) -> int:
        """The user's index, or -1 for a user nobody has heard of."""
        u = self.user_ids.get(raw)
        return -1 if u is None else u

    def _path(self, u: int) -> str:
        if u < 0 or not bool(self.model.known_users[u]):
            return "fallback"
        if not isinstance(self.model, MatrixFactorization):
            return "model"  # vectors are built from the live ratings: new ratings are native
        if u < len(self._train_counts) and self._train_counts[u] > 0:
            return "online" if u in self._live else "model"
        return "fold-in"

    def title(self, raw_item: str) -> str | None:
        return self.train.title(raw_item)

    # ------------------------------------------------------------------ reads
    def predict(self, user: object, item: object, *, explain: int = 0) -> Prediction:
        return self.predict_many([(user, item)], explain=explain)[0]

    def predict_many(self, pairs: Sequence[tuple[object, object]], *, explain: int = 0) -> list[Prediction]:
        items = [self._item(i) for _, i in pairs]
        with self._lock:
            users = [self._user(u) for u, _ in pairs]
            values = self.model.predict(torch.tensor(users), torch.tensor(items)).tolist()
            out = []
            for (raw_u, raw_i), u, i, v in zip(pairs, users, items, values, strict=True):
                p = Prediction(str(raw_u), str(raw_i), float(v), self._path(u), self.title(str(raw_i)))
                if explain:
                    p.explanation, p.explanation_method = self._explain(u, i, explain)
                out.append(p)
            return out

    def recommend(self, user: object, k: int = 10, *, explain: int = 0) -> Recommendation:
        """The ``k`` best-scored items the user has not rated (training or live)."""
        with self._lock:
            u = self._user(user)
            scores = self.model.score_all(torch.tensor([u]))[0]
            n_known_items = len(self.item_ids)
            scores = scores[:n_known_items].clone()
            for rated in self._rated_items(u):
                scores[rated] = -torch.inf
            k = max(0, min(k, int(torch.isfinite(scores).sum())))
            top = torch.topk(scores, k)
            lo, hi = self.model.rating_scale
            rec = Recommendation(str(user), self._path(u))
            for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                raw = self.item_ids.raw(i)
                p = Prediction(str(user), raw, float(min(max(s, lo), hi)), rec.path, self.title(raw))
                if explain:
                    p.explanation, p.explanation_method = self._explain(u, i, explain)
                rec.items.append(p)
            return rec

    def _rated_items(self, u: int) -> list[np.ndarray]:
        out = []
        if 0 <= u < self.train.n_users:
            csr = self.train.by_user
            out.append(csr.columns[csr.row(u)])
        if u in self._live:
            out.append(np.asarray(self._live[u][0], dtype=np.int64))
        return [torch.from_numpy(a) for a in out if len(a)]

    def _explain(self, u: int, i: int, k: int) -> tuple[list[dict] | None, str | None]:
        """The ``k`` training ratings with the largest estimated effect on a prediction, and
        the method that estimated them; ``(None, reason)`` where none applies."""
        if u < 0 or not bool(self.model.known_users[u]):
            return None, "none: the prediction uses no rating of this user (fallback)"
        if isinstance(self.model, MatrixFactorization):
            from recsys.explain.influence import estimate_effects

            live = bool(self._live_log)
            method = self.explain_method
            if method == "rollback" and (self.artefact.rollback is None or live):
                method = "newton"  # the log covers training only; Newton needs no log
            if method == "newton":
                ratings = self._explained_ratings()
                ids, effects = self.newton.effects(u, i)
            else:
                ratings = self.train
                if u >= self.train.n_users:
                    return None, f"none: {method} explains training users only"
                ids, effects, _, _ = estimate_effects(self.model, self.train, u, i, method, self.artefact.rollback)
            top = np.argsort(-np.abs(effects), kind="stable")[:k]
            rows = [(int(ids[j]), float(effects[j])) for j in top]
        elif hasattr(self.model, "explain"):
            res = self.model.explain(self.user_ids.raw(u), self.item_ids.raw(i), top=k)
            first_hop = [e for e in res["evidence"] if e["hop"] == 1]
            rows = [(int(e["example"]), float(e["share"])) for e in first_hop[:k]]
            ratings, method = self.model.ratings, "evidence-chain shares (first hop)"
        else:
            return None, None
        out = []
        for z, effect in rows:
            raw_item = ratings.item_ids.raw(int(ratings.items[z]))
            out.append({"user": ratings.user_ids.raw(int(ratings.users[z])), "item": raw_item,
                        "title": self.title(raw_item), "rating": float(ratings.values[z]),
                        "timestamp": None if ratings.timestamps is None else int(ratings.timestamps[z]),
                        "effect": effect})
        return out, method

    def _explained_ratings(self) -> Ratings:
        """Training plus live ratings (rebuilt lazily after ingestion): the candidates of
        explanations, so that ratings received online explain later predictions too."""
        if self._explained is None:
            if self._live_log:
                u, i, v, t = (np.asarray(c) for c in zip(*self._live_log, strict=True))
                ts = None if self.train.timestamps is None else np.concatenate([self.train.timestamps, t.astype(np.int64)])
                self._explained = Ratings(
                    np.concatenate([self.train.users, u.astype(np.int64)]),
                    np.concatenate([self.train.items, i.astype(np.int64)]),
                    np.concatenate([self.train.values, v.astype(np.float32)]), ts,
                    self.user_ids, self.item_ids, self.train.rating_scale, self.train.item_titles)
            else:
                self._explained = self.train
            self.newton.train = self._explained
            self.newton.invalidate(sorted(self._stale_users), sorted(self._stale_items))
            self._stale_users.clear()
            self._stale_items.clear()
        return self._explained

    #: MF explanation method (`recsys.explain.influence.METHODS`); the default is the one the
    #: faithfulness harness found most faithful. ``rollback`` needs a model trained with
    #: ``--rollback``.
    explain_method = "newton"

    def user_info(self, user: object) -> UserInfo:
        with self._lock:
            u = self._user(user)
            if u < 0:
                raise UnknownIdError("user", user)
            n_train = int(self._train_counts[u]) if u < len(self._train_counts) else 0
            n_live = len(self._live.get(u, ([], []))[0])
            return UserInfo(str(user), bool(self.model.known_users[u]), n_train + n_live, n_train, n_live,
                            self._path(u))

    # ------------------------------------------------------------------ writes
    def add_user(self, user: object) -> bool:
        """Register a user with no ratings yet (answered by the fallback); False if known."""
        with self._lock:
            if user in self.user_ids:
                return False
            if not isinstance(self.model, MatrixFactorization) and hasattr(self.model, "add_user"):
                self.model.add_user(str(user))
                self.user_ids = self.model.ratings.user_ids
            else:
                self._ensure_users([str(user)])
            self._created.add(self.user_ids.index(user))
            return True

    def validate(self, ratings: Sequence[NewRating]) -> None:
        """Reject what `add_ratings` could not apply, before it is stored: unknown items
        (`UnknownIdError`) and ratings outside the model's scale (`ValueError`)."""
        lo, hi = self.model.rating_scale
        for r in ratings:
            self._item(r.item)
            if not lo <= r.rating <= hi:
                raise ValueError(f"rating {r.rating} for item {r.item!r} is outside the scale {lo:g}..{hi:g}")

    def add_ratings(self, ratings: Iterable[StoredRating | NewRating]) -> int:
        """Apply stored ratings to the live model, in order; returns how many were applied.
        Ratings already applied (by ``seq``) and duplicates are skipped, so replaying a store
        twice is harmless. Unknown items raise `UnknownIdError` before anything is applied."""
        batch = [r for r in ratings if not getattr(r, "duplicate", False)
                 and getattr(r, "seq", self._seen_seq + 1) > self._seen_seq]
        if not batch:
            return 0
        items = [self._item(r.item) for r in batch]
        with self._lock:
            if not isinstance(self.model, MatrixFactorization):
                return self._add_to_live_ratings(batch, items)
            self._ensure_users([r.user for r in batch])
            users = self.user_ids.indices([r.user for r in batch])
            for r, u, i in zip(batch, users, items, strict=True):
                its, vals = self._live.setdefault(int(u), ([], []))
                its.append(i)
                vals.append(float(r.rating))
                if hasattr(r, "seq"):
                    self._seen_seq = max(self._seen_seq, r.seq)
            now = int(time.time())
            self._apply(users, np.asarray(items, dtype=np.int64),
                        np.asarray([r.rating for r in batch], dtype=np.float32),
                        np.asarray([now if r.timestamp is None else r.timestamp for r in batch], dtype=np.int64))
            self.n_ingested += len(batch)
            return len(batch)

    def _add_to_live_ratings(self, batch: list, items: list[int]) -> int:
        """Models that read the ratings matrix at prediction time (the evidence-chain model)
        learn online by inserting the ratings into their live ratings: no parameter update."""
        if not hasattr(self.model, "add_ratings"):
            raise NotImplementedError(f"{type(self.model).__name__} cannot learn online")
        self.model.add_ratings([r.user for r in batch], [r.item for r in batch], [r.rating for r in batch],
                               [r.timestamp for r in batch] if all(getattr(r, "timestamp", None) is not None
                                                                  for r in batch) else None)
        self.user_ids = self.model.ratings.user_ids
        for r, i in zip(batch, items, strict=True):
            its, vals = self._live.setdefault(self.user_ids.index(r.user), ([], []))
            its.append(i)
            vals.append(float(r.rating))
            if hasattr(r, "seq"):
                self._seen_seq = max(self._seen_seq, r.seq)
        self.n_ingested += len(batch)
        return len(batch)

    def _ensure_users(self, raw_users: Sequence[str]) -> None:
        unseen = [u for u in dict.fromkeys(raw_users) if u not in self.user_ids]
        if not unseen:
            return
        self.user_ids = self.user_ids.extend(unseen)
        if len(self.user_ids) > self.model.n_users:
            if not hasattr(self.model, "grow"):
                raise NotImplementedError(f"{type(self.model).__name__} cannot take new users")
            self.model.grow(max(len(self.user_ids), 2 * self.model.n_users), self.model.n_items)

    def _apply(self, users: np.ndarray, items: np.ndarray, values: np.ndarray, timestamps: np.ndarray) -> None:
        """Apply new ratings (already appended to ``_live``) to the model: online SGD over
        the trained users' ratings in arrival order (one kernel pass per ``online_passes``),
        and a fresh fold-in for every other user who rated."""
        model = self.model
        trained = np.zeros(len(users), dtype=bool)
        in_train = users < len(self._train_counts)
        trained[in_train] = self._train_counts[users[in_train]] > 0
        self._live_log.extend(zip(users.tolist(), items.tolist(), values.tolist(), timestamps.tolist(), strict=True))
        self._explained = None  # candidates and cached rows are rebuilt on the next explanation
        self._stale_users.update(users.tolist())
        self._stale_items.update(items.tolist())
        if trained.any():
            live = Ratings(users[trained], items[trained], values[trained], None, self.user_ids, self.item_ids,
                           model.rating_scale)
            order = np.arange(len(live), dtype=np.int64)
            for _ in range(self.online_passes):
                if model.device.type == "cpu":
                    model.sgd_examples(live, order, self._online_lr)
                else:
                    model.sgd_batch(*live.tensors(model.device), self._online_lr)
        for u in np.unique(users[~trained]):
            its, vals = self._live[int(u)]
            p, b = model.fold_in_user(torch.tensor(its), torch.tensor(vals))
            model.set_user(int(u), p, b)

    def replay(self, stored: Iterable[StoredRating], users: Iterable[str] = ()) -> int:
        """Bring the model up to date with a store after a (re)start."""
        for user in users:
            self.add_user(user)
        n = 0
        chunk: list[StoredRating] = []
        for r in stored:
            chunk.append(r)
            if len(chunk) >= 10_000:
                n += self.add_ratings(chunk)
                chunk = []
        return n + self.add_ratings(chunk)

    @property
    def last_seq(self) -> int:
        return self._seen_seq

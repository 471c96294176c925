"""`Recommender`: the serving facade over one trained artefact plus the ratings received
since (pure Python; the HTTP layer in ``api/`` and the command line only validate, call it
and map errors).

Every answer says which *path* produced it (the model's `OnlineLearner.path`):

- ``model``: the trained model, for a user and item it was trained on;
- ``fold-in``: MF for a user it was not trained on, from that user's live ratings (a ridge
  solve on the fixed item factors, redone whenever the user rates something);
- ``online``: a trained user whose live ratings were applied by online SGD steps;
- ``fallback``: no rating of the user (or item) is known: the bias-only prediction.

The facade keeps ONE `Ratings`: the training ratings, then every rating received online in
arrival order (`Ratings.append`), so example ``k`` means the same rating to the model's
online learning (`OnlineLearner.learn`), its update log and its explanations
(`Explainer.explain`). It asks the model for capabilities by protocol
(`recsys.models.base`), never by class. Unknown *items* are an error (`UnknownIdError`): MF
has no vector for an item nobody has rated, and inventing one would be a guess.
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
from recsys.models.base import Explainable, Explainer, Explanation, OnlineLearner
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


#: why a fallback prediction has no explanation
FALLBACK_REASON = "none: the prediction uses no rating of this user (fallback)"


def final_learning_rate(metadata: dict) -> float:
    """The learning rate training ended at (``learning_rate · lr_decay^(epochs-1)`` of the
    artefact's ``training.train_config``; 0.01 when it says nothing): the online rate."""
    cfg = metadata.get("training", {}).get("train_config", {})
    lr, decay, epochs = cfg.get("learning_rate", 0.01), cfg.get("lr_decay", 1.0), cfg.get("epochs", 1)
    return float(lr) * float(decay) ** max(0, int(epochs) - 1)


class Recommender:
    """Predictions, recommendations, explanations and online ingestion for one artefact.

    ``warm`` (the service): before the first request, make one prediction (compiled kernels
    load) and let the explainer precompute what it caches. A one-shot command passes False."""

    #: explanation method (None: the model family's default, e.g. MF's cached one-row Newton)
    explain_method: str | None = None

    def __init__(self, artefact: Artefact, *, device: str = "cpu", warm: bool = True) -> None:
        self.artefact = artefact
        self.model = artefact.model.to(device)
        self.train = artefact.train
        #: training ratings, then every rating applied online (example ids = rows)
        self.ratings: Ratings = artefact.train
        self._lock = threading.RLock()
        self._train_counts = self.train.user_counts()
        self._seen_seq = 0
        self.n_ingested = 0
        self.loaded_at = time.time()
        self.learner: OnlineLearner | None = self.model if isinstance(self.model, OnlineLearner) else None
        if self.learner is not None:
            self.learner.start_online(self.train, log=artefact.rollback,
                                      learning_rate=final_learning_rate(artefact.metadata))
        self._explainers: dict[str | None, Explainer] = {}
        explainer = self._explainer(self.explain_method)
        if warm:
            if len(self.train):  # e.g. REC's compiled inference kernels, before the first request
                self.model.predict(torch.tensor([int(self.train.users[0])]), torch.tensor([int(self.train.items[0])]))
            if explainer is not None:
                explainer.warm()

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", warm: bool = True) -> Recommender:
        return cls(load_artefact(path, device=device), device=device, warm=warm)

    @property
    def user_ids(self) -> IdMap:
        return self.ratings.user_ids

    @property
    def item_ids(self) -> IdMap:
        return self.ratings.item_ids

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
        if self.learner is not None:
            return self.learner.path(u)
        return "model" if 0 <= u < self.model.n_users and bool(self.model.known_users[u]) else "fallback"

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
        """The ``k`` best-scored items the user has not rated (training or live), each with its
        clipped predicted rating."""
        with self._lock:
            u = self._user(user)
            scores = self.model.score_all(torch.tensor([u]))[0]
            n_known_items = len(self.item_ids)
            scores = scores[:n_known_items].clone()
            for rated in self._rated_items(u):
                scores[rated.to(scores.device)] = -torch.inf
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

    def _live_rows(self, u: int) -> np.ndarray:
        """Rows of ``ratings`` received online from user ``u``."""
        n = len(self.train)
        return n + np.flatnonzero(self.ratings.users[n:] == u)

    def _rated_items(self, u: int) -> list[torch.Tensor]:
        out = []
        if 0 <= u < self.train.n_users:
            csr = self.train.by_user
            out.append(csr.columns[csr.row(u)])
        if u >= 0:
            out.append(self.ratings.items[self._live_rows(u)])
        return [torch.from_numpy(a) for a in out if len(a)]

    # ------------------------------------------------------------------ explanations
    def _explainer(self, method: str | None) -> Explainer | None:
        """The model's explainer for ``method`` over the facade's ratings (made on first use,
        then kept up to date with every rating learnt); None when the model explains nothing."""
        if method not in self._explainers:
            if not isinstance(self.model, Explainable):
                return None
            self._explainers[method] = self.model.explainer(self.ratings, self.artefact.rollback, method)
        return self._explainers[method]

    def explain(self, user: object, item: object, k: int = 5, method: str | None = None) -> Explanation:
        """The explanation of the prediction of raw ``user`` for raw ``item``: its ``k``
        largest contributions (ratings, training or live) and the method (``method`` None:
        `explain_method`). `UnknownIdError` for ids nobody has heard of; a user the model
        has no rating of gets an explanation by no rating (``none: ...``)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        with self._lock:
            u = self.user_ids.get(user)
            if u is None:
                raise UnknownIdError("user", user)
            i = self._item(item)
            explainer = self._explainer(self.explain_method if method is None else method)
            if explainer is None:
                raise NotImplementedError(f"{type(self.model).__name__} does not explain its predictions")
            return explainer.explain(u, i, k)

    def _explain(self, u: int, i: int, k: int) -> tuple[list[dict] | None, str | None]:
        """The ``k`` ratings with the largest estimated effect on a prediction (as the
        service returns them), and the method that estimated them; ``(None, reason)`` where
        none applies."""
        if self._path(u) == "fallback":
            return None, FALLBACK_REASON
        explainer = self._explainer(self.explain_method)
        if explainer is None:
            return None, None
        exp = explainer.explain(u, i, k)
        if exp.method.startswith("none"):
            return None, exp.method
        return [{"user": c.user, "item": c.item, "title": c.title, "rating": c.rating,
                 "timestamp": c.timestamp, "effect": c.effect} for c in exp.contributions], exp.method

    def user_info(self, user: object) -> UserInfo:
        with self._lock:
            u = self._user(user)
            if u < 0:
                raise UnknownIdError("user", user)
            n_train = int(self._train_counts[u]) if u < len(self._train_counts) else 0
            n_live = len(self._live_rows(u))
            known = u < self.model.n_users and bool(self.model.known_users[u])
            return UserInfo(str(user), known, n_train + n_live, n_train, n_live, self._path(u))

    # ------------------------------------------------------------------ writes
    def _learn(self, ratings: Ratings) -> None:
        """Make ``ratings`` (the facade's ratings, grown) the facade's, and have the model and
        every explainer learn the rows it added."""
        if self.learner is None:
            raise NotImplementedError(f"{type(self.model).__name__} cannot learn online")
        new = np.arange(len(self.ratings), len(ratings), dtype=np.int64)
        self.learner.learn(ratings, new)
        self.ratings = ratings
        for explainer in self._explainers.values():
            explainer.update(ratings, new)

    def add_user(self, user: object) -> bool:
        """Register a user with no ratings yet (answered by the fallback); False if known."""
        with self._lock:
            if user in self.user_ids:
                return False
            r = self.ratings
            empty = np.zeros(0, dtype=np.int64)
            self._learn(r.append(Ratings(empty, empty, np.zeros(0, np.float32), None, r.user_ids.extend([str(user)]),
                                         r.item_ids, r.rating_scale)))
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
        items = np.asarray([self._item(r.item) for r in batch], dtype=np.int64)
        with self._lock:
            r = self.ratings
            user_ids = r.user_ids.extend([r_.user for r_ in batch])
            now = int(time.time())
            new = Ratings(user_ids.indices([r_.user for r_ in batch]), items,
                          np.asarray([r_.rating for r_ in batch], dtype=np.float32),
                          np.asarray([now if r_.timestamp is None else r_.timestamp for r_ in batch], dtype=np.int64),
                          user_ids, r.item_ids, r.rating_scale)
            self._learn(r.append(new))
            seqs = [r_.seq for r_ in batch if getattr(r_, "seq", None) is not None]
            if seqs:
                self._seen_seq = max(self._seen_seq, *seqs)
            self.n_ingested += len(batch)
            return len(batch)

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

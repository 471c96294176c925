"""`Recommender`: the serving facade over one trained artefact plus the ratings received
since (pure Python; the HTTP layer in ``api/`` and the command line only validate, call it
and map errors).

Two models may answer: the *rating model* (a `RatingModel`: predictions, ``predict``) and the
*ranking model* (a `RankingModel`: recommendations, ``recommend``). An artefact holds a rating
model with the ranker saved beside it (``recsys train``), a ranker alone (``recsys train
--model ease``; it predicts no ratings: `NoRatingModelError`), or a rating model alone (an
older artefact: recommendations then rank by predicted rating, as before). Recommended items
carry the ranker's ``score`` and, where a rating model is loaded, the predicted ``rating``.

Every answer says which *path* produced it (the model's `OnlineLearner.path`):

- ``model``: the trained model, for a user and item it was trained on;
- ``fold-in``: a user the model was not trained on, placed from that user's live ratings
  (MF: a ridge solve on the fixed item factors; a ranker: its own fold-in), redone whenever
  the user rates something;
- ``online``: a trained user whose live ratings were applied by online SGD steps;
- ``fallback``: no rating of the user (or item) is known: the bias-only prediction;
- ``popularity``: a ranker's list for a user with no interaction: the most popular items.

The facade keeps ONE `Ratings`: the training ratings, then every rating received online in
arrival order (`Ratings.append`), so example ``k`` means the same rating to the model's
online learning (`OnlineLearner.learn`), its update log and its explanations
(`Explainer.explain`). It asks the model for capabilities by protocol
(`recsys.models.base`), never by class. Unknown *items* are an error (`UnknownIdError`): MF
has no vector for an item nobody has rated, and inventing one would be a guess.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
import torch

from recsys.artefact import Artefact, load_artefact
from recsys.errors import RecsysError, UnknownIdError
from recsys.models import Model
from recsys.models.base import Explainable, Explainer, Explanation, OnlineLearner
from recsys.ratings import IdMap, Ratings
from recsys.store import NewRating, StoredRating


class NoRatingModelError(RecsysError, ValueError):
    """A rating prediction was asked of an artefact that holds a ranking model only."""


@dataclass
class Prediction:
    """One (user, item) answer: ``rating`` the predicted rating (None where no rating model is
    loaded), ``score`` the ranker's score when it is a recommendation (for an artefact with a
    rating model alone: the predicted rating it was ranked by), ``path`` what produced it."""

    user: str
    item: str
    rating: float | None
    path: str
    title: str | None = None
    explanation: list[dict] | None = None
    explanation_method: str | None = None
    score: float | None = None


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
#: why a popularity recommendation has no explanation
POPULARITY_REASON = "none: the user has no interaction; the most popular items (popularity)"


def final_learning_rate(metadata: dict) -> float:
    """The learning rate training ended at (``learning_rate · lr_decay^(epochs-1)`` of the
    artefact's ``training.train_config``; 0.01 when it says nothing): the online rate."""
    cfg = metadata.get("training", {}).get("train_config", {})
    lr, decay, epochs = cfg.get("learning_rate", 0.01), cfg.get("lr_decay", 1.0), cfg.get("epochs", 1)
    return float(lr) * float(decay) ** max(0, int(epochs) - 1)


class Recommender:
    """Predictions, recommendations, explanations and online ingestion for one artefact.

    ``rater`` is the rating model (None for a ranker-only artefact), ``ranker`` the ranking
    model (the artefact's ranker, or its model when that ranks; None for a rating model
    alone). Both learn every rating ingested (`OnlineLearner.learn`) against the one
    `ratings`. ``warm`` (the service): before the first request, make one prediction or
    ranking (compiled kernels load) and let the explainers precompute what they cache. A
    one-shot command passes False."""

    #: explanation method (None: the model family's default, e.g. MF's cached one-row Newton)
    explain_method: str | None = None

    def __init__(self, artefact: Artefact, *, device: str = "cpu", warm: bool = True) -> None:
        self.artefact = artefact
        #: the artefact's own model (a rating model, or a ranker for a ranker-only artefact)
        self.model: Model = artefact.model.to(device)
        self.rater: Model | None = self.model if self.model.task == "rating" else None
        if self.model.task == "ranking":
            self.ranker: Model | None = self.model
        else:
            self.ranker = artefact.ranker.model.to(device) if artefact.ranker is not None else None
        self.train = artefact.train
        #: training ratings, then every rating applied online (example ids = rows)
        self.ratings: Ratings = artefact.train
        self._lock = threading.RLock()
        self._train_counts = self.train.user_counts()
        #: read caches: each user's live rows (indexed up to row ``_live_indexed`` of
        #: ``ratings``, extended on the next read), and each model's `OnlineLearner` answer
        self._live_index: dict[int, list[int]] = {}
        self._live_indexed = len(self.train)
        self._online: dict[int, bool] = {}
        self._seen_seq = 0
        self.n_ingested = 0
        #: stored ratings this model could not apply (skipped, see `add_ratings`): count, the
        #: first few as ``{"seq", "user", "item", "rating", "reason"}``, and every skipped seq
        self.n_skipped = 0
        self.skipped_examples: list[dict] = []
        self._skipped_seqs = array("q")
        self.loaded_at = time.time()
        lr = final_learning_rate(artefact.metadata)
        #: the models that learn ingested ratings, rating model first
        self.learners: list[OnlineLearner] = []
        for model, log in ((self.rater, artefact.rollback), (self.ranker, None)):
            if model is not None and isinstance(model, OnlineLearner):
                model.start_online(self.train, log=log, learning_rate=lr if model is self.rater else None)
                self.learners.append(model)
        if warm and self.learners:
            self._warm_learning()
        self._explainers: dict[tuple[str, str | None], Explainer] = {}
        explainers = [self._explainer(role, self.explain_method) for role in ("rating", "ranking")]
        if warm:
            if len(self.train):  # e.g. REC's compiled inference kernels, before the first request
                first = torch.tensor([int(self.train.users[0])])
                if self.rater is not None:
                    self.rater.predict(first, torch.tensor([int(self.train.items[0])]))
                if self.ranker is not None:
                    self.ranker.score_all(first)
            for explainer in explainers:
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

    def _model_path(self, model: Model, u: int) -> str:
        online = self._online.get(id(model))
        if online is None:  # a runtime protocol check costs microseconds: once per model
            online = self._online[id(model)] = isinstance(model, OnlineLearner)
        if online:
            return model.path(u)
        return "model" if 0 <= u < model.n_users and bool(model.known_users[u]) else "fallback"

    def _path(self, u: int) -> str:
        """The path of a prediction for user ``u`` (the rating model's; a ranker-only
        artefact: the path of the user's recommendations)."""
        return self._model_path(self.rater, u) if self.rater is not None else self._rank_path(u)

    def _n_interactions(self, u: int) -> int:
        if u < 0:
            return 0
        n_train = int(self._train_counts[u]) if u < len(self._train_counts) else 0
        return n_train + len(self._live_rows(u))

    def _rank_path(self, u: int) -> str:
        """The path of user ``u``'s recommendations by the ranker: ``popularity`` for a user
        with no interaction, else the ranker's own (``model``, ``fold-in``, ``online``)."""
        assert self.ranker is not None
        if self._n_interactions(u) == 0:
            return "popularity"
        path = self._model_path(self.ranker, u)
        return "popularity" if path == "fallback" else path

    def title(self, raw_item: str) -> str | None:
        return self.train.title(raw_item)

    # ------------------------------------------------------------------ reads
    def predict(self, user: object, item: object, *, explain: int = 0) -> Prediction:
        return self.predict_many([(user, item)], explain=explain)[0]

    def predict_many(self, pairs: Sequence[tuple[object, object]], *, explain: int = 0) -> list[Prediction]:
        """Predicted ratings of raw ``(user, item)`` pairs; `NoRatingModelError` when the
        artefact holds a ranking model only."""
        if self.rater is None:
            raise NoRatingModelError(
                f"this model ({self.model.name}) ranks; it predicts no ratings: ask for the user's "
                "recommendations instead (or train a rating model, e.g. --model mf)")
        items = [self._item(i) for _, i in pairs]
        with self._lock:
            users = [self._user(u) for u, _ in pairs]
            out = []
            for (raw_u, raw_i), u, i in zip(pairs, users, items, strict=True):
                p = Prediction(str(raw_u), str(raw_i), None, self._path(u), self.title(str(raw_i)))
                if explain:
                    # the explanation carries the prediction it explains: one model call, not two
                    p.explanation, p.explanation_method, p.rating = self._explain("rating", u, i, explain, p.path)
                out.append(p)
            missing = [j for j, p in enumerate(out) if p.rating is None]
            if missing:
                values = self.rater.predict(torch.tensor([users[j] for j in missing]),
                                            torch.tensor([items[j] for j in missing])).tolist()
                for j, v in zip(missing, values, strict=True):
                    out[j].rating = float(v)
            return out

    def recommend(self, user: object, k: int = 10, *, explain: int = 0) -> Recommendation:
        """The ``k`` best items the user has not rated (training or live), in order.

        With a ranker: its ``score_all`` (the popularity ranking, path ``popularity``, for a
        user with no interaction), each item with the ranker's ``score``, the predicted
        ``rating`` where a rating model is loaded (else None), and explanations by the
        ranker's explainer. A rating model alone ranks by its clipped predicted rating
        (``score`` = ``rating``)."""
        with self._lock:
            u = self._user(user)
            if self.ranker is None:
                return self._recommend_by_rating(u, str(user), k, explain)
            path = self._rank_path(u)
            if path == "popularity":
                scores = self.ranker.popularity_scores(1)[0]
            else:
                scores = self.ranker.score_all(torch.tensor([u]))[0]
            top_scores, top = self._top(u, scores, k)
            rec = Recommendation(str(user), path)
            ratings: list[float | None] = [None] * len(top)
            if self.rater is not None and top:
                ratings = self.rater.predict(torch.full((len(top),), u), torch.tensor(top)).tolist()
            raw_items = self.item_ids.raw_ids
            explained = self._explain_list(u, top, explain) if explain and path != "popularity" else None
            for n, (s, i, r) in enumerate(zip(top_scores, top, ratings, strict=True)):
                raw = str(raw_items[i])
                p = Prediction(str(user), raw, None if r is None else float(r), rec.path, self.title(raw),
                               score=float(s))
                if explain:
                    if path == "popularity":
                        p.explanation_method = POPULARITY_REASON
                    elif explained is not None:
                        p.explanation, p.explanation_method, _ = explained[n]
                    else:
                        p.explanation, p.explanation_method, _ = self._explain("ranking", u, i, explain, path)
                rec.items.append(p)
            return rec

    def _explain_list(self, u: int, items: list[int], k: int) -> list[tuple] | None:
        """`_explain` of each of ``items`` by the ranker, in one call where its explainer
        explains a list at once (``explain_many``); None where it does not."""
        explainer = self._explainer("ranking", self.explain_method)
        many = getattr(explainer, "explain_many", None)
        return None if many is None else [_served(exp) for exp in many(u, items, k)]

    def _top(self, u: int, scores: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
        """The ``k`` best-scored items of ``scores [n_items]`` that user ``u`` has not rated:
        ``(scores, item indices)``, best first (ties: the lower index). A partial sort
        (``argpartition``) in numpy: O(n_items + k log k)."""
        values = scores[:len(self.item_ids)].detach().to("cpu", torch.float32).numpy().copy()
        rated = self._rated_items(u)
        if len(rated):
            values[rated] = -np.inf
        k = max(0, min(k, int(np.isfinite(values).sum())))
        if k == 0:
            return [], []
        key = -values
        if k < len(key):
            kth = np.partition(key, k - 1)[k - 1]
            chosen = np.flatnonzero(key <= kth)  # every tie at the k-th score, in index order
        else:
            chosen = np.arange(len(key))
        top = chosen[np.argsort(key[chosen], kind="stable")][:k]
        return values[top].tolist(), top.tolist()

    def _recommend_by_rating(self, u: int, user: str, k: int, explain: int) -> Recommendation:
        assert self.rater is not None
        top_scores, top = self._top(u, self.rater.score_all(torch.tensor([u]))[0], k)
        lo, hi = self.rater.rating_scale
        rec = Recommendation(user, self._path(u))
        for s, i in zip(top_scores, top, strict=True):
            raw = self.item_ids.raw(i)
            clipped = float(min(max(s, lo), hi))
            p = Prediction(user, raw, clipped, rec.path, self.title(raw), score=clipped)
            if explain:
                p.explanation, p.explanation_method, _ = self._explain("rating", u, i, explain, rec.path)
            rec.items.append(p)
        return rec

    def _live_rows(self, u: int) -> np.ndarray:
        """Rows of ``ratings`` received online from user ``u``, ``int64 [m]`` in order: from
        a per-user index extended by the rows added since the last read (O(new rows) once,
        then a lookup, instead of a scan of every live row per request). Rows never change
        once added (example ``k`` is the same rating for good), so the index stays valid."""
        total = len(self.ratings)
        if self._live_indexed < total:
            start = self._live_indexed
            users = self.ratings.users[start:total]
            order = np.argsort(users, kind="stable")
            keys, first = np.unique(users[order], return_index=True)
            bounds = np.append(first, len(order))
            for j, user in enumerate(keys.tolist()):
                self._live_index.setdefault(user, []).extend((start + order[bounds[j]:bounds[j + 1]]).tolist())
            self._live_indexed = total
        rows = self._live_index.get(u)
        return np.asarray(rows, dtype=np.int64) if rows else np.zeros(0, dtype=np.int64)

    def _rated_items(self, u: int) -> np.ndarray:
        """Items user ``u`` rated (training or live; repeats possible), ``int64 [m]``."""
        parts = []
        if 0 <= u < self.train.n_users:
            csr = self.train.by_user
            parts.append(csr.columns[csr.row(u)])
        if u >= 0:
            live = self._live_rows(u)
            if len(live):
                parts.append(self.ratings.items[live])
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ------------------------------------------------------------------ explanations
    def _explainer(self, role: str, method: str | None) -> Explainer | None:
        """The ``role`` (``rating`` or ``ranking``) model's explainer for ``method`` over the
        facade's ratings (made on first use, then kept up to date with every rating learnt);
        None when there is no such model or it explains nothing."""
        key = (role, method)
        if key not in self._explainers:
            model = self.rater if role == "rating" else self.ranker
            if model is None or not isinstance(model, Explainable):
                return None
            log = self.artefact.rollback if role == "rating" else None
            self._explainers[key] = model.explainer(self.ratings, log, method)
        return self._explainers[key]

    def explain(self, user: object, item: object, k: int = 5, method: str | None = None) -> Explanation:
        """The explanation of the rating model's prediction (a ranker-only artefact: of the
        ranker's score) of raw ``user`` for raw ``item``: its ``k`` largest contributions
        (ratings or interactions, training or live) and the method (``method`` None:
        `explain_method`). `UnknownIdError` for ids nobody has heard of; a user the model
        has no rating of gets an explanation by no rating (``none: ...``)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        with self._lock:
            u = self.user_ids.get(user)
            if u is None:
                raise UnknownIdError("user", user)
            i = self._item(item)
            role = "rating" if self.rater is not None else "ranking"
            explainer = self._explainer(role, self.explain_method if method is None else method)
            if explainer is None:
                raise NotImplementedError(f"{type(self.model).__name__} does not explain its predictions")
            return explainer.explain(u, i, k)

    def _explain(self, role: str, u: int, i: int, k: int, path: str | None = None
                 ) -> tuple[list[dict] | None, str | None, float | None]:
        """The ``k`` ratings (interactions) with the largest estimated effect on the ``role``
        model's prediction (score), as the service returns them, the method that estimated
        them and the prediction (score) explained; ``(None, reason, None)`` where none
        applies. ``path``: user ``u``'s path, when the caller has it already."""
        if role == "rating" and (path if path is not None else self._path(u)) == "fallback":
            return None, FALLBACK_REASON, None
        explainer = self._explainer(role, self.explain_method)
        if explainer is None:
            return None, None, None
        return _served(explainer.explain(u, i, k))

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
        """Make ``ratings`` (the facade's ratings, grown) the facade's, and have the models
        (rating model and ranker: the ranker folds the rows in, so the next list changes at
        once) and every explainer learn the rows it added."""
        if not self.learners:
            raise NotImplementedError(f"{type(self.model).__name__} cannot learn online")
        new = np.arange(len(self.ratings), len(ratings), dtype=np.int64)
        for learner in self.learners:
            learner.learn(ratings, new)
        self.ratings = ratings
        for explainer in self._explainers.values():
            explainer.update(ratings, new)

    #: room for ratings received online that warming makes, as a fraction of the rows loaded
    reserve_fraction = 0.25

    def _warm_learning(self) -> None:
        """What the first write would otherwise pay, done before serving: room for the ratings
        to come (`Ratings.reserve`: the copy of the loaded rows the first append makes, 0.6 s
        at 10^7 ratings) and a `learn` of no rows by every learner (compiled kernels load:
        about 0.7 s in a fresh process). Changes no prediction."""
        self.ratings = self.ratings.reserve(max(int(len(self.ratings) * self.reserve_fraction), 1 << 16))
        empty = np.zeros(0, dtype=np.int64)
        for learner in self.learners:
            learner.learn(self.ratings, empty)

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
        (`UnknownIdError`) and ratings outside the model's scale or not finite (`ValueError`);
        the first such rating in order is the one named. One dict lookup per rating; only a
        rating that fails it is looked at again (`_unmappable`)."""
        positions, n_items = self.item_ids.table()
        lo, hi = self.model.rating_scale
        for r in ratings:
            i = positions.get(r.item)
            if i is None or i >= n_items or not lo <= r.rating <= hi:  # NaN fails the comparison too
                self._refuse(r)

    def _refuse(self, r: StoredRating | NewRating) -> None:
        """Raise why ``r`` cannot be applied (`UnknownIdError` or `ValueError`); nothing when it can."""
        problem = self._unmappable(r)
        if problem is not None:
            raise UnknownIdError("item", r.item) if problem.startswith("unknown item") else ValueError(problem)

    def _unmappable(self, r: StoredRating | NewRating) -> str | None:
        """Why this model cannot apply rating ``r`` (None: it can)."""
        if self.item_ids.get(r.item) is None:
            return f"unknown item id {r.item!r}"
        lo, hi = self.model.rating_scale
        if not (math.isfinite(r.rating) and lo <= r.rating <= hi):
            return f"rating {r.rating} for item {r.item!r} is outside the scale {lo:g}..{hi:g}"
        return None

    #: how many skipped ratings `skipped_examples` lists
    max_skipped_examples = 20

    def add_ratings(self, ratings: Iterable[StoredRating | NewRating], *, skip_unmappable: bool = False) -> int:
        """Apply ratings to the live model, in order; returns how many were applied.

        Stored ratings (with a ``seq``) must come in increasing ``seq`` order (`ValueError`
        otherwise); those already applied (``seq <= last_seq``) and duplicates are skipped,
        so replaying a store twice is harmless. A rating this model cannot apply (an item it
        does not know, a value outside its scale): with ``skip_unmappable`` (following a store,
        whose rows an earlier artefact accepted) it is left out, counted in ``n_skipped``,
        listed in ``skipped_examples`` and its seq still counts as seen; without, the first
        one raises `UnknownIdError` or `ValueError` before anything is applied."""
        if not isinstance(ratings, list):
            ratings = list(ratings)
        parsed = self._stored_columns(ratings)
        if parsed is None:  # anything but consecutive fresh stored rows the model can all apply
            parsed = self._parse_each(ratings, skip_unmappable)
        users, user_rows, items, values, stamps, skipped, last = parsed
        with self._lock:
            for r, problem in skipped:
                self._skip(r, problem)
            if users:
                ratings_now = self.ratings
                user_ids = ratings_now.user_ids
                if (user_rows < 0).any():  # users new to the map (or ids given as another type than str)
                    user_ids = user_ids.extend(users)
                    user_rows = user_ids.indices(users)
                if not isinstance(stamps, np.ndarray):
                    if None in stamps:
                        now = int(time.time())
                        stamps = [now if t is None else t for t in stamps]
                    stamps = np.asarray(stamps, dtype=np.int64)
                new = Ratings(user_rows, items, values, stamps,
                              user_ids, ratings_now.item_ids, ratings_now.rating_scale)
                self._learn(ratings_now.append(new))
                self.n_ingested += len(users)
            self._seen_seq = last
            return len(users)

    #: `_stored_columns` from this many ratings on (below, its fixed cost exceeds the loop's)
    columns_from = 64

    def _stored_columns(self, ratings: list) -> tuple | None:
        """The columns of ``ratings`` when they are what a store hands a follower: stored rows
        (`StoredRating`), none a duplicate, seqs increasing and all after `last_seq`, every item
        known and every value on the scale; None otherwise (`_parse_each` then looks at each).
        One transposition and C-level dict lookups instead of a Python loop per rating (u1,
        around the models: 0.5-0.6 -> 0.4 µs a rating at 100 a batch, 0.6 -> 0.25 at 1,000)."""
        if len(ratings) < self.columns_from or set(map(type, ratings)) != {StoredRating}:
            return None
        seqs, users, raw_items, values, stamps, _, duplicates = zip(*ratings, strict=True)
        if any(duplicates):
            return None
        seq = np.fromiter(seqs, dtype=np.int64, count=len(seqs))
        if seq[0] <= self._seen_seq or (len(seq) > 1 and not bool((seq[1:] > seq[:-1]).all())):
            return None
        positions, n_items = self.item_ids.table()
        items = np.fromiter(map(positions.get, raw_items, repeat(-1)), dtype=np.int64, count=len(raw_items))
        value = np.fromiter(values, dtype=np.float64, count=len(values))  # checked as given, then stored as float32
        lo, hi = self.model.rating_scale
        if not (bool((items >= 0).all()) and bool((items < n_items).all())
                and bool((value >= lo).all()) and bool((value <= hi).all())):  # NaN fails too
            return None
        user_positions, n_users = self.user_ids.table()
        user_rows = np.fromiter(map(user_positions.get, users, repeat(-1)), dtype=np.int64, count=len(users))
        user_rows[user_rows >= n_users] = -1  # ids a later map holds: not in this one
        return (list(users), user_rows, items, value.astype(np.float32),
                np.fromiter(stamps, dtype=np.int64, count=len(stamps)), [], int(seq[-1]))

    def _parse_each(self, ratings: list, skip_unmappable: bool) -> tuple:
        """`add_ratings`' columns from one look at each rating: ``(users, user rows, items,
        values, timestamps, skipped, last seq)``."""
        # one pass, one dict lookup per item; a stored rating (the service's path) is unpacked
        # as the tuple it is, anything else read by attribute
        users: list[str] = []
        user_rows: list[int] = []  # each rating's user index, -1 for a user this map does not hold yet
        items: list[int] = []
        values: list[float] = []
        stamps: list[int | None] = []
        skipped: list[tuple[StoredRating | NewRating, str | None]] = []
        seen = last = self._seen_seq
        lo, hi = self.model.rating_scale
        item_ids = self.item_ids
        positions, n_items = item_ids.table()
        user_positions, n_users = self.user_ids.table()
        for r in ratings:
            if type(r) is StoredRating:
                seq, user, item, value, stamp, _, duplicate = r
            else:
                seq, duplicate = getattr(r, "seq", None), getattr(r, "duplicate", False)
                user, item, value, stamp = r.user, r.item, r.rating, r.timestamp
            if duplicate:
                continue
            if seq is not None:
                if seq <= seen:
                    continue
                if seq <= last:
                    raise ValueError(f"stored ratings must come in sequence order: seq {seq} after {last}")
                last = seq
            i = positions.get(item)
            if i is None or i >= n_items or not lo <= value <= hi:
                i = item_ids.get(item)  # e.g. an id that is not a str
                if i is None or not lo <= value <= hi:
                    if not skip_unmappable:
                        self._refuse(r)
                    skipped.append((r, self._unmappable(r)))
                    continue
            u = user_positions.get(user, -1)
            users.append(user)
            user_rows.append(u if u < n_users else -1)
            items.append(i)
            values.append(value)
            stamps.append(stamp)
        return (users, np.asarray(user_rows, dtype=np.int64), np.asarray(items, dtype=np.int64),
                np.asarray(values, dtype=np.float32), stamps, skipped, last)

    def _skip(self, r: StoredRating | NewRating, reason: str) -> None:
        self.n_skipped += 1
        seq = getattr(r, "seq", None)
        if seq is not None:
            self._skipped_seqs.append(seq)
        if len(self.skipped_examples) < self.max_skipped_examples:
            self.skipped_examples.append({"seq": seq, "user": r.user, "item": r.item, "rating": r.rating,
                                          "reason": reason})

    def skipped_seqs(self, first: int, last: int) -> list[int]:
        """The seqs in ``first..last`` that this model skipped as unmappable."""
        lo = bisect.bisect_left(self._skipped_seqs, first)
        hi = bisect.bisect_right(self._skipped_seqs, last)
        return list(self._skipped_seqs[lo:hi])

    def replay(self, stored: Iterable[StoredRating], users: Iterable[str] = ()) -> int:
        """Bring the model up to date with a store after a (re)start: ``users`` created with
        no rating, then ``stored`` in seq order; rows it cannot apply are skipped and counted
        (`add_ratings` with ``skip_unmappable``), so one bad row blocks nothing."""
        for user in users:
            self.add_user(user)
        n = 0
        chunk: list[StoredRating] = []
        for r in stored:
            chunk.append(r)
            if len(chunk) >= 10_000:
                n += self.add_ratings(chunk, skip_unmappable=True)
                chunk = []
        return n + self.add_ratings(chunk, skip_unmappable=True)

    @property
    def last_seq(self) -> int:
        return self._seen_seq


def _served(exp: Explanation) -> tuple[list[dict] | None, str, float | None]:
    """An explanation as the service returns it: ``(contributions as dicts, or None when the
    method says none applies; the method; the prediction or score explained)``."""
    if exp.method.startswith("none"):
        return None, exp.method, exp.prediction
    return [{"user": c.user, "item": c.item, "title": c.title, "rating": c.rating,
             "timestamp": c.timestamp, "effect": c.effect} for c in exp.contributions], exp.method, exp.prediction

"""The most-popular ranker: every user gets the same list, items ordered by how often they were
interacted with. The non-personalised baseline, and what a user with no interaction gets
from every ranking model."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from recsys.models.base import Explanation, RankingModel
from recsys.ratings import Ratings

#: the weightings `PopularityConfig` accepts
WEIGHTINGS = ("count", "sum")
#: the explanation's method: no interaction of the user explains a popularity score
REASON = "none: popularity (no interaction of the user explains it)"


@dataclass
class PopularityConfig:
    """Attributes:
        weighting: ``count``: an item's score is its number of distinct users (a pair given
            again counts once); ``sum``: the sum of its interactions' values (their weights;
            for explicit ratings, the sum of the ratings).
    """

    weighting: str = "count"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"popularity weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")


class PopularityRanker(RankingModel):
    """Scores every item by its popularity (`PopularityConfig.weighting`), the same for every
    user; registered as ``popular``. Buffer ``item_scores`` float32 ``[n_items]``: the live
    scores (online interactions update them; ``item_counts`` stays the fitted counts)."""

    name = "popular"

    def __init__(self, n_users: int, n_items: int, rating_scale: tuple[float, float] = (0.0, 1.0),
                 config: PopularityConfig | None = None) -> None:
        super().__init__(n_users, n_items, rating_scale)
        self.config = config or PopularityConfig()
        self.register_buffer("item_scores", torch.zeros(n_items))
        #: the live (user, item) pairs -> value, built on the first `learn`
        self._pairs: dict[int, float] | None = None
        self._n_rows = 0

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def bind_ratings(self, ratings: Ratings) -> None:
        self._pairs = None
        self._n_rows = len(ratings)

    def _pair_values(self, ratings: Ratings) -> dict[int, float]:
        """(user · n_items + item) -> latest value, over ``ratings`` (a pair given again keeps
        its last row)."""
        keys = ratings.users * self.n_items + ratings.items
        return dict(zip(keys.tolist(), ratings.values.astype(np.float64).tolist(), strict=True))

    def _scores_of(self, pairs: dict[int, float]) -> np.ndarray:
        keys = np.fromiter(pairs.keys(), dtype=np.int64, count=len(pairs))
        weights = None if self.config.weighting == "count" else np.fromiter(pairs.values(), np.float64, len(pairs))
        return np.bincount(keys % self.n_items, weights=weights, minlength=self.n_items).astype(np.float32)

    def fit(self, interactions: Ratings, *, progress: bool | None = None) -> dict:
        """Count (or sum) each item's interactions; returns ``fit_seconds``."""
        if interactions.n_items != self.n_items or interactions.n_users > self.n_users:
            raise ValueError(f"popularity built for {self.n_users} users x {self.n_items} items cannot fit "
                             f"interactions over {interactions.n_users} x {interactions.n_items}")
        started = time.perf_counter()
        self.prepare(interactions)
        pairs = self._pair_values(interactions)
        self.item_scores.copy_(torch.from_numpy(self._scores_of(pairs)))
        self._pairs = pairs
        return {"fit_seconds": time.perf_counter() - started, "weighting": self.config.weighting}

    def popularity_scores(self, n: int) -> torch.Tensor:
        return self.item_scores.expand(n, -1).clone()

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """``float32 [B, n_items]``: the item scores, the same row for every user."""
        if bool((users >= self.n_users).any()):
            raise IndexError("user index beyond the model's tables")
        return self.popularity_scores(len(users))

    # ------------------------------------------------------------------ online
    def start_online(self, train: Ratings, *, log: object | None = None,
                     learning_rate: float | None = None) -> None:
        """Nothing to prepare (no log, no learning rate)."""

    def learn(self, ratings: Ratings, new: np.ndarray) -> None:
        """Add the example ids ``new`` of ``ratings`` (training + live) to the item scores: a
        new (user, item) pair counts once more (``sum``: adds its value); a pair given again
        replaces its value and is not counted twice. Users added to the id map grow the tables;
        items are fixed (an unknown item is a `ValueError`)."""
        new = np.asarray(new, dtype=np.int64)
        if len(new) and int(ratings.items[new].max()) >= self.n_items:
            raise ValueError(f"the popularity ranker cannot learn items it was not fitted on "
                             f"(it has {self.n_items} items); refit to add items")
        if ratings.n_users > self.n_users:
            extra = torch.zeros(ratings.n_users - self.n_users, dtype=torch.bool, device=self.device)
            self.known_users = torch.cat([self.known_users, extra])
            self.n_users = ratings.n_users
        before = len(ratings) - len(new)
        if self._pairs is None or self._n_rows != before:
            self._pairs = self._pair_values(ratings.subset(np.arange(before)))
        pairs = self._pairs
        delta = np.zeros(self.n_items, dtype=np.float64)
        for k in new.tolist():
            item = int(ratings.items[k])
            key = int(ratings.users[k]) * self.n_items + item
            value = float(ratings.values[k])
            old = pairs.get(key)
            if self.config.weighting == "count":
                delta[item] += old is None
            else:
                delta[item] += value - (old or 0.0)
            pairs[key] = value
        self._n_rows = len(ratings)
        with torch.no_grad():
            self.item_scores.add_(torch.from_numpy(delta.astype(np.float32)).to(self.device))
            if len(new):
                self.known_users[torch.from_numpy(np.unique(ratings.users[new])).to(self.device)] = True

    def path(self, user: int) -> str:
        """Always ``popularity``: no user's own interactions change their list."""
        return "popularity"

    def explainer(self, ratings: Ratings, log: object | None = None,
                  method: str | None = None) -> PopularityExplainer:
        """An explainer that says the score is popularity, crediting no interaction."""
        return PopularityExplainer(self, ratings)


class PopularityExplainer:
    """Explanations of popularity scores: no interaction of the user explains them
    (``method`` `REASON`, no contributions)."""

    method = REASON
    units = "score"

    def __init__(self, model: PopularityRanker, ratings: Ratings) -> None:
        self.model = model
        self.ratings = ratings

    def warm(self) -> None:
        """Nothing to precompute."""

    def update(self, ratings: Ratings, new: np.ndarray) -> None:
        self.ratings = ratings

    def explain(self, user: int, item: int, k: int) -> Explanation:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        r = self.ratings
        raw_i = r.item_ids.raw(item)
        raw_u = r.user_ids.raw(user) if 0 <= user < r.n_users else ""
        return Explanation(raw_u, raw_i, r.title(raw_i), float(self.model.item_scores[item]), REASON,
                           units=self.units)


__all__ = ["REASON", "WEIGHTINGS", "PopularityConfig", "PopularityExplainer", "PopularityRanker"]

"""EASE's explainer (`recsys.models.base.Explainer`): exact shares.

EASE scores item ``i`` for user ``u`` as ``s_ui = Σ_j x_uj·B_ji`` over the user's own
interactions ``j`` (``x_uj`` their input weight), so interaction ``j`` is credited with
``x_uj·B_ji`` and the contributions of all the user's interactions sum to the score exactly
(up to float32 rounding). With top-k pruning the shares are those of the pruned ``B``, and
again sum to the pruned model's score. With the popularity prior on
(`recsys.models.ease.EASEConfig.cold_weight` > 0) the score also holds the prior
``c/(n_u + c)·m_u·pop_i``, which no single interaction is credited with: it is reported in
`Explanation.terms` under `PRIOR_TERM`, so the contributions plus the terms sum to the score.
A user with no interaction gets the popularity ranking, which no interaction explains.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.models.base import Contribution, Explanation, RankingModel
from recsys.ratings import Ratings

#: the estimate this explainer reports
METHOD = "exact (EASE item-item weights)"
#: the reason given when the score is the popularity ranking
POPULARITY_REASON = "none: popularity (the user has no interaction)"
#: the name of the popularity prior's part of a score in `Explanation.terms`
PRIOR_TERM = "popularity prior"


class EASEExplainer:
    """Explains an `EASE` model's scores by the user's interactions. ``ratings`` are the
    interactions the model holds (training first, then those learnt online):
    `Contribution.example` is a row there. Nothing is cached: `update` only takes the grown
    ratings (the model's rows already hold what `learn` added)."""

    method = METHOD
    units = "score"

    def __init__(self, model: RankingModel, ratings: Ratings) -> None:
        self.model = model
        self.ratings = ratings
        #: the last user's ``(user, score row, prior row)``: a list of k items explained for
        #: one user scores the user once (cleared when the ratings grow)
        self._last: tuple[int, torch.Tensor, torch.Tensor | None] | None = None

    def warm(self) -> None:
        """Nothing to precompute."""

    def update(self, ratings: Ratings, new: np.ndarray) -> None:
        """Explain against the grown ``ratings`` from now on."""
        self.ratings = ratings
        self._last = None

    def _rows(self, user: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The user's served score row and popularity-prior row (None when the prior is off),
        ``float32 [n_items]`` each, from one `EASE.score_parts` call."""
        if self._last is None or self._last[0] != user:
            ease, prior, _ = self.model.score_parts(torch.tensor([user]))
            on = bool(self.model.config.cold_weight)
            self._last = (user, (ease + prior)[0] if on else ease[0], prior[0] if on else None)
        return self._last[1], self._last[2]

    def contributions(self, user: int, item: int) -> tuple[np.ndarray, np.ndarray]:
        """Every interaction of index ``user`` with its effect on the score of ``item``:
        ``(example ids int64 [m], effects float64 [m])``; the effects sum to the score."""
        model = self.model
        items, values, examples = model.user_row(user)
        sources, weights = model.item_weights(item)
        lookup = np.zeros(model.n_items, dtype=np.float64)
        lookup[sources] = weights
        effects = model.input_weights(values).astype(np.float64) * lookup[items]
        return examples, effects

    def explain(self, user: int, item: int, k: int) -> Explanation:
        """The ``k`` interactions of index ``user`` with the largest absolute effect on the
        score of index ``item`` (``units="score"``; ``n_candidates``: all the user's
        interactions); ``terms``: ``{PRIOR_TERM: the popularity prior's part}`` where the
        model's ``cold_weight`` is on (all contributions plus the terms = the score)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        model, r = self.model, self.ratings
        if not 0 <= item < model.n_items:
            raise IndexError(f"item index {item} outside the model's {model.n_items} items")
        raw_i = r.item_ids.raw(item)
        title = r.title(raw_i)
        known = 0 <= user < min(model.n_users, r.n_users)
        raw_u = r.user_ids.raw(user) if known else ""
        if not known or model.path(user) != "model":
            score = float(model.popularity_scores(1)[0, item])
            return Explanation(raw_u, raw_i, title, score, POPULARITY_REASON, units=self.units)
        scores, prior = self._rows(user)
        score = float(scores[item])
        examples, effects = self.contributions(user, item)
        order = np.argsort(-np.abs(effects), kind="stable")[:k]
        contribs = [Contribution(
            example=int(ex), user=raw_u, item=r.item_ids.raw(int(r.items[ex])), rating=float(r.values[ex]),
            timestamp=None if r.timestamps is None else int(r.timestamps[ex]),
            title=r.title(r.item_ids.raw(int(r.items[ex]))), effect=float(effects[j]), shares="item-item")
            for j, ex in ((int(j), int(examples[j])) for j in order)]
        terms = None if prior is None else {PRIOR_TERM: float(prior[item])}
        return Explanation(raw_u, raw_i, title, score, METHOD, contribs, len(examples),
                           units=self.units, terms=terms)


__all__ = ["METHOD", "POPULARITY_REASON", "PRIOR_TERM", "EASEExplainer"]

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

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class _UserParts:
    """One user's raw id, served scores ``[n_items]`` (with the prior where it is on), prior
    ``[n_items]`` (None when off), and interactions: items, input weights (float64) and
    example ids ``[m]``."""

    user: int
    raw_user: str
    scores: np.ndarray
    prior: np.ndarray | None
    items: np.ndarray
    weights: np.ndarray
    examples: np.ndarray


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
        #: the last user's scores and row: a list of k items explained for one user scores
        #: the user once (cleared when the ratings grow)
        self._last: _UserParts | None = None
        self._raw_item_ids: tuple[object, np.ndarray] | None = None

    def warm(self) -> None:
        """Nothing to precompute."""

    def _raw_items(self) -> np.ndarray:
        """The raw item ids in index order (one array per id map: indexing it costs far less
        than a lookup through the map per contribution)."""
        ids = self.ratings.item_ids
        if self._raw_item_ids is None or self._raw_item_ids[0] is not ids:
            self._raw_item_ids = (ids, ids.raw_ids)
        return self._raw_item_ids[1]

    def update(self, ratings: Ratings, new: np.ndarray) -> None:
        """Explain against the grown ``ratings`` from now on."""
        self.ratings = ratings
        self._last = None

    def _user(self, user: int) -> _UserParts:
        """What every explanation of ``user`` reuses (one `EASE.score_parts` call and one
        row read per user, kept for the next call: a list of k items is explained for one
        user)."""
        last = self._last
        if last is None or last.user != user:
            ease, prior, _ = self.model.score_parts(torch.tensor([user]))
            ease, prior = ease[0].detach().cpu().numpy(), prior[0].detach().cpu().numpy()
            on = bool(self.model.config.cold_weight)
            items, values, examples = self.model.user_row(user)
            last = self._last = _UserParts(user, self.ratings.user_ids.raw(user), ease + prior if on else ease,
                                           prior if on else None, items,
                                           self.model.input_weights(values).astype(np.float64), examples)
        return last

    def contributions(self, user: int, item: int) -> tuple[np.ndarray, np.ndarray]:
        """Every interaction of index ``user`` with its effect on the score of ``item``:
        ``(example ids int64 [m], effects float64 [m])``; the effects sum to the score."""
        parts = self._user(user)
        return parts.examples, parts.weights * self.model.source_weights(parts.items, item)

    def explain(self, user: int, item: int, k: int) -> Explanation:
        """The ``k`` interactions of index ``user`` with the largest absolute effect on the
        score of index ``item`` (``units="score"``; ``n_candidates``: all the user's
        interactions); ``terms``: ``{PRIOR_TERM: the popularity prior's part}`` where the
        model's ``cold_weight`` is on (all contributions plus the terms = the score)."""
        return self.explain_many(user, [item], k)[0]

    def explain_many(self, user: int, items: Sequence[int], k: int) -> list[Explanation]:
        """`explain` of each of ``items`` for one ``user`` (a list of recommendations), with
        one gather of the weights ``B_j,i`` for all of them (`EASE.source_weights_many`)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        model, r = self.model, self.ratings
        items = [int(i) for i in items]
        for item in items:
            if not 0 <= item < model.n_items:
                raise IndexError(f"item index {item} outside the model's {model.n_items} items")
        raw_items = self._raw_items()
        known = 0 <= user < min(model.n_users, r.n_users)
        parts = self._user(user) if known else None
        if parts is None or len(parts.items) == 0:  # no interaction: the popularity path
            popularity = model.popularity_scores(1)[0]
            return [Explanation(parts.raw_user if parts else "", str(raw_items[item]),
                                r.title(str(raw_items[item])), float(popularity[item]), POPULARITY_REASON,
                                units=self.units) for item in items]
        raw_u, prior = parts.raw_user, parts.prior
        effects = parts.weights[:, None] * model.source_weights_many(parts.items, np.asarray(items, np.int64))
        timestamps = r.timestamps
        out = []
        for column, item in enumerate(items):
            raw_i = str(raw_items[item])
            contribs = []
            for j in _top_abs(effects[:, column], k).tolist():
                ex = int(parts.examples[j])
                raw = str(raw_items[r.items[ex]])
                contribs.append(Contribution(
                    example=ex, user=raw_u, item=raw, rating=float(r.values[ex]),
                    timestamp=None if timestamps is None else int(timestamps[ex]),
                    title=r.title(raw), effect=float(effects[j, column]), shares="item-item"))
            terms = None if prior is None else {PRIOR_TERM: float(prior[item])}
            out.append(Explanation(raw_u, raw_i, r.title(raw_i), float(parts.scores[item]), METHOD, contribs,
                                   len(parts.examples), units=self.units, terms=terms))
        return out


def _top_abs(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``|values|``, largest first (ties: the lower position,
    as a stable sort orders them), by a partial sort: O(m + k log k), not O(m log m)."""
    m = len(values)
    if k <= 0 or m == 0:
        return np.zeros(0, dtype=np.int64)
    key = -np.abs(values)
    if k < m and m > 512:  # below that a full sort costs less than the partial one's extra passes
        kth = np.partition(key, k - 1)[k - 1]
        chosen = np.flatnonzero(key <= kth)  # ties at the k-th value all in, in position order
        return chosen[np.argsort(key[chosen], kind="stable")][:k]
    return np.argsort(key, kind="stable")[:k]


__all__ = ["METHOD", "POPULARITY_REASON", "PRIOR_TERM", "EASEExplainer"]

"""Explainers of the `implicit` wrappers (`recsys.models.base.Explainer`), in score units:

- `ALSExplainer` (exact): ALS's user row is a ridge solve over the user's interactions, so a
  score splits exactly over them: ``x_u·y_i = Σ_j c_uj (y_iᵀ W_u⁻¹ y_j)`` with ``W_u = YᵀY +
  reg·I + Σ_j (c_uj − 1) y_j y_jᵀ`` (the library's ``explain``). The contributions sum to the
  served score; any part they do not cover (a user row that is not the exact solve over these
  interactions, e.g. ``exact_user_solve=False``) is reported as a term, never hidden.
- `BPRExplainer` (approximate): BPR's score is not additive in the user's interactions. The
  user's row ``x_u`` is projected on the span of their items' factors by least squares,
  ``x_u ≈ Σ_j a_j y_j``, and item ``j`` is credited ``a_j (y_j·y_i)``; the rest of ``x_u`` and the
  item bias are terms, so contributions plus terms equal the score. It says which of the
  user's items the user's direction is built from, not what removing one would do.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsys.models.base import Contribution, Explanation
from recsys.models.implicit.common import PATH_POPULARITY, ImplicitFactorModel, library_threads
from recsys.ratings import Ratings

ALS_METHOD = "exact: ALS user-solve split (implicit's explain)"
BPR_METHOD = ("approximate: least-squares projection of the user's factors on their items' factors; "
              "item j credited a_j·(q_j·q_i)")
POPULARITY_REASON = "none: popularity ranking (the user has no interaction)"
NO_FACTORS_REASON = "none: the item had no interaction at fit time (no factors; it is ranked last)"
RESIDUAL_TERM = "not credited (the user's row is not the exact solve over these interactions)"
UNITS = "score"


class _Base:
    """What both explainers share: the live ratings, the cases no interaction explains, and
    building `Contribution` rows from example ids."""

    method: str
    units = UNITS

    def __init__(self, model: ImplicitFactorModel, ratings: Ratings) -> None:
        self.model, self.ratings = model, ratings

    def warm(self) -> None:
        """Nothing to precompute: an explanation costs one user solve."""

    def update(self, ratings: Ratings, new: np.ndarray) -> None:
        """``ratings`` (training + live) grew by the example ids ``new``."""
        self.ratings = ratings

    def _header(self, user: int, item: int) -> tuple[str, str, str | None]:
        r = self.ratings
        raw_u = r.user_ids.raw(user) if 0 <= user < r.n_users else ""
        raw_i = r.item_ids.raw(item)
        return raw_u, raw_i, r.title(raw_i)

    def _unexplained(self, user: int, item: int, k: int) -> Explanation | None:
        """The explanation where no interaction explains the score (else None)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        model = self.model
        if not 0 <= item < model.n_items:
            raise IndexError(f"item index {item} outside the model's {model.n_items} items")
        raw_u, raw_i, title = self._header(user, item)
        if model.path(user) == PATH_POPULARITY:
            return Explanation(raw_u, raw_i, title, float(model.item_counts[item]), POPULARITY_REASON,
                               units=UNITS)
        if not bool(model.known_items[item]):
            return Explanation(raw_u, raw_i, title, model.score(user, item), NO_FACTORS_REASON, units=UNITS)
        return None

    def _contributions(self, rows: np.ndarray, effects: np.ndarray, k: int, shares: str) -> list[Contribution]:
        r = self.ratings
        out = []
        for j in np.argsort(-np.abs(effects), kind="stable")[:k]:
            z = int(rows[j])
            raw_item = r.item_ids.raw(int(r.items[z]))
            out.append(Contribution(
                example=z, user=r.user_ids.raw(int(r.users[z])), item=raw_item, rating=float(r.values[z]),
                timestamp=None if r.timestamps is None else int(r.timestamps[z]), title=r.title(raw_item),
                effect=float(effects[j]), shares=shares))
        return out


class ALSExplainer(_Base):
    """The exact split of an `ALS` score over the user's interactions in ``ratings`` (training
    + live; a pair received again counts once, with its latest row). Caches the factorised
    ``W_u`` of the most recent users (`cache_size`); `update` drops the users it touches."""

    method = ALS_METHOD
    cache_size = 256

    def __init__(self, model: ImplicitFactorModel, ratings: Ratings) -> None:
        super().__init__(model, ratings)
        self._weights: OrderedDict[int, Any] = OrderedDict()

    def update(self, ratings: Ratings, new: np.ndarray) -> None:
        super().update(ratings, new)
        for u in np.unique(ratings.users[np.asarray(new, dtype=np.int64)]).tolist():
            self._weights.pop(u, None)

    def split(self, user: int, item: int) -> tuple[np.ndarray, np.ndarray, float]:
        """``(rows int64 [m], effects float64 [m], total)``: each of the user's interactions (row
        of ``ratings``, in item order) and its share of the score of ``item``; ``total`` is
        their sum, the score of the exact solve."""
        model, r = self.model, self.ratings
        rows = model.user_rows(r, user)
        data = model.interaction_data(r.values[rows])
        csr = sp.csr_matrix((data, r.items[rows], np.array([0, len(rows)])), shape=(1, model.n_items),
                            dtype=np.float32)
        lib = model.library()
        with library_threads():
            total, top, weights = lib.explain(0, csr, item, user_weights=self._weights.get(user), N=len(rows))
        self._weights[user] = weights
        self._weights.move_to_end(user)
        while len(self._weights) > self.cache_size:
            self._weights.popitem(last=False)
        effects = np.zeros(len(rows))
        position = {int(i): p for p, i in enumerate(r.items[rows])}
        for i, effect in top:
            effects[position[int(i)]] = effect
        return rows, effects, float(total)

    def explain(self, user: int, item: int, k: int) -> Explanation:
        """The ``k`` interactions with the largest shares (by absolute value) of the score of
        indices ``(user, item)``; ``n_candidates``: all of the user's interactions."""
        done = self._unexplained(user, item, k)
        if done is not None:
            return done
        raw_u, raw_i, title = self._header(user, item)
        rows, effects, total = self.split(user, item)
        score = self.model.score(user, item)
        residual = score - total
        terms = {RESIDUAL_TERM: residual} if abs(residual) > 1e-4 * (1.0 + abs(score)) else None
        return Explanation(raw_u, raw_i, title, score, ALS_METHOD, self._contributions(rows, effects, k, "user solve"),
                           len(rows), units=UNITS, terms=terms)


class BPRExplainer(_Base):
    """The approximate split of a `BPR` score (module docstring): contributions plus ``terms``
    (item bias, the part of the user's row outside their items' span) equal the score."""

    method = BPR_METHOD

    def split(self, user: int, item: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """``(rows int64 [m], effects float64 [m], terms)`` for the score of ``(user, item)``."""
        model, r = self.model, self.ratings
        rows = model.user_rows(r, user)
        d = model.table_width() - 1
        x = model.user_factors[user, :d].detach().cpu().double().numpy()
        items = model.item_factors.detach().cpu().double().numpy()
        y = items[r.items[rows], :d]
        target = items[item, :d]
        with library_threads():
            a = np.linalg.lstsq(y.T, x, rcond=None)[0] if len(rows) else np.zeros(0)
        effects = a * (y @ target)
        rest = x - y.T @ a
        terms = {"item bias": float(items[item, d]),
                 "user factors outside their items' span": float(rest @ target)}
        return rows, effects, terms

    def explain(self, user: int, item: int, k: int) -> Explanation:
        done = self._unexplained(user, item, k)
        if done is not None:
            return done
        raw_u, raw_i, title = self._header(user, item)
        rows, effects, terms = self.split(user, item)
        return Explanation(raw_u, raw_i, title, self.model.score(user, item), BPR_METHOD,
                           self._contributions(rows, effects, k, "approximate"), len(rows), units=UNITS,
                           terms=terms)


__all__ = ["ALS_METHOD", "BPR_METHOD", "NO_FACTORS_REASON", "POPULARITY_REASON", "RESIDUAL_TERM",
           "ALSExplainer", "BPRExplainer"]

"""Explanations: which training ratings raised or lowered a prediction, and by how much.

The public queries over any `recsys.models.base.Explainable` model: `explain` (one
prediction) and `explain_recommendations` (the `recommend` list), each an
`recsys.models.base.Explanation`. The estimates themselves live with their model family:
MF's (``newton``, ``rollback``, ``fia``: `METHODS`; the candidates, `estimate_effects`, the
serving cache `NewtonInfluence`) in `recsys.models.mf.explain`, re-exported here; the
evidence-chain model's shares in `recsys.models.rec.explain`. See ``docs/explanations.md``.
"""

from __future__ import annotations

import torch

from recsys.errors import UnknownIdError
from recsys.models.base import Contribution, Explainable, Explanation, RatingModel, UpdateLog
from recsys.models.mf.explain import (
    DEFAULT_METHOD,
    METHODS,
    UNITS,
    NewtonInfluence,
    candidates,
    estimate_effects,
)
from recsys.ratings import Ratings


def _explainer(model: RatingModel, log: UpdateLog | None, train: Ratings, method: str | None):
    if not isinstance(model, Explainable):
        raise TypeError(f"{type(model).__name__} does not explain its predictions (base.Explainable)")
    return model.explainer(train, log, method)  # None: the family's default method


def explain(model: RatingModel, log: UpdateLog | None, train: Ratings, user: object, item: object,
            k: int = 5, method: str | None = None) -> Explanation:
    """The ``k`` training ratings with the largest estimated effect (by absolute value) on the
    prediction of raw ``user`` for raw ``item``.

    ``method``: one of the model family's methods (MF: `METHODS`, ``newton`` by default,
    ``rollback`` needs ``log``); None gives the family's default. Raises
    `UnknownIdError` for ids the training ratings never saw."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    u, i = train.user_ids.index(user, "user"), train.item_ids.index(item, "item")
    return _explainer(model, log, train, method).explain(u, i, k)


def explain_recommendations(model: RatingModel, log: UpdateLog | None, train: Ratings, user: object,
                            n: int = 10, k: int = 5, method: str | None = None) -> list[Explanation]:
    """Explanations for the ``n`` top-scored items ``user`` has not rated (the `recommend`
    list), each with its ``k`` largest contributions. The ``prediction`` field holds the
    (clipped) predicted rating."""
    u = train.user_ids.index(user, "user")
    scores = model.score_all(torch.tensor([u]))[0].clone()
    rated = train.by_user
    scores[torch.from_numpy(rated.columns[rated.row(u)]).to(scores.device)] = -torch.inf
    top = torch.topk(scores, min(n, int(torch.isfinite(scores).sum()))).indices.cpu().numpy()
    explainer = _explainer(model, log, train, method)
    return [explainer.explain(u, int(i), k) for i in top]


__all__ = ["DEFAULT_METHOD", "METHODS", "UNITS", "Contribution", "Explanation", "NewtonInfluence", "UnknownIdError",
           "candidates", "estimate_effects", "explain", "explain_recommendations"]

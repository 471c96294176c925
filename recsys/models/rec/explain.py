"""The evidence-chain model's explainer (`recsys.models.base.Explainer`): the ratings behind a
prediction are its first-hop evidence, each credited with its exact share of ``u·v``
(`EvidenceChainModel.explain`); the parts no rating is credited with (global mean, baseline
biases, the fallback prior, prototypes' free vectors) are the explanation's ``terms``."""

from __future__ import annotations

import numpy as np
import torch

from recsys.models.base import Contribution, Explanation, RatingModel

#: the estimate this explainer reports
METHOD = "evidence-chain shares (first hop)"
#: the reason an explanation of a fallback prediction gives (no rating of the user is used)
FALLBACK_REASON = "none: the prediction uses no rating of this user (fallback)"


class EvidenceChainExplainer:
    """Explanations of an `EvidenceChainModel`'s predictions against its live ratings (the
    training ratings plus those inserted online by `learn`; a pair rated again carries its
    latest value): `Contribution.example` is the rating's row there. Nothing is cached, so
    `update` has nothing to do: the model's live ratings already hold what it learnt."""

    method = METHOD
    units = "rating points"

    def __init__(self, model: RatingModel) -> None:
        self.model = model

    def update(self, ratings: object, new: np.ndarray) -> None:
        """Nothing to refresh: explanations read the model's live ratings."""

    def warm(self) -> None:
        """Nothing to precompute."""

    def explain(self, user: int, item: int, k: int) -> Explanation:
        """The ``k`` first-hop evidence ratings with the largest shares (by absolute value)
        of the prediction of indices ``(user, item)``."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        model = self.model
        r = model.ratings
        raw_i = r.item_ids.raw(item)
        title = r.title(raw_i)
        if not 0 <= user < r.n_users:  # nobody the model has heard of
            pred = float(model.predict(torch.tensor([-1]), torch.tensor([item]))[0])
            return Explanation("", raw_i, title, pred, FALLBACK_REASON)
        raw_u = r.user_ids.raw(user)
        res = model.explain(raw_u, raw_i, top=None)
        if res["path"] == "fallback (unknown user)":
            return Explanation(raw_u, raw_i, title, float(res["prediction"]), FALLBACK_REASON,
                               terms=res["terms"])
        first = [e for e in res["evidence"] if e["hop"] == 1]  # largest |share| first
        contribs = [Contribution(
            example=int(e["example"]), user=e["user"], item=e["item"], rating=float(e["rating"]),
            timestamp=None if r.timestamps is None else int(r.timestamps[int(e["example"])]),
            title=r.title(e["item"]), effect=float(e["share"]), shares="hop 1") for e in first[:k]]
        return Explanation(raw_u, raw_i, title, float(res["prediction"]), METHOD, contribs, len(first),
                           terms=res["terms"])


__all__ = ["FALLBACK_REASON", "METHOD", "EvidenceChainExplainer"]

"""The evidence-chain model's explainer (`recsys.models.base.Explainer`): the ratings behind a
prediction are its first-hop evidence, each credited with its exact leave-one-out effect on
the served model: the prediction minus the prediction recomputed with that rating removed
from the live ratings (its edge hidden from every sampled chain under the same evaluation
sampling seed, as the model hides a batch's targets, and the baseline biases refitted
without it; the trained parameters unchanged). REC builds its representations from the
ratings on demand, so this is what the rating does to the prediction as served.

The first-hop *shares* of ``u·v`` (`EvidenceChainModel.explain`), served before, are not
effects (and are no longer served): a share measures a
message's part of the mean from zero, while removing the rating moves the mean by the
message's distance from it, re-samples the node's neighbours and refits the biases
(measured against leave-one-out by ``benchmarks/explain_rec.py``: see docs/explanations.md).
The parts no rating is credited with (global mean, baseline biases, the fallback prior,
prototypes' free vectors) are the explanation's ``terms``."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from recsys.models.base import Contribution, Explanation, RatingModel
from recsys.ratings import Ratings

#: the estimate this explainer reports
METHOD = "leave-one-out (evidence removed, same parameters)"
#: the explainer's earlier estimate, still accepted as a method name (it now names the same explainer)
SHARES_METHOD = "evidence-chain shares (first hop)"
#: the reason an explanation of a fallback prediction gives (no rating of the user is used)
FALLBACK_REASON = "none: the prediction uses no rating of this user (fallback)"


def baselines_without(ratings: Ratings, removed_ids: np.ndarray, mean: float, reg: float,
                      sweeps: int = 8, item_reg: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's ridge baseline (`recsys.models.rec.model.fit_baseline`) refitted without
    one rating, for each of ``removed_ids [C]`` at once (sparse products): ``(b_u [C,
    n_users], b_i [C, n_items])``, float64."""
    item_reg = reg if item_reg is None else item_reg
    u, i, v = ratings.users, ratings.items, ratings.values.astype(np.float64)
    nu, ni = ratings.n_users, ratings.n_items
    z = np.asarray(removed_ids, dtype=np.int64)
    c = len(z)
    a = sp.csr_matrix((np.ones(len(u)), (i, u)), shape=(ni, nu))  # item x user incidence
    resid = v - mean
    si = np.bincount(i, weights=resid, minlength=ni)
    su = np.bincount(u, weights=resid, minlength=nu)
    ci = np.bincount(i, minlength=ni).astype(np.float64)
    cu = np.bincount(u, minlength=nu).astype(np.float64)
    rows = np.arange(c)
    ci_c = np.broadcast_to(ci, (c, ni)).copy()
    cu_c = np.broadcast_to(cu, (c, nu)).copy()
    ci_c[rows, i[z]] -= 1
    cu_c[rows, u[z]] -= 1
    si_c = np.broadcast_to(si, (c, ni)).copy()
    su_c = np.broadcast_to(su, (c, nu)).copy()
    si_c[rows, i[z]] -= resid[z]
    su_c[rows, u[z]] -= resid[z]
    bu = np.zeros((c, nu))
    bi = np.zeros((c, ni))
    for _ in range(sweeps):
        s = si_c - (a @ bu.T).T
        s[rows, i[z]] += bu[rows, u[z]]
        bi = s / (item_reg + ci_c)
        s = su_c - (a.T @ bi.T).T
        s[rows, u[z]] += bi[rows, i[z]]
        bu = s / (reg + cu_c)
    return bu, bi


def unclipped_prediction(model: RatingModel, user: int, item: int) -> float:
    """The model's evaluation prediction for indices ``(user, item)`` before clipping to the
    scale (the mean of its ``eval_passes`` samplings)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(model(torch.tensor([user], device=model.device), torch.tensor([item], device=model.device))[0])
    finally:
        model.train(was)


def leave_one_out_effects(model: RatingModel, user: int, item: int, example_ids: np.ndarray, *,
                          components: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """For each rating ``example_ids [C]`` (rows of the model's live ratings): the unclipped
    prediction of ``(user, item)`` minus the prediction with that rating removed from the
    live ratings (hidden from the chains, baselines refitted), in rating points, float64
    ``[C]``. With ``components``: also the change with the chains masked only and with the
    baselines refitted only (else None, None). One masked evaluation per rating."""
    r = model.ratings
    graph, _ = model.live()
    ids = np.asarray(example_ids, dtype=np.int64)
    base = unclipped_prediction(model, user, item)
    c = model.config
    reg, item_reg = float(c.bias_reg), float(getattr(c, "item_reg", c.bias_reg))
    bu, bi = baselines_without(r, ids, float(model.global_mean), reg, item_reg=item_reg)
    keys = torch.from_numpy(r.users[ids] * graph.n_items + r.items[ids])
    total = np.zeros(len(ids))
    chain = np.zeros(len(ids)) if components else None
    basel = np.zeros(len(ids)) if components else None
    for k in range(len(ids)):
        new_bias = torch.from_numpy(np.concatenate([bu[k], bi[k]]).astype(np.float32)).to(model.device)
        with model.substituted(hidden_pairs=keys[k:k + 1]):
            with model.substituted(biases=new_bias):
                total[k] = base - unclipped_prediction(model, user, item)
            if components:
                chain[k] = base - unclipped_prediction(model, user, item)
        if components:
            with model.substituted(biases=new_bias):
                basel[k] = base - unclipped_prediction(model, user, item)
    return total, chain, basel


class EvidenceChainExplainer:
    """Explanations of an `EvidenceChainModel`'s predictions against its live ratings (the
    training ratings plus those inserted online by `learn`; a pair rated again carries its
    latest value): `Contribution.example` is the rating's row there, `Contribution.effect`
    its leave-one-out effect (module docstring). Nothing is cached, so `update` has nothing
    to do: the model's live ratings already hold what it learnt (users folded in from a few
    ratings are explained by those ratings the same way)."""

    method = METHOD
    units = "rating points"

    def __init__(self, model: RatingModel) -> None:
        self.model = model

    def update(self, ratings: object, new: np.ndarray) -> None:
        """Nothing to refresh: explanations read the model's live ratings."""

    def warm(self) -> None:
        """Nothing to precompute."""

    def explain(self, user: int, item: int, k: int) -> Explanation:
        """The ``k`` first-hop evidence ratings with the largest leave-one-out effects (by
        absolute value) on the prediction of indices ``(user, item)``."""
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
        first = [e for e in res["evidence"] if e["hop"] == 1]
        ids = np.array([int(e["example"]) for e in first], dtype=np.int64)
        effects = leave_one_out_effects(model, user, item, ids)[0] if len(ids) else np.zeros(0)
        order = np.argsort(-np.abs(effects), kind="stable")[:k]
        contribs = []
        for j in order:
            e = first[int(j)]
            contribs.append(Contribution(
                example=int(e["example"]), user=e["user"], item=e["item"], rating=float(e["rating"]),
                timestamp=None if r.timestamps is None else int(r.timestamps[int(e["example"])]),
                title=r.title(e["item"]), effect=float(effects[j]), shares="hop 1"))
        return Explanation(raw_u, raw_i, title, float(res["prediction"]), METHOD, contribs, len(first),
                           terms=res["terms"])


__all__ = ["FALLBACK_REASON", "METHOD", "SHARES_METHOD", "EvidenceChainExplainer", "baselines_without",
           "leave_one_out_effects", "unclipped_prediction"]

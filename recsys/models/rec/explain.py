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


class BaselineSystem:
    """What refitting the ridge baseline of ``ratings`` needs, built once per live ratings
    (`EvidenceChainExplainer` keeps it until the model's ratings change): the item x user
    incidence ``[n_items, n_users]`` and its transpose as CSR, the residual sums and rating
    counts per user and item (float64)."""

    def __init__(self, ratings: Ratings, mean: float) -> None:
        u, i = ratings.users, ratings.items
        nu, ni = ratings.n_users, ratings.n_items
        self.ratings, self.mean = ratings, float(mean)
        self.item_user = sp.csr_matrix((np.ones(len(u)), (i, u)), shape=(ni, nu))
        self.user_item = self.item_user.T.tocsr()
        self.resid = ratings.values.astype(np.float64) - self.mean
        self.item_sums = np.bincount(i, weights=self.resid, minlength=ni)
        self.user_sums = np.bincount(u, weights=self.resid, minlength=nu)
        self.item_counts = np.bincount(i, minlength=ni).astype(np.float64)
        self.user_counts = np.bincount(u, minlength=nu).astype(np.float64)

    def without(self, removed_ids: np.ndarray, reg: float, sweeps: int = 8,
                item_reg: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`baselines_without` of these ratings: ``(b_u [C, n_users], b_i [C, n_items])``,
        float64, computed node-major (``[n, C]``, so each sparse product reads the candidates
        contiguously) and returned as transposed views."""
        item_reg = reg if item_reg is None else item_reg
        r = self.ratings
        z = np.asarray(removed_ids, dtype=np.int64)
        c = len(z)
        cols = np.arange(c)
        uz, iz, rz = r.users[z], r.items[z], self.resid[z]
        den_i = np.repeat((item_reg + self.item_counts)[:, None], c, axis=1)
        den_u = np.repeat((reg + self.user_counts)[:, None], c, axis=1)
        den_i[iz, cols] -= 1
        den_u[uz, cols] -= 1
        si = np.repeat(self.item_sums[:, None], c, axis=1)
        su = np.repeat(self.user_sums[:, None], c, axis=1)
        si[iz, cols] -= rz
        su[uz, cols] -= rz
        bu = np.zeros((r.n_users, c))
        bi = np.zeros((r.n_items, c))
        for _ in range(sweeps):
            s = si - self.item_user @ bu
            s[iz, cols] += bu[uz, cols]
            bi = s / den_i
            s = su - self.user_item @ bi
            s[uz, cols] += bi[iz, cols]
            bu = s / den_u
        return bu.T, bi.T


def baselines_without(ratings: Ratings, removed_ids: np.ndarray, mean: float, reg: float,
                      sweeps: int = 8, item_reg: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's ridge baseline (`recsys.models.rec.model.fit_baseline`) refitted without
    one rating, for each of ``removed_ids [C]`` at once (sparse products): ``(b_u [C,
    n_users], b_i [C, n_items])``, float64. (`BaselineSystem` keeps the set-up for reuse.)"""
    return BaselineSystem(ratings, mean).without(removed_ids, reg, sweeps, item_reg)


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
                          components: bool = False,
                          baselines: BaselineSystem | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """For each rating ``example_ids [C]`` (rows of the model's live ratings): the unclipped
    prediction of ``(user, item)`` minus the prediction with that rating removed from the
    live ratings (hidden from the chains, baselines refitted), in rating points, float64
    ``[C]``; equal to `leave_one_out_effects_reference`. The C baselines are refitted in one
    batch of sparse products (``baselines``: a `BaselineSystem` of the live ratings to reuse)
    and the C masked predictions made by `EvidenceChainModel.masked_predictions` (each with
    its own chains, drawn from the evaluation seed as the model's forward draws them: hiding
    one edge shifts every later draw, so no chains are shared). With ``components``: also the
    change with the chains masked only and with the baselines refitted only (else None,
    None), by the reference."""
    if components:
        return leave_one_out_effects_reference(model, user, item, example_ids, components=True)
    r = model.ratings
    graph, _ = model.live()
    ids = np.asarray(example_ids, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros(0), None, None
    base = unclipped_prediction(model, user, item)
    c = model.config
    reg, item_reg = float(c.bias_reg), float(getattr(c, "item_reg", c.bias_reg))
    if baselines is None or baselines.ratings is not r or baselines.mean != float(model.global_mean):
        baselines = BaselineSystem(r, float(model.global_mean))
    bu, bi = baselines.without(ids, reg, item_reg=item_reg)
    biases = torch.from_numpy(np.concatenate([bu, bi], axis=1).astype(np.float32)).to(model.device)
    keys = torch.from_numpy(r.users[ids] * graph.n_items + r.items[ids]).to(model.device)
    masked = model.masked_predictions(user, item, keys, biases).double().numpy()
    return base - masked, None, None


def leave_one_out_effects_reference(model: RatingModel, user: int, item: int, example_ids: np.ndarray, *,
                          components: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """For each rating ``example_ids [C]`` (rows of the model's live ratings): the unclipped
    prediction of ``(user, item)`` minus the prediction with that rating removed from the
    live ratings (hidden from the chains, baselines refitted), in rating points, float64
    ``[C]``. With ``components``: also the change with the chains masked only and with the
    baselines refitted only (else None, None). One masked evaluation per rating, each through
    `EvidenceChainModel.substituted` and the model's forward: the definition that
    `leave_one_out_effects` computes faster (tests hold them equal)."""
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
    its leave-one-out effect (module docstring). The only thing kept between calls is the
    baseline's sparse set-up (`BaselineSystem`), rebuilt whenever the model's live ratings
    object changes, so `update` has nothing to do: the model's live ratings already hold what
    it learnt (users folded in from a few ratings are explained by those ratings the same
    way)."""

    method = METHOD
    units = "rating points"

    def __init__(self, model: RatingModel) -> None:
        self.model = model
        self._baselines: BaselineSystem | None = None

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
        if self._baselines is None or self._baselines.ratings is not r:
            self._baselines = BaselineSystem(r, float(model.global_mean))
        effects = leave_one_out_effects(model, user, item, ids, baselines=self._baselines)[0]
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


__all__ = ["FALLBACK_REASON", "METHOD", "SHARES_METHOD", "BaselineSystem", "EvidenceChainExplainer",
           "baselines_without", "leave_one_out_effects", "leave_one_out_effects_reference", "unclipped_prediction"]

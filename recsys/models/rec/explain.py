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

import warnings

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
    """What refitting the ridge baseline of ``ratings`` without one rating needs, built once
    per live ratings (`EvidenceChainExplainer` keeps it until the model's ratings change):
    the item x user incidence (float32 CSR, both ways), the residual sums and rating counts
    per user and item, and the full fit's iterates (float64; per ``(reg, item_reg, sweeps)``,
    on first use)."""

    def __init__(self, ratings: Ratings, mean: float) -> None:
        u, i = ratings.users, ratings.items
        nu, ni = ratings.n_users, ratings.n_items
        self.ratings, self.mean = ratings, float(mean)
        item_user = sp.csr_matrix((np.ones(len(u), np.float32), (i, u)), shape=(ni, nu))
        self.item_user, self.user_item = _torch_csr(item_user), _torch_csr(item_user.T.tocsr())
        self.resid = ratings.values.astype(np.float64) - self.mean
        self.item_counts = np.bincount(i, minlength=ni).astype(np.float64)
        self.user_counts = np.bincount(u, minlength=nu).astype(np.float64)
        self._iterates: dict[tuple[float, float, int], tuple[list[np.ndarray], list[np.ndarray]]] = {}

    def iterates(self, reg: float, item_reg: float, sweeps: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """`fit_baseline`'s user and item biases after each sweep ``0..sweeps`` (``[sweeps + 1]``
        arrays ``[n_users]`` / ``[n_items]``, sweep 0 all zero)."""
        key = (float(reg), float(item_reg), int(sweeps))
        if key not in self._iterates:
            r = self.ratings
            bu, bi = [np.zeros(r.n_users)], [np.zeros(r.n_items)]
            for _ in range(sweeps):
                bi.append(np.bincount(r.items, weights=self.resid - bu[-1][r.users], minlength=r.n_items)
                          / (item_reg + self.item_counts))
                bu.append(np.bincount(r.users, weights=self.resid - bi[-1][r.items], minlength=r.n_users)
                          / (reg + self.user_counts))
            self._iterates[key] = (bu, bi)
        return self._iterates[key]

    def without(self, removed_ids: np.ndarray, reg: float, sweeps: int = 8,
                item_reg: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`baselines_without` of these ratings: ``(b_u [C, n_users], b_i [C, n_items])``,
        float64. Computed as the full fit plus each removal's change, sweep by sweep: away
        from the removed rating's user and item a sweep is linear in the change (one sparse
        product of all C changes, node-major ``[n, C]``, in float32: the changes are small, so
        its rounding stays near 1e-9 rating points); at the two touched nodes, exactly."""
        item_reg = reg if item_reg is None else item_reg
        r = self.ratings
        z = np.asarray(removed_ids, dtype=np.int64)
        c = len(z)
        cols = np.arange(c)
        uz, iz, rz = r.users[z], r.items[z], self.resid[z]
        bu, bi = self.iterates(reg, item_reg, sweeps)
        den_i, den_u = item_reg + self.item_counts, reg + self.user_counts
        du = np.zeros((r.n_users, c))
        di = np.zeros((r.n_items, c))
        for s in range(1, sweeps + 1):
            t = _product(self.item_user, du) if s > 1 else np.zeros((r.n_items, c))
            di = -t / den_i[:, None]
            num = bi[s][iz] * den_i[iz] - rz - t[iz, cols] + bu[s - 1][uz] + du[uz, cols]
            di[iz, cols] = num / (den_i[iz] - 1) - bi[s][iz]
            t = _product(self.user_item, di)
            du = -t / den_u[:, None]
            num = bu[s][uz] * den_u[uz] - rz - t[uz, cols] + bi[s][iz] + di[iz, cols]
            du[uz, cols] = num / (den_u[uz] - 1) - bu[s][uz]
        return bu[-1][None, :] + du.T, bi[-1][None, :] + di.T


def _torch_csr(m: sp.csr_matrix) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                       torch.from_numpy(m.indices.astype(np.int64)),
                                       torch.from_numpy(m.data.astype(np.float32)), size=m.shape,
                                       check_invariants=False)


def _product(m: torch.Tensor, x: np.ndarray) -> np.ndarray:
    """``m @ x`` for a float32 CSR ``m`` and a float64 ``x [n, C]``, in float32, as float64."""
    return (m @ torch.from_numpy(x.astype(np.float32))).numpy().astype(np.float64)


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
    if was:  # (switching modes walks every submodule: skipped when already evaluating)
        model.eval()
    try:
        with torch.no_grad():
            return float(model(torch.tensor([user], device=model.device), torch.tensor([item], device=model.device))[0])
    finally:
        if was:
            model.train(True)


def leave_one_out_effects(model: RatingModel, user: int, item: int, example_ids: np.ndarray, *,
                          components: bool = False,
                          baselines: BaselineSystem | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """For each rating ``example_ids [C]`` (rows of the model's live ratings): the unclipped
    prediction of ``(user, item)`` minus the prediction with that rating removed from the
    live ratings (hidden from the chains, baselines refitted), in rating points, float64
    ``[C]``; equal to `leave_one_out_effects_reference`. The C baselines are refitted in one
    batch of sparse products (``baselines``: a `BaselineSystem` of the live ratings to reuse)
    and the C masked predictions made by `EvidenceChainModel.masked_predictions` (the chains
    drawn once from the evaluation seed, each rating's edges dropped from them: the draws are
    keyed by node, so that is what the model's forward draws with the rating hidden). With ``components``: also the
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

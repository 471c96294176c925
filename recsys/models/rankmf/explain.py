"""Explanations of the ranking MF's scores: which training interactions raised the score
``s(u, i) = p_u · q_i + b_i`` of a recommended item, and by how much (in score units).

The candidates for ``x = (u, i)`` are the interactions whose updates moved ``x``'s rows: the
user's own interactions (user row), the item's interactions (item row, as the positive) and,
with an exact log, the interactions that drew ``i`` as a negative. Each method estimates, for
every candidate ``z`` at once, ``effect_z = s(u, i; θ) − s(u, i; θ_{−z})``: positive when ``z``
raised the score (removing it would lower it).

- ``rollback`` (gradient rollback, Lawrence et al., arXiv 2010.05516): ``θ_{−z} = θ − Δ_z``
  with Δ_z the update ``z`` caused over training (`recsys.models.rankmf.log.RankRollbackLog`,
  its negatives credited to it): the same-trajectory removal estimate, exact in closed form
  (``δp·q + p·δq − δp·δq + δb``). Path-aware, any optimizer.
- ``newton`` (one-row Newton influence, ``bpr`` loss only): for the row ``z`` shares with
  ``x``, ``θ_{−z} = θ + H_{−z}⁻¹ ∇ℓ_z`` at the final weights, with the BPR loss and its
  Hessian taken in expectation over the uniform negatives (exact sums over the catalogue)
  and ``H_{−z}`` the row's Hessian without ``z``'s term (``D×D`` for the user row,
  ``(D+1)×(D+1)`` for the item row, whose Hessian also has every interaction's expected
  negative term). Needs no log; ignores the trajectory.

`RankMFExplainer` ranks candidates by the largest effect (largest positive first: the
interactions that most raised the score) and returns a `recsys.models.base.Explanation`
in units ``score``.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.models.base import Contribution, Explanation, RankingModel
from recsys.models.rankmf.log import RankRollbackLog
from recsys.ratings import Ratings

METHODS = ("rollback", "newton")
UNITS = "score"
POPULARITY_REASON = "none: popularity ranking (the user has no interactions)"


def candidates(train: Ratings, user: int, item: int, log: RankRollbackLog | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(example_ids int64 [m], shares_user, shares_item, drew_item bool [m])``: the user's
    interactions first, then the item's by other users, then (exact log) the other
    interactions that drew ``item`` as a negative."""
    bu, bi = train.by_user, train.by_item
    u_ids = bu.examples[bu.row(user)] if 0 <= user < train.n_users else np.empty(0, np.int64)
    i_ids = bi.examples[bi.row(item)] if 0 <= item < train.n_items else np.empty(0, np.int64)
    i_only = i_ids[train.users[i_ids] != user]
    ids = np.concatenate([u_ids, i_only]).astype(np.int64)
    if log is not None and log.negatives:
        drew, _ = log.negative_updates(item)
        drew = drew[drew < len(train)]
        ids = np.concatenate([ids, np.setdiff1d(drew, ids)])
    drew_mask = np.zeros(len(ids), dtype=bool)
    if log is not None and log.negatives:
        drew_mask = np.isin(ids, log.negative_updates(item)[0])
    return ids, train.users[ids] == user, train.items[ids] == item, drew_mask


def _weights(model: RankingModel, train: Ratings, ids: np.ndarray) -> np.ndarray:
    return model.example_weights(train.values[ids]).astype(np.float64)


def rollback_effects(model: RankingModel, log: RankRollbackLog, user: int, item: int, ids: np.ndarray,
                     su: np.ndarray, si: np.ndarray) -> np.ndarray:
    """Plain gradient rollback, ``s(θ) − s(θ − Δ_z)`` exactly on the user and item rows."""
    d = model.config.embedding_size
    p = model.user_factors.weight[user].detach().double().cpu().numpy()
    r = torch.cat([model.item_factors.weight[item], model.item_bias.weight[item]]).detach().double().cpu().numpy()
    dp = np.zeros((len(ids), d))
    dr = np.zeros((len(ids), d + 1))
    if su.any():
        dp[su] = log.user_updates(ids[su])
    if si.any():
        dr[si] = log.positive_updates(ids[si])
    if log.negatives:
        drew, updates = log.negative_updates(item)
        pos = {int(z): n for n, z in enumerate(ids)}
        for z, upd in zip(drew, updates, strict=True):
            n = pos.get(int(z))
            if n is not None:
                dr[n] += upd
    return dp @ r[:d] + dr[:, :d] @ p - np.einsum("md,md->m", dp, dr[:, :d]) + dr[:, d]


def _sig(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def newton_effects(model: RankingModel, train: Ratings, user: int, item: int, ids: np.ndarray,
                   su: np.ndarray, si: np.ndarray) -> np.ndarray:
    """One-row Newton influence under the expected BPR loss (module docstring)."""
    c = model.config
    if c.loss != "bpr":
        raise ValueError("the newton estimate is derived for the bpr loss; use method='rollback' (with a log)")
    P = model.user_factors.weight.detach().double().cpu().numpy()
    Q = model.item_factors.weight.detach().double().cpu().numpy()
    b = model.item_bias.weight.detach().double().cpu().numpy()[:, 0]
    n_items, d = Q.shape
    eff = np.zeros(len(ids))
    p, q_i, b_i = P[user], Q[item], b[item]
    if su.any():  # the user row
        z = ids[su]
        a = train.items[z]
        w = _weights(model, train, z)
        s = Q @ p + b  # [N]
        x = s[a][:, None] - s[None, :]  # [m, N]
        sp = _sig(x) * _sig(-x)
        gneg = _sig(-x)
        qa = Q[a]
        c_sp = sp @ Q  # Σ_j σ'_zj q_j  [m, d]
        hz = np.empty((len(z), d, d))
        for s0 in range(0, len(z), 32):  # Σ_j σ'_zj q_j q_jᵀ, chunked ([32, N, d] at a time)
            part = sp[s0:s0 + 32]
            hz[s0:s0 + 32] = np.einsum("mj,jd,je->mde", part, Q, Q, optimize=True)
        hz += (sp.sum(1)[:, None, None] * np.einsum("md,me->mde", qa, qa)
               - np.einsum("md,me->mde", qa, c_sp) - np.einsum("md,me->mde", c_sp, qa))
        hz = w[:, None, None] * (hz / n_items + c.reg * np.eye(d))
        g = w[:, None] * (-(gneg.sum(1)[:, None] * qa - gneg @ Q) / n_items + c.reg * p)
        h = hz.sum(0)
        h_minus = h[None] - hz + 1e-9 * np.eye(d)
        step = np.linalg.solve(h_minus, g[:, :, None])[:, :, 0]
        eff[su] += -(step @ q_i)
    if si.any():  # the item row [q_i; b_i]
        z = ids[si]
        v = train.users[z]
        w = _weights(model, train, z)
        lam = np.r_[np.full(d, c.reg), c.bias_reg]
        xt = np.concatenate([P, np.ones((len(P), 1))], axis=1)  # [n_users, d+1]
        # as the positive of its interactions z = (v, i)
        s_v = P[v] @ Q.T + b  # [m, N]
        x = s_v[:, item][:, None] - s_v
        x[:, item] = 0.0
        mask = np.ones(n_items)
        mask[item] = 0.0
        sp = (_sig(x) * _sig(-x) * mask).sum(1) / n_items
        gs = (_sig(-x) * mask).sum(1) / n_items
        hz = w[:, None, None] * (sp[:, None, None] * np.einsum("md,me->mde", xt[v], xt[v]) + np.diag(lam))
        g = w[:, None] * (-gs[:, None] * xt[v] + lam * np.r_[q_i, b_i])
        # as a negative of every other interaction y = (v', a), expected weight 1/N each
        other = train.items != item
        vy, ay = train.users[other], train.items[other]
        wy = model.example_weights(train.values[other]).astype(np.float64)
        xy = (P[vy] * Q[ay]).sum(1) + b[ay] - (P[vy] @ q_i + b_i)
        per_user = np.bincount(vy, weights=wy * _sig(xy) * _sig(-xy), minlength=len(P)) / n_items
        h = (xt * per_user[:, None]).T @ xt + (wy.sum() / n_items) * np.diag(lam) + hz.sum(0)
        h_minus = h[None] - hz + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(h_minus, g[:, :, None])[:, :, 0]
        eff[si] += -(step @ np.r_[p, 1.0])
    return eff


def estimate_effects(model: RankingModel, train: Ratings, user: int, item: int, method: str,
                     log: RankRollbackLog | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(example_ids [m], effects float64 [m] in score units, shares_user, shares_item,
    drew_item)`` for every candidate of ``(user, item)`` (indices). ``rollback`` needs
    ``log``; ``newton`` ignores the log's negatives (its candidates share a row)."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "rollback":
        if log is None:
            raise ValueError("the rollback method needs the model's update log (fit with a RollbackCallback)")
        if log.n_examples < len(train):
            raise ValueError(f"the update log covers {log.n_examples} interactions, the ratings {len(train)}")
        ids, su, si, drew = candidates(train, user, item, log)
        eff = rollback_effects(model, log, user, item, ids, su, si) if len(ids) else np.zeros(0)
    else:
        ids, su, si, drew = candidates(train, user, item, None)
        eff = newton_effects(model, train, user, item, ids, su, si) if len(ids) else np.zeros(0)
    return ids, eff, su, si, drew


#: the method of a softmax-trained model's explanations when it is served without its log
NO_LOG_REASON = "none: rank-mf trained with the softmax loss is explained from its update log (train with --rollback)"


class RankMFExplainer:
    """`recsys.models.base.Explainer` of `RankingMF` scores over ``ratings`` (the interactions
    the model was fitted on, rows = example ids of the log). ``method`` None: ``newton`` for
    the bpr loss (the more faithful to leave-one-out retraining in
    ``benchmarks/results/rankmf_faithfulness.json``: Spearman 0.75 against rollback's 0.67,
    slope 0.58 against 0.09), ``rollback`` (needs the log) for the softmax loss."""

    units = UNITS

    def __init__(self, model: RankingModel, ratings: Ratings, log: RankRollbackLog | None = None,
                 method: str | None = None) -> None:
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
        if method is None and model.config.loss != "bpr" and log is None:
            method = NO_LOG_REASON  # served without a log: say so instead of guessing
        method = method or ("newton" if model.config.loss == "bpr" else "rollback")
        if method == "rollback" and log is None:
            raise ValueError("the rollback method needs the model's update log (fit with a RollbackCallback)")
        if method == "newton" and model.config.loss != "bpr":
            raise ValueError("rank-mf trained with the softmax loss is explained by rollback: give its update log")
        self.model, self.ratings, self.log, self.method = model, ratings, log, method

    def warm(self) -> None:
        """Nothing is cached."""

    def update(self, ratings: Ratings, new: np.ndarray) -> None:
        self.ratings = ratings

    def explain(self, user: int, item: int, k: int) -> Explanation:
        """The ``k`` interactions that most raised the score of ``(user, item)`` (indices),
        largest effect first (negative effects only when fewer than ``k`` are positive)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        model, ratings = self.model, self.ratings
        if not 0 <= item < model.n_items:
            raise IndexError(f"item index {item} outside the model's {model.n_items} items")
        raw_u = ratings.user_ids.raw(user) if 0 <= user < ratings.n_users else ""
        raw_i = ratings.item_ids.raw(item)
        title = ratings.title(raw_i)
        if user < 0 or user >= model.n_users or not bool(model.known_users[user]):
            score = float(model.popularity_scores(1)[0, item])
            return Explanation(raw_u, raw_i, title, score, POPULARITY_REASON, units=UNITS)
        score = float(model.score_all(torch.tensor([user]))[0, item])
        if self.method == NO_LOG_REASON:
            return Explanation(raw_u, raw_i, title, score, self.method, units=UNITS)
        ids, eff, su, si, drew = estimate_effects(model, ratings, user, item, self.method, self.log)
        top = np.argsort(-eff, kind="stable")[:k]
        contribs = []
        for j in top:
            z = int(ids[j])
            raw_item = ratings.item_ids.raw(int(ratings.items[z]))
            shares = "both" if su[j] and si[j] else "user" if su[j] else "item" if si[j] else "negative"
            contribs.append(Contribution(
                example=z, user=ratings.user_ids.raw(int(ratings.users[z])), item=raw_item,
                rating=float(ratings.values[z]),
                timestamp=None if ratings.timestamps is None else int(ratings.timestamps[z]),
                title=ratings.title(raw_item), effect=float(eff[j]), shares=shares))
        attribution = self.log.attribution if self.method == "rollback" and self.log is not None else None
        return Explanation(raw_u, raw_i, title, score, self.method, contribs, len(ids), units=UNITS,
                           attribution=attribution, terms={"item_bias": float(model.item_bias.weight[item, 0].detach())})


__all__ = ["METHODS", "POPULARITY_REASON", "UNITS", "RankMFExplainer", "candidates", "estimate_effects",
           "newton_effects", "rollback_effects"]

"""MF's explanations: which ratings raised or lowered a prediction, and by how much.

For a prediction ``x = (u, i)`` of biased MF, the candidates are the training ratings that
share its user or its item (only they touch ``x``'s rows). Each method estimates, for every
candidate ``z`` at once, the effect ``f(x; θ) − f(x; θ_{−z})`` in rating points: positive when
``z`` raised the prediction (removing it would lower it), negative when it lowered it.

Methods (all one vectorised closed form per prediction, no weight copies):

- ``rollback`` (plain gradient rollback, Lawrence et al., arXiv 2010.05516): ``θ_{−z} = θ − Δ_z``
  with Δ_z from the `RollbackLog` (or reconstructed from the `CompactRollbackLog`, only the
  terms each candidate's shared row needs): the same-trajectory removal estimate. Path-aware, works
  for any optimizer and online updates; with SGD its sizes are too large, because the log sums
  every epoch's updates while, in retraining, the row's other ratings pull it back.
- ``newton`` (one-row Newton influence): for the row ``z`` shares with ``x`` (user or item),
  ``θ_{−z} = θ + H_{−z}⁻¹ ∇ℓ_z`` at the final weights, with ``H_{−z}`` the Gauss–Newton matrix
  of the row's *other* ratings plus their per-visit L2 (``[factors; bias]``, a ``(d+1)²``
  system per block and row: one solve per row, each candidate a Sherman–Morrison rank-one
  downdate). Influence restricted to one row. Needs no log.
- ``fia`` (Cheng et al., arXiv 1811.08120, the peer): influence functions restricted to the
  user and item factor vectors jointly (``2d × 2d`` per block), with the exact Hessian of the
  training loss (no downdate, no biases, as published).

`MFExplainer` (what `MatrixFactorization.explainer` returns: a `recsys.models.base.Explainer`)
ranks candidates by the absolute effect and maps them to raw ids, rating, timestamp and title
in a `recsys.models.base.Explanation`. The default method is the one the faithfulness harness
measured most faithful (see ``docs/explanations.md``); the serving default caches it per row
(`NewtonInfluence`). The public queries over any model are `recsys.explain.influence`'s.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from recsys.models.base import Contribution, Explanation, RatingModel, UpdateLog
from recsys.ratings import Ratings

METHODS = ("newton", "rollback", "fia")
#: Method used when none is named: most faithful to exact leave-one-out in the harness.
DEFAULT_METHOD = "newton"
UNITS = "rating points"
#: the reason an explanation of a fallback prediction gives (no rating of the user is used)
FALLBACK_REASON = "none: the prediction uses no rating of this user (fallback)"


# --------------------------------------------------------------------------- candidates
def candidates(train: Ratings, user: int, item: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training examples sharing ``user`` or ``item``: ``(example_ids int64 [m], shares_user
    bool [m], shares_item bool [m])``, user's ratings first; the pair itself (if it is a
    training rating) appears once with both flags."""
    bu, bi = train.by_user, train.by_item
    u_ids = bu.examples[bu.row(user)] if 0 <= user < train.n_users else np.empty(0, np.int64)
    i_ids = bi.examples[bi.row(item)] if 0 <= item < train.n_items else np.empty(0, np.int64)
    i_only = i_ids[train.users[i_ids] != user]
    ids = np.concatenate([u_ids, i_only])
    return ids, train.users[ids] == user, train.items[ids] == item


class _Rows:
    """float64 numpy copies of the rows one explanation needs (per block)."""

    def __init__(self, model: RatingModel, users: np.ndarray, items: np.ndarray) -> None:
        k, d = model.config.n_blocks, model.block_size
        if model.device.type == "cpu":  # numpy views of the tables: no tensor dispatch per query
            def take(table: torch.Tensor, idx: np.ndarray) -> np.ndarray:
                return table.detach().numpy()[idx].astype(np.float64)
            u, i = np.asarray(users), np.asarray(items)
        else:
            def take(table: torch.Tensor, idx: torch.Tensor) -> np.ndarray:
                return table.detach().index_select(0, idx).cpu().numpy().astype(np.float64)
            u = torch.as_tensor(users, device=model.device)
            i = torch.as_tensor(items, device=model.device)

        self.P = take(model.user_factors.weight, u).reshape(-1, k, d).transpose(1, 0, 2)  # [K, m, d]
        self.Q = take(model.item_factors.weight, i).reshape(-1, k, d).transpose(1, 0, 2)
        self.BU = take(model.user_bias.weight, u).T  # [K, m]
        self.BI = take(model.item_bias.weight, i).T

    def prediction(self, model: RatingModel, b: int = 0) -> float:
        """The clipped prediction of pair ``b`` (`RatingModel.predict` for a pair whose user
        and item both have training ratings), from the rows already gathered."""
        k = self.P.shape[0]
        raw = (float(model.global_mean) + self.BU[:, b].mean() + self.BI[:, b].mean()
               + float(np.einsum("kd,kd->", self.P[:, b], self.Q[:, b])) / k)
        lo, hi = model.rating_scale
        return min(max(raw, lo), hi)


def estimate_effects(model: RatingModel, train: Ratings, user: int, item: int, method: str = DEFAULT_METHOD,
                     log: UpdateLog | None = None, *, rows: _Rows | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Estimated effects of every candidate on the prediction of ``(user, item)`` (indices).

    Returns ``(example_ids [m], effects float64 [m] in rating points, shares_user [m],
    shares_item [m])``. ``rollback`` needs ``log``. ``rows``: the pair's rows, when the caller
    has gathered them already."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    ids, su, si = candidates(train, user, item)
    if len(ids) == 0:
        return ids, np.zeros(0), su, si
    if method == "rollback":
        if log is None:
            raise ValueError("the rollback method needs the model's RollbackLog (train with --rollback)")
        if log.n_examples < len(train):
            raise ValueError(f"the rollback log covers {log.n_examples} examples, the training ratings "
                             f"{len(train)}; extend it after online updates")
        eff = _rollback(model, log, user, item, ids, su, si, rows)
    elif method == "newton":
        eff = _newton(model, train, user, item, ids, su, si, rows)
    else:
        eff = _fia(model, train, user, item, ids, su, si, rows)
    return ids, eff, su, si


def _rollback(model: RatingModel, log: UpdateLog, user: int, item: int, ids: np.ndarray,
              su: np.ndarray, si: np.ndarray, x: _Rows | None = None) -> np.ndarray:
    """Plain GR: ``f(θ) − f(θ − Δ_z)`` exactly, per block, for the rows shared with x (from
    the exact log, or from the compact log's reconstruction of Δ_z)."""
    k, d = model.config.n_blocks, model.block_size
    x = x or _Rows(model, np.array([user]), np.array([item]))
    p, q = x.P[:, 0], x.Q[:, 0]  # [K, d]
    dpq, pdq, dbu, dbi = log.projected(ids, su, si, user, item, p, q)  # each [K, m]
    a, b = su.astype(np.float64), si.astype(np.float64)
    per_block = a * (dpq + dbu) + b * (pdq + dbi)
    both = np.flatnonzero(su & si)
    if len(both):  # the prediction's own rating moved both rows: the bilinear term
        rows = log.rows(ids[both])
        per_block[:, both] -= np.einsum("kmd,kmd->km", rows[..., :d], rows[..., d:2 * d])
    return per_block.sum(0) / k


def _row_system(model: RatingModel, train: Ratings, side: str, row: int) -> tuple[np.ndarray, np.ndarray]:
    """``(X [K, m, d+1], lam [d+1])`` of one user or item row: its ratings' coefficients on the
    row (``[other side's factors; 1]`` per block, at the current weights) and its per-visit L2."""
    k = model.config.n_blocks
    csr = train.by_user if side == "user" else train.by_item
    z = csr.examples[csr.row(row)]
    r = _Rows(model, train.users[z], train.items[z])
    X = np.concatenate([r.Q if side == "user" else r.P, np.ones((k, len(z), 1))], axis=2)
    reg = model.reg_user if side == "user" else model.reg_item
    bias_reg = model.bias_reg_user if side == "user" else model.bias_reg_item
    return X, np.r_[np.full(model.block_size, float(reg[row])), float(bias_reg[row])]


def contracted_rollback(model: RatingModel, train: Ratings, log: UpdateLog, user: int, item: int,
                        learning_rate_sum: float) -> tuple[np.ndarray, np.ndarray]:
    """The log's updates corrected for what the rest of training undid: ``(example ids [m],
    effects [m])`` in rating points, for the candidates of ``(user, item)``.

    Plain rollback credits ``z`` with the sum of its updates Δ_z. But in retraining without
    ``z`` every later visit of the row by another rating ``k`` contracts the difference by
    ``I − lr·(x_k x_kᵀ + λ)``: over training, by ``exp(−s·A)`` after a summed learning rate
    ``s``, with ``A = Σ_k x_k x_kᵀ + mλ`` the row's Gauss–Newton matrix. If ``z``'s gradient
    were constant over the summed rate ``S`` (``learning_rate_sum``: Σ over epochs of the
    epoch's rate, SGD batch 1), the surviving difference is ``(I − e^{−SA})A⁻¹ g`` while the
    log holds ``S·g``; so each candidate's logged row update is mapped by
    ``M = (I − e^{−SA}) (SA)⁻¹`` (per block; one eigendecomposition per row) and scored
    linearly, ``x̃ᵀ M Δ_z``. A diagnostic of why plain rollback's sizes are too large with SGD
    (measured in ``docs/explanations.md``), not a served method."""
    if learning_rate_sum <= 0:
        raise ValueError(f"learning_rate_sum must be positive, got {learning_rate_sum}")
    k, d = model.config.n_blocks, model.block_size
    ids, su, si = candidates(train, user, item)
    eff = np.zeros(len(ids))
    if len(ids) == 0:
        return ids, eff
    x = _Rows(model, np.array([user]), np.array([item]))
    rows = log.rows(ids)  # [K, m, 2d+2]: Δp, Δq, Δb_u, Δb_i
    for side, mask, row in (("user", su, user), ("item", si, item)):
        sel = np.flatnonzero(mask)
        if len(sel) == 0:
            continue
        X, lam = _row_system(model, train, side, row)
        A = np.einsum("kmi,kmj->kij", X, X)
        A[:, np.arange(d + 1), np.arange(d + 1)] += X.shape[1] * lam
        h, V = np.linalg.eigh(A)  # [K, d+1], [K, d+1, d+1]
        hs = np.maximum(h, 1e-12) * learning_rate_sum
        M = np.einsum("kij,kj,klj->kil", V, -np.expm1(-hs) / hs, V)
        if side == "user":
            delta = np.concatenate([rows[:, sel, :d], rows[:, sel, 2 * d:2 * d + 1]], axis=2)
            target = np.concatenate([x.Q[:, 0], np.ones((k, 1))], axis=1)
        else:
            delta = np.concatenate([rows[:, sel, d:2 * d], rows[:, sel, 2 * d + 1:]], axis=2)
            target = np.concatenate([x.P[:, 0], np.ones((k, 1))], axis=1)
        eff[sel] += np.einsum("ki,kij,kmj->m", target, M, delta) / k
    return ids, eff


def _row_newton(theta: np.ndarray, target: np.ndarray, X: np.ndarray, resid: np.ndarray,
                lam: np.ndarray) -> np.ndarray:
    """``−x̃ᵀ H_{−z}⁻¹ ∇ℓ_z`` for every rating z of one row, per block.

    theta ``[K, d+1]`` the row ``[factors; bias]``; target ``[K, d+1]`` the prediction's
    coefficients on it (``[other side's factors; 1]``); X ``[K, m, d+1]`` the row's ratings'
    coefficients; resid ``[K, m]`` their errors ``r − r̂_block``; lam ``[d+1]`` per-visit L2.
    ``H_{−z} = Σ_{k≠z} (x_k x_kᵀ + Λ) = A − x_z x_zᵀ`` with ``A = XᵀX + (m−1)Λ``."""
    m = X.shape[1]
    A = np.einsum("kmi,kmj->kij", X, X)
    A[:, np.arange(len(lam)), np.arange(len(lam))] += max(m - 1, 1) * lam
    G = -resid[..., None] * X + (lam * theta)[:, None, :]  # ∇ℓ_z [K, m, d+1]
    rhs = np.concatenate([target[:, :, None], X.transpose(0, 2, 1)], axis=2)  # [K, d+1, 1+m]
    sol = np.linalg.solve(A, rhs)
    w = sol[:, :, 0]  # A⁻¹ x̃  [K, d+1]
    Z = sol[:, :, 1:].transpose(0, 2, 1)  # rows A⁻¹ x_z  [K, m, d+1]
    c_g = np.einsum("kmj,kj->km", G, w)
    c_x = np.einsum("kmj,kj->km", X, w)
    t_g = np.einsum("kmj,kmj->km", Z, G)
    t_x = np.einsum("kmj,kmj->km", Z, X)
    denom = 1.0 - t_x
    denom = np.where(np.abs(denom) < 1e-9, 1e-9, denom)
    return -(c_g + c_x * t_g / denom)


def _newton(model: RatingModel, train: Ratings, user: int, item: int, ids: np.ndarray,
            su: np.ndarray, si: np.ndarray, x: _Rows | None = None) -> np.ndarray:
    k = model.config.n_blocks
    mu = float(model.global_mean)
    x = x or _Rows(model, np.array([user]), np.array([item]))
    eff = np.zeros(len(ids))
    for side, mask in (("user", su), ("item", si)):
        sel = np.flatnonzero(mask)
        if len(sel) == 0:
            continue
        z = ids[sel]
        r = _Rows(model, train.users[z], train.items[z])
        vals = train.values[z].astype(np.float64)
        resid = vals[None, :] - (mu + r.BU + r.BI + np.einsum("kmd,kmd->km", r.P, r.Q))
        ones = np.ones((k, len(z), 1))
        if side == "user":
            theta = np.concatenate([x.P[:, 0], x.BU[:, :1]], axis=1)
            target = np.concatenate([x.Q[:, 0], np.ones((k, 1))], axis=1)
            X = np.concatenate([r.Q, ones], axis=2)
            lam = np.r_[np.full(model.block_size, float(model.reg_user[user])), float(model.bias_reg_user[user])]
        else:
            theta = np.concatenate([x.Q[:, 0], x.BI[:, :1]], axis=1)
            target = np.concatenate([x.P[:, 0], np.ones((k, 1))], axis=1)
            X = np.concatenate([r.P, ones], axis=2)
            lam = np.r_[np.full(model.block_size, float(model.reg_item[item])), float(model.bias_reg_item[item])]
        eff[sel] += _row_newton(theta, target, X, resid, lam).sum(0) / k
    return eff


class RowIndex:
    """Each user's and item's ratings over a growing `Ratings`: the CSR of the ratings it
    started from (built once) plus the rows appended since, kept per user and item as they
    arrive (`extend`), so the new `Ratings` each batch of online ratings makes is never
    re-sorted (a full CSR is ``O(N log N)``: seconds at 10^7 ratings)."""

    def __init__(self, base: Ratings) -> None:
        self.base, self.ratings = base, base
        self._extra: dict[str, dict[int, list[int]]] = {"user": {}, "item": {}}

    def extend(self, ratings: Ratings, new: np.ndarray) -> None:
        """``ratings`` is the previous one plus the example ids ``new`` (appended rows)."""
        self.ratings = ratings
        new = np.asarray(new, dtype=np.int64)
        for z, u, i in zip(new.tolist(), ratings.users[new].tolist(), ratings.items[new].tolist(), strict=True):
            self._extra["user"].setdefault(u, []).append(z)
            self._extra["item"].setdefault(i, []).append(z)

    def row(self, side: str, r: int) -> tuple[np.ndarray, np.ndarray]:
        """``(example ids int64 [m], the other side's indices int64 [m])`` of user or item
        ``r`` (``side``), in CSR order (by the other side's index, then example id)."""
        base = self.base
        csr, n = (base.by_user, base.n_users) if side == "user" else (base.by_item, base.n_items)
        if 0 <= r < n:
            sl = csr.row(r)
            z, cols = csr.examples[sl], csr.columns[sl].astype(np.int64)
        else:
            z = cols = np.empty(0, np.int64)
        extra = self._extra[side].get(r)
        if extra:
            ez = np.asarray(extra, np.int64)
            z = np.r_[z, ez]
            cols = np.r_[cols, (self.ratings.items if side == "user" else self.ratings.users)[ez]]
            order = np.lexsort((z, cols))
            z, cols = z[order], cols[order]
        return z, cols


def _table(weight: torch.Tensor) -> np.ndarray:
    """A parameter table as numpy: a view on the CPU (no copy, no tensor dispatch)."""
    w = weight.detach()
    return w.numpy() if w.device.type == "cpu" else w.cpu().numpy()


class _NewtonRow(NamedTuple):
    """One user or item row of `NewtonInfluence`, in the row's CSR order (``m`` ratings)."""

    examples: np.ndarray  # int64 [m]: example ids
    others: np.ndarray  # int64 [m]: the other side's index of each rating (sorted: CSR order)
    weights: np.ndarray  # float32 [K, d+1, d+1]: W = A⁻¹ (damped: A⁻¹(I − e^{−SA}))
    alpha: np.ndarray  # float32 [m, K]: αᵢ = tᵢ/(1 − hᵢ) − rᵢ per block
    reg_theta: np.ndarray  # float64 [K, d+1]: λ⊙θ, the row's L2 gradient
    beta: np.ndarray  # float32 [m]: Σ_blocks |α_i|·‖x_i‖, the bound on |α_i (x_i·w)| per unit ‖w‖
    by_beta: np.ndarray  # int32 [m]: positions in decreasing order of beta

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self)


class NewtonInfluence:
    """The ``newton`` estimate with per-row precomputation, for serving.

    For one row (user or item, per block, ``[factors; bias]``) with ratings ``x_i`` (its
    coefficients ``[other side's factors; 1]``), residuals ``r_i``, per-visit L2 ``λ`` and
    ``A = Σ_i x_i x_iᵀ + (m−1)λ``, `_row_newton`'s effect of rating ``i`` on a prediction with
    coefficients ``x̃`` is ``−x̃ᵀ(A − x_i x_iᵀ)⁻¹∇ℓ_i`` with ``∇ℓ_i = −r_i x_i + λ⊙θ``. By
    Sherman–Morrison, with ``w = A⁻¹x̃``, ``h_i = x_iᵀA⁻¹x_i`` and ``t_i = x_iᵀA⁻¹∇ℓ_i``, it is
    ``−(α_i (x_i·w) + (λ⊙θ)·w)``, ``α_i = t_i/(1 − h_i) − r_i``. So a row keeps ``W = A⁻¹``
    (``[K, d+1, d+1]``) and one scalar ``α_i`` per rating and block; a query solves nothing:
    ``w = W x̃`` and a dot product with each rating's ``x_i``, read from the current tables
    (``O(m·D)``; about 33x less memory than keeping ``A⁻¹`` times each gradient). Rows are
    built on first use or all at once by `warm`; call `invalidate` for rows whose
    parameters changed (online updates).

    ``learning_rate_sum`` (the training's summed SGD rate, Σ over epochs of the epoch's rate;
    None: off): damp each row by ``1 − exp(−S·h)`` per eigenvalue ``h`` of the row's matrix
    ``A`` (``W = A⁻¹(I − e^{−SA})``) — the part of the Newton step a row converges in a summed
    rate ``S``, so low-curvature directions that training left unconverged move less (measured
    on the served model: slope 0.867 → 0.941, Spearman 0.950 → 0.955; ``docs/explanations.md``)."""

    def __init__(self, model: RatingModel, train: Ratings, *, learning_rate_sum: float | None = None,
                 index: RowIndex | None = None) -> None:
        if learning_rate_sum is not None and learning_rate_sum <= 0:
            raise ValueError(f"learning_rate_sum must be positive (or None), got {learning_rate_sum}")
        self.model = model
        #: each row's ratings (``train``'s, and those `RowIndex.extend` adds)
        self.index = index if index is not None else RowIndex(train)
        self.learning_rate_sum = learning_rate_sum
        self._rows: dict[tuple[str, int], _NewtonRow] = {}
        self._nbytes = 0

    #: the cache keeps rows while it holds less than this (bytes); rows built past it are
    #: used once and not kept (`warm` fills it with the rows of most ratings first)
    max_bytes = 1 << 30
    #: item rows longer than this are scored in bound order when only the top few are asked for
    prune_above = 4096
    #: ratings scored in the first step of that order (doubling at each step)
    prune_chunk = 1024

    @property
    def train(self) -> Ratings:
        """The ratings the rows are over (training, then those learnt online)."""
        return self.index.ratings

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached rows."""
        return self._nbytes

    def _drop(self, key: tuple[str, int]) -> None:
        row = self._rows.pop(key, None)
        if row is not None:
            self._nbytes -= row.nbytes

    def invalidate(self, users: np.ndarray | list[int] = (), items: np.ndarray | list[int] = (),
                   grown_items: np.ndarray | list[int] = ()) -> None:
        """Forget rows made stale by changed parameters of ``users`` / ``items``: their own
        rows and the rows of everyone they rated or were rated by (whose systems hold them).
        ``grown_items``: items that gained ratings while their parameters stayed (a folded-in
        user's ratings): only their own rows."""
        for i in set(int(x) for x in grown_items):
            self._drop(("item", i))
        for u in set(int(x) for x in users):
            self._drop(("user", u))
            for j in self.index.row("user", u)[1].tolist():
                self._drop(("item", j))
        for i in set(int(x) for x in items):
            self._drop(("item", i))
            for v in self.index.row("item", i)[1].tolist():
                self._drop(("user", v))

    def _row(self, side: str, row: int) -> _NewtonRow:
        """One user or item row (built on first use)."""
        key = (side, row)
        cached = self._rows.get(key)
        if cached is not None:
            return cached
        model, train = self.model, self.train
        k, d = model.config.n_blocks, model.block_size
        z, others = self.index.row(side, row)
        others = others.astype(np.int32)
        m = len(z)
        if side == "user":
            own_f, own_b = model.user_factors.weight, model.user_bias.weight
            other_f, other_b = model.item_factors.weight, model.item_bias.weight
            reg, bias_reg = float(model.reg_user[row]), float(model.bias_reg_user[row])
        else:
            own_f, own_b = model.item_factors.weight, model.item_bias.weight
            other_f, other_b = model.user_factors.weight, model.user_bias.weight
            reg, bias_reg = float(model.reg_item[row]), float(model.bias_reg_item[row])
        theta = np.concatenate([_table(own_f)[row].astype(np.float64).reshape(k, d),
                                _table(own_b)[row].astype(np.float64)[:, None]], axis=1)  # [K, d+1]
        lam = np.r_[np.full(d, reg), bias_reg]
        X = np.ones((k, m, d + 1))
        X[:, :, :d] = _table(other_f)[others].astype(np.float64).reshape(m, k, d).transpose(1, 0, 2)
        other_bias = _table(other_b)[others].astype(np.float64).T  # [K, m]
        resid = train.values[z].astype(np.float64)[None, :] - (
            float(model.global_mean) + theta[:, None, d] + other_bias + np.einsum("kmd,kd->km", X[:, :, :d], theta[:, :d]))
        A = X.transpose(0, 2, 1) @ X  # [K, d+1, d+1]
        A[:, np.arange(d + 1), np.arange(d + 1)] += max(m - 1, 1) * lam
        reg_theta = lam * theta  # [K, d+1]
        A_inv = np.linalg.inv(A)
        if self.learning_rate_sum is None:
            W = A_inv
        else:  # damped by what the row converges in that summed rate
            h, V = np.linalg.eigh(A)
            D = np.einsum("kij,kj,klj->kil", V, -np.expm1(-np.maximum(h, 0.0) * self.learning_rate_sum), V)
            W = np.linalg.solve(A, D)
        Z = X @ A_inv  # rows A⁻¹x_i (A symmetric)  [K, m, d+1]
        h_i = np.einsum("kmj,kmj->km", Z, X)
        t_i = -resid * h_i + (Z @ reg_theta[:, :, None])[..., 0]
        denom = 1.0 - h_i
        denom = np.where(np.abs(denom) < 1e-9, 1e-9, denom)
        alpha = (t_i / denom - resid).T  # [m, K]
        beta = (np.abs(alpha) * np.sqrt((X * X).sum(2)).T).sum(1)
        out = _NewtonRow(z, others, W.astype(np.float32), np.ascontiguousarray(alpha, dtype=np.float32), reg_theta,
                         beta.astype(np.float32), np.argsort(-beta, kind="stable").astype(np.int32))
        if self._nbytes + out.nbytes <= self.max_bytes:
            self._rows[key] = out
            self._nbytes += out.nbytes
        return out

    def warm(self) -> None:
        """Precompute rows, those of most ratings first, until the cache holds `max_bytes`
        (``K·(d+1)²`` floats per row plus about ``4K+12`` bytes per rating and row: every row
        of MovieLens-100K, 53 MB, in under a second; at 10^7 ratings every item row and the
        users of most ratings)."""
        k, d = self.model.config.n_blocks, self.model.block_size
        counts = np.r_[self.train.user_counts(), self.train.item_counts()]
        order = np.argsort(-counts, kind="stable")
        for j in order[counts[order] > 0]:
            side, row = ("user", int(j)) if j < self.train.n_users else ("item", int(j) - self.train.n_users)
            if self._nbytes + k * (d + 1) ** 2 * 4 + (4 * k + 12) * int(counts[j]) > self.max_bytes:
                break
            self._row(side, row)

    @staticmethod
    def _w(row: _NewtonRow, target: np.ndarray) -> tuple[np.ndarray, float]:
        """``(w = W x̃ [K, d+1] float32, (λ⊙θ)·w summed over blocks)`` for coefficients ``x̃``."""
        w = (row.weights @ target[:, :, None].astype(np.float32))[..., 0]
        return w, float((row.reg_theta * w).sum())

    @staticmethod
    def _scored(row: _NewtonRow, w: np.ndarray, c: float, other_table: np.ndarray,
                pos: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Effects of the row's ratings at ``pos``: ``−Σ_blocks (α_i (x_i·w) + (λ⊙θ)·w) / K``."""
        k, d1 = w.shape
        d = d1 - 1
        blocks = np.zeros((k * d, k), np.float32)  # w's factor parts, block-diagonal: one GEMV for all blocks
        for b in range(k):
            blocks[b * d:(b + 1) * d, b] = w[b, :d]
        xw = other_table[row.others[pos]] @ blocks  # x_i·w per block  [m, K]
        xw += w[:, d]
        return -((row.alpha[pos] * xw).sum(1, dtype=np.float64) + c) / k

    def _side(self, row: _NewtonRow, target: np.ndarray, other_table: np.ndarray) -> np.ndarray:
        """Effects ``[m]`` of a row's ratings on a prediction with coefficients ``target [K, d+1]``."""
        w, c = self._w(row, target)
        return self._scored(row, w, c, other_table)

    def _item_side_top(self, row: _NewtonRow, target: np.ndarray, table: np.ndarray, lo: int, hi: int, top: int,
                       settled_below: int, settled: np.ndarray) -> np.ndarray:
        """Positions of the item row (outside ``[lo, hi)``: the user's own) whose effects can
        be among the ``top`` largest by absolute value: every rating at or above example id
        ``settled_below`` (the caller re-estimates those), then the rest in decreasing order of
        their bound ``(β_i·max_b‖w_b‖ + |(λ⊙θ)·w|)/K`` (``|α_i(x_i·w)| ≤ |α_i|‖x_i‖‖w‖`` per
        block) until the bound falls below the ``top``-th largest settled ``|effect|`` seen
        (``settled``: those of the user's ratings that are final). Returns ``(positions,
        effects)``."""
        w, c = self._w(row, target)
        k = w.shape[0]
        w_max = float(np.sqrt((w.astype(np.float64) ** 2).sum(1)).max())
        late = np.flatnonzero(row.examples >= settled_below)
        late = late[(late < lo) | (late >= hi)]
        picked, effects = [late], [self._scored(row, w, c, table, late)]
        best = np.sort(np.abs(settled))[::-1][:top]  # the largest settled |effects| so far
        start, size, m = 0, self.prune_chunk, len(row.examples)
        while start < m:
            pos = row.by_beta[start:start + size].astype(np.int64)
            pos = pos[((pos < lo) | (pos >= hi)) & (row.examples[pos] < settled_below)]
            eff = self._scored(row, w, c, table, pos)
            picked.append(pos)
            effects.append(eff)
            best = np.sort(np.r_[best, np.abs(eff)])[::-1][:top]
            start += size
            size *= 2
            if start < m and len(best) == top:
                bound = (float(row.beta[row.by_beta[start]]) * w_max + abs(c)) / k
                if bound * (1 + 1e-4) + 1e-12 < best[-1]:
                    break
        return np.concatenate(picked), np.concatenate(effects)

    def effects_and_shares(self, user: int, item: int, *, top: int | None = None,
                           settled_below: int | None = None, user_settled: bool = True
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """``(example ids [n], effects [n], shares_user [n], shares_item [n], candidates)`` like
        `estimate_effects(..., "newton")`, from the cached rows alone (no scan of the ratings);
        ``candidates``: how many ratings share the user or the item.

        ``top``: only the candidates that can be among the ``top`` largest ``|effect|`` need
        be returned: an item row of more than `prune_above` ratings is scored in decreasing
        order of a bound on each rating's effect, stopping when no rating left can reach the
        ``top``-th largest (exact: the same top ``top`` as scoring all). Ratings with example
        id ``>= settled_below``, and the user's own unless ``user_settled``, are ones the
        caller re-estimates: always returned, never used to stop."""
        model = self.model
        k, d = model.config.n_blocks, model.block_size
        settled_below = np.iinfo(np.int64).max if settled_below is None else settled_below
        known_u = 0 <= user < self.train.n_users
        known_i = 0 <= item < self.train.n_items
        P, Q = _table(model.user_factors.weight), _table(model.item_factors.weight)
        ones = np.ones((k, 1))
        parts_ids, parts_eff, parts_su, parts_si = [], [], [], []
        ur = self._row("user", user) if known_u else None
        ir = self._row("item", item) if known_i else None
        lo = hi = 0
        if ir is not None:
            lo, hi = (int(x) for x in np.searchsorted(ir.others, [user, user + 1]))  # the user's own, CSR order
        n_candidates = 0
        settled = np.zeros(0)
        if ur is not None and len(ur.examples):
            eff_u = self._side(ur, np.concatenate([Q[item].reshape(k, d), ones], axis=1), Q)
            si_u = ur.others == item
            if ir is not None and si_u.any():  # the pair's own rating(s) moved both rows: the same examples, same order
                own = _NewtonRow(ir.examples[lo:hi], ir.others[lo:hi], ir.weights, ir.alpha[lo:hi], ir.reg_theta,
                                 ir.beta[:0], ir.by_beta[:0])
                eff_u[si_u] += self._side(own, np.concatenate([P[user].reshape(k, d), ones], axis=1), P)
            parts_ids.append(ur.examples)
            parts_eff.append(eff_u)
            parts_su.append(np.ones(len(ur.examples), bool))
            parts_si.append(si_u)
            n_candidates += len(ur.examples)
            if user_settled:
                settled = eff_u[ur.examples < settled_below]
        if ir is not None and len(ir.examples):
            target = np.concatenate([P[user].reshape(k, d), ones], axis=1)
            m = len(ir.examples)
            n_candidates += m - (hi - lo)
            if top is not None and m > self.prune_above:
                pos, eff_i = self._item_side_top(ir, target, P, lo, hi, max(top, 1), settled_below, settled)
                ex = ir.examples[pos]
            else:
                eff_i = self._side(ir, target, P)
                ex = ir.examples
                if hi > lo:
                    keep = np.r_[0:lo, hi:m]
                    ex, eff_i = ex[keep], eff_i[keep]
            parts_ids.append(ex)
            parts_eff.append(eff_i)
            parts_su.append(np.zeros(len(ex), bool))
            parts_si.append(np.ones(len(ex), bool))
        if not parts_ids:
            e = np.empty(0, np.int64)
            return e, np.zeros(0), np.zeros(0, bool), np.zeros(0, bool), 0
        if len(parts_ids) == 1:
            return parts_ids[0], parts_eff[0], parts_su[0], parts_si[0], n_candidates
        return (np.concatenate(parts_ids), np.concatenate(parts_eff), np.concatenate(parts_su),
                np.concatenate(parts_si), n_candidates)

    def effects(self, user: int, item: int) -> tuple[np.ndarray, np.ndarray]:
        """``(example ids [m], effects [m])`` like `estimate_effects(..., "newton")`."""
        ids, eff, _, _, _ = self.effects_and_shares(user, item)
        return ids, eff


def _fia(model: RatingModel, train: Ratings, user: int, item: int, ids: np.ndarray,
         su: np.ndarray, si: np.ndarray, x: _Rows | None = None) -> np.ndarray:
    """FIA: ``−∇_θ f(x)ᵀ H⁻¹ ∇_θ ℓ_z`` with θ = (p_u, q_i) per block, exact Hessian of the
    training loss restricted to θ (block-diagonal unless (u, i) is itself a training rating)."""
    k, d = model.config.n_blocks, model.block_size
    mu = float(model.global_mean)
    x = x or _Rows(model, np.array([user]), np.array([item]))
    p, q = x.P[:, 0], x.Q[:, 0]
    r = _Rows(model, train.users[ids], train.items[ids])
    resid = train.values[ids].astype(np.float64)[None, :] - (
        mu + r.BU + r.BI + np.einsum("kmd,kmd->km", r.P, r.Q))
    reg_u, reg_i = float(model.reg_user[user]), float(model.reg_item[item])
    H = np.zeros((k, 2 * d, 2 * d))
    Qu = r.Q[:, su]  # the user's items' factors [K, m_u, d]
    Pi = r.P[:, si]
    H[:, :d, :d] = np.einsum("kmi,kmj->kij", Qu, Qu) + su.sum() * reg_u * np.eye(d)
    H[:, d:, d:] = np.einsum("kmi,kmj->kij", Pi, Pi) + si.sum() * reg_i * np.eye(d)
    both = np.flatnonzero(su & si)
    if len(both):  # (u, i) is a training rating: ∂²ℓ/∂p∂qᵀ = q pᵀ − e I
        e = resid[:, both[0]]
        cross = np.einsum("ki,kj->kij", q, p) - e[:, None, None] * np.eye(d)
        H[:, :d, d:] = cross
        H[:, d:, :d] = cross.transpose(0, 2, 1)
    grad_f = np.concatenate([q, p], axis=1)  # ∇_θ f per block (× 1/K below)
    w = np.linalg.solve(H + 1e-9 * np.eye(2 * d), grad_f[:, :, None])[:, :, 0]  # [K, 2d]
    g_user = -resid[..., None] * r.Q + reg_u * p[:, None, :]  # ∇_p ℓ_z  [K, m, d]
    g_item = -resid[..., None] * r.P + reg_i * q[:, None, :]
    per_block = (su * np.einsum("kmd,kd->km", g_user, w[:, :d])
                 + si * np.einsum("kmd,kd->km", g_item, w[:, d:]))
    return -per_block.sum(0) / k


# --------------------------------------------------------------------------- fold-in users
class FoldInLeaveOneOut:
    """Exact leave-one-out of a folded-in user's own ratings: the effect of each on a
    prediction is the prediction minus that of the user re-folded without it
    (`MatrixFactorization.fold_in_user`'s ridge, on the item rows as they are now).

    The fold-in solves ``w = G⁻¹Xᵀt`` over the user's ``m`` ratings, ``x_z = [q_z/K; 1]``,
    ``t_z = r_z − μ − b̄_z``, ``G = XᵀX + diag(λ, …, λ, λ_b)``; without ``z`` (Sherman–Morrison)
    ``w − w_{−z} = G⁻¹x_z e_z / (1 − h_z)`` with ``e_z = t_z − x_zᵀw`` and ``h_z = x_zᵀG⁻¹x_z``.
    So per user the ``[D+1, m]`` matrix ``V = G⁻¹X·diag(e/(1 − h))`` is computed once (one
    ``(D+1)²`` solve) and an effect on item ``i`` is ``[q_i/K; 1]ᵀV``: a gather and a product.
    Exact for the ridge (tested against re-folding); ``invalidate`` users that rated again."""

    def __init__(self, model: RatingModel, ratings: Ratings, index: RowIndex | None = None) -> None:
        self.model, self.ratings = model, ratings
        self.index = index if index is not None and index.ratings is ratings else RowIndex(ratings)
        self._users: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached users."""
        return sum(z.nbytes + v.nbytes for z, v in self._users.values())

    def invalidate(self, users: np.ndarray | list[int] | set[int] = ()) -> None:
        for u in users:
            self._users.pop(int(u), None)

    def _user(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """``(example ids [m] sorted, V [m, D+1] float64)`` of one folded-in user."""
        if user in self._users:
            return self._users[user]
        model, ratings = self.model, self.ratings
        c = model.config
        z = np.sort(self.index.row("user", user)[0])
        q = model.item_factors.weight.detach().cpu().numpy()[ratings.items[z]].astype(np.float64)
        bi = model.item_bias.weight.detach().cpu().numpy()[ratings.items[z]].astype(np.float64).mean(-1)
        X = np.concatenate([q / c.n_blocks, np.ones((len(z), 1))], axis=1)  # [m, D+1]
        t = ratings.values[z].astype(np.float64) - float(model.global_mean) - bi
        G = X.T @ X
        G[np.diag_indices(X.shape[1])] += np.r_[np.full(X.shape[1] - 1, c.fold_in_reg), c.fold_in_bias_reg]
        GX = np.linalg.solve(G, np.concatenate([X.T, (X.T @ t)[:, None]], axis=1))  # [D+1, m+1]
        w, GinvX = GX[:, -1], GX[:, :-1]
        e = t - X @ w
        h = np.einsum("md,dm->m", X, GinvX)
        V = (GinvX * (e / np.maximum(1.0 - h, 1e-12))).T  # [m, D+1]
        out = (z, V)
        self._users[user] = out
        return out

    def effects(self, user: int, item: int, example_ids: np.ndarray) -> np.ndarray:
        """Effects ``[len(example_ids)]`` (rating points, unclipped prediction) of the user's
        own ratings ``example_ids`` on the prediction of ``item``."""
        z, V = self._user(user)
        c = self.model.config
        target = np.r_[self.model.item_factors.weight.detach().cpu().numpy()[item].astype(np.float64) / c.n_blocks,
                       1.0]
        return V[np.searchsorted(z, example_ids)] @ target


# --------------------------------------------------------------------------- the explainer
def _top(effects: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``|effects|``, largest first, ties by position (as a
    stable full sort would give them) without sorting all ``m`` (a partition, then ``k``)."""
    a = -np.abs(effects)
    if k >= len(a):
        return np.argsort(a, kind="stable")
    if k == 0:
        return np.empty(0, np.int64)
    kth = np.partition(a, k - 1)[k - 1]
    pick = np.flatnonzero(a <= kth)  # every tie of the k-th value, in position order
    return pick[np.argsort(a[pick], kind="stable")][:k]


class MFExplainer:
    """MF's `recsys.models.base.Explainer`: the ``k`` ratings with the largest estimated
    effect (by absolute value) on the prediction of one (user, item) pair, against
    ``ratings`` (training first, then those learnt online, as `update` reports them).

    ``method`` None: the serving default, one-row Newton cached per row (`NewtonInfluence`:
    ``A⁻¹`` per row and one number per rating, float32; `warm` precomputes rows, those of most
    ratings first, up to `NewtonInfluence.max_bytes`: all of them for MovieLens-100K; rows
    whose parameters online learning changed are recomputed on their next use). A named method (`METHODS`) is computed directly per query in float64
    (`estimate_effects`), as `recsys.explain.influence.explain` reports it. ``rollback`` needs
    the update ``log``; it follows the training trajectory, so once ratings were learnt online
    (the model's rows no longer where the log left them: fold-ins replace rows outright) it is
    answered by the cached Newton estimate, and the explanation says ``newton``."""

    units = UNITS
    #: `warm` precomputes nothing for more ratings than this (rows are built on first use);
    #: None: no limit (`NewtonInfluence.max_bytes` bounds what it keeps)
    warm_below: int | None = None

    def __init__(self, model: RatingModel, ratings: Ratings, log: UpdateLog | None = None,
                 method: str | None = None, *, n_trained: int | None = None,
                 learning_rate_sum: float | None = None) -> None:
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
        if method == "rollback" and log is None:
            raise ValueError("the rollback method needs the model's RollbackLog (train with --rollback)")
        self.model, self.ratings, self.log = model, ratings, log
        self.method = method or DEFAULT_METHOD
        self.cached = method is None
        #: rows of ``ratings`` the model was trained on; later rows were learnt online
        self.n_trained = len(ratings) if n_trained is None else n_trained
        #: the training's summed SGD rate for the damped cached Newton (`NewtonInfluence`); None: undamped
        self.learning_rate_sum = learning_rate_sum
        self._newton: NewtonInfluence | None = None
        self._stale_users: set[int] = set()
        self._stale_items: set[int] = set()
        self._grown_items: set[int] = set()
        self._moved = False  # ratings changed since the cache last saw them
        self._fold_in: FoldInLeaveOneOut | None = None
        self._index: RowIndex | None = None  # built with the first cache, then extended by `update`
        self._stale_fold_in: set[int] = set()

    # ------------------------------------------------------------------ Explainer
    def update(self, ratings: Ratings, new: np.ndarray) -> None:
        """``ratings`` (training + live) grew by the example ids ``new``, whose users' and
        items' rows online learning changed: the cached rows they touch are recomputed when
        next used (lazily, so a burst of ratings costs one refresh)."""
        new = np.asarray(new, dtype=np.int64)
        self.ratings = ratings
        if self._index is not None:
            self._index.extend(ratings, new)
        users, items = ratings.users[new], ratings.items[new]
        state = getattr(self.model, "_online", None)  # `recsys.models.mf.online.OnlineState`
        stepped = np.ones(len(new), bool) if state is None else state.is_trained(users)
        self._stale_users.update(users.tolist())
        self._stale_items.update(items[stepped].tolist())  # online SGD moved these item rows
        self._grown_items.update(items[~stepped].tolist())  # a fold-in moves no item row
        self._stale_fold_in.update(ratings.users[new].tolist())
        self._moved = True

    def warm(self) -> None:
        """Precompute the cached Newton rows, those of most ratings first, up to
        `NewtonInfluence.max_bytes` (cached default only; nothing above `warm_below` ratings)."""
        if self.cached and (self.warm_below is None or len(self.ratings) <= self.warm_below):
            self._cache().warm()

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the cached Newton rows and fold-in users' leave-one-out matrices."""
        newton = 0 if self._newton is None else self._newton.nbytes
        fold_in = 0 if self._fold_in is None else self._fold_in.nbytes
        return newton + fold_in

    def explain(self, user: int, item: int, k: int) -> Explanation:
        """The explanation of the prediction of indices ``(user, item)`` (``k >= 0``)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        model, ratings = self.model, self.ratings
        raw_u = ratings.user_ids.raw(user) if 0 <= user < ratings.n_users else ""
        raw_i = ratings.item_ids.raw(item)
        title = ratings.title(raw_i)
        if user < 0 or user >= model.n_users or not bool(model.known_users[user]):
            pred = float(model.predict(torch.tensor([user]), torch.tensor([item]))[0])
            return Explanation(raw_u, raw_i, title, pred, FALLBACK_REASON)
        ids, eff, su, si, method, rows, n_candidates = self._effects(user, item, top=k)
        if bool(model.known_items[item]) and (rows is not None or model.device.type == "cpu"):
            # the prediction from the pair's rows (numpy views on the CPU): no tensor dispatch
            pred = (rows or _Rows(model, np.array([user]), np.array([item]))).prediction(model)
        else:
            pred = float(model.predict(torch.tensor([user]), torch.tensor([item]))[0])
        top = _top(eff, k)
        contribs = []
        for j in top:
            z = int(ids[j])
            raw_item = ratings.item_ids.raw(int(ratings.items[z]))
            contribs.append(Contribution(
                example=z, user=ratings.user_ids.raw(int(ratings.users[z])), item=raw_item,
                rating=float(ratings.values[z]),
                timestamp=None if ratings.timestamps is None else int(ratings.timestamps[z]),
                title=ratings.title(raw_item), effect=float(eff[j]),
                shares="both" if su[j] and si[j] else ("user" if su[j] else "item")))
        attribution = self.log.attribution if (method == "rollback" and self.log is not None) else None
        return Explanation(raw_u, raw_i, title, pred, method, contribs, n_candidates, attribution=attribution)

    def effects(self, user: int, item: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
        """Every candidate's estimated effect on the prediction of indices ``(user, item)``,
        as `explain` serves it: ``(example ids [m], effects float64 [m] in rating points,
        shares_user [m], shares_item [m], method)``. A user on the fold-in path (not trained,
        folded in from their ratings) has their own ratings' effects from the exact re-fold
        without each (`FoldInLeaveOneOut`, method ``fold-in exact``, with ``newton`` on the
        item's ratings); every other user the method as configured."""
        ids, eff, su, si, method, _, _ = self._effects(user, item)
        return ids, eff, su, si, method

    def _effects(self, user: int, item: int, top: int | None = None):
        """`effects`, plus the pair's rows when gathered and the number of candidates; ``top``:
        only the candidates that can be among the ``top`` largest need be returned."""
        model, ratings = self.model, self.ratings
        method = self.method
        rows = None
        folded = getattr(model, "path", None) is not None and model.path(user) == "fold-in"
        state = getattr(model, "_online", None)  # `recsys.models.mf.online.OnlineState`, once learning online
        if self.cached or folded or (method == "rollback" and len(ratings) > self.n_trained):
            # ratings learnt online and a folded-in user's own are re-estimated below: never pruned on
            ids, eff, su, si, n_candidates = self._cache().effects_and_shares(
                user, item, top=top, settled_below=self.n_trained if state is not None else None,
                user_settled=not folded)
            method = "newton"
        else:
            rows = _Rows(model, np.array([user]), np.array([item]))
            ids, eff, su, si = estimate_effects(model, ratings, user, item, method, self.log, rows=rows)
            n_candidates = len(ids)
        if state is not None and len(ratings) > self.n_trained and (ids >= self.n_trained).any():
            eff, method = self._online_steps(state, user, item, ids, su, si, eff, method, folded)
        if folded and su.any():
            # the user's row is the fold-in ridge's solution: their ratings' effects are its exact
            # leave-one-out; the item's rows were never trained on them (no item-side share)
            mine = np.flatnonzero(su)
            eff = eff.copy()
            eff[mine] = self._fold_in_cache().effects(user, item, ids[mine])
            si = si & ~su
            method = "fold-in exact + newton" if si.any() else "fold-in exact"
        return ids, eff, su, si, method, rows, n_candidates

    def _online_steps(self, state, user: int, item: int, ids: np.ndarray, su: np.ndarray, si: np.ndarray,
                      eff: np.ndarray, method: str, folded: bool) -> tuple[np.ndarray, str]:
        """Effects of the ratings learnt online, against the steps they took: a rating of a
        trained user was applied by ``passes`` online SGD visits at the online rate, moving its
        user's and item's rows by about ``passes·lr·(−∇ℓ_z)`` (the gradient at the current
        weights: few, late steps, nothing after them to pull the rows back), so its effect is
        that move scored on the prediction's rows (measured against re-running the online
        steps without it: ``docs/explanations.md``). A rating of a folded-in user moved no
        item row (the fold-in is a ridge solve): no item share."""
        model, ratings = self.model, self.ratings
        late = np.flatnonzero(ids >= self.n_trained)
        z = ids[late]
        stepped = state.is_trained(ratings.users[z])
        eff = eff.copy()
        eff[late[~stepped & si[late] & ~su[late]]] = 0.0  # another folded-in user's rating of the item
        sel = late[stepped]
        if len(sel) == 0:
            return eff, method
        k = model.config.n_blocks
        zs = ids[sel]
        owners, items = ratings.users[zs], ratings.items[zs]
        r = _Rows(model, owners, items)
        x = _Rows(model, np.array([user]), np.array([item]))
        e = ratings.values[zs].astype(np.float64)[None, :] - (
            float(model.global_mean) + r.BU + r.BI + np.einsum("kmd,kmd->km", r.P, r.Q))  # [K, m]
        scale = state.passes * state.learning_rate
        out = np.zeros(len(sel))
        mine = su[sel] & ~folded
        if mine.any():  # the user's row moved: scored with the prediction's item factors
            reg, breg = float(model.reg_user[user]), float(model.bias_reg_user[user])
            dp = e[..., None] * r.Q - reg * r.P  # [K, m, d]
            db = e - breg * r.BU
            out += mine * (np.einsum("kmd,kd->m", dp, x.Q[:, 0]) + db.sum(0)) / k
        theirs = si[sel]
        if theirs.any():  # the item's row moved: scored with the prediction's user factors
            reg, breg = float(model.reg_item[item]), float(model.bias_reg_item[item])
            dq = e[..., None] * r.P - reg * r.Q
            db = e - breg * r.BI
            out += theirs * (np.einsum("kmd,kd->m", dq, x.P[:, 0]) + db.sum(0)) / k
        eff[sel] = scale * out
        return eff, f"{method} + online steps"

    # ------------------------------------------------------------------ the caches
    def _fold_in_cache(self) -> FoldInLeaveOneOut:
        if self._fold_in is None or self._fold_in.ratings is not self.ratings:
            kept = self._fold_in
            self._fold_in = FoldInLeaveOneOut(self.model, self.ratings, self._row_index())
            if kept is not None:  # keep the users that did not rate again
                kept.invalidate(self._stale_fold_in)
                self._fold_in._users = kept._users
            self._stale_fold_in.clear()
        return self._fold_in

    def _row_index(self) -> RowIndex:
        if self._index is None or self._index.ratings is not self.ratings:
            self._index = RowIndex(self.ratings)
        return self._index

    def _cache(self) -> NewtonInfluence:
        if self._newton is None or self._newton.index is not self._row_index():  # built, or ratings replaced
            self._newton = None
            self._newton = NewtonInfluence(self.model, self.ratings, learning_rate_sum=self.learning_rate_sum,
                                           index=self._row_index())
            self._stale_users.clear()
            self._stale_items.clear()
            self._grown_items.clear()
            self._moved = False
        elif self._moved:
            self._newton.invalidate(sorted(self._stale_users), sorted(self._stale_items), sorted(self._grown_items))
            self._stale_users.clear()
            self._stale_items.clear()
            self._grown_items.clear()
            self._moved = False
        return self._newton


__all__ = ["DEFAULT_METHOD", "FALLBACK_REASON", "METHODS", "UNITS", "FoldInLeaveOneOut", "MFExplainer",
           "NewtonInfluence", "RowIndex", "contracted_rollback",
           "candidates", "estimate_effects"]

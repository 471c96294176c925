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

import bisect
from typing import NamedTuple

import numpy as np
import torch

from recsys.models.base import Contribution, Explanation, RatingModel, UpdateLog
from recsys.models.mf.explain_kernels import (
    extend_row_chains,
    fold_in_leave_one_out,
    insert_rows,
    newton_row,
    online_step_scores,
    pair_prediction,
    pair_scores,
    pair_scores_updated,
    record_moves,
    row_chain,
    stamp_rows,
    trained_mask,
    updated_weights,
)
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
    started from (built once) plus the rows appended since, chained per user and item as
    they arrive (`extend`: one compiled pass, ``O(len(new))``, no per-rating Python), so the
    new `Ratings` each batch of online ratings makes is never re-sorted (a full CSR is
    ``O(N log N)``: seconds at 10^7 ratings)."""

    def __init__(self, base: Ratings) -> None:
        self.base, self.ratings = base, base
        self._first = len(base)  # the first appended example id
        # per appended example (id − _first): the previous appended example of its user / item
        # (−1: none); per user / item: its last appended example (−1: none) and how many
        self._prev = {"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64)}
        self._head = {"user": np.full(base.n_users, -1, np.int64), "item": np.full(base.n_items, -1, np.int64)}
        self._count = {"user": np.zeros(base.n_users, np.int64), "item": np.zeros(base.n_items, np.int64)}

    def extend(self, ratings: Ratings, new: np.ndarray) -> None:
        """``ratings`` is the previous one plus the example ids ``new`` (appended rows)."""
        self.ratings = ratings
        new = np.asarray(new, dtype=np.int64)
        if len(new) == 0:
            return
        prev, head, count = self._prev, self._head, self._count
        if len(ratings) - self._first > len(prev["user"]):  # amortised growth, as the ratings arrive
            size = max(len(ratings) - self._first, 2 * len(prev["user"]), 1024)
            for side in ("user", "item"):
                prev[side] = np.r_[prev[side], np.full(size - len(prev[side]), -1, np.int64)]
        for side, n in (("user", ratings.n_users), ("item", ratings.n_items)):
            if n > len(head[side]):
                size = max(n, 2 * len(head[side]))
                head[side] = np.r_[head[side], np.full(size - len(head[side]), -1, np.int64)]
                count[side] = np.r_[count[side], np.zeros(size - len(count[side]), np.int64)]
        extend_row_chains(new, ratings.users, ratings.items, self._first, prev["user"], prev["item"], head["user"],
                          head["item"], count["user"], count["item"])

    def appended(self, side: str, r: int) -> np.ndarray:
        """The example ids appended for user or item ``r`` (``side``) since the base ratings,
        in the order `extend` received them (int64)."""
        count = self._count[side]
        n = int(count[r]) if 0 <= r < len(count) else 0
        if n == 0:
            return _NO_POSITIONS
        return row_chain(int(self._head[side][r]), self._prev[side], n, self._first)

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
        ez = self.appended(side, r)
        if len(ez):
            z = np.r_[z, ez]
            cols = np.r_[cols, (self.ratings.items if side == "user" else self.ratings.users)[ez]]
            order = np.lexsort((z, cols))
            z, cols = z[order], cols[order]
        return z, cols


def _table(weight: torch.Tensor) -> np.ndarray:
    """A parameter table (or buffer) as numpy: a view on the CPU (no copy, no tensor dispatch)."""
    w = weight.detach()
    return w.numpy() if w.device.type == "cpu" else w.cpu().numpy()


_NO_POSITIONS = np.zeros(0, np.int64)
_NO_POSITIONS.flags.writeable = False


def _lower(A: np.ndarray) -> np.ndarray:
    """The lower triangles ``[K, n(n+1)/2]`` of ``A [K, n, n]``, row by row (`numpy.tril_indices`)."""
    rows, cols = np.tril_indices(A.shape[1])
    return A[:, rows, cols]


class _NewtonRow(NamedTuple):
    """One user or item row of `NewtonInfluence`, in the row's CSR order (``m`` ratings)."""

    examples: np.ndarray  # int64 [m]: example ids
    others: np.ndarray  # int32 [m]: the other side's index of each rating (sorted: CSR order)
    weights: np.ndarray  # float32 [K, d+1, d+1]: W = A⁻¹ (damped: A⁻¹(I − e^{−SA}))
    alpha: np.ndarray  # float32 [m, K]: αᵢ = tᵢ/(1 − hᵢ) − rᵢ per block
    reg_theta: np.ndarray  # float64 [K, d+1]: λ⊙θ, the row's L2 gradient
    beta: np.ndarray  # float32 [m]: Σ_blocks |α_i|·‖x_i‖, the bound on |α_i (x_i·w)| per unit ‖w‖ (item rows;
    #                   a user row's ratings are bounded one by one, `explain_kernels.user_effect_bounds`: [0])
    by_beta: np.ndarray  # int32 [m]: positions in decreasing order of beta (item rows; [0] for a user row)
    gram: np.ndarray  # float64 [K, (d+1)(d+2)/2]: A's lower triangle, kept for an update in place
    #                   (`NewtonInfluence.update_above`), else [0, 0]
    h_max: np.ndarray  # float64 [K]: max_i h_i (bounds the α_i after an update in place)
    x2_max: np.ndarray  # float64 [K]: max_i ‖x_i‖²
    theta: np.ndarray  # float64 [K, d+1]: the row's [factors; bias] at the build (kept with gram, else [0, 0])
    h: np.ndarray  # float32 [m, K]: h_i = x_iᵀA⁻¹x_i, kept with gram on a user row (else [0, 0]): bounds its
    #                ratings' α once its own parameters moved (`explain_kernels.pair_scores_updated`)
    values: np.ndarray  # float32 [m]: the ratings' values, kept with h (else [0]): read in row order by the
    #                     bounds of a user row updated in place (`explain_kernels.user_effect_bounds`)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self)


class _RowUpdate(NamedTuple):
    """A long cached row updated in place since its build (raters moved, ratings gained, its
    own parameters moved): its system now, which ratings were gained or had their rater move
    since the build, and how far the cached bound ``β`` widens (`explain_kernels.updated_weights`)."""

    gram: np.ndarray  # float64 [K, (d+1)(d+2)/2]: A's lower triangle now
    weights: np.ndarray  # float64 [K, d+1, d+1]: W' = A⁻¹
    reg_weights: np.ndarray  # float64 [K, d+1]: W'(λ⊙θ)
    theta: np.ndarray  # float64 [K, d+1]: the row's [factors; bias] now
    reg_theta: np.ndarray  # float64 [K, d+1]: λ⊙θ now
    moved: np.ndarray  # bool [m]: ratings gained, or whose rater moved, since the build
    alpha: np.ndarray  # float32 [m, K]: α with W' and θ now, NaN until a query computed it (`updated_rating_score`)
    n_moved: int
    beta_scale: float
    beta_shift: float
    h_spread: np.ndarray  # float64 [K]: how far h' = xᵀW'x may be from the build's h of a rating whose other
    #                       row did not move: ε·x2_max + 2⁻²³, ε ≥ ‖W' − W‖₂ (`updated_weights`; user rows)
    alpha_bounds: np.ndarray  # float32 [m, K, 2] (user rows; else [0, K, 2]): each rating's α' interval,
    #                           NaN until a query computed it (`explain_kernels.user_effect_bounds`)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self if isinstance(a, np.ndarray))


class _FactorHistory:
    """The factors one side's rows (users or items) had before each move, for updates in
    place (`NewtonInfluence`): a copy of the side's factor table as of the last invalidation
    (``then``; rows added since are kept apart in ``then_new``, so the copy is never copied
    again when the model doubles its tables) and a ring of records ``(row, factors before the
    move)``, record n at slot ``n % len(rows)``: room for twice as many records as the side has
    rows (up to ``kept``) from the start, grown up to ``kept`` records before it wraps.
    `explain_kernels.record_moves` writes them."""

    def __init__(self, table: np.ndarray, kept: int) -> None:
        self.then = table.copy()
        self.then_new = np.zeros((0, table.shape[1]), np.float32)
        self.kept = kept
        # room from the start (grown while ingesting: copies), its pages written now (np.full):
        # a page first written while ingesting cost a fault (4-6 ms for a batch at 10^7)
        self.rows = np.full(min(kept, max(256, 2 * len(table))), 0, np.int64)
        self.factors = np.full((len(self.rows), table.shape[1]), 0.0, np.float32)
        self.written = 0
        self.dropped = 0  # the clock of the newest invalidation whose records were overwritten
        self.clocks: list[int] = []  # per invalidation that wrote records: its clock ...
        self.starts: list[int] = []  # ... and the number of records written before it
        self.first = 0  # entries of both lists before this one were overwritten

    @property
    def nbytes(self) -> int:
        return self.then.nbytes + self.then_new.nbytes + self.rows.nbytes + self.factors.nbytes

    def make_room(self, n: int) -> None:
        """Grow the ring for ``n`` more records while it has not wrapped (up to ``kept``)."""
        ring = len(self.rows)
        if self.written + n > ring and ring < self.kept:
            ring = min(self.kept, max(2 * ring, self.written + n))
            self.rows = np.r_[self.rows, np.zeros(ring - len(self.rows), np.int64)]
            self.factors = np.concatenate([self.factors, np.zeros((ring - len(self.factors), self.factors.shape[1]),
                                                                  np.float32)])

    def hold(self, top: int, table: np.ndarray) -> None:
        """Room in ``then_new`` for rows up to ``top`` (rows added since the copy: as they are
        now, no row held them before), grown amortised."""
        held = len(self.then) + len(self.then_new)
        if top > held:
            size = min(max(top, held + (held - len(self.then)), len(self.then) + 64), len(table))
            self.then_new = np.concatenate([self.then_new, table[held:size]])

    def wrote(self, clock: int, n: int) -> None:
        """``n`` records were written at ``clock``: list them, drop what they overwrote."""
        if n == 0:
            return
        self.clocks.append(clock)
        self.starts.append(self.written)
        self.written += n
        first, ring = self.first, len(self.rows)
        while first < len(self.starts) and self.starts[first] < self.written - ring:  # overwritten: dropped lazily
            self.dropped = self.clocks[first]
            first += 1
        if first > 1024 and 2 * first > len(self.starts):
            del self.clocks[:first], self.starts[:first]
            first = 0
        self.first = first

    def before(self, rows: np.ndarray, clock: int, window: int) -> np.ndarray | None:
        """The factors ``[len(rows), K·d]`` float32 the (sorted, unique) ``rows`` had at
        ``clock`` (before their first move after it), or None when the ring no longer reaches
        back that far or holds more than ``window`` records since."""
        if self.dropped > clock:
            return None
        at = bisect.bisect_right(self.clocks, clock, self.first)
        first = self.starts[at] if at < len(self.starts) else self.written
        ring = len(self.rows)
        if first < self.written - ring or self.written - first > window:
            return None
        slots = np.arange(first, self.written) % ring
        held = self.rows[slots]
        seen, where = np.unique(held, return_index=True)  # each row's first record after ``clock``
        pos = np.searchsorted(seen, rows)
        if (pos >= len(seen)).any() or (seen[np.minimum(pos, len(seen) - 1)] != rows).any():
            return None
        return self.factors[slots[where[pos]]]


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
    built (one compiled call, `explain_kernels.newton_row`) on first use or all at once by
    `warm`; call `invalidate` with the rows whose parameters changed (online updates): it
    stamps them, and a cached row is rebuilt on its next use if a stamp says that its own
    parameters or ratings, or the parameters of a row it holds, changed since it was built;
    a row of more than `update_above` ratings is updated in place instead when a pruned
    query uses it (`_update`: its ``A`` gains the changes' low-rank terms, the α a query
    scores are computed from ``A⁻¹``; an item row's pruning bound is widened by a proven
    margin, a user row's ratings are bounded one by one from the build's ``h``).

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
        self._recent: dict[tuple[str, int], _NewtonRow] = {}  # past max_bytes, in the order built
        self._nbytes = 0
        # staleness stamps: `invalidate` advances the clock; a row was current at `_checked[key]`
        self._clock = 0
        self._checked: dict[tuple[str, int], int] = {}
        sizes = {"user": self.train.n_users, "item": self.train.n_items}
        #: per side, the clock at which each row's own parameters or ratings last changed
        self._own = {side: np.zeros(n, np.int64) for side, n in sizes.items()}
        #: per side, the clock at which each row's parameters last changed (stales the rows holding it)
        self._moved = {side: np.zeros(n, np.int64) for side, n in sizes.items()}
        #: per side, the last `changes_kept` invalidations' moved rows ``(clock, sorted indices)``
        self._changes: dict[str, list[tuple[int, np.ndarray]]] = {"user": [], "item": []}
        self._dropped_change = {"user": 0, "item": 0}  # the clock of the newest change no longer listed
        k, d = model.config.n_blocks, model.block_size
        self._empty = _NewtonRow(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((k, d + 1, d + 1), np.float32),
                                 np.zeros((0, k), np.float32), np.zeros((k, d + 1)), np.zeros(0, np.float32),
                                 np.zeros(0, np.int32), np.zeros((0, 0)), np.zeros(k), np.zeros(k),
                                 np.zeros((0, 0)), np.zeros((0, k), np.float32),
                                 np.zeros(0, np.float32))  # a user or item with no row
        #: long rows updated in place since their other rows moved (`_update`), by key
        self._updates: dict[tuple[str, int], _RowUpdate] = {}
        self._not_updated = _RowUpdate(np.zeros((k, (d + 1) * (d + 2) // 2)), np.zeros((k, d + 1, d + 1)), np.zeros((k, d + 1)),
                                       np.zeros((k, d + 1)), np.zeros((k, d + 1)), np.zeros(0, bool),
                                       np.zeros((0, k), np.float32), 0, 1.0, 0.0, np.zeros(k),
                                       np.zeros((0, k, 2), np.float32))  # its fields' types
        #: how many rows were built and updated in place (for tests and benchmarks)
        self.counts = {"built": 0, "updated": 0}
        # per side, the factors as of the last `invalidate` and a ring of the factors moved rows
        # had before each move: an update in place needs each moved rater's (or rated item's)
        # factors as they were when the row was last built or updated
        self._history = {"user": _FactorHistory(_table(model.user_factors.weight), self.history_kept),
                         "item": _FactorHistory(_table(model.item_factors.weight), self.history_kept)}
        self._tables_key: tuple[int, int] | None = None  # `_factor_tables`
        self._tables: tuple[np.ndarray, np.ndarray] | None = None
        #: (users, items) the stamps and the histories' copies have room for (`record` grows them)
        self._room = tuple(min(len(self._own[side]), len(self._moved[side]), len(self._history[side].then))
                           for side in ("user", "item"))

    #: the cache keeps rows while it holds less than this (bytes); rows built past it are
    #: kept only among the `recent_rows` built last (`warm` fills it with the rows of most
    #: ratings first)
    max_bytes = 1 << 30
    #: rows built past `max_bytes` that are kept, the most recently built (a user's row is
    #: built once for the ``k`` items a recommendation explains)
    recent_rows = 256
    #: invalidations listed per side, so a long row is checked against the rows moved since
    #: it was built instead of reading every rater's stamp
    changes_kept = 256
    #: item rows longer than this are scored in bound order when only the top few are asked for
    #: (at 10^7 ratings: 4096 -> 128 took the p99 of a random pair from 1.8 to 0.4 ms, 590 -> 68
    #: ratings scored per query; the same explanations); user rows longer than this (or updated
    #: in place) are bounded rating by rating first, from float32 dot products
    #: (`explain_kernels.user_effect_bounds`: ~0.02 µs a rating, against ~0.06-0.3 µs for an
    #: exact score), and only the ratings whose bound reaches the top are scored
    prune_above = 128
    #: ratings scored in the first step of that order (doubling at each step)
    prune_chunk = 32
    #: a row longer than this whose other rows (raters, or rated items) moved, that gained
    #: ratings or whose own parameters moved is updated in place when a pruned query
    #: (`explain`'s top k) uses it: ``A`` gains each moved rating's rank-2 change, each gained
    #: rating's rank-1 term and its share of the ridge, and is inverted again
    #: (``O(K·(d+1)³)``); the α of the ratings the query scores are computed then from ``A⁻¹``
    #: (``O(K·(d+1)²)`` each: more than a cached α, so rows a rebuild costs little for are
    #: rebuilt), instead of rebuilding the row (``O(m·K·(d+1)²)``: about 0.7 ms at 512 ratings
    #: at 10^7, 6 ms at 5,000, 170 ms at 173,000). An item row's other ratings are pruned by
    #: their build's bound, widened; a user row's are each bounded from the build's ``h``
    #: (`explain_kernels.user_effect_bounds`: each rating's α' interval once per update, then
    #: ``O(K·d)`` float32 per query) and scored only when the bound can reach the top. Such a
    #: row keeps ``A``'s lower triangle (``4·K·(d+1)(d+2)`` bytes more; a user row also ``h``
    #: and its values, ``4K + 4`` bytes a rating, and per update ``8K`` bytes a rating of α'
    #: intervals).
    update_above = 512
    #: an updated row of m ratings is rebuilt once more of its ratings than
    #: ``min(max(update_moved_max, m/128), 8·update_moved_max)`` were gained or had their
    #: rater move since its build (each is scored by every query, its α computed again after
    #: each update: ~1.3 µs a rating at 10^7, against ~1.7 µs a rating for a rebuild)
    update_moved_max = 64
    #: an updated user row of m ratings is rebuilt once more than ``max(update_moved_max,
    #: m/user_moved_share)`` of its ratings were gained or had their item move since its build
    #: (each adds its rank-2 term to ``A`` once, ~0.5 µs summed with the others', and is scored
    #: exactly by every query, its α' computed again after each update, ~0.3-0.5 µs; the others
    #: are bounded rating by rating; a rebuild costs ~1.3 µs a rating; a heavy user's items move
    #: often, whenever anyone rates them: at 10^7, m/32 rebuilt a 2,135-rating row inside a first
    #: query, 4.1 ms, where m/16 updated it in place, 2.4 ms)
    user_moved_share = 16
    #: moved users' previous factors kept (records; one per user and invalidation): a row whose
    #: raters moved longer ago than the ring reaches is rebuilt
    history_kept = 1 << 14
    #: rows kept updated in place at once (each holds ``A``, ``W'`` and its α: about 60 KB plus
    #: 4K bytes a rating at D=128/K=4, outside `max_bytes`); past it the least recently
    #: updated row is dropped and rebuilt when next used
    updates_kept = 1024

    @property
    def train(self) -> Ratings:
        """The ratings the rows are over (training, then those learnt online)."""
        return self.index.ratings

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached rows (the `recent_rows` and updates in place included) and
        by the copy of the user factors and history an update in place reads."""
        return (self._nbytes + sum(r.nbytes for r in self._recent.values())
                + sum(u.nbytes for u in self._updates.values()) + sum(h.nbytes for h in self._history.values()))

    def invalidate(self, users: np.ndarray | list[int] = (), items: np.ndarray | list[int] = (),
                   grown_items: np.ndarray | list[int] = ()) -> None:
        """Mark the rows made stale by changed parameters of ``users`` / ``items``: their own
        rows and the rows of everyone they rated or were rated by (whose systems hold them).
        ``grown_items``: items that gained ratings while their parameters stayed (a folded-in
        user's ratings): only their own rows. Costs ``O(len)`` now (stamps); each cached row
        is checked against the stamps when next used and rebuilt if stale."""
        items = np.asarray(items, dtype=np.int64)
        grown = np.asarray(grown_items, dtype=np.int64)
        moved = np.zeros(len(items) + len(grown), bool)
        moved[:len(items)] = True
        self.record(np.asarray(users, dtype=np.int64), np.r_[items, grown], moved)

    def record(self, users: np.ndarray, items: np.ndarray, items_moved: np.ndarray) -> None:
        """`invalidate` in the form online ratings come in (`MFExplainer.update`): ``users``
        (int64 ``[n]``, repeats harmless) moved; ``items`` (int64 ``[m]``) gained ratings, and
        their parameters moved where ``items_moved`` (bool ``[m]``). One compiled pass
        (`explain_kernels.record_moves`: the stamps, and the moved users' previous factors
        into the history ring), plus the lists of moved rows."""
        if len(users) + len(items) == 0:
            return
        self._clock += 1
        users_then, items_then = self._history["user"], self._history["item"]
        user_table, item_table = self._factor_tables()
        if users_then.written + len(users) > len(users_then.rows):
            users_then.make_room(len(users))
        if items_then.written + len(items) > len(items_then.rows):
            items_then.make_room(len(items))
        own, moved = self._own, self._moved
        while True:
            user_records, item_records, n_moved, top_u, top_i = record_moves(
                users, items, items_moved, self._clock, own["user"], moved["user"], own["item"], moved["item"],
                users_then.rows, users_then.factors, users_then.written, users_then.then, users_then.then_new,
                user_table, items_then.rows, items_then.factors, items_then.written, items_then.then,
                items_then.then_new, item_table)
            if top_u <= self._room[0] and top_i <= self._room[1]:
                break
            users_then.hold(top_u, user_table)  # (nothing was written) amortised growth: new users arrive one by one
            items_then.hold(top_i, item_table)
            for side, top in (("user", top_u), ("item", top_i)):
                for stamps in (own, moved):
                    if top > len(stamps[side]):
                        size = max(top, 2 * len(stamps[side]))
                        stamps[side] = np.r_[stamps[side], np.zeros(size - len(stamps[side]), np.int64)]
            self._room = tuple(min(len(own[side]), len(moved[side]), len(h.then) + len(h.then_new))
                               for side, h in (("user", users_then), ("item", items_then)))
        if user_records:
            users_then.wrote(self._clock, user_records)
        if item_records:
            items_then.wrote(self._clock, item_records)
        moved_items = items if n_moved == len(items) else items[items_moved]
        for side, rows in (("user", users), ("item", moved_items)):
            if len(rows) == 0:
                continue
            listed = self._changes[side]
            listed.append((self._clock, rows))
            if len(listed) > self.changes_kept:
                self._dropped_change[side] = listed.pop(0)[0]

    def _factor_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The user and item factor tables as numpy, kept while the tables' storage stays (on
        the CPU a view sees every write in place; the model's `grow` makes new tables)."""
        users, items = self.model.user_factors.weight, self.model.item_factors.weight
        key = (users.data_ptr(), items.data_ptr())
        if key != self._tables_key or users.device.type != "cpu":
            self._tables, self._tables_key = (_table(users), _table(items)), key
        return self._tables

    def _factors_before(self, rows: np.ndarray, clock: int, side: str = "user") -> np.ndarray | None:
        """The factors ``[len(rows), K·d]`` float32 the (sorted, unique) ``side`` rows had at
        ``clock`` (before their first move after it), or None when the history no longer
        reaches back that far or holds more than `update_window` records since."""
        return self._history[side].before(rows, clock, self.update_window)

    #: at most this many history records are searched for an update in place (else rebuild)
    update_window = 4096

    def _moved_since(self, side: str, clock: int, limit: int) -> np.ndarray | None:
        """The ``side`` rows whose parameters changed after ``clock`` (unsorted, maybe repeated),
        or None when more than ``limit`` or no longer all listed."""
        if self._dropped_change[side] > clock:
            return None
        parts, n = [], 0
        for at, rows in reversed(self._changes[side]):
            if at <= clock:
                break
            parts.append(rows)
            n += len(rows)
            if n > limit:
                return None
        return np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.zeros(0, np.int64))

    def _staleness(self, side: str, row: int, cached: _NewtonRow,
                   positions_wanted: bool = False) -> tuple[str, np.ndarray | None]:
        """Whether a cached row is still what `_build` would give: ``("current", None)`` when
        neither its own parameters or ratings nor the parameters of a row it holds changed
        since it was last found so; else ``("own", positions)`` when its own did, or
        ``("held", positions)``, with the positions (sorted) of its ratings whose other row
        moved since (None unless ``positions_wanted``: an update in place needs them, a
        rebuild does not)."""
        key = (side, row)
        seen = self._checked.get(key, -1)
        if seen == self._clock:
            return "current", None
        own = self._own[side]
        own_changed = row < len(own) and own[row] > seen
        if own_changed and not positions_wanted:
            return "own", None
        other = "item" if side == "user" else "user"
        others = cached.others
        moved = self._moved_since(other, seen, max(len(others) // 8, 16))
        if moved is None:  # many: read the stamp of every row it holds
            stamps = self._moved[other]
            inside = others < len(stamps)
            held = np.zeros(len(others), np.int64)
            held[inside] = stamps[others[inside]]
            positions = np.flatnonzero(held > seen)
        elif len(moved) and len(others):  # few: look them up in the sorted `others`
            lo = np.searchsorted(others, moved)
            held = others[np.minimum(lo, len(others) - 1)] == moved
            if held.any() and not positions_wanted:
                return ("own" if own_changed else "held"), None
            if held.any():  # every rating of each (a rater may have rated the item more than once)
                moved = np.unique(moved[held])
                lo, hi = np.searchsorted(others, moved, "left"), np.searchsorted(others, moved, "right")
                counts = hi - lo
                total = int(counts.sum())
                positions = np.repeat(lo, counts) + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
            else:
                positions = _NO_POSITIONS
        else:
            positions = _NO_POSITIONS
        if own_changed:
            return "own", positions
        if len(positions):
            return "held", positions
        self._checked[key] = self._clock
        return "current", None

    def _row(self, side: str, row: int, update: bool = False) -> _NewtonRow:
        """One user or item row: the cached one while it is current (`_staleness`), else
        built now (and kept, `_keep`). ``update``: a long row whose other rows moved may be
        updated in place instead (`_update`; the caller scores it with `_updates`' state)."""
        key = (side, row)
        cached = self._rows.get(key)
        if cached is None:
            cached = self._recent.get(key)
        if cached is not None:
            updatable = update and cached.gram.size > 0
            status, positions = self._staleness(side, row, cached, updatable)
            if status == "current" and (update or key not in self._updates):
                return cached
            if status != "current" and updatable and self._update(key, cached, positions, status == "own"):
                return self._rows.get(key, self._recent.get(key))
        out = self._build(side, row)
        self._keep(key, out)
        return out

    def _update(self, key: tuple[str, int], cached: _NewtonRow, positions: np.ndarray, own_changed: bool) -> bool:
        """Update a long row in place (`explain_kernels.updated_weights`) for the ratings at
        ``positions`` whose other row (rater, or rated item) moved since it was last built or
        updated and, when ``own_changed``, for the ratings it gained and its own parameters'
        move; False (the caller rebuilds) when the row keeps no ``A``, too many of its ratings
        were gained or had their other row move since the build (`update_moved_max`), their
        previous factors are no longer in the history, or (an item row) the cached bound would
        widen past use."""
        side, row = key
        if cached.gram.size == 0:
            return False
        other = "user" if side == "item" else "item"
        model = self.model
        k, d = model.config.n_blocks, model.block_size
        done = self._updates.get(key)
        moved = done.moved if done is not None else np.zeros(len(cached.examples), bool)
        row_now, added = cached, np.zeros(0, np.int64)
        if own_changed:  # ratings gained since: inserted in CSR order (after the other row's earlier ones)
            base = self.index.base
            csr, n_rows = (base.by_item, base.n_items) if side == "item" else (base.by_user, base.n_users)
            n_base = len(csr.examples[csr.row(row)]) if row < n_rows else 0
            extra = self.index.appended(side, row)
            first = len(cached.examples) - n_base
            if first < 0 or first > len(extra):
                return False
            if first < len(extra):
                new_z = extra[first:]
                new_others = (self.train.users if side == "item" else self.train.items)[new_z].astype(np.int32)
                order = np.lexsort((new_z, new_others))
                new_z, new_others = new_z[order], new_others[order]
                inserted = np.searchsorted(cached.others, new_others, "right")
                added = inserted + np.arange(len(inserted))
                positions = positions + np.searchsorted(inserted, positions, "right")
                by_beta = cached.by_beta + np.searchsorted(inserted, cached.by_beta, "right") if cached.by_beta.size \
                    else cached.by_beta
                k_rows = np.zeros((len(new_z), k), np.float32)
                row_now = cached._replace(
                    examples=insert_rows(cached.examples, inserted, new_z),
                    others=insert_rows(cached.others, inserted, new_others),
                    alpha=insert_rows(cached.alpha, inserted, k_rows),
                    beta=insert_rows(cached.beta, inserted, np.zeros(len(new_z), np.float32)) if cached.beta.size
                    else cached.beta,
                    by_beta=np.r_[by_beta, added].astype(np.int32) if cached.by_beta.size else cached.by_beta,
                    h=insert_rows(cached.h, inserted, k_rows) if cached.h.size else cached.h,
                    values=insert_rows(cached.values, inserted, self.train.values[new_z].astype(np.float32))
                    if cached.values.size else cached.values)
                moved = insert_rows(moved, inserted, np.ones(len(new_z), bool))
        moved = moved.copy()
        moved[positions] = True
        n_moved = int(moved.sum())
        if n_moved > (min(max(self.update_moved_max, len(moved) // 128), 8 * self.update_moved_max) if side == "item"
                      else max(self.update_moved_max, len(moved) // self.user_moved_share)):
            return False
        movers = row_now.others[positions].astype(np.int64)
        unique = np.unique(movers)
        before = self._factors_before(unique, self._checked.get(key, -1), other) if len(unique) else None
        if len(unique) and before is None:
            return False
        reg, bias_reg = (model.reg_item, model.bias_reg_item) if side == "item" else (model.reg_user, model.bias_reg_user)
        lam = np.full(d + 1, float(_table(reg)[row]))
        lam[d] = float(_table(bias_reg)[row])
        if own_changed:
            own_f, own_b = (model.item_factors, model.item_bias) if side == "item" else (model.user_factors, model.user_bias)
            theta = np.empty((k, d + 1))
            theta[:, :d] = _table(own_f.weight)[row].reshape(k, d)
            theta[:, d] = _table(own_b.weight)[row]
        else:
            theta = done.theta if done is not None else cached.theta
        drift = theta - cached.theta
        other_f = model.user_factors if side == "item" else model.item_factors
        try:
            gram, weights, reg_weights, scale, shift, eps = updated_weights(
                cached.gram if done is None else done.gram, cached.weights, positions,
                before[np.searchsorted(unique, movers)] if len(unique) else np.zeros((0, k * d), np.float32), added,
                len(added) * lam, _table(other_f.weight), row_now.others, lam * theta, cached.h_max,
                cached.x2_max, np.sqrt((drift ** 2).sum(1)), np.sqrt(((lam * drift) ** 2).sum(1)))
        except ValueError:  # not positive definite (cannot happen with an L2 > 0): rebuild
            return False
        if side == "item" and not np.isfinite(scale):  # (a user row is bounded rating by rating: `h`, `eps`)
            return False
        if row_now is not cached:
            if key in self._rows:
                self._nbytes += row_now.nbytes - cached.nbytes
                self._rows[key] = row_now
            else:
                self._recent[key] = row_now
        self._updates.pop(key, None)  # (re-inserted last: the dict is in the order last updated)
        self._updates[key] = _RowUpdate(gram, weights, reg_weights, theta, lam * theta, moved,
                                        np.full((len(moved), k), np.nan, np.float32), n_moved, float(scale),
                                        float(shift), eps * cached.x2_max + 2.0 ** -23,
                                        np.full((len(moved), k, 2), np.nan, np.float32) if side == "user"
                                        else self._not_updated.alpha_bounds)
        while len(self._updates) > self.updates_kept:  # the least recently updated row: rebuilt when next used
            self._drop(next(iter(self._updates)))
        self._checked[key] = self._clock
        self.counts["updated"] += 1
        return True

    def _build(self, side: str, row: int) -> _NewtonRow:
        """One row from the current tables and ratings (`explain_kernels.newton_row`)."""
        model = self.model
        k, d = model.config.n_blocks, model.block_size
        z, others = self.index.row(side, row)
        others = others.astype(np.int32)
        if side == "user":
            own_f, own_b = model.user_factors.weight, model.user_bias.weight
            other_f, other_b = model.item_factors.weight, model.item_bias.weight
            reg, bias_reg = float(_table(model.reg_user)[row]), float(_table(model.bias_reg_user)[row])
        else:
            own_f, own_b = model.item_factors.weight, model.item_bias.weight
            other_f, other_b = model.user_factors.weight, model.user_bias.weight
            reg, bias_reg = float(_table(model.reg_item)[row]), float(_table(model.bias_reg_item)[row])
        theta = np.empty((k, d + 1))
        theta[:, :d] = _table(own_f)[row].reshape(k, d)
        theta[:, d] = _table(own_b)[row]
        lam = np.full(d + 1, reg)
        lam[d] = bias_reg
        A, A_inv, alpha, beta, h_max, x2_max, h = newton_row(theta, _table(other_f), _table(other_b), others,
                                                          self.train.values[z].astype(np.float64),
                                                          float(model.global_mean), lam)
        if self.learning_rate_sum is None:
            W = A_inv
        else:  # damped by what the row converges in that summed rate
            h, V = np.linalg.eigh(A)
            D = np.einsum("kij,kj,klj->kil", V, -np.expm1(-np.maximum(h, 0.0) * self.learning_rate_sum), V)
            W = np.linalg.solve(A, D)
        updatable = len(z) > self.update_above and self.learning_rate_sum is None
        self.counts["built"] += 1
        if side == "user":  # (bounded rating by rating: no order kept)
            beta, by_beta = np.zeros(0, np.float32), np.zeros(0, np.int32)
        else:
            by_beta = np.argsort(-beta, kind="stable").astype(np.int32)
        return _NewtonRow(z, others, W.astype(np.float32), alpha, lam * theta, beta,
                          by_beta, _lower(A) if updatable else np.zeros((0, 0)),
                          h_max, x2_max, theta if updatable else np.zeros((0, 0)),
                          h if updatable and side == "user" else np.zeros((0, k), np.float32),
                          self.train.values[z].astype(np.float32) if updatable and side == "user"
                          else np.zeros(0, np.float32))

    def _drop(self, key: tuple[str, int]) -> None:
        """Forget a cached row (and its update in place): it is built again when next used."""
        old = self._rows.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes
        self._recent.pop(key, None)
        self._updates.pop(key, None)
        self._checked.pop(key, None)

    def _keep(self, key: tuple[str, int], row: _NewtonRow) -> None:
        """Cache a row just built, current now: in the main cache while it holds less than
        `max_bytes` (a stale row it replaces frees its bytes first), else among the
        `recent_rows` built last."""
        old = self._rows.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes
        self._recent.pop(key, None)
        self._updates.pop(key, None)
        self._checked[key] = self._clock
        if self._nbytes + row.nbytes <= self.max_bytes:
            self._rows[key] = row
            self._nbytes += row.nbytes
        elif self.recent_rows > 0:
            if len(self._recent) >= self.recent_rows:
                oldest = next(iter(self._recent))
                del self._recent[oldest]
                self._checked.pop(oldest, None)
                self._updates.pop(oldest, None)
            self._recent[key] = row
        else:
            self._checked.pop(key, None)

    def current(self, side: str, row: int) -> bool:
        """Whether the ``side`` (``user`` / ``item``) row ``row`` is cached and current (used
        as it is by the next query, not rebuilt)."""
        cached = self._rows.get((side, row), self._recent.get((side, row)))
        return cached is not None and self._staleness(side, row, cached)[0] == "current" \
            and (side, row) not in self._updates

    def updated(self, side: str, row: int) -> bool:
        """Whether the ``side`` row ``row`` is cached and updated in place (`_update`) since
        it was built: some of its raters moved since."""
        return (side, row) in self._updates

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
        if len(order):  # load the scoring kernels too (numba's first call reads its cache)
            self.effects_and_shares(0, 0, top=1)
            self.effects_and_shares(0, 0)
            # and the update in place's (of no moved rating: nothing changes)
            model, up = self.model, self._not_updated
            none = np.zeros(0, np.int64)
            updated_weights(_lower(np.eye(d + 1)[None].repeat(k, 0)), up.weights.astype(np.float32), none,
                            np.zeros((0, k * d), np.float32), none, np.zeros(d + 1), _table(model.user_factors.weight),
                            np.zeros(0, np.int32), up.reg_weights, np.zeros(k), np.ones(k), np.zeros(k), np.zeros(k))
            for a in (none, np.zeros(0, np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32),
                      np.zeros(0, bool)):  # the gained ratings' insertion, per array type
                insert_rows(a, none, a)
            e, users, items = self._empty, _table(model.user_factors.weight), _table(model.item_factors.weight)
            pair_scores_updated(k, e.examples, e.others, e.alpha, e.weights, e.reg_theta, False, e.examples, e.others,
                                up.alpha, e.weights, up.reg_theta, e.beta, e.by_beta, False, users, items, 0, 0, True, 1,
                                np.iinfo(np.int64).max, True, self.prune_chunk, True, up.moved, self.train.values,
                                _table(model.user_bias.weight), up.theta, up.weights, up.reg_weights,
                                float(model.global_mean), 1.0, 0.0, True, up.moved, up.alpha, up.alpha, up.theta,
                                up.weights, up.reg_weights, up.h_spread, _table(model.item_bias.weight), True,
                                up.alpha[:, 0], up.alpha_bounds, e.x2_max)
            pair_scores(k, e.examples, e.others, e.alpha, e.weights, e.reg_theta, True, e.examples, e.others, e.alpha,
                        e.weights, e.reg_theta, e.beta, e.by_beta, False, users, items, 0, 0, True, 1,
                        np.iinfo(np.int64).max, True, self.prune_chunk, True, e.x2_max)

    def effects_and_shares(self, user: int, item: int, *, top: int | None = None,
                           settled_below: int | None = None, user_settled: bool = True, score_user: bool = True
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """``(example ids [n], effects [n], shares_user [n], shares_item [n], candidates)`` like
        `estimate_effects(..., "newton")`, from the cached rows alone (no scan of the ratings);
        ``candidates``: how many ratings share the user or the item.

        ``top``: only the candidates that can be among the ``top`` largest ``|effect|`` need
        be returned: an item row of more than `prune_above` ratings is scored in decreasing
        order of a bound on each rating's effect, stopping when no rating left can reach the
        ``top``-th largest, and a user row of more than `prune_above` ratings or updated in
        place scores only the ratings whose bound can reach it (exact: the same top ``top`` as
        scoring all). Ratings with example
        id ``>= settled_below``, and the user's own unless ``user_settled``, are ones the
        caller re-estimates: always returned, never used to stop. ``score_user`` False: the
        user's own ratings are returned with effect 0 (the caller replaces all of them, as
        for a folded-in user), and their row is not built. One compiled call over the two
        rows (`explain_kernels.pair_scores`)."""
        model = self.model
        settled_below = np.iinfo(np.int64).max if settled_below is None else settled_below
        known_u = 0 <= user < self.train.n_users
        known_i = 0 <= item < self.train.n_items
        ir = self._row("item", item, update=top is not None) if known_i else self._empty
        done = self._updates.get(("item", item)) if known_i else None
        if known_u and score_user:
            ur = self._row("user", user, update=top is not None)
            z_u, others_u = ur.examples, ur.others
        else:
            ur = self._empty
            z_u, others_u = self.index.row("user", user) if known_u else (ur.examples, ur.others)
            others_u = others_u.astype(np.int32)
        done_u = self._updates.get(("user", user)) if known_u and score_user else None
        prune = top is not None and len(ir.examples) > self.prune_above
        # a user row is bounded first when long, or updated in place (its α' are costly to compute)
        prune_user = top is not None and (len(z_u) > self.prune_above or done_u is not None)
        users, items = _table(model.user_factors.weight), _table(model.item_factors.weight)
        if done is None and done_u is None:
            return pair_scores(model.config.n_blocks, z_u, others_u, ur.alpha, ur.weights, ur.reg_theta,
                               known_u and score_user, ir.examples, ir.others, ir.alpha, ir.weights, ir.reg_theta,
                               ir.beta, ir.by_beta, known_i, users, items, user, item, prune, max(top or 1, 1),
                               settled_below, user_settled, self.prune_chunk, prune_user, ur.x2_max)
        up = self._not_updated  # (the side not updated in place: placeholders of the right types)
        i_up, u_up = done or up, done_u or up
        return pair_scores_updated(model.config.n_blocks, z_u, others_u, ur.alpha, ur.weights, u_up.reg_theta
                                   if done_u is not None else ur.reg_theta, known_u and score_user, ir.examples,
                                   ir.others, i_up.alpha if done is not None else ir.alpha, ir.weights,
                                   i_up.reg_theta if done is not None else ir.reg_theta, ir.beta, ir.by_beta, known_i,
                                   users, items, user, item, prune, max(top or 1, 1), settled_below, user_settled,
                                   self.prune_chunk, done is not None, i_up.moved, self.train.values,
                                   _table(model.user_bias.weight), i_up.theta, i_up.weights, i_up.reg_weights,
                                   float(model.global_mean), i_up.beta_scale, i_up.beta_shift, done_u is not None,
                                   u_up.moved, u_up.alpha, ur.h if done_u is not None else up.alpha, u_up.theta,
                                   u_up.weights, u_up.reg_weights, u_up.h_spread, _table(model.item_bias.weight),
                                   prune_user, ur.values if done_u is not None else up.alpha[:, 0],
                                   u_up.alpha_bounds, ur.x2_max)

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
    compiled call, `explain_kernels.fold_in_leave_one_out`: for ``m ≤ D+1`` ratings in the
    ratings' space, an ``m × m`` Cholesky instead of the ``(D+1)²`` solve) and an effect on
    item ``i`` is ``[q_i/K; 1]ᵀV``: a gather and a product. Exact for the ridge (tested
    against re-folding); ``invalidate`` users that rated again and items that online
    learning moved (a user is recomputed when next used if an item it rated moved since)."""

    def __init__(self, model: RatingModel, ratings: Ratings, index: RowIndex | None = None) -> None:
        self.model, self.ratings = model, ratings
        self.index = index if index is not None and index.ratings is ratings else RowIndex(ratings)
        #: per user ``(example ids sorted, V, the clock when computed)``
        self._users: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        self._clock = 0
        self._item_moved = np.zeros(0, np.int64)  # per item, the clock at which it last moved

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached users."""
        return sum(z.nbytes + v.nbytes for z, v, _ in self._users.values())

    def invalidate(self, users: np.ndarray | list[int] | set[int] = (),
                   moved_items: np.ndarray | list[int] = ()) -> None:
        """Drop ``users`` (they rated again) and stamp ``moved_items`` (their parameters
        changed: every cached user who rated one is stale)."""
        moved_items = np.asarray(moved_items, dtype=np.int64)
        self.record(np.fromiter((int(u) for u in users), np.int64), moved_items, np.ones(len(moved_items), bool))

    def record(self, users: np.ndarray, items: np.ndarray, items_moved: np.ndarray) -> None:
        """`invalidate` in the form online ratings come in (`MFExplainer.update`): drop
        ``users`` (int64) and stamp the ``items`` (int64) where ``items_moved`` (bool)."""
        if self._users:
            for u in users.tolist():
                self._users.pop(u, None)
        self._clock += 1
        while True:
            stamped, top = stamp_rows(self._item_moved, items, items_moved, self._clock)
            if top <= len(self._item_moved):
                break
            self._item_moved = np.r_[self._item_moved,
                                     np.zeros(max(top, 2 * len(self._item_moved)) - len(self._item_moved), np.int64)]
        if stamped == 0:  # nothing moved: the clock stays
            self._clock -= 1

    def _user(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """``(example ids [m] sorted, V [m, D+1] float64)`` of one folded-in user."""
        cached = self._users.get(user)
        if cached is not None:
            z, V, at = cached
            items = self.ratings.items[z]
            items = items[items < len(self._item_moved)]
            if not len(items) or int(self._item_moved[items].max()) <= at:
                return z, V
        model, ratings = self.model, self.ratings
        c = model.config
        z = np.sort(self.index.row("user", user)[0])
        V = fold_in_leave_one_out(_table(model.item_factors.weight), _table(model.item_bias.weight), ratings.items[z],
                                  ratings.values[z].astype(np.float64), float(model.global_mean),
                                  float(c.fold_in_reg), float(c.fold_in_bias_reg))
        self._users[user] = (z, V, self._clock)
        return z, V

    def effects(self, user: int, item: int, example_ids: np.ndarray) -> np.ndarray:
        """Effects ``[len(example_ids)]`` (rating points, unclipped prediction) of the user's
        own ratings ``example_ids`` on the prediction of ``item``."""
        z, V = self._user(user)
        c = self.model.config
        target = np.ones(V.shape[1])
        target[:-1] = _table(self.model.item_factors.weight)[item] / c.n_blocks
        return V[np.searchsorted(z, example_ids)] @ target


# --------------------------------------------------------------------------- the explainer
def _prediction(model: RatingModel, user: int, item: int) -> float:
    """`_Rows.prediction` of one pair read straight from the tables (numpy views on the CPU)."""
    lo, hi = model.rating_scale
    return pair_prediction(_table(model.user_factors.weight), _table(model.item_factors.weight),
                           _table(model.user_bias.weight), _table(model.item_bias.weight), user, item,
                           float(model.global_mean), float(lo), float(hi))


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
    whose parameters online learning changed are recomputed on their next use, long item
    rows and user rows updated in place: `NewtonInfluence.update_above`). A named method (`METHODS`) is computed directly per query in float64
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
        self._fold_in: FoldInLeaveOneOut | None = None
        self._index: RowIndex | None = None  # built with the first cache, then extended by `update`

    # ------------------------------------------------------------------ Explainer
    def update(self, ratings: Ratings, new: np.ndarray) -> None:
        """``ratings`` (training + live) grew by the example ids ``new``, whose users' and
        items' rows online learning changed: the cached rows they touch are marked stale
        (stamps, ``O(len(new))``; the moved users' previous factors are kept for updates in
        place) and rebuilt or updated when next used (lazily, so a burst of ratings costs one
        rebuild per row); a folded-in user's leave-one-out is recomputed once an item it rated
        moved."""
        new = np.asarray(new, dtype=np.int64)
        self.ratings = ratings
        if self._index is not None:
            self._index.extend(ratings, new)
        newton = self._newton if self._newton is not None and self._newton.index is self._index else None
        if len(new) == 0 or (newton is None and self._fold_in is None):
            return
        users, items = ratings.users[new], ratings.items[new]
        state = getattr(self.model, "_online", None)  # `recsys.models.mf.online.OnlineState`
        # online SGD moved the users' rows and their items' rows; a fold-in moves no item row
        stepped = np.ones(len(new), bool) if state is None else trained_mask(state.trained, users)
        if newton is not None:
            newton.record(users, items, stepped)
        if self._fold_in is not None:
            self._fold_in.record(users, items, stepped)

    def warm(self) -> None:
        """Precompute the cached Newton rows, those of most ratings first, up to
        `NewtonInfluence.max_bytes` (cached default only; nothing above `warm_below` ratings),
        and load the compiled kernels of the prediction and of fold-in and online users (numba's
        first call of each reads its cache: 5-30 ms the first such explanation would pay) and
        what the model's `path` imports on its first call (14-180 ms at 10^7 ratings)."""
        if self.cached and (self.warm_below is None or len(self.ratings) <= self.warm_below):
            self._cache().warm()
        if self.cached:
            model, ratings, none = self.model, self.ratings, np.zeros(0, np.int64)
            c = model.config
            fold_in_leave_one_out(_table(model.item_factors.weight), _table(model.item_bias.weight),
                                  ratings.items[none], ratings.values[none].astype(np.float64),
                                  float(model.global_mean), float(c.fold_in_reg), float(c.fold_in_bias_reg))
            online_step_scores(_table(model.user_factors.weight), _table(model.item_factors.weight),
                               _table(model.user_bias.weight), _table(model.item_bias.weight), ratings.users[none],
                               ratings.items[none], ratings.values[none].astype(np.float64), float(model.global_mean),
                               0, 0, np.zeros(0, bool), np.zeros(0, bool), 0.0, 0.0, 0.0, 0.0)
            if model.n_users and model.n_items:
                _prediction(model, 0, 0)
            # and `update`'s bookkeeping (of no rating: nothing changes)
            index, one = self._row_index(), np.zeros(1, np.int64)
            extend_row_chains(none, ratings.users, ratings.items, index._first, index._prev["user"], index._prev["item"],
                              index._head["user"], index._head["item"], index._count["user"], index._count["item"])
            row_chain(-1, index._prev["user"], 0, index._first)
            trained_mask(np.zeros(0, bool), none)
            stamp_rows(one, none, np.zeros(0, bool), 0)
            factors = np.zeros((0, model.user_factors.weight.shape[1]), np.float32)
            users_then, items_then = _table(model.user_factors.weight), _table(model.item_factors.weight)
            record_moves(none, none, np.zeros(0, bool), 0, one, one, one, one, none, factors, 0, users_then, factors,
                         users_then, none, factors, 0, items_then, factors, items_then)
            if getattr(model, "path", None) is not None:  # its first call imports the online-learning module
                model.path(0)

    @property
    def row_counts(self) -> dict[str, int]:
        """How many cached Newton rows were built and updated in place so far
        (`NewtonInfluence.counts`: ``{"built": n, "updated": n}``)."""
        return dict(self._newton.counts) if self._newton is not None else {"built": 0, "updated": 0}

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
            pred = rows.prediction(model) if rows is not None else _prediction(model, user, item)
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
                user_settled=not folded, score_user=not folded)
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
        zs = ids[sel]
        out = online_step_scores(
            _table(model.user_factors.weight), _table(model.item_factors.weight), _table(model.user_bias.weight),
            _table(model.item_bias.weight), ratings.users[zs], ratings.items[zs], ratings.values[zs].astype(np.float64),
            float(model.global_mean), user, item, su[sel] & (not folded), si[sel], float(_table(model.reg_user)[user]),
            float(_table(model.bias_reg_user)[user]), float(_table(model.reg_item)[item]),
            float(_table(model.bias_reg_item)[item]))
        eff[sel] = (state.passes * state.learning_rate) * out
        return eff, f"{method} + online steps"

    # ------------------------------------------------------------------ the caches
    def _fold_in_cache(self) -> FoldInLeaveOneOut:
        if self._fold_in is None or self._fold_in.ratings is not self.ratings:
            kept = self._fold_in
            self._fold_in = FoldInLeaveOneOut(self.model, self.ratings, self._row_index())
            if kept is not None:  # the users that did not rate again (`update` dropped those that did)
                self._fold_in._users, self._fold_in._clock = kept._users, kept._clock
                self._fold_in._item_moved = kept._item_moved
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
        return self._newton


__all__ = ["DEFAULT_METHOD", "FALLBACK_REASON", "METHODS", "UNITS", "FoldInLeaveOneOut", "MFExplainer",
           "NewtonInfluence", "RowIndex", "contracted_rollback",
           "candidates", "estimate_effects"]

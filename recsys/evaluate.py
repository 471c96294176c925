"""Accuracy and ranking metrics, and the protocols that compute them for a `RatingModel`
(error metrics and ranking by predicted rating) or a `RankingModel` (top-N ranking).

Metric functions are pure and vectorised: error metrics take predictions and truth (numpy
or torch); ranking metrics take the ``[B, k]`` boolean *hit matrix* of top-k lists (``hits[b,
j]``: the item at rank ``j+1`` of user ``b``'s list is relevant) and per-user relevant counts,
and return one value per user. The protocols batch over ratings or users and return plain
JSON-serialisable dicts (``float``/``int``/``None``).

Relevance: a test item is relevant to its user when the test rating is at least
``relevance_threshold`` (default 4.0, "liked" on a 1-5 scale); for implicit feedback
(``relevance_threshold=None``) every test interaction is relevant. Training items of a user
are excluded from that user's top-k list, because recommending what a user already rated is
not a recommendation. Every model is ranked by its `score_all` through the same code (one
metric code for every model): a `RankingModel` by its scores, a `RatingModel` by its
predicted ratings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from recsys.models.base import RankingModel, RatingModel
from recsys.ratings import CSR, Ratings

ArrayLike = np.ndarray | torch.Tensor
#: what `evaluate_ranking` ranks with: any model with ``score_all`` and the known-id buffers
Scorer = RatingModel | RankingModel


# ---------------------------------------------------------------------------------- rating errors
def _pair(predictions: ArrayLike, truth: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(predictions).to(torch.float64).reshape(-1)
    t = torch.as_tensor(truth).to(device=p.device, dtype=torch.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"predictions have {p.numel()} values, truth has {t.numel()}")
    if p.numel() == 0:
        raise ValueError("no ratings to score")
    return p, t


def rmse(predictions: ArrayLike, truth: ArrayLike) -> float:
    """Root mean squared error of ``predictions [n]`` against ``truth [n]``."""
    p, t = _pair(predictions, truth)
    return float(torch.sqrt(torch.mean((p - t) ** 2)))


def mae(predictions: ArrayLike, truth: ArrayLike) -> float:
    """Mean absolute error of ``predictions [n]`` against ``truth [n]``."""
    p, t = _pair(predictions, truth)
    return float(torch.mean(torch.abs(p - t)))


# ---------------------------------------------------------------------------------- ranking metrics
def _hits(hits: ArrayLike) -> torch.Tensor:
    h = torch.as_tensor(hits)
    if h.dim() != 2:
        raise ValueError(f"hits must be a [B, k] matrix, got shape {tuple(h.shape)}")
    return h.to(torch.float64)


def _undefined_where_none(values: torch.Tensor, n_relevant: ArrayLike) -> torch.Tensor:
    n = torch.as_tensor(n_relevant, device=values.device)
    return torch.where(n > 0, values, torch.full_like(values, math.nan))


def precision_at_k(hits: ArrayLike) -> torch.Tensor:
    """Share of each top-k list that is relevant, ``float64 [B]`` for ``hits [B, k]``."""
    h = _hits(hits)
    return h.sum(dim=1) / h.shape[1]


def recall_at_k(hits: ArrayLike, n_relevant: ArrayLike) -> torch.Tensor:
    """Share of each user's ``n_relevant [B]`` relevant items found in the top-k,
    ``float64 [B]``; NaN where ``n_relevant == 0`` (undefined)."""
    h = _hits(hits)
    n = torch.as_tensor(n_relevant, device=h.device).to(torch.float64)
    return _undefined_where_none(h.sum(dim=1) / n.clamp(min=1), n_relevant)


def _discounts(k: int, device: torch.device) -> torch.Tensor:
    """``1 / log2(rank + 1)`` for ranks ``1..k``, ``float64 [k]``."""
    return 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=device))


def ndcg_at_k(hits: ArrayLike, n_relevant: ArrayLike) -> torch.Tensor:
    """Normalised DCG with binary gains and ``1/log2(rank+1)`` discount, ``float64 [B]``.

    The ideal DCG puts ``min(k, n_relevant)`` hits at the top. NaN where ``n_relevant == 0``.
    """
    h = _hits(hits)
    k = h.shape[1]
    disc = _discounts(k, h.device)
    dcg = h @ disc
    n = torch.as_tensor(n_relevant, device=h.device).to(torch.int64)
    ideal = torch.cumsum(disc, 0)[(n.clamp(1, k) - 1)]
    return _undefined_where_none(dcg / ideal, n_relevant)


def map_at_k(hits: ArrayLike, n_relevant: ArrayLike) -> torch.Tensor:
    """Average precision at k, ``float64 [B]``: the sum over hit ranks ``j`` of
    precision@j, divided by ``min(k, n_relevant)``. NaN where ``n_relevant == 0``."""
    h = _hits(hits)
    k = h.shape[1]
    ranks = torch.arange(1, k + 1, dtype=torch.float64, device=h.device)
    precision_at_rank = torch.cumsum(h, dim=1) / ranks
    n = torch.as_tensor(n_relevant, device=h.device).to(torch.float64)
    ap = (precision_at_rank * h).sum(dim=1) / n.clamp(1, k)
    return _undefined_where_none(ap, n_relevant)


def catalogue_coverage(top_items: ArrayLike, n_items: int) -> float:
    """Share of the ``n_items`` catalogue that appears in at least one top-k list of
    ``top_items`` (item indices ``[B, k]``)."""
    items = torch.as_tensor(top_items).reshape(-1)
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    return float(torch.unique(items).numel()) / n_items


# ---------------------------------------------------------------------------------- protocols
def _check_indices(model: Scorer, ratings: Ratings, what: str) -> None:
    if ratings.n_users > model.n_users or ratings.n_items > model.n_items:
        raise ValueError(
            f"{what} has {ratings.n_users} users x {ratings.n_items} items but the model was "
            f"built for {model.n_users} x {model.n_items}; use the training split's id maps"
        )


def evaluate_ratings(model: RatingModel, test: Ratings, *, batch_size: int = 65536) -> dict:
    """RMSE and MAE of ``model.predict`` on every test rating, plus how many test pairs the
    fallback answered: ``n_unknown_user`` / ``n_unknown_item`` (per ``model.known_users`` /
    ``known_items``) and ``n_fallback`` (either unknown).
    """
    if model.task != "rating":
        raise TypeError(f"{model.name} ranks items and predicts no ratings; use evaluate_ranking")
    if len(test) == 0:
        raise ValueError("evaluate_ratings: the test set is empty")
    _check_indices(model, test, "test")
    was_training = model.training
    model.eval()
    device = model.device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    ab = torch.zeros((), dtype=torch.float64, device=device)
    unknown = torch.zeros(3, dtype=torch.int64, device=device)
    users, items, values = test.tensors(device)
    try:
        with torch.no_grad():
            for start in range(0, len(test), batch_size):
                u = users[start:start + batch_size]
                i = items[start:start + batch_size]
                err = model.predict(u, i).to(torch.float64) - values[start:start + batch_size]
                sq += (err * err).sum()
                ab += err.abs().sum()
                user_known, item_known = model.known_mask(u, i)
                uu, ui = ~user_known, ~item_known
                unknown += torch.stack([uu.sum(), ui.sum(), (uu | ui).sum()])
    finally:
        model.train(was_training)
    n = len(test)
    n_user, n_item, n_fallback = (int(x) for x in unknown.tolist())
    return {
        "rmse": math.sqrt(float(sq) / n),
        "mae": float(ab) / n,
        "n_test": n,
        "n_unknown_user": n_user,
        "n_unknown_item": n_item,
        "n_fallback": n_fallback,
    }


def _csr_entries(csr: CSR, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries of CSR ``rows`` as ``(position of the row in rows, column)``, both
    ``int64 [m]`` — a vectorised gather of several CSR rows at once."""
    starts = csr.indptr[rows]
    counts = csr.indptr[rows + 1] - starts
    total = int(counts.sum())
    row_pos = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return row_pos, csr.columns[offsets + np.arange(total, dtype=np.int64)]


def evaluate_ranking(model: Scorer, train: Ratings, test: Ratings, *, k: int = 10,
                     relevance_threshold: float | None = 4.0, batch_users: int = 1024) -> dict:
    """Top-k metrics of ``model.score_all`` with each user's training items masked out.

    The protocol: a test item is relevant when its test value is at least
    ``relevance_threshold`` (None: every test interaction, for implicit feedback); users
    with at least one relevant test item are evaluated, users with test rows but none
    relevant are skipped (``n_users_skipped``); ``n_relevant`` counts every relevant test
    item of the user (even one the model cannot score), recall divides by it and the ideal
    DCG of NDCG puts ``min(k, n_relevant)`` hits at the top (binary gains). Metric values
    (``precision``, ``recall``, ``ndcg``, ``map``) are means over the evaluated users
    (``n_users``; None when there are none); ``coverage`` is the share of all ``n_items``
    indices in some evaluated user's top-k. ``k`` is capped at ``n_items``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_indices(model, test, "test")
    _check_indices(model, train, "train")
    n_items = model.n_items
    k_eff = min(k, n_items)
    relevant = test if relevance_threshold is None else test.subset(test.values >= relevance_threshold)
    n_relevant = relevant.user_counts()
    test_users = np.flatnonzero(test.user_counts() > 0)
    users = test_users[n_relevant[test_users] > 0]
    n_skipped = len(test_users) - len(users)

    device = model.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    seen = torch.zeros(n_items, dtype=torch.bool, device=device)
    train_csr, relevant_csr = train.by_user, relevant.by_user
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(users), batch_users):
                batch = users[start:start + batch_users]
                b = len(batch)
                scores = model.score_all(torch.from_numpy(batch).to(device)).to(torch.float32)
                mask = torch.zeros((b, n_items), dtype=torch.bool, device=device)
                rows, cols = _csr_entries(train_csr, batch)
                mask[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = True
                scores = scores.masked_fill(mask, -math.inf)
                top_scores, top = torch.topk(scores, k_eff, dim=1)
                rel = torch.zeros((b, n_items), dtype=torch.bool, device=device)
                rows, cols = _csr_entries(relevant_csr, batch)
                rel[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = True
                hits = rel.gather(1, top)
                n_rel = torch.from_numpy(n_relevant[batch]).to(device)
                sums += torch.stack([
                    precision_at_k(hits).sum(),
                    recall_at_k(hits, n_rel).sum(),
                    ndcg_at_k(hits, n_rel).sum(),
                    map_at_k(hits, n_rel).sum(),
                ])
                seen[top[top_scores > -math.inf]] = True  # masked fillers are not shown
    finally:
        model.train(was_training)
    n_eval = len(users)
    means = [float(s) / n_eval if n_eval else None for s in sums.tolist()]
    return {
        "k": k,
        "relevance_threshold": None if relevance_threshold is None else float(relevance_threshold),
        "precision": means[0],
        "recall": means[1],
        "ndcg": means[2],
        "map": means[3],
        "coverage": float(seen.sum()) / n_items if n_eval else None,
        "n_users": n_eval,
        "n_users_evaluated": n_eval,
        "n_users_skipped": n_skipped,
    }


FitFn = Callable[[Ratings], tuple[Scorer, float]]


def cross_validate(fit_fn: FitFn, folds: Sequence[tuple[str, Ratings, Ratings]], *,
                   ranking_k: int | None = None, relevance_threshold: float | None = 4.0) -> dict:
    """Fit and evaluate one model per ``(name, train, test)`` fold.

    ``fit_fn(train) -> (model, fit_seconds)``. Each fold's dict holds ``name``,
    ``fit_seconds``, ``eval_seconds``, the `evaluate_ratings` fields (rating models only:
    ``model.task == "rating"``) and, when ``ranking_k`` is given (a ranking model: 10 when
    it is not), the `evaluate_ranking` fields. Returns ``{"folds": [...], "mean": {...}}``,
    the mean taken per numeric field over the folds where it is defined.
    """
    if not folds:
        raise ValueError("cross_validate needs at least one fold")
    results: list[dict] = []
    for name, train, test in folds:
        model, fit_seconds = fit_fn(train)
        started = time.perf_counter()
        row: dict = {"name": name, "fit_seconds": float(fit_seconds)}
        ranks = model.task == "ranking"
        if not ranks:
            row.update(evaluate_ratings(model, test))
        if ranking_k is not None or ranks:
            row.update(evaluate_ranking(model, train, test, k=ranking_k or 10,
                                        relevance_threshold=relevance_threshold))
        row["eval_seconds"] = time.perf_counter() - started
        results.append(row)
    mean: dict[str, float] = {}
    for key in results[0]:
        values = [r.get(key) for r in results]
        numeric = [float(v) for v in values
                   if isinstance(v, int | float) and not isinstance(v, bool)]
        if numeric:
            mean[key] = sum(numeric) / len(numeric)
    return {"folds": results, "mean": mean}


__all__ = [
    "catalogue_coverage",
    "cross_validate",
    "evaluate_ranking",
    "evaluate_ratings",
    "mae",
    "map_at_k",
    "ndcg_at_k",
    "precision_at_k",
    "recall_at_k",
    "rmse",
]

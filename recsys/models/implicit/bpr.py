"""Bayesian Personalised Ranking (Rendle et al. 2009), fitted by the `implicit` library
(`implicit.bpr.BayesianPersonalizedRanking`; its CUDA backend when the model is on a CUDA device
and the library has one), wrapped as a `recsys.models.base.RankingModel`.

The library's layout, kept as is: factor rows have ``embedding_size + 1`` columns; a user's
last column is fixed at 1 and an item's last column is its bias ``b_i``, so ``score(u, i) =
x_u·y_i + b_i`` is one dot product of the stored rows. Training is hogwild SGD on
``ln σ(s_uj − s_uk) − (reg/2)(|x_u|² + |y_j|² + |y_k|²)`` for a sampled interaction ``(u, j)``
(uniform over interactions) and a negative ``k`` drawn like an interaction's item (so in
proportion to item popularity), resampled when ``u`` has it; ``iterations`` epochs of one step
per interaction.

Fold-in (`BPR.fold_in_user`, online `learn`): the user's row maximises the expected per-step
objective of their steps, item factors and biases fixed,

    F(x) = (1/|P|) Σ_{j∈P} Σ_{k∉P} π_k ln σ((y_j − y_k)·x + b_j − b_k) − (fold_in_reg/2)|x|²,

``P`` the user's items, ``π`` the item popularity over ``k ∉ P`` (normalised). ``F`` is strictly
concave: Newton's method with a backtracking line search finds its maximiser, deterministically
(negatives subsampled by ``π`` past `MAX_PAIRS` pairs). SGD in training stops short of each
user's optimum, so a fitted row and its fold-in are not equal; the fold-in orders the user's
items first as the fitted row does (tested), and ranks validation items as well (`BPRConfig`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch

from recsys.models.implicit.common import (
    ImplicitFactorModel,
    check_common,
    check_interactions,
    check_items,
    library_threads,
    user_item_csr,
)
from recsys.ratings import Ratings

if TYPE_CHECKING:
    from recsys.models.implicit.explain import BPRExplainer

#: above this many (positive, negative) pairs a fold-in subsamples its negatives
MAX_PAIRS = 2_000_000


@dataclass(frozen=True)
class BPRConfig:
    """Hyper-parameters of `BPR`: ``embedding_size`` 64 (the issue's reference); the library's
    documented defaults (``learning_rate=0.01, regularization=0.01``) except ``iterations``: 50,
    not 100, because a validation grid did better: validation slices (20% of the rows,
    `recsys.splits.validation_slice`, seed 0) of the MovieLens-100K u1 and u2 *training* files,
    never the test files; mean NDCG@10 on the slices 0.155 at 100 iterations, 0.179 at 50, 0.181
    at 30, 0.13 at 15-20 (under-fitted), 0.096 at 300; learning rate 0.05 and reg 0.001 were
    worse. ``fold_in_reg``: the ridge weight of a fold-in's objective (None: ``reg``; with every
    user's row replaced by its fold-in, the u1 slice scored 0.190 at None, 0.185 at 0.1, 0.182 at
    1, against 0.184 for the fitted rows). ``num_threads``: the library's threads (0: all cores;
    hogwild SGD, so a run with several threads may not repeat bit for bit)."""

    embedding_size: int = 64
    learning_rate: float = 0.01
    reg: float = 0.01
    iterations: int = 50
    fold_in_reg: float | None = None
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        check_common(self)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.fold_in_reg is not None and not self.fold_in_reg > 0:
            raise ValueError(f"fold_in_reg must be > 0 (or None: reg), got {self.fold_in_reg!r}")


class BPR(ImplicitFactorModel):
    """`implicit`'s BPR as a ranker. Buffers: ``user_factors float32 [n_users, D+1]`` (last
    column 1), ``item_factors float32 [n_items, D+1]`` (last column: the item bias), ``D =
    embedding_size``, plus `RankingModel`'s. ``score(u, i) = user_factors[u] · item_factors[i]``."""

    name = "bpr"
    config_class = BPRConfig
    config: BPRConfig

    def table_width(self) -> int:
        return self.config.embedding_size + 1

    def library_spec(self) -> tuple[Callable[..., Any], type, dict]:
        import implicit.bpr
        import implicit.cpu.bpr

        c = self.config
        options = dict(factors=c.embedding_size, learning_rate=c.learning_rate, regularization=c.reg,
                       iterations=c.iterations, random_state=c.seed)
        return implicit.bpr.BayesianPersonalizedRanking, implicit.cpu.bpr.BayesianPersonalizedRanking, options

    def fit(self, interactions: Ratings, *, progress: bool | None = None) -> dict:
        """Fit on ``interactions`` through the library (``BayesianPersonalizedRanking.fit`` on the
        binary user×item CSR: BPR reads an interaction as "chosen", whatever its value); the
        factors, bias column included, are copied into the buffers. Returns ``fit_seconds``,
        ``backend`` and ``n_interactions``."""
        check_interactions(self, interactions)
        start = time.perf_counter()
        self.prepare(interactions)
        csr = self.csr(interactions)
        gpu = self.use_gpu()
        lib = self.new_library(gpu=gpu)
        with library_threads():
            lib.fit(csr, show_progress=bool(progress))
        if gpu:
            lib = lib.to_cpu()
        self._copy_tables(lib.user_factors, lib.item_factors)
        return {"fit_seconds": time.perf_counter() - start, "backend": "cuda" if gpu else "cpu",
                "n_interactions": int(csr.nnz)}

    # ------------------------------------------------------------------ fold-in
    def fold_in_rows(self, csr: sp.csr_matrix) -> np.ndarray:
        """Rows ``float32 [r, D+1]`` (last column 1) maximising the module docstring's ``F`` for
        the users whose items are the rows of ``csr`` (a row with no entry: zeros, then 1)."""
        c = self.config
        reg = c.reg if c.fold_in_reg is None else c.fold_in_reg
        items = self.item_factors.detach().cpu().numpy().astype(np.float64)
        popularity = self.item_counts.detach().cpu().numpy().astype(np.float64)
        out = np.zeros((csr.shape[0], self.table_width()), dtype=np.float32)
        out[:, -1] = 1.0
        with library_threads():  # one BLAS thread: small products, a pool only spins
            for r in range(csr.shape[0]):
                positives = csr.indices[csr.indptr[r]:csr.indptr[r + 1]]
                if len(positives):
                    rng = np.random.default_rng([c.seed, r])
                    out[r, :-1] = bpr_user_solve(items, positives, popularity, reg, rng)
        return out

    @torch.no_grad()
    def fold_in_user(self, items: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A user's row ``float32 [D+1]`` from the ``items [m]`` they chose (``values`` are only
        checked: BPR reads every interaction as a choice), item factors fixed: the maximiser of
        the module docstring's ``F``. Not installed: `set_user` does that."""
        items_np = torch.as_tensor(items).cpu().numpy().astype(np.int64)
        values_np = torch.as_tensor(values).cpu().numpy().astype(np.float32)
        check_items(self, items_np, values_np)
        csr = user_item_csr(np.zeros(len(items_np), np.int64), items_np, self.interaction_data(values_np),
                            1, self.n_items)
        return torch.from_numpy(self.fold_in_rows(csr)[0]).to(self.device)

    # ------------------------------------------------------------------ explanations
    def explainer(self, ratings: Ratings, log: Any = None, method: str | None = None) -> BPRExplainer:
        """An `recsys.models.base.Explainer` over ``ratings``: BPR's score is not additive in the
        user's interactions, so the split is an approximation, labelled as one (see
        `recsys.models.implicit.explain.BPRExplainer`). ``method``: None or ``approximate``."""
        from recsys.models.implicit.explain import BPRExplainer

        if method not in (None, "approximate"):
            raise ValueError(f"BPR explains by an approximate split only (method 'approximate'), got {method!r}")
        return BPRExplainer(self, ratings)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(z))


def bpr_user_solve(item_factors: np.ndarray, positives: np.ndarray, popularity: np.ndarray, reg: float,
                   rng: np.random.Generator, *, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """The maximiser ``float64 [D]`` of the BPR fold-in objective ``F`` (module docstring) for
    the user whose items are ``positives``: ``item_factors [n_items, D+1]`` (last column: bias),
    ``popularity [n_items]`` the negatives' sampling weights (uniform where they sum to 0)."""
    n_items = item_factors.shape[0]
    positives = np.unique(positives)
    is_pos = np.zeros(n_items, dtype=bool)
    is_pos[positives] = True
    negatives = np.flatnonzero(~is_pos)
    d = item_factors.shape[1] - 1
    if len(negatives) == 0:
        return np.zeros(d)
    pi = popularity[negatives].clip(min=0.0)
    pi = pi / pi.sum() if pi.sum() > 0 else np.full(len(negatives), 1.0 / len(negatives))
    if len(positives) * len(negatives) > MAX_PAIRS:  # unbiased subsample of the π-weighted sum
        m = max(1, MAX_PAIRS // len(positives))
        draws, counts = np.unique(rng.choice(len(negatives), size=m, p=pi), return_counts=True)
        negatives, pi = negatives[draws], counts / m
    yp, bp = item_factors[positives, :d], item_factors[positives, d]
    yn, bn = item_factors[negatives, :d], item_factors[negatives, d]
    n_p = len(positives)

    def objective(x: np.ndarray) -> float:
        margin = (yp @ x + bp)[:, None] - (yn @ x + bn)[None, :]
        return float((_log_sigmoid(margin) @ pi).sum() / n_p - 0.5 * reg * (x @ x))

    x = np.zeros(d)
    value = objective(x)
    for _ in range(max_iter):
        margin = (yp @ x + bp)[:, None] - (yn @ x + bn)[None, :]
        w = _sigmoid(-margin) * pi  # ∂/∂margin of π_k ln σ(margin)
        grad = (yp.T @ w.sum(1) - yn.T @ w.sum(0)) / n_p - reg * x
        h = _sigmoid(margin) * _sigmoid(-margin) * pi  # −∂²/∂margin²
        cross = yp.T @ h @ yn
        curvature = ((yp.T * h.sum(1)) @ yp + (yn.T * h.sum(0)) @ yn - cross - cross.T) / n_p
        step = np.linalg.solve(curvature + reg * np.eye(d), grad)
        decrement = float(grad @ step)
        if decrement / 2 <= tol:
            break
        t = 1.0
        while True:
            candidate = x + t * step
            new_value = objective(candidate)
            if new_value >= value + 0.25 * t * decrement or t < 1e-8:
                break
            t /= 2
        x, value = candidate, new_value
    return x


__all__ = ["BPR", "MAX_PAIRS", "BPRConfig", "bpr_user_solve"]

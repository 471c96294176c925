"""Implicit-feedback ALS (Hu, Koren & Volinsky 2008), fitted by the `implicit` library
(`implicit.als.AlternatingLeastSquares`; its CUDA backend when the model is on a CUDA device and
the library has one), wrapped as a `recsys.models.base.RankingModel`.

The model: user rows ``x_u`` and item rows ``y_i`` (``embedding_size`` columns) minimise
``Σ_{u,i} c_ui (p_ui − x_u·y_i)² + reg (Σ|x_u|² + Σ|y_i|²)`` over *all* pairs, with ``p_ui = 1``
and confidence ``c_ui`` for an interaction, ``p = 0, c = 1`` for every other pair. Given the item
factors, a user's row is the ridge solve

    x_u = (YᵀY + reg·I + Σ_{j∈u} (c_uj − 1) y_j y_jᵀ)⁻¹ Σ_{j∈u} c_uj y_j,

which is what a fold-in computes (the library's ``recalculate_user``) and what makes the score
additive in the user's own interactions: ``x_u·y_i = Σ_j c_uj (y_iᵀ W_u⁻¹ y_j)`` (the library's
``explain``; `recsys.models.implicit.explain.ALSExplainer`).
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
    from recsys.models.implicit.explain import ALSExplainer

CONFIDENCE_RULES = ("scaled", "one-plus")
WEIGHTINGS = ("binary", "values")


@dataclass(frozen=True)
class ALSConfig:
    """Hyper-parameters of `ALS`.

    Defaults: ``embedding_size`` 64 (the issue's reference), ``iterations`` 15 (the library's
    default); ``reg=50, alpha=3, weighting="values"`` replace the library's documented defaults
    (``regularization=0.01, alpha=1``, binary input) because a validation grid did better with
    them: validation slices (20% of the rows, `recsys.splits.validation_slice`, seed 0) of the
    MovieLens-100K u1 and u2 *training* files, never the test files; mean NDCG@10 on the slices
    0.186 at the library's defaults, 0.260 at these (grid: reg 0.01..200, alpha 1..10, binary or
    values weights, scaled or one-plus confidence; one-plus with alpha 1, reg 50 tied at 0.261).

    - ``weighting``: an interaction's weight ``w``: ``binary`` (1 for every interaction) or
      ``values`` (the interaction's value: a play count, a rating).
    - ``confidence``: how ``w`` becomes the confidence ``c``: ``scaled`` (implicit's own rule,
      ``c = alpha·w``) or ``one-plus`` (Hu et al.'s ``c = 1 + alpha·w``). Interactions with
      ``w = 0`` are left out; a negative ``w`` (``values`` only) is the library's "disliked,
      with confidence ``|c|``".
    - ``exact_user_solve``: after the library's fit (whose user rows come from a few
      conjugate-gradient steps), recompute every user's row by the exact solve on the final
      item factors (``recalculate_user``): the served score is then exactly the sum of the
      explanation's contributions, and a fold-in of a fitted user's unchanged interactions
      gives back their row. False keeps the library's rows as they are.
    - ``num_threads``: the library's threads (0: all cores).
    """

    embedding_size: int = 64
    reg: float = 50.0
    alpha: float = 3.0
    confidence: str = "scaled"
    weighting: str = "values"
    iterations: int = 15
    exact_user_solve: bool = True
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        check_common(self)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if self.confidence not in CONFIDENCE_RULES:
            raise ValueError(f"confidence must be one of {CONFIDENCE_RULES}, got {self.confidence!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")


class ALS(ImplicitFactorModel):
    """`implicit`'s ALS as a ranker. Buffers: ``user_factors float32 [n_users, D]``,
    ``item_factors float32 [n_items, D]`` (``D = embedding_size``), plus `RankingModel`'s.
    ``score(u, i) = user_factors[u] · item_factors[i]`` (unitless; higher: ranked earlier)."""

    name = "als"
    config_class = ALSConfig
    config: ALSConfig

    # ------------------------------------------------------------------ the library
    def library_alpha(self) -> float:
        """The ``alpha`` handed to the library, which multiplies the CSR values by it."""
        return self.config.alpha if self.config.confidence == "scaled" else 1.0

    def interaction_data(self, values: np.ndarray) -> np.ndarray:
        """CSR values for interaction weights ``values [m]`` (before the library's ``alpha``):
        ``w`` under ``scaled``; ``sign(w)(1 + alpha|w|)`` under ``one-plus`` (0 where ``w = 0``)."""
        c = self.config
        w = np.ones(len(values), np.float32) if c.weighting == "binary" else np.asarray(values, np.float32)
        if c.confidence == "scaled":
            return w
        return (np.sign(w) * (1.0 + c.alpha * np.abs(w))).astype(np.float32)

    def library_spec(self) -> tuple[Callable[..., Any], type, dict]:
        import implicit.als
        import implicit.cpu.als

        c = self.config
        options = dict(factors=c.embedding_size, regularization=c.reg, alpha=self.library_alpha(),
                       iterations=c.iterations, random_state=c.seed)
        return implicit.als.AlternatingLeastSquares, implicit.cpu.als.AlternatingLeastSquares, options

    # ------------------------------------------------------------------ fitting
    def fit(self, interactions: Ratings, *, progress: bool | None = None) -> dict:
        """Fit on ``interactions`` through the library: the user×item CSR of confidences
        (`interaction_data`, float32), ``AlternatingLeastSquares.fit``, then (``exact_user_solve``)
        ``recalculate_user`` for every user; the factors are copied into the buffers. Returns
        ``fit_seconds``, ``backend`` (``cpu`` or ``cuda``) and ``n_interactions`` (CSR entries)."""
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
            users = lib.user_factors
            if self.config.exact_user_solve:
                users = lib.recalculate_user(np.arange(self.n_users), csr)
        self._copy_tables(users, lib.item_factors)
        return {"fit_seconds": time.perf_counter() - start, "backend": "cuda" if gpu else "cpu",
                "n_interactions": int(csr.nnz)}

    # ------------------------------------------------------------------ fold-in
    def fold_in_rows(self, csr: sp.csr_matrix) -> np.ndarray:
        """The library's ``recalculate_user`` (exact Cholesky solve, item factors fixed) for
        each row of ``csr``: ``float32 [r, D]`` (a row with no entry: zeros)."""
        with library_threads():
            out = self.library().recalculate_user(np.arange(csr.shape[0]), csr)
        return np.asarray(out, dtype=np.float32).reshape(csr.shape[0], -1)

    @torch.no_grad()
    def fold_in_user(self, items: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A user's row ``float32 [D]`` from their interactions with known ``items [m]`` (weights
        ``values [m]``), the item factors fixed: the solve of the module docstring (the library's
        ``recalculate_user``). Not installed: `set_user` does that."""
        items_np = torch.as_tensor(items).cpu().numpy().astype(np.int64)
        values_np = torch.as_tensor(values).cpu().numpy().astype(np.float32)
        check_items(self, items_np, values_np)
        csr = user_item_csr(np.zeros(len(items_np), np.int64), items_np, self.interaction_data(values_np),
                            1, self.n_items)
        return torch.from_numpy(self.fold_in_rows(csr)[0]).to(self.device)

    # ------------------------------------------------------------------ explanations
    def explainer(self, ratings: Ratings, log: Any = None, method: str | None = None) -> ALSExplainer:
        """An `recsys.models.base.Explainer` over ``ratings`` (training first, then those learnt
        online): the exact split of each score over the user's interactions (the library's
        ``explain``). ``log`` is ignored; ``method`` must be None or ``exact``."""
        from recsys.models.implicit.explain import ALSExplainer

        if method not in (None, "exact"):
            raise ValueError(f"ALS explains by the exact user-solve split only (method 'exact'), got {method!r}")
        return ALSExplainer(self, ratings)


__all__ = ["ALS", "ALSConfig", "CONFIDENCE_RULES", "WEIGHTINGS"]

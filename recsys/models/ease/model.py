"""EASE (Steck 2019, "Embarrassingly shallow autoencoders for sparse data"): an item-item
ranking model in closed form.

With ``X`` the users × items matrix of interaction weights, the item-item weights are

    G = XᵀX + λI,   P = G⁻¹,   B_ij = −P_ij / P_jj  (i ≠ j),   B_jj = 0

and user ``u``'s scores are ``s_u = x_u·B``: ``s_ui = Σ_j x_uj·B_ji``, a sum over the user's
own interactions ``j``. So a user's scores are a function of their row alone (fold-in of a new
or changed user is exact, no refit), and each interaction's share of a score is exact
(`recsys.models.ease.explain`).

Memory: the fit holds about three dense ``n_items × n_items`` float64 matrices (``G``, the
LU workspace, ``P``); the dense model stores ``B`` as float32. ``max_items`` guards against
catalogues that would not fit (a clear `ValueError` at construction); ``top_k`` pruning stores
and scores only the ``top_k`` largest weights of each item's column (see `EASEConfig`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from recsys.models.base import RankingModel
from recsys.models.ease.rows import UserRows
from recsys.ratings import Ratings

WEIGHTINGS = ("auto", "liked", "value", "binary")
#: `EASEConfig.cold_weight`'s default (chosen on validation slices: see ``benchmarks/tune_ease.py``)
COLD_WEIGHT_DEFAULT = 6.0


@dataclass
class EASEConfig:
    """EASE's settings. The defaults were chosen on validation slices carved from the
    training folds u1..u5 of MovieLens-100K only (15% of each user's training ratings held
    out at random; NDCG@10 with relevant = rating >= 4; the test files were not read while
    choosing): see ``benchmarks/tune_ease.py`` and ``benchmarks/results/tune_ease.json``. The
    best mean validation NDCG@10 of the grid reg ∈ {50, 100, 200, 300, 500, 800} ×
    disliked_weight ∈ {1, 0.5, 0.35, 0.2} × gram_weights on/off was ``reg=200``,
    ``disliked_weight=0.5``, ``gram_weights=True`` (0.2433; reg 300 tied within 1e-5, binary
    EASE's best 0.2295): these are the defaults, with ``weighting="auto"`` (liked weighting on
    star ratings, the values as weights on implicit feedback).

    ``cold_weight=6`` (the popularity prior) was chosen after them, on training folds only:
    20% of each fold's users with more than 5 training ratings held out of the fit, k of their
    training ratings revealed by ``learn``, the rest their validation targets. Mean over u1..u5
    of the cold validation NDCG@10 at k = 1 / 3 / 5: 0.233 / 0.296 / 0.323 without the prior
    (popularity: 0.295 / 0.289 / 0.286), 0.296 / 0.337 / 0.351 at ``cold_weight=6``; the warm
    validation NDCG@10 (the 15% slices above) 0.2433 -> 0.2416, within the 0.002 allowed (8:
    0.2408, over it; the grid 0..50 is in ``tune_ease.json`` under ``cold_prior``).

    Attributes:
        reg: λ, the ridge on the item-item weights (added to the Gram matrix's diagonal), in
            units of (squared) interaction weights.
        weighting: how an interaction's value becomes its weight ``x_uj``: ``liked`` (1 when
            the value is at least ``liked_threshold``, else ``disliked_weight``: for explicit
            ratings), ``value`` (the value itself: implicit feedback with weights), ``binary``
            (1 for every interaction) or ``auto``: ``liked`` when the data's rating scale
            straddles ``liked_threshold`` (explicit ratings such as 1..5 stars), ``value``
            otherwise (plain implicit feedback, whose values are all 1).
        liked_threshold: the value at which an explicit rating counts as liked.
        disliked_weight: the weight of an interaction below ``liked_threshold`` (``liked``).
        gram_weights: the Gram matrix ``XᵀX`` uses the same weights as the users' input rows
            (True) or a binary ``X`` (False).
        top_k: None: keep the dense ``B`` (``n_items²`` float32). An integer: keep, for each
            item ``i`` (a column of ``B``), the ``top_k`` source items ``j`` with the largest
            ``|B_ji|`` (buffers ``neighbours`` int64 and ``weights`` float32 ``[n_items,
            top_k]``; row ``i`` holds column ``i``), so a score is a sparse product; the fit
            still inverts the dense Gram matrix.
        max_items: the largest catalogue the model agrees to hold (the memory guard): past it
            the constructor raises a `ValueError` with the memory the fit would need.
        cold_weight: ``c``, the strength of the popularity prior for users with few
            interactions (see `EASE.prior_scores`): user ``u`` with ``n_u >= 1`` distinct
            interactions is scored ``x_u·B + c/(n_u + c) · m_u · item_counts/max(item_counts)``,
            ``m_u = max_i |(x_u·B)_i|`` (the user's own largest EASE score, so the prior is on
            the scale of that user's scores); the prior's share ``c/(n_u + c)`` is 1/2 at
            ``n_u = c`` and vanishes as ``n_u`` grows. ``0`` turns it off (pure ``x_u·B``). A
            user with no interaction gets ``item_counts`` itself (the popularity ranking, the
            rule's limit at ``n_u = 0`` up to a positive factor). The default was chosen on
            validation only (``benchmarks/tune_ease.py``: cold-start slices carved from the
            training folds); see the module's docstring for its figures.
    """

    reg: float = 200.0
    weighting: str = "auto"
    liked_threshold: float = 4.0
    disliked_weight: float = 0.5
    gram_weights: bool = True
    top_k: int | None = None
    max_items: int = 20_000
    cold_weight: float = COLD_WEIGHT_DEFAULT

    def __post_init__(self) -> None:
        if not (isinstance(self.reg, int | float) and math.isfinite(self.reg) and self.reg > 0):
            raise ValueError(f"EASE reg must be a positive number, got {self.reg!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"EASE weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        if not (math.isfinite(self.disliked_weight) and self.disliked_weight >= 0):
            raise ValueError(f"EASE disliked_weight must be >= 0, got {self.disliked_weight!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k
                                       or self.top_k < 1):
            raise ValueError(f"EASE top_k must be a positive integer or None, got {self.top_k!r}")
        if int(self.max_items) < 1:
            raise ValueError(f"EASE max_items must be positive, got {self.max_items!r}")
        if not (isinstance(self.cold_weight, int | float) and not isinstance(self.cold_weight, bool)
                and math.isfinite(self.cold_weight) and self.cold_weight >= 0):
            raise ValueError(f"EASE cold_weight must be a number >= 0, got {self.cold_weight!r}")


def fit_memory_bytes(n_items: int) -> int:
    """The fit's peak memory estimate: three dense ``n_items²`` float64 matrices (Gram matrix,
    LU workspace, inverse)."""
    return 3 * 8 * int(n_items) ** 2


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def check_memory(n_items: int, config: EASEConfig) -> None:
    """The memory guard: a `ValueError` naming the item count and the memory needed when
    ``n_items`` exceeds ``config.max_items``."""
    if n_items <= config.max_items:
        return
    need = (f"EASE over {n_items:,} items needs about {_gb(fit_memory_bytes(n_items))} to fit (three dense "
            f"{n_items:,}x{n_items:,} float64 matrices), more than max_items={config.max_items:,} allows")
    if config.top_k is None:
        advice = (f"; the dense weight matrix alone takes {_gb(4 * n_items ** 2)}: top_k pruning (e.g. "
                  f"top_k=200: {_gb(12 * n_items * 200)}) stores and scores only n_items x top_k weights, "
                  "but the fit still inverts the dense Gram matrix, so raise max_items only where that "
                  "memory is there, or use a factor model (als, bpr) for a catalogue this large")
    else:
        advice = ("; top_k pruning shrinks the stored weights, not the fit: raise max_items only where "
                  "that memory is there, or use a factor model (als, bpr) for a catalogue this large")
    raise ValueError(need + advice)


class EASE(RankingModel):
    """The EASE item-item model (see the module's docstring); registered as ``ease``.

    Buffers (fixed by ``n_items`` and the config, so artefacts load them): dense, ``weights``
    float32 ``[n_items, n_items]`` = ``B`` (row ``j`` = source item, column ``i`` = scored
    item); pruned (``top_k``), ``neighbours`` int64 and ``weights`` float32 ``[n_items, k]``
    with ``k = min(top_k, n_items)``: row ``i`` lists the source items ``j`` kept for item
    ``i`` (sorted by index) and their ``B_ji``. Scores come from the interactions bound by
    `bind_ratings` (training, then those `learn` adds).
    """

    name = "ease"

    def __init__(self, n_users: int, n_items: int, rating_scale: tuple[float, float] = (0.0, 1.0),
                 config: EASEConfig | None = None) -> None:
        super().__init__(n_users, n_items, rating_scale)
        self.config = config or EASEConfig()
        check_memory(n_items, self.config)
        if self.config.top_k is None:
            self.register_buffer("weights", torch.zeros(n_items, n_items))
        else:
            k = min(int(self.config.top_k), n_items)
            self.register_buffer("neighbours", torch.zeros(n_items, k, dtype=torch.int64))
            self.register_buffer("weights", torch.zeros(n_items, k))
        self._rows: UserRows | None = None
        self._sparse_cache: tuple[tuple, torch.Tensor] | None = None
        #: bumped whenever the rows scores are computed from change (`bind_ratings`, `learn`)
        self._rows_version = 0
        #: the last single user's ``(key, ease, prior, degree)`` (numpy, float32 [n_items]):
        #: a recommendation and the explanations of its items score the user once
        self._last_user: tuple[tuple, np.ndarray, np.ndarray, int] | None = None
        self._weights_view: tuple[torch.Tensor, np.ndarray] | None = None

    @property
    def pruned(self) -> bool:
        return self.config.top_k is not None

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    # ------------------------------------------------------------------ weighting
    @property
    def input_weighting(self) -> str:
        """The weighting in force (``auto`` resolved against the rating scale)."""
        c = self.config
        if c.weighting != "auto":
            return c.weighting
        lo, hi = self.rating_scale
        return "liked" if lo < c.liked_threshold <= hi else "value"

    def input_weights(self, values: np.ndarray) -> np.ndarray:
        """Interaction values ``[m]`` -> input weights ``x_uj`` ``float32 [m]``."""
        values = np.asarray(values, dtype=np.float32)
        mode = self.input_weighting
        if mode == "liked":
            return np.where(values >= self.config.liked_threshold, 1.0,
                            self.config.disliked_weight).astype(np.float32)
        if mode == "binary":
            return np.ones_like(values)
        return values

    def _gram_weights(self, values: np.ndarray) -> np.ndarray:
        return self.input_weights(values) if self.config.gram_weights else np.ones(len(values), np.float32)

    # ------------------------------------------------------------------ fit
    def bind_ratings(self, ratings: Ratings) -> None:
        """Keep the interactions of ``ratings`` by user (the rows scores are computed from)."""
        self._rows = UserRows(ratings)
        self._rows_version += 1

    def fit(self, interactions: Ratings, *, progress: bool | None = None) -> dict:
        """Fit ``B`` on ``interactions`` in closed form (float64, on the model's device: torch
        on CUDA where the model is there). Returns ``fit_seconds``, ``n_items``, ``reg``, the
        weighting in force and the number of weights kept."""
        if interactions.n_items != self.n_items or interactions.n_users > self.n_users:
            raise ValueError(f"EASE built for {self.n_users} users x {self.n_items} items cannot fit "
                             f"interactions over {interactions.n_users} x {interactions.n_items}")
        started = time.perf_counter()
        self.prepare(interactions)
        rows = self._rows
        assert rows is not None
        x = rows.matrix(np.arange(interactions.n_users), self.n_items, self._gram_weights).astype(np.float64)
        gram = torch.from_numpy((x.T @ x).toarray()).to(self.device)
        del x
        gram.diagonal().add_(float(self.config.reg))
        p = torch.linalg.inv(gram)  # LU: several times faster than cholesky_inverse on CPU torch
        del gram
        b = p.div_(-p.diagonal().clone())  # B_ij = -P_ij / P_jj (column j scaled)
        b.fill_diagonal_(0.0)
        with torch.no_grad():
            if not self.pruned:
                self.weights.copy_(b)
            else:
                self._prune(b)
        self._sparse_cache = None
        return {"fit_seconds": time.perf_counter() - started, "n_items": self.n_items,
                "n_users": int(interactions.n_users), "reg": float(self.config.reg),
                "weighting": self.input_weighting, "gram_weights": bool(self.config.gram_weights),
                "weights_kept": int(self.weights.numel())}

    def _prune(self, b: torch.Tensor, block: int = 2048) -> None:
        """Keep the ``k`` largest ``|B_ji|`` of each column ``i`` (ties: the lower index ``j``)."""
        k = self.weights.shape[1]
        for start in range(0, self.n_items, block):
            cols = b[:, start:start + block].T  # [blk, n]: row = scored item i, entries B_ji
            top = torch.topk(cols.abs(), k, dim=1, sorted=False).indices
            top = torch.sort(top, dim=1).values
            self.neighbours[start:start + block] = top
            self.weights[start:start + block] = cols.gather(1, top).float()

    # ------------------------------------------------------------------ scoring
    def _require_rows(self) -> UserRows:
        if self._rows is None:
            raise RuntimeError("EASE has no interactions bound: fit it, or load it with recsys.artefact.load_artefact")
        return self._rows

    def _sparse_bt(self) -> torch.Tensor:
        """The pruned ``Bᵀ`` as a coalesced sparse COO ``[n_items, n_items]`` (row ``i``: the
        kept weights of column ``i``), cached until the buffers change."""
        key = (self.weights.data_ptr(), self.weights._version, self.neighbours._version, str(self.device))
        if self._sparse_cache is None or self._sparse_cache[0] != key:
            n, k = self.neighbours.shape
            rows = torch.arange(n, device=self.device).repeat_interleave(k)
            idx = torch.stack([rows, self.neighbours.reshape(-1)])
            mat = torch.sparse_coo_tensor(idx, self.weights.reshape(-1), (n, n), check_invariants=False).coalesce()
            self._sparse_cache = (key, mat)
        return self._sparse_cache[1]

    def score_rows(self, x: sp.csr_matrix) -> torch.Tensor:
        """Scores ``x·B`` for weighted input rows ``x`` (scipy CSR ``[B, n_items]``), ``float32
        [B, n_items]`` on the model's device."""
        if not self.pruned and x.shape[0] <= 8:
            # a few users (serving): gather the rows of B their interactions select,
            # O(nnz · n_items) instead of the dense product's O(B · n_items²)
            out = torch.zeros(x.shape[0], self.n_items, device=self.device)
            for r in range(x.shape[0]):
                lo, hi = int(x.indptr[r]), int(x.indptr[r + 1])
                if hi > lo:
                    idx = torch.from_numpy(x.indices[lo:hi].astype(np.int64)).to(self.device)
                    w = torch.from_numpy(x.data[lo:hi].astype(np.float32)).to(self.device)
                    out[r] = w @ self.weights.index_select(0, idx)
            return out
        dense = torch.from_numpy(x.toarray().astype(np.float32)).to(self.device)
        if not self.pruned:
            return dense @ self.weights
        return torch.sparse.mm(self._sparse_bt(), dense.T).T.contiguous()

    def prior_scores(self, ease_scores: torch.Tensor, degrees: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The popularity prior added to users' EASE scores, ``float32 [B, n_items]``:
        ``c/(n_u + c) · m_u · item_counts/max(item_counts)`` with ``c`` =
        `EASEConfig.cold_weight`, ``n_u`` = ``degrees [B]`` (the user's distinct
        interactions) and ``m_u = max_i |ease_scores[u, i]|`` (``ease_scores [B, n_items]``
        = ``x_u·B``). Zeros when ``c = 0``, when no item has been seen, or for a user whose EASE
        scores are all zero."""
        c = float(self.config.cold_weight)
        out = torch.zeros_like(ease_scores)
        top = float(self.item_counts.max()) if self.n_items else 0.0
        if c == 0.0 or top <= 0.0:
            return out
        n = torch.as_tensor(np.asarray(degrees), dtype=torch.float32, device=ease_scores.device).reshape(-1)
        share = c / (n + c)
        scale = ease_scores.abs().amax(dim=1) if ease_scores.shape[1] else torch.zeros_like(n)
        pop = (self.item_counts / top).to(ease_scores.device)
        return (share * scale)[:, None] * pop[None, :]

    def score_parts(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """``(x_u·B, prior, degrees)`` of index tensor ``users [B]``: the EASE scores and the
        popularity prior (`prior_scores`), both ``float32 [B, n_items]``, and each user's
        number of interactions ``int64 [B]`` (0 for ``-1`` and users with none, whose score is
        the popularity ranking instead)."""
        rows = self._require_rows()
        u = users.detach().cpu().numpy().astype(np.int64).reshape(-1)
        if (u >= self.n_users).any():
            raise IndexError("user index beyond the model's tables")
        if len(u) == 1 and self.device.type == "cpu":
            ease1, prior1, degree = self.user_parts(int(u[0]))
            return (torch.from_numpy(ease1.copy())[None], torch.from_numpy(prior1.copy())[None],
                    np.array([degree], dtype=np.int64))
        ease = self.score_rows(rows.matrix(u, self.n_items, self.input_weights))
        degrees = rows.degrees(u)
        return ease, self.prior_scores(ease, degrees), degrees

    def user_parts(self, user: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One user's ``(x_u·B, prior, degree)`` as in `score_parts` (``float32 [n_items]``
        each, numpy, CPU models), computed with numpy (a single user's few hundred
        multiply-adds per item cost less than the tensor and sparse-matrix set-up around
        them) and kept until the user, the rows or the weights change: treat them as
        read-only."""
        key = (int(user), self._rows_version, self.weights._version, self.weights.data_ptr(),
               float(self.config.cold_weight))
        last = self._last_user
        if last is not None and last[0] == key:
            return last[1], last[2], last[3]
        items, values, _ = self._require_rows().row(int(user)) if user >= 0 else (np.zeros(0, np.int64), None, None)
        ease = np.zeros(self.n_items, dtype=np.float32)
        if len(items):
            w = self.input_weights(values)
            if not self.pruned:
                weights = self._weights_numpy()
                for start in range(0, len(items), 256):  # a gather of at most 256 rows of B at a time
                    ease += w[start:start + 256] @ weights[items[start:start + 256]]
            else:
                x = sp.csr_matrix((w, items, [0, len(items)]), shape=(1, self.n_items))
                ease = self.score_rows(x)[0].numpy()
        prior = np.zeros(self.n_items, dtype=np.float32)
        c = float(self.config.cold_weight)
        counts = self.item_counts.detach().numpy()
        top = float(counts.max()) if self.n_items else 0.0
        if c > 0.0 and top > 0.0 and self.n_items:
            prior = (c / (len(items) + c) * float(np.abs(ease).max()) / top * counts).astype(np.float32)
        self._last_user = (key, ease, prior, len(items))
        return ease, prior, len(items)

    def _weights_numpy(self) -> np.ndarray:
        """``weights`` as a numpy view (CPU), kept while the buffer is the same tensor."""
        w = self.weights
        if self._weights_view is None or self._weights_view[0] is not w:
            self._weights_view = (w, w.detach().numpy())
        return self._weights_view[1]

    def source_weights(self, sources: np.ndarray, item: int) -> np.ndarray:
        """``B_j,item`` for the source items ``sources [m]``, ``float32 [m]`` (pruned: 0 where
        ``j`` is not among the weights kept for ``item``)."""
        sources = np.asarray(sources, dtype=np.int64)
        if not self.pruned:
            return self._weights_numpy()[sources, item] if self.device.type == "cpu" else \
                self.weights[torch.from_numpy(sources).to(self.device), item].cpu().numpy()
        kept, w = self.item_weights(item)
        pos = np.searchsorted(kept, sources).clip(max=max(len(kept) - 1, 0))
        hit = kept[pos] == sources if len(kept) else np.zeros(len(sources), bool)
        return np.where(hit, w[pos] if len(kept) else 0.0, 0.0).astype(np.float32)

    def source_weights_many(self, sources: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``B_j,i`` for the source items ``sources [m]`` and scored items ``items [n]``,
        ``float32 [m, n]`` (`source_weights` of each item, in one gather where ``B`` is dense)."""
        sources = np.asarray(sources, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if self.pruned or self.device.type != "cpu":
            out = np.empty((len(sources), len(items)), dtype=np.float32)
            for column, item in enumerate(items.tolist()):
                out[:, column] = self.source_weights(sources, item)
            return out
        return self._weights_numpy()[np.ix_(sources, items)]

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Scores ``float32 [B, n_items]`` of index tensor ``users [B]``: ``x_u·B`` plus the
        popularity prior (`prior_scores`; none at ``cold_weight = 0``) for users with
        interactions, the popularity ranking (``item_counts``) for ``-1`` and users with none."""
        ease, prior, degrees = self.score_parts(users)
        scores = ease + prior if self.config.cold_weight else ease
        cold = torch.from_numpy(degrees == 0).to(self.device)
        if bool(cold.any()):
            scores = torch.where(cold[:, None], self.popularity_scores(len(degrees)), scores)
        return scores

    # ------------------------------------------------------------------ fold-in and online
    @torch.no_grad()
    def fold_in_user(self, items: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The score row ``float32 [n_items]`` of a user with interactions ``items [m]`` and
        ``values [m]``, everything else fixed (exact: EASE's score, the popularity prior
        included, is a function of the row). With no interactions: the popularity ranking."""
        items_np = torch.as_tensor(items).cpu().numpy().astype(np.int64).reshape(-1)
        values_np = torch.as_tensor(values).cpu().numpy().astype(np.float32).reshape(-1)
        if len(items_np) != len(values_np):
            raise ValueError(f"fold_in_user: {len(items_np)} items but {len(values_np)} values")
        if len(items_np) and (items_np.min() < 0 or items_np.max() >= self.n_items):
            raise ValueError(f"fold_in_user: item indices must lie in 0..{self.n_items - 1}")
        if not len(items_np):
            return self.popularity_scores(1)[0]
        # an item given twice keeps its last value, as a rating given again does
        last = len(items_np) - 1 - np.unique(items_np[::-1], return_index=True)[1]
        items_np, values_np = items_np[last], values_np[last]
        x = sp.csr_matrix((self.input_weights(values_np), items_np, [0, len(items_np)]), shape=(1, self.n_items))
        ease = self.score_rows(x)
        if not self.config.cold_weight:
            return ease[0]
        return (ease + self.prior_scores(ease, np.array([len(items_np)])))[0]

    def start_online(self, train: Ratings, *, log: object | None = None,
                     learning_rate: float | None = None) -> None:
        """Nothing to prepare: online learning changes the users' rows, not ``B`` (no log, no
        learning rate)."""

    def learn(self, ratings: Ratings, new: np.ndarray) -> None:
        """Take the example ids ``new`` of ``ratings`` (training + live) into the users' rows:
        their scores change at once (exact fold-in; ``B`` is fixed). Users added to the id
        map grow the tables; items are fixed (an unknown item is a `ValueError`). When the rows
        before ``new`` are not those the model holds, it rebinds to all of ``ratings``."""
        new = np.asarray(new, dtype=np.int64)
        if ratings.n_items > self.n_items and len(new) and int(ratings.items[new].max()) >= self.n_items:
            raise ValueError(f"EASE cannot learn interactions with items it was not fitted on "
                             f"(it has {self.n_items} items); refit to add items")
        self._grow(ratings.n_users)
        self._rows_version += 1
        rows = self._rows
        if rows is None or rows.n_rows != len(ratings) - len(new):
            self.bind_ratings(ratings)
            touched = np.unique(ratings.users)
        else:
            touched = rows.add(ratings, new)
        if len(touched):
            if self.device.type == "cpu":  # a numpy view: a torch index assignment costs ~15 us a call
                self.known_users.numpy()[touched] = True
            else:
                self.known_users[torch.from_numpy(touched).to(self.device)] = True

    def _grow(self, n_users: int) -> None:
        if n_users <= self.n_users:
            return
        extra = torch.zeros(n_users - self.n_users, dtype=torch.bool, device=self.device)
        self.known_users = torch.cat([self.known_users, extra])
        self.n_users = n_users

    def path(self, user: int) -> str:
        """``model`` for a user with interactions, ``popularity`` for ``-1`` or one with none."""
        rows = self._rows
        if rows is None or user < 0 or user >= self.n_users or rows.degree(int(user)) == 0:
            return "popularity"
        return "model"

    def user_row(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The interactions the model scores index ``user`` from: ``(items int64 [m], values
        float32 [m], example ids int64 [m])``, sorted by item."""
        return self._require_rows().row(int(user))

    def item_weights(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """Column ``item`` of ``B`` as ``(source items int64 [m], B_j,item float32 [m])``:
        all items (dense) or the ``top_k`` kept (pruned)."""
        if not self.pruned:
            return np.arange(self.n_items), self.weights[:, item].detach().cpu().numpy()
        return self.neighbours[item].detach().cpu().numpy(), self.weights[item].detach().cpu().numpy()

    # ------------------------------------------------------------------ explanations
    def explainer(self, ratings: Ratings, log: object | None = None, method: str | None = None):
        """The exact explainer (`recsys.models.ease.explain.EASEExplainer`) over ``ratings``
        (the interactions the model holds: training first, then those learnt); ``log`` is not
        used; ``method`` None or ``exact``."""
        from recsys.models.ease.explain import METHOD, EASEExplainer

        if method not in (None, "exact", METHOD):
            raise ValueError(f"EASE explains by {METHOD!r}, not {method!r}")
        return EASEExplainer(self, ratings)


__all__ = ["COLD_WEIGHT_DEFAULT", "EASE", "WEIGHTINGS", "EASEConfig", "check_memory", "fit_memory_bytes"]

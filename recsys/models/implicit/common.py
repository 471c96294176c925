"""What the two `implicit` wrappers (`ALS`, `BPR`) share: the factor tables as fixed-shape
buffers, scoring, the user×item CSR handed to the library, and online fold-in bookkeeping.

``import implicit`` in this package is an absolute import: it names the third-party library
(`implicit.als`, `implicit.bpr`, `implicit.gpu`), never this package (``recsys.models.implicit``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from recsys.models.base import RankingModel
from recsys.ratings import Ratings
from recsys.threads import torch_threads_kept

#: `path` labels
PATH_MODEL, PATH_FOLD_IN, PATH_POPULARITY = "model", "fold-in", "popularity"


def check_common(config: Any) -> None:
    """Clear errors for the fields both configs share (called by their ``__post_init__``)."""
    if not isinstance(config.embedding_size, int) or config.embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive integer, got {config.embedding_size!r}")
    if not isinstance(config.iterations, int) or config.iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {config.iterations!r}")
    if not config.reg >= 0:
        raise ValueError(f"reg must be >= 0, got {config.reg!r}")
    if not isinstance(config.num_threads, int) or config.num_threads < 0:
        raise ValueError(f"num_threads must be an integer >= 0 (0: all cores), got {config.num_threads!r}")
    if not isinstance(config.seed, int):
        raise ValueError(f"seed must be an integer, got {config.seed!r}")


def check_interactions(model: RankingModel, interactions: Ratings) -> None:
    """Clear errors for interactions the model cannot fit on."""
    if len(interactions) == 0:
        raise ValueError(f"{model.name}: no interactions to fit on")
    if (interactions.n_users, interactions.n_items) != (model.n_users, model.n_items):
        raise ValueError(f"{model.name}: the interactions index {interactions.n_users} users and "
                         f"{interactions.n_items} items, the model was built for {model.n_users} and "
                         f"{model.n_items}")


def check_items(model: RankingModel, items: np.ndarray, values: np.ndarray) -> None:
    if len(items) != len(values):
        raise ValueError(f"fold_in_user: {len(items)} items but {len(values)} values")
    if len(items) and (items.min() < 0 or items.max() >= model.n_items):
        raise IndexError(f"fold_in_user: item index outside the model's {model.n_items} items")


@contextlib.contextmanager
def library_threads() -> Iterator[None]:
    """Around a call into `implicit`: BLAS single-threaded (implicit parallelises over users
    itself and warns when OpenBLAS keeps its own pool) and torch's thread count kept (the
    library's OpenMP runtime may reset it; see `recsys.threads`)."""
    with torch_threads_kept(), threadpool_limits(1, "blas"):
        yield


def latest_rows(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Row indices ``int64 [m]`` keeping, for each (user, item) pair, its last row (a pair
    received again online carries its latest value), in row order."""
    key = users.astype(np.int64) * max(n_items, 1) + items.astype(np.int64)
    _, last_from_end = np.unique(key[::-1], return_index=True)
    return np.sort(len(key) - 1 - last_from_end)


def user_item_csr(users: np.ndarray, items: np.ndarray, data: np.ndarray, n_users: int,
                  n_items: int) -> sp.csr_matrix:
    """The ``float32 [n_users, n_items]`` CSR the library fits on (sorted column indices; one
    entry per pair, the latest row's). Entries whose ``data`` is 0 are dropped: they carry no
    signal and the library would read a zero confidence as "observed with weight 0"."""
    keep = latest_rows(users, items, n_items)
    users, items, data = users[keep], items[keep], np.asarray(data, dtype=np.float32)[keep]
    nz = data != 0
    csr = sp.csr_matrix((data[nz], (users[nz], items[nz])), shape=(n_users, n_items), dtype=np.float32)
    csr.sort_indices()
    return csr


@dataclass
class OnlineState:
    """What online learning remembers: how many rows of the online ratings the model was
    fitted on (``n_trained``) and which users' rows were since recomputed by a fold-in
    (``folded``)."""

    n_trained: int
    folded: set[int] = field(default_factory=set)


class ImplicitFactorModel(RankingModel):
    """A ranker whose state is the library's two factor tables, copied into buffers:
    ``user_factors float32 [n_users, W]`` and ``item_factors float32 [n_items, W]`` (``W`` =
    `table_width`: ``embedding_size`` for ALS, ``embedding_size + 1`` for BPR, whose last column
    holds 1 for users and the item bias for items). ``score(u, i) = user_factors[u] ·
    item_factors[i]``. Subclasses fit through the library (`fit`) and solve one user's row
    from their interactions with the items fixed (`fold_in_user`)."""

    config_class: ClassVar[type]

    def __init__(self, n_users: int, n_items: int, rating_scale: tuple[float, float] = (0.0, 1.0),
                 config: Any = None) -> None:
        super().__init__(n_users, n_items, rating_scale)
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, "
                            f"got {type(self.config).__name__}")
        width = self.table_width()
        self.register_buffer("user_factors", torch.zeros(n_users, width))
        self.register_buffer("item_factors", torch.zeros(n_items, width))
        self._online: OnlineState | None = None
        self._lib_cache: tuple[tuple, Any] | None = None

    def table_width(self) -> int:
        """Columns of the factor tables (``W``)."""
        return self.config.embedding_size

    def config_dict(self) -> dict:
        return asdict(self.config)

    def use_gpu(self) -> bool:
        """Fit with implicit's CUDA backend: the model lives on a CUDA device and the library
        was built with it (`implicit.gpu.HAS_CUDA`, which needs ``rmm``)."""
        import implicit.gpu

        return self.device.type == "cuda" and bool(implicit.gpu.HAS_CUDA)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Scores ``float32 [B, n_items]`` for user indices ``users [B]``: ``user_factors[u] ·
        item_factors[i]``. Items with no interaction (no factors: never fitted) score below
        every fitted item of the row (the row's minimum − 1); users ``-1`` or with no interaction
        get `popularity_scores`."""
        users = torch.as_tensor(users, dtype=torch.int64).to(self.device)
        if users.numel() and int(users.max()) >= self.n_users:
            raise IndexError(f"user index {int(users.max())} beyond the model's {self.n_users} users")
        safe = users.clamp_min(0)
        known = (users >= 0) & self.known_users[safe]
        scores = self.user_factors[safe] @ self.item_factors.T
        if not bool(self.known_items.all()) and scores.shape[0]:
            floor = scores.masked_fill(~self.known_items, float("inf")).amin(dim=1, keepdim=True) - 1.0
            scores = torch.where(self.known_items, scores, floor.clamp_max(0.0))
        if not bool(known.all()):
            scores = torch.where(known[:, None], scores, self.popularity_scores(len(users)))
        return scores

    @torch.no_grad()
    def score(self, user: int, item: int) -> float:
        """``score_all`` of one (user, item) pair."""
        return float(self.score_all(torch.tensor([user]))[0, item])

    # ------------------------------------------------------------------ the library's input
    def interaction_data(self, values: np.ndarray) -> np.ndarray:
        """The CSR values handed to the library for interaction weights ``values [m]``."""
        return np.ones(len(values), dtype=np.float32)

    def csr(self, interactions: Ratings) -> sp.csr_matrix:
        """The user×item CSR of ``interactions`` (`user_item_csr` of `interaction_data`)."""
        return user_item_csr(interactions.users, interactions.items,
                             self.interaction_data(interactions.values), self.n_users, self.n_items)

    def _copy_tables(self, user_factors: np.ndarray, item_factors: np.ndarray) -> None:
        """Copy the library's factor arrays into the buffers (shapes checked)."""
        for name, array in (("user_factors", user_factors), ("item_factors", item_factors)):
            buf = getattr(self, name)
            array = np.asarray(array, dtype=np.float32)
            if array.shape != tuple(buf.shape):
                raise RuntimeError(f"implicit returned {name} of shape {array.shape}, expected {tuple(buf.shape)}")
            buf.copy_(torch.from_numpy(np.ascontiguousarray(array)))

    def library(self) -> Any:
        """A CPU library model object over the current item factors (cached until they change:
        fit, load, growth), for fold-in solves and explanations."""
        t = self.item_factors
        key = (t.data_ptr(), t._version, tuple(t.shape), str(t.device))
        if self._lib_cache is None or self._lib_cache[0] != key:
            self._lib_cache = (key, self.new_library(gpu=False, items=t.detach().cpu().numpy().copy()))
        return self._lib_cache[1]

    def new_library(self, *, gpu: bool, items: np.ndarray | None = None) -> Any:
        """A fresh library model with this config, on `implicit`'s GPU or CPU backend
        (``items``: its item factors)."""
        gpu_class, cpu_class, options = self.library_spec()
        with library_threads():  # the constructor checks the BLAS threads
            if gpu:
                lib = gpu_class(**options, use_gpu=True)
            else:
                lib = cpu_class(**options, num_threads=self.config.num_threads)
        if items is not None:
            lib.item_factors = np.ascontiguousarray(items, dtype=np.float32)
        return lib

    def library_spec(self) -> tuple[Callable[..., Any], type, dict]:
        """``(factory that takes use_gpu, CPU class, constructor options)`` of the wrapped
        `implicit` model."""
        raise NotImplementedError

    # ------------------------------------------------------------------ fold-in and online
    def fold_in_user(self, items: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A user's factor row ``float32 [W]`` from their interactions with ``items [m]``
        (weights ``values [m]``), every item's factors fixed. Not installed: see `set_user`."""
        raise NotImplementedError

    def fold_in_rows(self, csr: sp.csr_matrix) -> np.ndarray:
        """Factor rows ``float32 [r, W]`` for the users whose interactions are the rows of
        ``csr [r, n_items]`` (the values `interaction_data` gives)."""
        raise NotImplementedError

    @torch.no_grad()
    def set_user(self, user: int, factors: torch.Tensor) -> None:
        """Install a folded-in user's row; the user counts as known from now on."""
        self.user_factors[user] = torch.as_tensor(factors, dtype=torch.float32).to(self.device)
        self.known_users[user] = True

    @torch.no_grad()
    def grow(self, n_users: int, n_items: int) -> None:
        """Enlarge the tables to at least ``n_users`` / ``n_items`` rows (never shrinks). New
        rows are zero and unknown (popularity) until a fold-in fills a user's row; a new item
        has no factors (nobody can fit it without a refit) and scores last."""
        n_users, n_items = max(n_users, self.n_users), max(n_items, self.n_items)
        if (n_users, n_items) == (self.n_users, self.n_items):
            return

        def extend(t: torch.Tensor, n: int) -> torch.Tensor:
            return torch.cat([t, torch.zeros((n - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)])

        self.user_factors = extend(self.user_factors, n_users)
        self.item_factors = extend(self.item_factors, n_items)
        self.known_users = extend(self.known_users, n_users)
        self.known_items = extend(self.known_items, n_items)
        self.item_counts = extend(self.item_counts, n_items)
        self.n_users, self.n_items = n_users, n_items

    def start_online(self, train: Ratings, *, log: Any = None, learning_rate: float | None = None) -> None:
        """Prepare to learn online after fitting on ``train`` (its rows are the first example
        ids of every later `learn`). ``log`` and ``learning_rate`` are ignored: a fold-in is a
        solve, with no gradient steps to log or to size."""
        self._online = OnlineState(len(train))

    def learn(self, ratings: Ratings, new: np.ndarray) -> None:
        """Apply the example ids ``new`` of ``ratings`` (training + live, `Ratings.append`):
        every user with a new interaction gets their row recomputed by `fold_in_rows` from all
        their interactions in ``ratings`` (the latest row per item), the item factors fixed;
        the tables grow to the ratings' id maps first (``new`` may be empty)."""
        if ratings.n_users > self.n_users or ratings.n_items > self.n_items:
            grow_users = max(ratings.n_users, 2 * self.n_users) if ratings.n_users > self.n_users else self.n_users
            self.grow(grow_users, max(ratings.n_items, self.n_items))
        if self._online is None:
            self._online = OnlineState(len(ratings) - len(new))
        new = np.asarray(new, dtype=np.int64)
        if len(new) == 0:
            return
        users = np.unique(ratings.users[new])
        self.refold(ratings, users)
        self._online.folded.update(users.tolist())

    @torch.no_grad()
    def refold(self, ratings: Ratings, users: np.ndarray) -> None:
        """Recompute the rows of ``users`` (indices) from their interactions in ``ratings``."""
        users = np.asarray(users, dtype=np.int64)
        rows = np.flatnonzero(np.isin(ratings.users, users))
        position = np.full(self.n_users, -1, dtype=np.int64)
        position[users] = np.arange(len(users))
        csr = user_item_csr(position[ratings.users[rows]], ratings.items[rows],
                            self.interaction_data(ratings.values[rows]), len(users), self.n_items)
        solved = torch.from_numpy(self.fold_in_rows(csr)).to(self.device)
        index = torch.from_numpy(users).to(self.device)
        self.user_factors[index] = solved
        self.known_users[index] = torch.from_numpy(np.diff(csr.indptr) > 0).to(self.device)

    def path(self, user: int) -> str:
        """Which path answers index ``user`` now: ``model`` (fitted), ``fold-in`` (row recomputed
        from interactions received after fitting) or ``popularity`` (no interaction)."""
        if user < 0 or user >= self.n_users or not bool(self.known_users[user]):
            return PATH_POPULARITY
        if self._online is not None and user in self._online.folded:
            return PATH_FOLD_IN
        return PATH_MODEL

    # ------------------------------------------------------------------ a user's interactions
    def user_rows(self, ratings: Ratings, user: int) -> np.ndarray:
        """The rows of ``ratings`` the model reads for ``user`` (the latest per item), in item
        order: the interactions their factor row was solved from."""
        rows = np.flatnonzero(ratings.users == user)
        rows = rows[latest_rows(ratings.users[rows], ratings.items[rows], ratings.n_items)]
        rows = rows[self.interaction_data(ratings.values[rows]) != 0]
        return rows[np.argsort(ratings.items[rows], kind="stable")]


__all__ = ["PATH_FOLD_IN", "PATH_MODEL", "PATH_POPULARITY", "ImplicitFactorModel", "OnlineState",
           "check_common", "check_interactions", "check_items", "latest_rows", "library_threads", "user_item_csr"]

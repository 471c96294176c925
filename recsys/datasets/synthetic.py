"""Synthetic explicit ratings at any scale, for tests and throughput benchmarks.

Ratings follow a low-rank model with user and item biases plus Gaussian noise, clipped to the
scale; users and items are drawn with power-law (Zipf-like) popularity, like real logs. Rows
are generated in fixed-size blocks, each from its own seeded random stream, so the result
depends only on the arguments and ``seed``, never on ``chunk_size``. Duplicate (user, item)
pairs may occur (as in real logs) and are kept: no duplicate removal is run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.ratings import IdMap, Ratings

BLOCK = 1 << 16
"""Rows per independent random stream; fixed so that ``chunk_size`` cannot change results."""

_NPZ_KEYS = ("users", "items", "values")


def popularity_cdf(n: int, skew: float) -> np.ndarray:
    """Cumulative distribution over popularity ranks ``1..n`` with weight ``rank**-skew``,
    ``float64 [n]`` ending at 1 (``skew=0`` is uniform)."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -float(skew)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return cdf


def synthetic_ratings(
    n_ratings: int,
    n_users: int,
    n_items: int,
    *,
    rank: int = 16,
    noise: float = 0.5,
    user_skew: float = 1.0,
    item_skew: float = 1.0,
    rating_scale: tuple[float, float] = (1.0, 5.0),
    seed: int = 0,
    chunk_size: int = 1_000_000,
    integer_ratings: bool = False,
) -> Ratings:
    """``n_ratings`` synthetic ratings of ``n_users`` users on ``n_items`` items.

    Rating = middle of the scale + quarter range x (user bias + item bias + ``p_u . q_i``)
    + ``noise`` x N(0, 1), clipped to ``rating_scale`` (rounded first when
    ``integer_ratings``). Biases have std 0.5 and the dot product std 1 in quarter-range units,
    so on a 1..5 scale the signal std is about 1.2 stars. User (item) popularity is
    ``rank**-user_skew`` (``item_skew``) over popularity ranks randomly assigned to ids.

    Memory: the final arrays (``int64`` users and items, ``float32`` values, 20 bytes a
    rating), the factors and one chunk of ``chunk_size`` rows. Id maps are ``"0".."n-1"``;
    there are no timestamps; pairs may repeat.
    """
    if n_ratings < 1 or n_users < 1 or n_items < 1 or rank < 1 or chunk_size < 1:
        raise ValueError("n_ratings, n_users, n_items, rank and chunk_size must be positive")
    lo, hi = map(float, rating_scale)
    if not lo < hi:
        raise ValueError(f"rating_scale must be (low, high) with low < high, got {rating_scale}")
    model_rng = np.random.default_rng([seed, 0])
    scale = np.float32(1.0 / rank**0.25)
    p = model_rng.standard_normal((n_users, rank), dtype=np.float32) * scale
    q = model_rng.standard_normal((n_items, rank), dtype=np.float32) * scale
    user_bias = model_rng.normal(0.0, 0.5, n_users).astype(np.float32)
    item_bias = model_rng.normal(0.0, 0.5, n_items).astype(np.float32)
    user_of_rank = model_rng.permutation(n_users).astype(np.int64)
    item_of_rank = model_rng.permutation(n_items).astype(np.int64)
    user_cdf = popularity_cdf(n_users, user_skew)
    item_cdf = popularity_cdf(n_items, item_skew)

    users = np.empty(n_ratings, dtype=np.int64)
    items = np.empty(n_ratings, dtype=np.int64)
    values = np.empty(n_ratings, dtype=np.float32)
    step = -(-chunk_size // BLOCK) * BLOCK
    mid, quarter = np.float32((lo + hi) / 2), np.float32((hi - lo) / 4)
    for start in range(0, n_ratings, step):
        stop = min(start + step, n_ratings)
        u_rank, i_rank, eps = _draw(seed, start, stop, user_cdf, item_cdf)
        u = user_of_rank[u_rank]
        i = item_of_rank[i_rank]
        r = np.empty(stop - start, dtype=np.float32)
        for a in range(0, stop - start, BLOCK):  # cache-sized pieces of the factor gathers
            b = min(a + BLOCK, stop - start)
            np.einsum("ij,ij->i", p[u[a:b]], q[i[a:b]], out=r[a:b])
        r += user_bias[u]
        r += item_bias[i]
        r *= quarter
        r += mid
        eps *= np.float32(noise)
        r += eps
        if integer_ratings:
            np.rint(r, out=r)
        np.clip(r, lo, hi, out=r)
        users[start:stop], items[start:stop], values[start:stop] = u, i, r
    return Ratings(users, items, values, None, IdMap(range(n_users)), IdMap(range(n_items)),
                   (lo, hi))


def _draw(seed: int, start: int, stop: int, user_cdf: np.ndarray,
          item_cdf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """User and item popularity ranks (``int64``) and standard normal noise (``float32``) for
    rows ``start:stop``; ``start`` is a multiple of `BLOCK`, each block has its own stream."""
    n = stop - start
    u_rank = np.empty(n, dtype=np.int64)
    i_rank = np.empty(n, dtype=np.int64)
    eps = np.empty(n, dtype=np.float32)
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        rng = np.random.default_rng([seed, 1, (start + a) // BLOCK])
        for cdf, out in ((user_cdf, u_rank[a:b]), (item_cdf, i_rank[a:b])):
            # Inverse CDF of sorted draws (cache-friendly search), then shuffled: the same
            # distribution as searching i.i.d. draws one by one, three times faster.
            # side="right" with draws in [0, 1) never returns len(cdf).
            out[:] = np.searchsorted(cdf, np.sort(rng.random(b - a)), side="right")
            rng.shuffle(out)
        rng.standard_normal(out=eps[a:b], dtype=np.float32)
    return u_rank, i_rank, eps


def save_ratings_npz(ratings: Ratings, path: str | Path) -> None:
    """Save ``users``, ``items``, ``values`` (and ``timestamps``, ``rating_scale``, raw ids)
    uncompressed to ``path`` for benchmarks that reuse data; raw ids are stored as fixed-width
    unicode so no pickle is needed."""
    arrays = {
        "users": ratings.users,
        "items": ratings.items,
        "values": ratings.values,
        "rating_scale": np.asarray(ratings.rating_scale, dtype=np.float64),
        "user_ids": ratings.user_ids.raw_ids.astype(str),
        "item_ids": ratings.item_ids.raw_ids.astype(str),
    }
    if ratings.timestamps is not None:
        arrays["timestamps"] = ratings.timestamps
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_ratings_npz(path: str | Path) -> Ratings:
    """Ratings saved by `save_ratings_npz` (or any ``.npz`` with ``users``, ``items``,
    ``values``: ids then default to ``0..max``), read without pickle."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in _NPZ_KEYS if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks array(s) {missing}")
        users = z["users"].astype(np.int64, copy=False)
        items = z["items"].astype(np.int64, copy=False)
        values = z["values"].astype(np.float32, copy=False)
        timestamps = z["timestamps"].astype(np.int64, copy=False) if "timestamps" in z.files else None
        if "rating_scale" in z.files:
            lo, hi = (float(x) for x in z["rating_scale"])
        else:
            lo, hi = float(values.min()), float(values.max())
        user_ids = z["user_ids"] if "user_ids" in z.files else range(int(users.max()) + 1)
        item_ids = z["item_ids"] if "item_ids" in z.files else range(int(items.max()) + 1)
    return Ratings(users, items, values, timestamps, IdMap(user_ids), IdMap(item_ids), (lo, hi))

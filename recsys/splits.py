"""Train/test splits of one `Ratings`, and the command-line grammar that names them.

Rating splits hold out a fraction of the ratings (random, per-user temporal) or of the users
(cold start); ranking splits hold out a fixed number ``K`` of each user's interactions
(per-user temporal and random leave-K-out), the protocol of top-N evaluation.

Every split returns a `Split` whose parts are row subsets of the source (`Ratings.subset`),
so they share its id maps: index ``u`` is the same user in train and test. Unless a function
says otherwise, train and test are disjoint and together hold every source row exactly once.
All randomness comes from ``numpy.random.default_rng(seed)``, so a (spec, data) pair always
gives the same split. Everything is vectorised over ratings (no Python loop per rating).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from recsys.ratings import Ratings

SplitKind = Literal["random", "temporal", "cold-users", "temporal-leave", "random-leave", "canonical"]

#: Fold names that come with the dataset files (MovieLens-100K ``u1.base``/``u1.test`` ...).
CANONICAL_FOLDS: tuple[str, ...] = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")

SPLIT_GRAMMAR = (
    "random:FRACTION[:SEED], temporal:FRACTION, cold-users:FRACTION:K[:SEED], "
    "temporal-leave:K (each user's last K interactions), random-leave:K[:SEED] (K random "
    "interactions per user) (FRACTION in (0, 1), K and SEED non-negative integers; K >= 1 for "
    "the leave-K-out splits), "
    f"or a canonical fold name ({', '.join(CANONICAL_FOLDS)}) resolved by the dataset loader"
)


@dataclass(frozen=True, eq=False)
class Split:
    """A train/test pair cut from one `Ratings`; both parts share the source's id maps.

    Attributes:
        train, test: the two parts.
        name: the split's spec string (e.g. ``random:0.2:0``), parseable by `parse_split`.
        cold_users: for cold-start splits, the held-out user indices, sorted ``int64 [m]``;
            empty for other splits.
    """

    train: Ratings
    test: Ratings
    name: str
    cold_users: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


# ---------------------------------------------------------------------------------- helpers
def _check_fraction(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{what} must lie strictly between 0 and 1, got {value}")
    return value


def _split_by_mask(ratings: Ratings, is_test: np.ndarray, name: str,
                   cold_users: np.ndarray | None = None) -> Split:
    extra = {} if cold_users is None else {"cold_users": cold_users}
    return Split(ratings.subset(~is_test), ratings.subset(is_test), name, **extra)


def _rank_within_user(users: np.ndarray, order: np.ndarray, n_users: int) -> np.ndarray:
    """For rows sorted by ``order`` (grouped by user), each row's 0-based position within its
    user's group, returned in the original row order, ``int64 [n]``."""
    counts = np.bincount(users, minlength=n_users)
    starts = np.zeros(n_users, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users), dtype=np.int64) - starts[users[order]]
    return rank


def _round_half_up(x: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


# ---------------------------------------------------------------------------------- splits
def random_split(ratings: Ratings, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Hold out ``round(test_fraction * n)`` ratings chosen uniformly at random.

    The count is clamped to ``[1, n-1]`` so both parts are non-empty (needs ``n >= 2``).
    Users or items may end up with ratings only in test; `count_unknown` reports them.
    """
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    n = len(ratings)
    if n < 2:
        raise ValueError(f"random_split needs at least 2 ratings, got {n}")
    n_test = int(np.clip(_round_half_up(test_fraction * n), 1, n - 1))
    rng = np.random.default_rng(seed)
    is_test = np.zeros(n, dtype=bool)
    is_test[rng.permutation(n)[:n_test]] = True
    return _split_by_mask(ratings, is_test, f"random:{test_fraction:g}:{seed}")


def temporal_split(ratings: Ratings, test_fraction: float = 0.2) -> Split:
    """Per user, the latest ratings go to test: the last ``round(test_fraction * c)`` of a
    user's ``c`` ratings by (timestamp, row), at most ``c - 1`` so every user keeps at least
    one training rating (users with one rating, or with ``round(test_fraction * c) == 0``,
    stay wholly in train). Every test rating of a user is then no earlier than all of that
    user's training ratings. `ValueError` when the ratings have no timestamps.
    """
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if ratings.timestamps is None:
        raise ValueError("temporal_split needs timestamps, and these ratings have none; "
                         "use a random split instead")
    n = len(ratings)
    order = np.lexsort((np.arange(n), ratings.timestamps, ratings.users))
    rank = _rank_within_user(ratings.users, order, ratings.n_users)
    counts = ratings.user_counts()
    n_test_user = np.minimum(counts - 1, _round_half_up(test_fraction * counts))
    n_test_user = np.maximum(n_test_user, 0)
    c = counts[ratings.users]
    is_test = rank >= c - n_test_user[ratings.users]
    return _split_by_mask(ratings, is_test, f"temporal:{test_fraction:g}")


def cold_start_users(ratings: Ratings, user_fraction: float = 0.2, revealed: int = 5,
                     seed: int = 0) -> Split:
    """Hold out users: ``round(user_fraction * n_active)`` users (at least 1; ``n_active`` =
    users with a rating) chosen at random among those with **more than** ``revealed``
    ratings. For each held-out user, ``revealed`` random ratings go to train (the evidence a
    new user gives) and all the others to test; every other user's ratings stay in train.
    So each held-out user has exactly ``revealed`` training ratings and at least one test
    rating. ``revealed=0`` makes them wholly unknown to the model (pure cold start).

    `ValueError` when fewer users than requested have more than ``revealed`` ratings.
    The held-out indices are `Split.cold_users`.
    """
    user_fraction = _check_fraction(user_fraction, "user_fraction")
    revealed = int(revealed)
    if revealed < 0:
        raise ValueError(f"revealed must be >= 0, got {revealed}")
    counts = ratings.user_counts()
    n_active = int((counts > 0).sum())
    n_cold = max(1, int(_round_half_up(user_fraction * n_active)))
    eligible = np.flatnonzero(counts > revealed)
    if n_cold > len(eligible):
        raise ValueError(
            f"cold_start_users wants {n_cold} held-out users ({user_fraction:g} of {n_active}) "
            f"with more than {revealed} ratings, but only {len(eligible)} users have that many; "
            "lower user_fraction or revealed"
        )
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(eligible, size=n_cold, replace=False)).astype(np.int64)
    is_cold = np.zeros(ratings.n_users, dtype=bool)
    is_cold[cold] = True
    n = len(ratings)
    order = np.lexsort((rng.random(n), ratings.users))  # random order within each user
    rank = _rank_within_user(ratings.users, order, ratings.n_users)
    is_test = is_cold[ratings.users] & (rank >= revealed)
    return _split_by_mask(ratings, is_test, f"cold-users:{user_fraction:g}:{revealed}:{seed}", cold)


def reveal_order(ratings: Ratings, eligible: np.ndarray, share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nested cold-start reveals, for curves over ``k`` revealed ratings on the same users:
    ``round(share · len(eligible))`` users drawn (seeded) from the user indices ``eligible``,
    and every row's reveal rank ``int64 [n]``: for a drawn user's rows, its position in a
    seeded random order of that user's ratings (revealing ``k`` takes ``rank < k``, so the
    ``k = 1`` reveal is part of the ``k = 3`` one); ``-1`` for every other user's rows.
    Returns ``(held-out users, sorted int64 [m], rank)``."""
    share = _check_fraction(share, "share")
    rng = np.random.default_rng(seed)
    eligible = np.asarray(eligible, dtype=np.int64)
    held = np.sort(rng.choice(eligible, size=int(round(share * len(eligible))), replace=False))
    is_held = np.zeros(ratings.n_users, dtype=bool)
    is_held[held] = True
    rows = np.flatnonzero(is_held[ratings.users])
    order = rows[np.lexsort((rng.random(len(rows)), ratings.users[rows]))]
    rank = np.full(len(ratings), -1, dtype=np.int64)
    u_sorted = ratings.users[order]
    rank[order] = np.arange(len(order)) - np.searchsorted(u_sorted, u_sorted, side="left")
    return held, rank


def _leave_k_mask(ratings: Ratings, k: int, order: np.ndarray) -> np.ndarray:
    """Test mask of leave-``k``-out: for rows sorted by ``order`` (grouped by user), the
    last ``k`` of each user with more than ``k`` rows."""
    rank = _rank_within_user(ratings.users, order, ratings.n_users)
    counts = ratings.user_counts()[ratings.users]
    return (counts > k) & (rank >= counts - k)


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    return int(k)


def temporal_leave_k_out(ratings: Ratings, k: int = 1) -> Split:
    """Per-user temporal leave-``k``-out, the ranking protocol: each user's last ``k``
    interactions by (timestamp, row) go to test, for every user with **more than** ``k``
    interactions; users with ``k`` or fewer stay wholly in train (so every test user keeps
    at least one training interaction and has exactly ``k`` test ones). Every test row of a
    user is no earlier than all of that user's training rows. `ValueError` when the ratings
    have no timestamps (use `random_leave_k_out`).
    """
    k = _check_k(k)
    if ratings.timestamps is None:
        raise ValueError("temporal_leave_k_out needs timestamps, and these ratings have none; "
                         "use random_leave_k_out (random-leave:K) instead")
    n = len(ratings)
    order = np.lexsort((np.arange(n), ratings.timestamps, ratings.users))
    return _split_by_mask(ratings, _leave_k_mask(ratings, k, order), f"temporal-leave:{k}")


def random_leave_k_out(ratings: Ratings, k: int = 1, seed: int = 0) -> Split:
    """Per-user random leave-``k``-out: ``k`` interactions drawn uniformly at random
    (``numpy.random.default_rng(seed)``) from each user with **more than** ``k``
    interactions go to test; users with ``k`` or fewer stay wholly in train."""
    k = _check_k(k)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(ratings)), ratings.users))  # random order within each user
    return _split_by_mask(ratings, _leave_k_mask(ratings, k, order), f"random-leave:{k}:{seed}")


def validation_slice(train: Ratings, fraction: float = 0.05, seed: int = 0) -> tuple[Ratings, Ratings]:
    """Split training ratings into ``(fit, validation)`` for early stopping and tuning (never
    carve validation out of the test set).

    Draws ``round(fraction * n)`` random rows (clamped to ``[1, n-1]``), then moves rows back
    to ``fit`` until every user and item in ``validation`` also has a rating in ``fit`` (one
    row per uncovered user, then per uncovered item), so validation measures generalisation
    rather than the fallback. The validation part may hence be smaller than asked; the two
    parts are disjoint and together are ``train``.
    """
    fraction = _check_fraction(fraction, "fraction")
    n = len(train)
    if n < 2:
        raise ValueError(f"validation_slice needs at least 2 ratings, got {n}")
    rng = np.random.default_rng(seed)
    n_val = int(np.clip(_round_half_up(fraction * n), 1, n - 1))
    perm = rng.permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:n_val]] = True
    # Moving a row back only adds fit ratings, so one pass per side suffices. Candidates are
    # taken in the random draw order so the row moved back is itself random.
    for keys, size in ((train.users, train.n_users), (train.items, train.n_items)):
        fit_counts = np.bincount(keys[~is_val], minlength=size)
        drawn = perm[:n_val]
        drawn = drawn[is_val[drawn] & (fit_counts[keys[drawn]] == 0)]
        if len(drawn):
            _, first = np.unique(keys[drawn], return_index=True)
            is_val[drawn[first]] = False
    return train.subset(~is_val), train.subset(is_val)


def count_unknown(train: Ratings, test: Ratings) -> dict[str, int]:
    """How many test ratings the model can only answer with its fallback.

    Returns ``n_test`` and the number of test ratings whose user has no training rating
    (``n_unknown_user``), whose item has none (``n_unknown_item``) and both
    (``n_unknown_both``). The parts must share id maps.
    """
    _check_same_maps(train, test)
    known_user = train.user_counts() > 0
    known_item = train.item_counts() > 0
    unknown_user = ~known_user[test.users]
    unknown_item = ~known_item[test.items]
    return {
        "n_test": len(test),
        "n_unknown_user": int(unknown_user.sum()),
        "n_unknown_item": int(unknown_item.sum()),
        "n_unknown_both": int((unknown_user & unknown_item).sum()),
    }


def _check_same_maps(train: Ratings, test: Ratings) -> None:
    same_users = train.user_ids is test.user_ids or train.user_ids == test.user_ids
    same_items = train.item_ids is test.item_ids or train.item_ids == test.item_ids
    if not (same_users and same_items):
        raise ValueError("train and test must share id maps (cut them from one Ratings, or "
                         "re-index with Ratings.with_id_maps)")


# ---------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class SplitSpec:
    """A parsed split spec (see `parse_split`); `apply` cuts it from a `Ratings`.

    ``fraction`` is the test fraction (random, temporal) or user fraction (cold-users);
    ``revealed`` is K of cold-users; ``leave`` is K of the leave-K-out splits
    (temporal-leave, random-leave); ``fold`` is the canonical fold name (kind
    ``canonical``), which only the dataset loader can resolve.
    """

    kind: SplitKind
    fraction: float | None = None
    revealed: int | None = None
    seed: int = 0
    fold: str | None = None
    leave: int | None = None

    @property
    def name(self) -> str:
        """The canonical spec string, e.g. ``random:0.2:0`` (also the `Split.name`)."""
        if self.kind == "canonical":
            return str(self.fold)
        if self.kind == "random":
            return f"random:{self.fraction:g}:{self.seed}"
        if self.kind == "temporal":
            return f"temporal:{self.fraction:g}"
        if self.kind == "temporal-leave":
            return f"temporal-leave:{self.leave}"
        if self.kind == "random-leave":
            return f"random-leave:{self.leave}:{self.seed}"
        return f"cold-users:{self.fraction:g}:{self.revealed}:{self.seed}"

    def __str__(self) -> str:
        return self.name

    def apply(self, ratings: Ratings) -> Split:
        """The split of ``ratings``; `ValueError` for canonical folds (they are files of the
        dataset, loaded by the dataset loader, not cut from ratings)."""
        if self.kind == "canonical":
            raise ValueError(f"split {self.fold!r} is a canonical fold of the dataset files; "
                             "load it through the dataset loader instead of cutting it")
        if self.kind == "temporal-leave":
            assert self.leave is not None
            return temporal_leave_k_out(ratings, self.leave)
        if self.kind == "random-leave":
            assert self.leave is not None
            return random_leave_k_out(ratings, self.leave, self.seed)
        assert self.fraction is not None
        if self.kind == "random":
            return random_split(ratings, self.fraction, self.seed)
        if self.kind == "temporal":
            return temporal_split(ratings, self.fraction)
        assert self.revealed is not None
        return cold_start_users(ratings, self.fraction, self.revealed, self.seed)


def parse_split(spec: str) -> SplitSpec:
    """Parse a command-line split spec: ``random:F[:SEED]``, ``temporal:F``,
    ``cold-users:F:K[:SEED]``, ``temporal-leave:K``, ``random-leave:K[:SEED]`` or a canonical
    fold name (``u1``..``u5``, ``ua``, ``ub``;
    returned as kind ``canonical`` for the dataset loader). `ValueError` naming the spec and
    the grammar when malformed.
    """
    text = spec.strip()
    if text.lower() in CANONICAL_FOLDS:
        return SplitSpec("canonical", fold=text.lower())
    parts = text.split(":")
    kind, args = parts[0].lower(), parts[1:]

    def fail(reason: str) -> ValueError:
        return ValueError(f"invalid split spec {spec!r}: {reason}; expected {SPLIT_GRAMMAR}")

    def fraction(value: str) -> float:
        try:
            f = float(value)
        except ValueError:
            raise fail(f"fraction {value!r} is not a number") from None
        if not 0.0 < f < 1.0:
            raise fail(f"fraction {value!r} is not strictly between 0 and 1")
        return f

    def natural(value: str, what: str) -> int:
        if not value.isdigit():
            raise fail(f"{what} {value!r} is not a non-negative integer")
        return int(value)

    if kind == "random":
        if len(args) not in (1, 2):
            raise fail("random takes FRACTION[:SEED]")
        seed = natural(args[1], "seed") if len(args) == 2 else 0
        return SplitSpec("random", fraction(args[0]), seed=seed)
    if kind == "temporal":
        if len(args) != 1:
            raise fail("temporal takes FRACTION only")
        return SplitSpec("temporal", fraction(args[0]))
    if kind == "cold-users":
        if len(args) not in (2, 3):
            raise fail("cold-users takes FRACTION:K[:SEED]")
        seed = natural(args[2], "seed") if len(args) == 3 else 0
        return SplitSpec("cold-users", fraction(args[0]), natural(args[1], "K"), seed)
    if kind in ("temporal-leave", "random-leave"):
        if kind == "temporal-leave" and len(args) != 1:
            raise fail("temporal-leave takes K only")
        if kind == "random-leave" and len(args) not in (1, 2):
            raise fail("random-leave takes K[:SEED]")
        k = natural(args[0], "K")
        if k < 1:
            raise fail("K must be at least 1")
        seed = natural(args[1], "seed") if len(args) == 2 else 0
        return SplitSpec(kind, seed=seed, leave=k)  # type: ignore[arg-type]
    raise fail(f"unknown split kind {parts[0]!r}")


__all__ = [
    "CANONICAL_FOLDS",
    "SPLIT_GRAMMAR",
    "Split",
    "SplitSpec",
    "cold_start_users",
    "count_unknown",
    "parse_split",
    "random_leave_k_out",
    "random_split",
    "reveal_order",
    "temporal_leave_k_out",
    "temporal_split",
    "validation_slice",
]

"""Shared fixtures: small synthetic ratings for unit tests and MovieLens-100K (from the data
home, ``$RECSYS_DATA``) for integration tests, which skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from recsys.ratings import Ratings


def make_ratings(n_users: int = 30, n_items: int = 20, n: int = 300, seed: int = 0,
                 rank: int = 3) -> Ratings:
    """Low-rank ratings on a 1..5 scale with unique (user, item) pairs, every user and item
    rated at least once."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_items, size=min(n, n_users * n_items), replace=False)
    users, items = pairs // n_items, pairs % n_items
    users[:n_users] = np.arange(n_users)
    items[:n_items] = np.arange(n_items)
    key = np.unique(users * n_items + items, return_index=True)[1]
    users, items = users[np.sort(key)], items[np.sort(key)]
    p = rng.normal(size=(n_users, rank))
    q = rng.normal(size=(n_items, rank))
    values = np.clip(np.round(3 + (p[users] * q[items]).sum(1) + rng.normal(0, 0.3, len(users))), 1, 5)
    return Ratings.from_arrays(users, items, values, np.arange(len(users)) * 10, rating_scale=(1, 5))


@pytest.fixture
def small_ratings() -> Ratings:
    return make_ratings()


def with_new_ratings(ratings: Ratings, users: list[object], items: list[object],
                     values: list[float]) -> tuple[Ratings, np.ndarray]:
    """``ratings`` with rows for the raw ids ``users, items`` and ``values`` appended
    (`Ratings.append`: new ids join the maps, existing indices and rows are unchanged), as
    ratings received online arrive: ``(all ratings, the new rows' example ids int64 [m])``."""
    user_ids, item_ids = ratings.user_ids.extend(users), ratings.item_ids.extend(items)
    n, m = len(ratings), len(values)
    timestamps = None
    if ratings.timestamps is not None:
        start = int(ratings.timestamps.max()) + 1 if n else 0
        timestamps = np.arange(start, start + m, dtype=np.int64)
    new = Ratings(user_ids.indices(users), item_ids.indices(items), np.asarray(values, dtype=np.float32),
                  timestamps, user_ids, item_ids, ratings.rating_scale)
    return ratings.append(new), np.arange(n, n + m, dtype=np.int64)


#: a small evidence-chain model for unit tests (seconds to train)
SMALL_REC = {"embedding_size": 8, "hidden_size": 16, "prototypes": 4, "fanouts": (6, 4, 3), "eval_passes": 2}


@pytest.fixture(scope="module")
def rec_ratings() -> Ratings:
    """The synthetic ratings the evidence-chain tests use (one copy per test module)."""
    return make_ratings(n_users=40, n_items=25, n=500, seed=1)


@pytest.fixture(scope="module")
def rec_trained(rec_ratings):
    """A `SMALL_REC` model trained 4 epochs on `rec_ratings` (one per test module)."""
    from recsys.models import build_model
    from recsys.train import TrainConfig, Trainer

    model = build_model("rec", rec_ratings.n_users, rec_ratings.n_items, rec_ratings.rating_scale, SMALL_REC)
    Trainer(TrainConfig(epochs=4, optimizer="adam", learning_rate=0.01, batch_size=64, progress=False)).fit(
        model, rec_ratings)
    return model


def ml100k_home() -> Path | None:
    home = os.environ.get("RECSYS_DATA")
    if home and (Path(home) / "ml-100k" / "u.data").is_file():
        return Path(home)
    return None


def require_ml100k() -> None:
    """Skip (or, in CI where ``RECSYS_REQUIRE_DATA=1``, fail) without MovieLens-100K."""
    if ml100k_home() is None:
        message = "MovieLens-100K not in the data home: set RECSYS_DATA to a folder holding ml-100k/"
        if os.environ.get("RECSYS_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def ml100k_u1():
    require_ml100k()
    from recsys.datasets import load_split

    return load_split("ml-100k", "u1")

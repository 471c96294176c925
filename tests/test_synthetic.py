"""synthetic_ratings: determinism, shapes, popularity skew, scale; npz round trip."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.datasets import load_ratings_npz, save_ratings_npz, synthetic_ratings
from recsys.datasets.synthetic import BLOCK


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("users", "items", "values"))


def test_same_seed_same_arrays_other_seed_differs():
    a = synthetic_ratings(5000, 100, 50, seed=3)
    assert same(a, synthetic_ratings(5000, 100, 50, seed=3))
    assert not same(a, synthetic_ratings(5000, 100, 50, seed=4))


def test_chunk_size_does_not_change_the_result():
    n = 2 * BLOCK + 123
    a = synthetic_ratings(n, 300, 200, chunk_size=1)
    b = synthetic_ratings(n, 300, 200, chunk_size=BLOCK + 5)
    c = synthetic_ratings(n, 300, 200, chunk_size=10**7)
    assert same(a, b) and same(a, c)


def test_shapes_dtypes_and_maps():
    r = synthetic_ratings(10_000, 200, 80, rank=4)
    assert len(r) == 10_000 and r.timestamps is None
    assert (r.users.dtype, r.items.dtype, r.values.dtype) == (np.int64, np.int64, np.float32)
    assert (r.n_users, r.n_items) == (200, 80)
    assert r.user_ids.raw(199) == "199"
    assert r.users.min() >= 0 and r.users.max() < 200 and r.items.max() < 80


@pytest.mark.parametrize("scale", [(1.0, 5.0), (0.0, 10.0), (-1.0, 1.0)])
def test_values_within_scale(scale):
    r = synthetic_ratings(20_000, 100, 100, rating_scale=scale, noise=2.0)
    assert r.rating_scale == scale
    assert r.values.min() >= scale[0] and r.values.max() <= scale[1]
    assert r.values.std() > 0.1 * (scale[1] - scale[0])


def test_integer_ratings():
    r = synthetic_ratings(5000, 50, 50, integer_ratings=True)
    assert set(np.unique(r.values)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_popularity_is_skewed_and_zero_skew_is_flat():
    r = synthetic_ratings(200_000, 2000, 1000, item_skew=1.0, user_skew=1.0)
    top = np.sort(r.item_counts())[::-1]
    assert top[:10].sum() / len(r) > 0.2  # top 1% of items: far more than 1% of ratings
    assert np.sort(r.user_counts())[::-1][:20].sum() / len(r) > 0.2
    flat = synthetic_ratings(200_000, 2000, 1000, item_skew=0.0)
    assert np.sort(flat.item_counts())[::-1][:10].sum() / len(flat) < 0.02


def test_popular_ids_are_spread_over_the_id_space():
    counts = synthetic_ratings(100_000, 1000, 1000).item_counts()
    assert set(np.argsort(counts)[-10:].tolist()) != set(range(10))


def test_ratings_follow_the_low_rank_signal():
    r = synthetic_ratings(100_000, 300, 200, noise=0.1)
    means = np.bincount(r.items, weights=r.values, minlength=r.n_items) / np.maximum(r.item_counts(), 1)
    assert means[r.item_counts() > 50].std() > 0.3


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        synthetic_ratings(0, 10, 10)
    with pytest.raises(ValueError):
        synthetic_ratings(10, 10, 10, rating_scale=(5, 1))


def test_npz_round_trip_without_pickle(tmp_path):
    r = synthetic_ratings(3000, 40, 30)
    path = tmp_path / "s.npz"
    save_ratings_npz(r, path)
    back = load_ratings_npz(path)
    assert same(r, back)
    assert back.rating_scale == r.rating_scale
    assert back.user_ids == r.user_ids and back.item_ids == r.item_ids
    with np.load(path, allow_pickle=False) as z:
        assert {"users", "items", "values"} <= set(z.files)


def test_npz_keeps_string_ids_and_timestamps(tmp_path):
    from recsys.ratings import Ratings

    r = Ratings.from_arrays(["b", "a"], ["x", "y"], [1.0, 2.0], [5, 6])
    save_ratings_npz(r, tmp_path / "r.npz")
    back = load_ratings_npz(tmp_path / "r.npz")
    assert list(back.user_ids.raw_ids) == ["a", "b"]
    assert list(back.timestamps) == [5, 6]


def test_npz_with_only_the_three_arrays(tmp_path):
    np.savez(tmp_path / "bare.npz", users=np.array([0, 3]), items=np.array([1, 0]),
             values=np.array([1.0, 4.0]))
    back = load_ratings_npz(tmp_path / "bare.npz")
    assert (back.n_users, back.n_items, back.rating_scale) == (4, 2, (1.0, 4.0))

"""Splits: disjoint and complete parts, seeded determinism, the protocol of each split, and
the command-line grammar of `parse_split`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys.ratings import Ratings
from recsys.splits import (
    SPLIT_GRAMMAR,
    Split,
    SplitSpec,
    cold_start_users,
    count_unknown,
    parse_split,
    random_split,
    reveal_order,
    temporal_split,
    validation_slice,
)


@pytest.fixture(scope="module")
def ratings() -> Ratings:
    """60 users rating 1-25 of 40 items, with coarse timestamps (so ties occur)."""
    rng = np.random.default_rng(7)
    users, items, values, stamps = [], [], [], []
    for u in range(60):
        n = int(rng.integers(1, 26))
        for i in rng.choice(40, size=n, replace=False):
            users.append(u)
            items.append(int(i))
            values.append(float(rng.integers(1, 6)))
            stamps.append(int(rng.integers(0, 10)) * 1000)
    return Ratings.from_arrays(users, items, values, stamps, rating_scale=(1.0, 5.0))


def _keys(r: Ratings) -> np.ndarray:
    return r.users * r.n_items + r.items


def assert_partition(source: Ratings, split: Split) -> None:
    """Train and test share the maps, are disjoint, and together are the source."""
    train, test = split.train, split.test
    assert train.user_ids is source.user_ids and test.item_ids is source.item_ids
    assert len(train) + len(test) == len(source)
    assert not np.intersect1d(_keys(train), _keys(test)).size
    both = np.sort(np.concatenate([_keys(train), _keys(test)]))
    np.testing.assert_array_equal(both, np.sort(_keys(source)))


def same_split(a: Split, b: Split) -> bool:
    return np.array_equal(np.sort(_keys(a.test)), np.sort(_keys(b.test)))


# ---------------------------------------------------------------------------------- random
def test_random_split_is_a_seeded_partition(ratings: Ratings) -> None:
    split = random_split(ratings, 0.25, seed=3)
    assert_partition(ratings, split)
    assert len(split.test) == int(np.floor(0.25 * len(ratings) + 0.5))
    assert split.name == "random:0.25:3"
    assert same_split(split, random_split(ratings, 0.25, seed=3))
    assert not same_split(split, random_split(ratings, 0.25, seed=4))


def test_random_split_keeps_both_parts_non_empty() -> None:
    tiny = Ratings.from_arrays([1, 2], [1, 1], [3.0, 4.0])
    split = random_split(tiny, 0.01)
    assert (len(split.train), len(split.test)) == (1, 1)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        random_split(tiny, 1.0)


# ---------------------------------------------------------------------------------- temporal
def test_temporal_split_puts_each_users_latest_ratings_in_test(ratings: Ratings) -> None:
    split = temporal_split(ratings, 0.2)
    assert_partition(ratings, split)
    assert split.name == "temporal:0.2"
    counts = ratings.user_counts()
    test_counts = split.test.user_counts()
    expected = np.minimum(counts - 1, np.floor(0.2 * counts + 0.5)).clip(0)
    np.testing.assert_array_equal(test_counts, expected)
    assert (test_counts[counts == 1] == 0).all()
    train_last = pd.Series(split.train.timestamps).groupby(split.train.users).max()
    test_first = pd.Series(split.test.timestamps).groupby(split.test.users).min()
    assert (test_first >= train_last.reindex(test_first.index)).all()


def test_temporal_split_breaks_timestamp_ties_by_row() -> None:
    r = Ratings.from_arrays([1, 1, 1, 1], [1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0], [5, 9, 9, 1])
    split = temporal_split(r, 0.5)
    # order by (timestamp, row): items 4, 1, 2, 3 -> the later two are items 2 and 3
    assert sorted(split.test.item_ids.raw_ids[split.test.items]) == ["2", "3"]


def test_temporal_split_needs_timestamps() -> None:
    r = Ratings.from_arrays([1, 1], [1, 2], [3.0, 4.0])
    with pytest.raises(ValueError, match="timestamps"):
        temporal_split(r)


# ---------------------------------------------------------------------------------- cold start
def test_cold_start_reveals_exactly_k_ratings_per_held_out_user(ratings: Ratings) -> None:
    k = 4
    split = cold_start_users(ratings, 0.2, revealed=k, seed=1)
    assert_partition(ratings, split)
    assert split.name == "cold-users:0.2:4:1"
    counts = ratings.user_counts()
    cold = split.cold_users
    assert cold.dtype == np.int64 and np.all(np.diff(cold) > 0)
    assert len(cold) == int(np.floor(0.2 * (counts > 0).sum() + 0.5))
    assert (counts[cold] > k).all()
    train_counts = split.train.user_counts()
    np.testing.assert_array_equal(train_counts[cold], k)
    np.testing.assert_array_equal(split.test.user_counts()[cold], counts[cold] - k)
    # only held-out users are in test, every other user is wholly in train
    np.testing.assert_array_equal(np.unique(split.test.users), cold)
    others = np.setdiff1d(np.arange(ratings.n_users), cold)
    np.testing.assert_array_equal(train_counts[others], counts[others])
    again = cold_start_users(ratings, 0.2, revealed=k, seed=1)
    assert same_split(split, again) and np.array_equal(cold, again.cold_users)


def test_cold_start_with_nothing_revealed_leaves_users_unknown(ratings: Ratings) -> None:
    split = cold_start_users(ratings, 0.1, revealed=0, seed=2)
    assert not np.isin(split.train.users, split.cold_users).any()
    report = count_unknown(split.train, split.test)
    assert report["n_unknown_user"] == len(split.test)


def test_cold_start_errors_when_too_few_users_have_enough_ratings(ratings: Ratings) -> None:
    with pytest.raises(ValueError, match="more than 24 ratings"):
        cold_start_users(ratings, 0.9, revealed=24)
    with pytest.raises(ValueError, match="revealed"):
        cold_start_users(ratings, 0.2, revealed=-1)


# ---------------------------------------------------------------------------------- validation
def test_validation_slice_covers_its_users_and_items_in_fit(ratings: Ratings) -> None:
    fit, valid = validation_slice(ratings, 0.1, seed=5)
    assert_partition(ratings, Split(fit, valid, "v"))
    assert 0 < len(valid) <= int(np.floor(0.1 * len(ratings) + 0.5))
    assert (fit.user_counts()[valid.users] > 0).all()
    assert (fit.item_counts()[valid.items] > 0).all()
    again_fit, again_valid = validation_slice(ratings, 0.1, seed=5)
    np.testing.assert_array_equal(_keys(again_valid), _keys(valid))


def test_validation_slice_moves_uncoverable_rows_back() -> None:
    # every user has one rating: no validation row can keep its user in fit
    r = Ratings.from_arrays(np.arange(20), np.arange(20) % 3, np.ones(20) * 3)
    fit, valid = validation_slice(r, 0.5)
    assert len(valid) == 0 and len(fit) == 20


# ---------------------------------------------------------------------------------- unknowns
def test_count_unknown_counts_users_items_and_both() -> None:
    r = Ratings.from_arrays([1, 1, 2, 1, 3, 3, 2], [1, 2, 1, 3, 1, 3, 2], [3.0] * 7)
    split = Split(r.subset(np.arange(3)), r.subset(np.arange(3, 7)), "hand")
    # test pairs: (1,3) item unknown; (3,1) user unknown; (3,3) both; (2,2) known
    assert count_unknown(split.train, split.test) == {
        "n_test": 4, "n_unknown_user": 2, "n_unknown_item": 2, "n_unknown_both": 1,
    }


def test_count_unknown_rejects_foreign_id_maps() -> None:
    a = Ratings.from_arrays([1], [1], [3.0])
    b = Ratings.from_arrays([2], [1], [3.0])
    with pytest.raises(ValueError, match="share id maps"):
        count_unknown(a, b)


# ---------------------------------------------------------------------------------- specs
@pytest.mark.parametrize(("spec", "expected"), [
    ("random:0.2", SplitSpec("random", 0.2, seed=0)),
    ("random:0.1:42", SplitSpec("random", 0.1, seed=42)),
    ("temporal:0.25", SplitSpec("temporal", 0.25)),
    ("cold-users:0.2:5", SplitSpec("cold-users", 0.2, 5, 0)),
    ("cold-users:0.3:0:9", SplitSpec("cold-users", 0.3, 0, 9)),
    ("u1", SplitSpec("canonical", fold="u1")),
    ("UB", SplitSpec("canonical", fold="ub")),
])
def test_parse_split_accepts_the_grammar(spec: str, expected: SplitSpec) -> None:
    parsed = parse_split(spec)
    assert parsed == expected
    assert parse_split(parsed.name) == parsed


@pytest.mark.parametrize(("spec", "reason"), [
    ("random", "FRACTION"),
    ("random:abc", "not a number"),
    ("random:1.5", "strictly between"),
    ("random:0", "strictly between"),
    ("random:0.2:x", "seed"),
    ("random:0.2:1:2", "FRACTION"),
    ("temporal:0.2:1", "FRACTION only"),
    ("cold-users:0.2", "FRACTION:K"),
    ("cold-users:0.2:-1", "K"),
    ("holdout:0.2", "unknown split kind"),
    ("u6", "unknown split kind"),
    ("", "unknown split kind"),
])
def test_parse_split_errors_name_the_spec_and_the_grammar(spec: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_split(spec)
    message = str(info.value)
    assert repr(spec) in message and reason in message and SPLIT_GRAMMAR in message
    assert "canonical fold" in message


def test_split_spec_apply_matches_the_functions(ratings: Ratings) -> None:
    assert same_split(parse_split("random:0.3:2").apply(ratings), random_split(ratings, 0.3, 2))
    assert same_split(parse_split("temporal:0.2").apply(ratings), temporal_split(ratings, 0.2))
    cold = parse_split("cold-users:0.2:3:1").apply(ratings)
    assert cold.name == "cold-users:0.2:3:1"
    assert same_split(cold, cold_start_users(ratings, 0.2, 3, 1))
    with pytest.raises(ValueError, match="dataset loader"):
        parse_split("u1").apply(ratings)


def test_reveal_order_draws_a_share_of_the_eligible_users_and_nests_their_reveals(ratings):
    """Held-out users come from ``eligible`` only; each one's rows are ranked 0..n_u-1 (a
    permutation), so revealing k takes exactly k of their ratings and the k=1 reveal lies inside
    the k=3 one; every other user's rows rank -1; the same seed gives the same draw."""
    counts = ratings.user_counts()
    eligible = np.flatnonzero(counts > 3)
    held, rank = reveal_order(ratings, eligible, 0.5, seed=4)
    assert len(held) == round(0.5 * len(eligible)) and np.isin(held, eligible).all()
    assert np.array_equal(held, np.sort(held))
    is_held = np.isin(ratings.users, held)
    assert (rank[~is_held] == -1).all()
    for u in held:
        mine = rank[ratings.users == u]
        assert np.array_equal(np.sort(mine), np.arange(counts[u]))
    one, three = (rank >= 0) & (rank < 1), (rank >= 0) & (rank < 3)
    assert one.sum() == len(held) and three.sum() == 3 * len(held) and (three[one]).all()
    again_held, again_rank = reveal_order(ratings, eligible, 0.5, seed=4)
    assert np.array_equal(again_held, held) and np.array_equal(again_rank, rank)
    assert not np.array_equal(reveal_order(ratings, eligible, 0.5, seed=5)[1], rank)

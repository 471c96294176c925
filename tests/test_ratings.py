"""Ratings: id maps, CSR views, duplicates and subsets."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.errors import DuplicateRatingsWarning, RatingsFormatError, UnknownIdError
from recsys.ratings import IdMap, Ratings


def test_raw_ids_are_strings_sorted_numerically_when_integers():
    r = Ratings.from_arrays(["10", "2", "9"], ["b", "a", "c"], [1.0, 2.0, 3.0])
    assert list(r.user_ids.raw_ids) == ["2", "9", "10"]
    assert list(r.item_ids.raw_ids) == ["a", "b", "c"]
    assert r.user_ids.index(10) == r.user_ids.index("10") == 2
    assert r.users.dtype == np.int64 and r.values.dtype == np.float32


def test_unknown_raw_id_raises_named_error_and_indices_gives_minus_one():
    m = IdMap(["a", "b"])
    with pytest.raises(UnknownIdError, match="unknown user id 'z'"):
        m.index("z", "user")
    assert list(m.indices(["b", "z"])) == [1, -1]
    assert m.get("z") is None


def test_idmap_extend_keeps_existing_indices():
    m = IdMap(["a", "b"]).extend(["c", "a", "d", "c"])
    assert list(m.raw_ids) == ["a", "b", "c", "d"]


def test_duplicates_keep_the_latest_and_warn_with_count():
    with pytest.warns(DuplicateRatingsWarning, match="2 duplicate"):
        r = Ratings.from_arrays(["u", "u", "u", "v"], ["i", "i", "i", "i"], [1, 5, 3, 2],
                                timestamps=[10, 30, 20, 5])
    assert len(r) == 2
    assert r.values[r.users == r.user_ids.index("u")][0] == 5.0


def test_duplicates_without_timestamps_keep_the_last_row():
    with pytest.warns(DuplicateRatingsWarning):
        r = Ratings.from_arrays([1, 1], [2, 2], [4, 1])
    assert list(r.values) == [1.0]


def test_nan_rating_names_its_row():
    with pytest.raises(RatingsFormatError, match="line 2"):
        Ratings.from_arrays([1, 2], [1, 2], [3.0, float("nan")], source="mem")


def test_csr_by_user_and_item_are_consistent(small_ratings):
    r = small_ratings
    by_user = r.by_user
    for u in range(r.n_users):
        rows = by_user.examples[by_user.row(u)]
        assert np.all(r.users[rows] == u)
        assert np.array_equal(r.items[rows], by_user.columns[by_user.row(u)])
        assert np.array_equal(r.values[rows], by_user.values[by_user.row(u)])
    by_item = r.by_item
    assert by_item.degrees().sum() == len(r)
    assert np.array_equal(np.sort(by_item.examples), np.arange(len(r)))


def test_subset_keeps_id_maps(small_ratings):
    part = small_ratings.subset(np.arange(10))
    assert part.user_ids is small_ratings.user_ids
    assert len(part) == 10


def test_half_star_and_custom_scales():
    r = Ratings.from_arrays([1, 2], [1, 1], [0.5, 4.5])
    assert r.rating_scale == (0.5, 4.5)
    r = Ratings.from_arrays([1, 2], [1, 1], [3.0, 7.0], rating_scale=(0, 10))
    assert r.rating_scale == (0.0, 10.0)


def test_to_frame_round_trips_raw_ids(small_ratings):
    frame = small_ratings.to_frame()
    again = Ratings.from_arrays(frame.user, frame.item, frame.rating, frame.timestamp, rating_scale=(1, 5))
    assert np.array_equal(again.values, small_ratings.values)
    assert again.user_ids == small_ratings.user_ids

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


def test_append_keeps_example_ids_and_takes_extended_maps(small_ratings):
    r = small_ratings
    user_ids = r.user_ids.extend(["newcomer"])
    new = Ratings(np.array([0, len(user_ids) - 1]), np.array([1, 2]), np.array([4.0, 2.0], np.float32),
                  np.array([7, 8]), user_ids, r.item_ids, r.rating_scale)
    both = r.append(new)
    assert len(both) == len(r) + 2 and both.user_ids is user_ids and both.item_ids is r.item_ids
    assert np.array_equal(both.users[: len(r)], r.users) and np.array_equal(both.values[len(r):], [4.0, 2.0])
    assert np.array_equal(both.timestamps[len(r):], [7, 8]) and both.item_titles is r.item_titles
    assert r.append(r.subset(np.zeros(len(r), dtype=bool))) is r  # nothing to add
    no_ts = Ratings(new.users, new.items, new.values, None, user_ids, r.item_ids, r.rating_scale)
    assert r.append(no_ts).timestamps is None
    with pytest.raises(ValueError, match="extend"):
        r.append(Ratings(np.array([0]), np.array([0]), np.array([3.0], np.float32), None,
                         IdMap(["someone-else"]), r.item_ids, r.rating_scale))
    with pytest.raises(ValueError, match="scale"):
        r.append(Ratings(np.array([0]), np.array([0]), np.array([3.0], np.float32), None,
                         r.user_ids, r.item_ids, (0.0, 10.0)))


def test_appending_one_rating_at_a_time_grows_in_place_and_never_changes_an_earlier_result(small_ratings):
    r = small_ratings
    one = [r.subset(np.arange(len(r)) == k) for k in range(4)]
    chain = [r]
    for piece in one:
        chain.append(chain[-1].append(piece))
    assert chain[2].users.base is chain[4].users.base  # the same buffer, grown in place
    # a second branch from an older result gets its own buffer: the first branch is untouched
    branch = chain[2].append(one[3])
    assert branch.users.base is not chain[4].users.base
    for k, ratings in enumerate(chain):
        assert len(ratings) == len(r) + k
        assert np.array_equal(ratings.users[len(r):], [p.users[0] for p in one[:k]])
        assert np.array_equal(ratings.timestamps[len(r):], [p.timestamps[0] for p in one[:k]])
    assert np.array_equal(branch.values[-1:], one[3].values) and len(branch) == len(r) + 3
    assert chain[4].by_user.degrees().sum() == len(r) + 4  # derived views see the appended rows


def test_extending_a_map_leaves_the_map_it_came_from_unchanged():
    base = IdMap(["a", "b"])
    grown = base.extend(["c"])
    again = grown.extend(["d", "c"])
    assert list(again.raw_ids) == ["a", "b", "c", "d"] and again.index("d") == 3
    # the older maps share storage with the newer ones but still see only their own ids
    assert len(base) == 2 and "c" not in base and base.get("d") is None
    assert list(base.indices(["a", "c", "d"])) == [0, -1, -1]
    assert list(grown.indices(["c", "d"])) == [2, -1]
    # a second extension of an older map is a map of its own: no id moves
    other = base.extend(["x"])
    assert list(other.raw_ids) == ["a", "b", "x"] and list(again.raw_ids) == ["a", "b", "c", "d"]
    assert again.extends(base) and again.extends(grown) and not other.extends(grown)
    assert base.extend(["b", "a"]) is base


def test_many_ids_are_looked_up_alike_one_by_one_or_vectorised():
    m = IdMap([f"u{k}" for k in range(1000)])
    ids = [f"u{k}" for k in range(0, 2000, 3)]
    expected = [k if k < 1000 else -1 for k in range(0, 2000, 3)]
    assert list(m.indices(ids)) == expected  # more than IdMap.small: the pandas index
    assert list(m.indices(ids[:10])) == expected[:10]  # the dict
    with pytest.raises(ValueError, match="'u3' repeats"):
        IdMap(["u1", "u3", "u2", "u3"])


def test_reserve_keeps_the_rows_and_later_appends_do_not_copy_them():
    r = Ratings.from_arrays(["u", "v", "w"], ["i", "j", "i"], [1.0, 2.0, 3.0], timestamps=[1, 2, 3],
                            rating_scale=(1.0, 5.0))
    roomy = r.reserve(10)
    assert len(roomy) == 3 and roomy.user_ids is r.user_ids
    for name in ("users", "items", "values", "timestamps"):
        assert np.array_equal(getattr(roomy, name), getattr(r, name))
    more = Ratings.from_arrays(["v"], ["j"], [5.0], timestamps=[9], user_ids=r.user_ids, item_ids=r.item_ids,
                               rating_scale=(1.0, 5.0))
    grown = roomy.append(more)
    assert np.shares_memory(grown.users, roomy.users)  # written into the room reserved, no copy
    assert list(grown.values) == [1.0, 2.0, 3.0, 5.0] and list(roomy.values) == [1.0, 2.0, 3.0]
    assert grown.reserve(5) is grown  # room left: nothing to do
    assert roomy.reserve(5) is not roomy  # its room now holds grown's row: a copy of its own

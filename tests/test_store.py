"""RatingStore: durable, ordered, idempotent, group-committed."""

from __future__ import annotations

import threading

import pytest

from recsys.store import NewRating, RatingStore, StoreClosedError


def test_ratings_come_back_in_order_with_consecutive_sequence_numbers(tmp_path):
    with RatingStore(tmp_path / "db") as store:
        first = store.add([NewRating("u", "a", 4.0, 100), NewRating("u", "b", 2.5)])
        second = store.add([NewRating("v", "a", 1.0, 7)])
        assert [r.seq for r in first + second] == [1, 2, 3]
        assert [(r.user, r.item, r.rating) for r in store.replay()] == [("u", "a", 4.0), ("u", "b", 2.5), ("v", "a", 1.0)]
        assert [r.seq for r in store.replay(after_seq=2)] == [3]
        assert first[0].timestamp == 100 and first[1].timestamp > 1_000_000_000  # defaults to now


def test_event_ids_are_stored_once_even_within_one_batch(tmp_path):
    with RatingStore(tmp_path / "db") as store:
        a = store.add([NewRating("u", "a", 4.0, event_id="e1"), NewRating("u", "a", 5.0, event_id="e1")])
        b = store.add([NewRating("u", "a", 3.0, event_id="e1"), NewRating("u", "c", 3.0, event_id="e2")])
        assert [r.duplicate for r in a + b] == [False, True, True, False]
        assert {r.seq for r in a + b[:1]} == {1} and b[0].rating == 4.0
        assert store.count() == 2


def test_data_survives_reopening(tmp_path):
    with RatingStore(tmp_path / "db") as store:
        store.add([NewRating("u", "a", 4.0, event_id="x")])
        store.add_user("lonely")
    with RatingStore(tmp_path / "db") as store:
        assert [r.event_id for r in store.replay()] == ["x"]
        assert store.users() == ["lonely"]
        assert store.add([NewRating("u", "b", 1.0)])[0].seq == 2


def test_concurrent_writers_are_group_committed_without_loss(tmp_path):
    with RatingStore(tmp_path / "db", group_window_s=0.005) as store:
        def write(w: int) -> None:
            for k in range(25):
                store.add([NewRating(f"w{w}", str(k), 3.0, event_id=f"{w}-{k}")])

        threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seqs = [r.seq for r in store.replay()]
        assert seqs == list(range(1, 201))


def test_invalid_ratings_and_closed_store_are_errors(tmp_path):
    store = RatingStore(tmp_path / "db")
    with pytest.raises(ValueError, match="finite"):
        store.add([NewRating("u", "a", float("nan"))])
    store.close()
    with pytest.raises(StoreClosedError):
        store.add([NewRating("u", "a", 1.0)])

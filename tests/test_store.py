"""RatingStore: durable, ordered, idempotent, group-committed."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest

from recsys.store import (
    EventIdConflictError,
    NewRating,
    RatingStore,
    StoreClosedError,
    StoredRating,
)


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
        a = store.add([NewRating("u", "a", 4.0, event_id="e1"), NewRating("u", "a", 4.0, event_id="e1")])
        b = store.add([NewRating("u", "a", 4.0, event_id="e1"), NewRating("u", "c", 3.0, event_id="e2")])
        assert [r.duplicate for r in a + b] == [False, True, True, False]
        assert {r.seq for r in a + b[:1]} == {1} and b[0].rating == 4.0
        assert store.count() == 2


def test_a_retry_without_timestamp_matches_the_stored_one(tmp_path):
    with RatingStore(tmp_path / "db") as store:
        first = store.add([NewRating("u", "a", 4.0, 123, event_id="e1")])[0]
        assert store.add([NewRating("u", "a", 4.0, None, event_id="e1")])[0] == \
            StoredRating(first.seq, "u", "a", 4.0, 123, "e1", duplicate=True)


@pytest.mark.parametrize("changed", [NewRating("u", "a", 5.0, 100, "e1"), NewRating("v", "a", 4.0, 100, "e1"),
                                     NewRating("u", "b", 4.0, 100, "e1"), NewRating("u", "a", 4.0, 101, "e1")])
def test_an_event_id_reused_with_another_payload_is_a_conflict_and_stores_nothing_of_the_request(tmp_path, changed):
    with RatingStore(tmp_path / "db") as store:
        store.add([NewRating("u", "a", 4.0, 100, "e1")])
        with pytest.raises(EventIdConflictError, match="event_id 'e1' is already stored as seq 1"):
            store.add([NewRating("w", "z", 1.0, None, "fresh"), changed])
        with pytest.raises(EventIdConflictError):  # the same id twice in one request, payloads differ
            store.add([NewRating("w", "z", 1.0, None, "e9"), NewRating("w", "z", 2.0, None, "e9")])
        assert store.count() == 1 and store.last_seq() == 1
        assert store.add([NewRating("w", "z", 1.0, None, "fresh")])[0].seq == 2  # numbering goes on


def test_a_conflict_fails_only_its_own_request_within_a_group_commit(tmp_path):
    with RatingStore(tmp_path / "db", group_window_s=0.05) as store:
        store.add([NewRating("u", "a", 4.0, 100, "e1")])
        results: dict[str, object] = {}

        def send(name: str, ratings: list[NewRating]) -> None:
            try:
                results[name] = store.add(ratings)
            except EventIdConflictError as exc:
                results[name] = exc

        threads = [threading.Thread(target=send, args=("bad", [NewRating("x", "a", 1.0, None, "n1"),
                                                               NewRating("u", "a", 2.0, 100, "e1")])),
                   threading.Thread(target=send, args=("good", [NewRating("y", "b", 3.0, None, "n2")]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert isinstance(results["bad"], EventIdConflictError)
        assert [r.seq for r in results["good"]] == [2]
        assert [r.event_id for r in store.replay()] == ["e1", "n2"]


def test_the_log_is_followed_by_cursors(tmp_path):
    with RatingStore(tmp_path / "db") as store:
        assert store.last_seq() == 0 and store.last_user() == 0 and store.new_users() == []
        store.add([NewRating("u", "a", 4.0), NewRating("u", "b", 3.0)])
        store.add_user("x")
        store.add_user("y")
        assert not store.add_user("x")
        assert store.last_seq() == 2 and [r.seq for r in store.replay(after_seq=1)] == [2]
        assert store.new_users() == [(1, "x"), (2, "y")] and store.new_users(after=1) == [(2, "y")]
        assert store.last_user() == 2 and store.users() == ["x", "y"]


def _write_from_another_process(path: str, writer: int, n: int) -> None:
    with RatingStore(path) as store:
        for k in range(n):
            store.add([NewRating(f"p{writer}", str(k), 3.0, None, f"{writer}-{k}")])


def test_writers_in_several_processes_share_one_gapless_log(tmp_path):
    """Each process has its own connection, writer thread and group commits; the file lock
    serialises them, so sequence numbers stay consecutive and nothing is lost."""
    ctx = multiprocessing.get_context("spawn")
    path = str(tmp_path / "db")
    RatingStore(path).close()
    procs = [ctx.Process(target=_write_from_another_process, args=(path, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    with RatingStore(path) as store:
        for k in range(40):
            store.add([NewRating("here", str(k), 2.0, None, f"here-{k}")])
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        rows = list(store.replay())
        assert [r.seq for r in rows] == list(range(1, 161)) and store.last_seq() == 160
        assert len({r.event_id for r in rows}) == 160


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


def test_the_chosen_model_is_the_last_one_recorded(tmp_path):
    with RatingStore(tmp_path / "db") as store:
        assert store.chosen_model() is None
        assert store.choose_model("/models/a") == 1 and store.choose_model("/models/b") == 2
    with RatingStore(tmp_path / "db") as store:
        assert store.chosen_model() == (2, "/models/b")


def test_committed_after_is_the_log_from_memory_for_own_rows_and_from_the_file_for_others(tmp_path):
    """Two stores on one file (two processes): each answers `committed_after` exactly as
    `replay` reads the file, whatever the cursor and limit, its own rows coming from memory
    (not read back: they are the very objects `add` returned) and the other's from the file;
    rows it no longer keeps (past `max_recent`) are read from the file too."""
    with RatingStore(tmp_path / "db") as a, RatingStore(tmp_path / "db") as b:
        a.max_recent = 6
        own = []
        for k in range(6):
            own += a.add([NewRating("a", f"{k}-{j}", 3.0, 10 + j) for j in range(k % 3 + 1)])
            b.add([NewRating("b", str(k), 2.0, 7, event_id=f"e{k}")] * (k % 2 + 1))  # a duplicate within
            a.add([NewRating("dup", "x", 1.0, 1, event_id="same")])  # stored once, then duplicates
        log = list(a.replay())
        assert [r.seq for r in log] == list(range(1, len(log) + 1))
        kept = {id(r) for _, rows in a._recent for r in rows}
        assert 0 < sum(len(rows) for _, rows in a._recent) <= 6 + 3
        for store in (a, b):
            for after in range(len(log) + 1):
                for limit in (1, 2, 5, 10_000):
                    got = store.committed_after(after, limit)
                    assert got[:limit] == log[after:after + limit] and (len(got) >= limit or got == log[after:])
        from_memory = [r for r in a.committed_after(0) if id(r) in kept]
        assert from_memory and all(r.user in ("a", "dup") for r in from_memory)
        assert not any(id(r) in kept for r in b.committed_after(0))


def test_a_write_waiting_in_line_past_its_timeout_is_not_stored_and_the_line_moves_on(tmp_path):
    """The first caller in line leads the commit; one queued behind a commit that cannot
    start (the writers' lock held, as by another process) gives up after its timeout with
    nothing stored, and the writes behind it are committed once the lock is free."""
    with RatingStore(tmp_path / "db") as store:
        results = {}
        with store._exclusive():  # another process committing
            leader = threading.Thread(target=lambda: results.setdefault("leader", store.add([NewRating("u", "a", 1.0)])))
            leader.start()
            while not store._writes or not store._writes[0].taken:
                pass
            with pytest.raises(TimeoutError, match="nothing of them was stored"):
                store.add([NewRating("late", "b", 2.0)], timeout=0.05)
            follower = threading.Thread(target=lambda: results.setdefault("follower", store.add([NewRating("v", "c", 3.0)])))
            follower.start()
            while len(store._writes) < 2:
                pass
        leader.join(5)
        follower.join(5)
        assert [r.user for r in store.replay()] == ["u", "v"]
        assert results["leader"][0].seq == 1 and results["follower"][0].seq == 2


def test_event_ids_are_indexed_only_where_given_and_an_older_store_keeps_its_index(tmp_path):
    store = RatingStore(tmp_path / "new.db")
    indexes = {row[1]: row for row in store._conn.execute("PRAGMA index_list(ratings)")}
    assert set(indexes) == {"ratings_event_id"} and indexes["ratings_event_id"][4] == 1  # partial
    plan = store._conn.execute("EXPLAIN QUERY PLAN SELECT seq FROM ratings WHERE event_id IN (?, ?)",
                               ("a", "b")).fetchall()
    assert "ratings_event_id" in str(plan)
    store.close()
    old = sqlite3.connect(tmp_path / "old.db")  # the schema before: the column declared UNIQUE
    old.executescript("CREATE TABLE ratings (seq INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, "
                      "item TEXT NOT NULL, rating REAL NOT NULL, timestamp INTEGER NOT NULL, event_id TEXT UNIQUE, "
                      "received_at REAL NOT NULL)")
    old.close()
    store = RatingStore(tmp_path / "old.db")
    assert {row[1] for row in store._conn.execute("PRAGMA index_list(ratings)")} == {"sqlite_autoindex_ratings_1"}
    first = store.add([NewRating("u", "i", 4.0, event_id="e")])
    again = store.add([NewRating("u", "i", 4.0, event_id="e"), NewRating("u", "j", 3.0)])
    assert again[0].duplicate and again[0].seq == first[0].seq and [r.seq for r in store.replay()] == [1, 2]
    store.close()

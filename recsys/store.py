"""`RatingStore`: the durable log of ratings received online, in SQLite (stdlib ``sqlite3``).

A rating is acknowledged only after the transaction holding it is committed with
``journal_mode=WAL`` and ``synchronous=FULL``: the WAL is fsynced at every commit, so an
acknowledged rating survives a killed process and a power cut (with ``NORMAL`` a power cut
could lose the last commits; we choose ``FULL``). Writers are serialised by one lock per
process plus an exclusive file lock across processes (SQLite's own busy-retry makes tail
latencies explode under contention). Concurrent single-rating writes are *group
committed*: the first caller in line commits, in its own thread, everything queued behind it
while the previous commit was running and while it waited for the writers' lock (another
process committing: so several workers on one store group their commits too), plus what
arrives within ``group_window_s`` (default 0: no added delay), in one transaction, and each
caller returns after that commit.

Idempotency: a client-supplied ``event_id`` is unique; re-sending it with the same payload
returns the original row instead of storing a duplicate; re-sending it with a different payload
(user, item, rating, or a given timestamp that differs) is an `EventIdConflictError` for that
request alone (nothing of it is stored; other requests of the same group commit are not
affected).

Order: every commit happens under the exclusive lock and numbers its rows after the last
committed ``seq``, so readers (in this process or another) see ``seq`` values appear in
order and without gaps: once ``seq`` S is visible, every ``seq`` below it is too. That is what
lets a follower apply the log by a single cursor (`replay` after the last ``seq`` applied;
`last_seq` to see whether there is anything new). Users created with no ratings have their
own cursor (`new_users`, ordered by their row id).

The store also records which model artefact the processes sharing it should serve
(`choose_model`, `chosen_model`): a reload through one process is a new *generation* the
others follow.
"""

from __future__ import annotations

import fcntl
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from recsys.errors import RecsysError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    user        TEXT NOT NULL,
    item        TEXT NOT NULL,
    rating      REAL NOT NULL,
    timestamp   INTEGER NOT NULL,
    event_id    TEXT,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    user        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    generation  INTEGER PRIMARY KEY AUTOINCREMENT,
    path        TEXT NOT NULL,
    chosen_at   REAL NOT NULL
);
"""


class StoreClosedError(RecsysError):
    """The store was closed; nothing more can be written."""


class EventIdConflictError(RecsysError):
    """An ``event_id`` already stored (or repeated in one request) came with a different
    payload; nothing of the request was stored."""


class StoredRating(NamedTuple):
    """One rating as stored: ``seq`` is its position in the log (1-based, increasing).

    A named tuple (immutable, compared by value): the service builds one per rating it
    stores and per rating it reads back, and a tuple is built in a third of the time of a
    frozen dataclass (0.2-0.3 us against 0.7)."""

    seq: int
    user: str
    item: str
    rating: float
    timestamp: int
    event_id: str | None
    duplicate: bool = False  # True when this event_id had already been stored


def _same_payload(stored: StoredRating, new: RatingLike) -> bool:
    """Whether ``new`` is a retry of ``stored`` (a missing timestamp matches any)."""
    return (stored.user == new.user and stored.item == new.item and stored.rating == float(new.rating)
            and (new.timestamp is None or int(new.timestamp) == stored.timestamp))


@dataclass(frozen=True)
class NewRating:
    """A rating to store (``timestamp`` None: the time it is stored)."""

    user: str
    item: str
    rating: float
    timestamp: int | None = None
    event_id: str | None = None


class RatingLike(Protocol):
    """What `RatingStore.add` reads of a rating: a `NewRating`, or any object with these
    attributes (the service passes its validated request bodies as they are)."""

    user: str
    item: str
    rating: float
    timestamp: int | None
    event_id: str | None


class _Write:
    """One caller's ratings on their way into a commit (`RatingStore.add`): ``taken`` once a
    commit has them, ``done`` with ``result`` (the stored rows, or the exception) after."""

    __slots__ = ("ratings", "taken", "done", "result")

    def __init__(self, ratings: list[RatingLike]) -> None:
        self.ratings = ratings
        self.taken = False
        self.done = False
        self.result: list[StoredRating] | BaseException | None = None


class RatingStore:
    """A durable, append-only rating log (see the module docstring)."""

    #: seconds a connection waits on SQLite's own locks (held briefly by other processes)
    busy_timeout_s = 30.0
    #: how many of the rows it committed last a store keeps in memory for `committed_after`
    #: (a follower a few batches behind reads its own process's rows from there)
    max_recent = 20_000

    def __init__(self, path: str | Path, *, group_window_s: float = 0.0, max_group: int = 10_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+b")  # noqa: SIM115
        self._write_lock = threading.Lock()
        # busy_timeout: a reader or a checkpoint of another process may hold SQLite's own locks
        # briefly; writers are serialised by the file lock below, so a wait is short
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                     timeout=self.busy_timeout_s)
        with self._exclusive_file():  # two processes creating the same new store at once
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            self._index_event_ids()
        self._read = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                     timeout=self.busy_timeout_s)
        self._read_lock = threading.Lock()
        self._group_window_s = group_window_s
        self._max_group = max_group
        #: writes waiting for their commit, in arrival order; the first not yet taken into a
        #: commit leads the next one (`add`)
        self._writes: deque[_Write] = deque()
        self._writes_changed = threading.Condition(threading.Lock())
        #: the rows this process committed lately, per transaction ``(first seq, rows)``,
        #: oldest first, at most about `max_recent` rows (`committed_after`)
        self._recent: deque[tuple[int, list[StoredRating]]] = deque()
        self._recent_rows = 0
        self._recent_lock = threading.Lock()
        self._closed = False

    def _index_event_ids(self) -> None:
        """Event ids unique through a partial index, of the rows that have one: a rating
        sent without an event id (most) then adds no index entry (about 0.6 µs of SQLite's CPU
        a row less). A store created before this declared the column ``UNIQUE`` and keeps
        that index (SQLite's ``sqlite_autoindex_ratings_1``); it gets no second one."""
        indexes = {row[1] for row in self._conn.execute("PRAGMA index_list(ratings)")}
        if "sqlite_autoindex_ratings_1" not in indexes:
            self._conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS ratings_event_id ON ratings(event_id) "
                               "WHERE event_id IS NOT NULL")

    # ------------------------------------------------------------------ writing
    def add(self, ratings: Sequence[RatingLike], timeout: float | None = 30.0) -> list[StoredRating]:
        """Store ``ratings`` durably; returns them as stored (in order), after the commit.
        Ratings whose ``event_id`` was seen before with the same payload come back with
        ``duplicate=True`` and the original values; a different payload under a known
        ``event_id`` raises `EventIdConflictError` and stores nothing of ``ratings``.
        `TimeoutError` when they waited in line behind this process's other writes for
        ``timeout`` seconds without a commit taking them (nothing of them is stored then);
        the caller first in line waits for the writers' lock as long as another process
        holds it.

        Group commit, led by the callers themselves: a caller with no commit ahead of it in
        this process commits at once, in its own thread, taking along every write queued
        behind it by the time it holds the writers' lock; those callers just wait for that
        commit. Handing each write to a writer thread and back (the previous design) cost
        60-80 us of CPU a request in thread wake-ups, more than the commit of one rating."""
        if self._closed:
            raise StoreClosedError("the rating store is closed")
        if not ratings:
            return []
        for r in ratings:
            if not math.isfinite(r.rating):
                raise ValueError(f"rating must be a finite number, got {r.rating!r}")
        write = _Write(list(ratings))
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._writes_changed:
            if self._closed:
                raise StoreClosedError("the rating store is closed")
            self._writes.append(write)
            if self._group_window_s:
                self._writes_changed.notify_all()  # a leader may be gathering within its window
            while not write.done and (write.taken or self._writes[0] is not write):
                remaining = None if deadline is None or write.taken else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._writes.remove(write)  # not taken into any commit: nothing of it is stored
                    raise TimeoutError(f"the rating store took no commit of these {len(write.ratings)} ratings "
                                       f"within {timeout} s; nothing of them was stored")
                self._writes_changed.wait(remaining)
            if not write.done:
                write.taken = True  # first in line: this thread leads the next commit
        if not write.done:
            self._lead(write)
        if isinstance(write.result, BaseException):
            raise write.result
        return write.result

    def _lead(self, leader: _Write) -> None:
        """Commit ``leader``'s write and those queued behind it in one transaction: wait for
        the writers' lock (other processes on the file may be committing), *then* take the
        writes queued by now (and within ``group_window_s``), so that requests arriving
        while another process's commit holds the lock join this one (several workers on
        one store group their commits too); record each write's outcome, wake the waiters."""
        group = [leader]
        try:
            with self._exclusive():
                with self._writes_changed:
                    if self._group_window_s:
                        deadline = time.monotonic() + self._group_window_s
                        while sum(len(w.ratings) for w in self._writes) < self._max_group:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                break
                            self._writes_changed.wait(remaining)
                    group = self._take_group(leader)
                try:
                    results: list = self._commit_locked([w.ratings for w in group])
                except BaseException as exc:  # every write of the group learns it failed; nothing was stored
                    results = [exc] * len(group)
        except BaseException as exc:  # the writers' lock itself failed
            results = [exc] * len(group)
        with self._writes_changed:
            for write, result in zip(group, results, strict=True):
                write.result, write.done = result, True
                self._writes.remove(write)
            self._writes_changed.notify_all()

    def _take_group(self, leader: _Write) -> list[_Write]:
        """The writes of the next commit: ``leader`` (first in line) and those behind it, up
        to ``max_group`` ratings; the caller holds ``_writes_changed``."""
        group, n = [], 0
        for write in self._writes:
            if group and n + len(write.ratings) > self._max_group:
                break
            write.taken = True
            group.append(write)
            n += len(write.ratings)
        assert group[0] is leader, "the leader of a commit is the first write in line"
        return group

    def add_user(self, user: str) -> bool:
        """Record a user created with no ratings; False if the user already existed."""
        with self._exclusive():
            cur = self._conn.execute("INSERT OR IGNORE INTO users(user, created_at) VALUES (?, ?)",
                                     (user, time.time()))
            return cur.rowcount == 1

    def _commit(self, groups: list[list[RatingLike]]) -> list[list[StoredRating] | EventIdConflictError]:
        """One transaction for all groups (one group: one caller's ratings): look up known
        event ids in bulk, number the new rows explicitly (we hold the only write lock, so
        numbers are consecutive), insert them with one ``executemany``. A group that reuses
        an event id with a different payload gets its `EventIdConflictError` instead and
        adds nothing."""
        with self._exclusive():
            return self._commit_locked(groups)

    def _commit_locked(self, groups: list[list[RatingLike]]) -> list[list[StoredRating] | EventIdConflictError]:
        """`_commit`, the writers' lock held by the caller."""
        now = time.time()
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            events = list({r.event_id for g in groups for r in g if r.event_id is not None})
            known: dict[str, StoredRating] = {}
            for start in range(0, len(events), 500):
                chunk = events[start:start + 500]
                rows = cur.execute(
                    "SELECT seq, user, item, rating, timestamp, event_id FROM ratings WHERE event_id IN "
                    f"({','.join('?' * len(chunk))})", chunk).fetchall()
                known.update({row[5]: StoredRating(*row, duplicate=True) for row in rows})
            row = cur.execute("SELECT seq FROM sqlite_sequence WHERE name = 'ratings'").fetchone()
            seq = row[0] if row else 0
            out: list[list[StoredRating] | EventIdConflictError] = []
            inserts = []
            for group in groups:
                stored, group_inserts, group_known = [], [], {}
                conflict = None
                for r in group:
                    event_id = r.event_id
                    if event_id is None:  # most ratings: nothing to look up
                        seq += 1
                        stamp = r.timestamp
                        s = StoredRating(seq, r.user, r.item, float(r.rating), int(now) if stamp is None else int(stamp),
                                         None)
                        group_inserts.append(s[:6])
                        stored.append(s)
                        continue
                    old = group_known.get(event_id) or known.get(event_id)
                    if old is not None:
                        if not _same_payload(old, r):
                            conflict = EventIdConflictError(
                                f"event_id {event_id!r} is already stored as seq {old.seq} with user "
                                f"{old.user!r}, item {old.item!r}, rating {old.rating:g}, timestamp "
                                f"{old.timestamp}; this request sends user {r.user!r}, item {r.item!r}, "
                                f"rating {float(r.rating):g}, timestamp {r.timestamp}: use a new event_id for "
                                "a new rating (nothing of this request was stored)")
                            break
                        stored.append(old)
                        continue
                    seq += 1
                    ts = int(now) if r.timestamp is None else int(r.timestamp)
                    s = StoredRating(seq, r.user, r.item, float(r.rating), ts, event_id)
                    group_known[event_id] = s._replace(duplicate=True)  # a repeat later in this batch is a duplicate
                    group_inserts.append(s[:6])
                    stored.append(s)
                if conflict is not None:
                    seq -= len(group_inserts)  # this group adds nothing: the next numbers follow on
                    out.append(conflict)
                    continue
                known.update(group_known)
                inserts.extend(group_inserts)
                out.append(stored)
            cur.executemany("INSERT INTO ratings(seq, user, item, rating, timestamp, event_id, received_at) "
                            f"VALUES (?, ?, ?, ?, ?, ?, {now!r})", inserts)  # one receipt time: a float's repr
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        if inserts:  # committed: the new rows (consecutive seqs) are the log's, remember them
            self._remember([s for group in out if not isinstance(group, EventIdConflictError)
                            for s in group if not s.duplicate])
        return out

    def _remember(self, fresh: list[StoredRating]) -> None:
        """Keep ``fresh`` (rows just committed, consecutive seqs) for `committed_after`."""
        with self._recent_lock:
            self._recent.append((fresh[0].seq, fresh))
            self._recent_rows += len(fresh)
            while self._recent_rows - len(self._recent[0][1]) >= self.max_recent:
                self._recent_rows -= len(self._recent.popleft()[1])

    class _FileLock:
        def __init__(self, store: RatingStore) -> None:
            self.store = store

        def __enter__(self) -> None:
            self.store._write_lock.acquire()
            try:
                fcntl.flock(self.store._lock_file.fileno(), fcntl.LOCK_EX)
            except BaseException:
                self.store._write_lock.release()
                raise

        def __exit__(self, *exc: object) -> None:
            fcntl.flock(self.store._lock_file.fileno(), fcntl.LOCK_UN)
            self.store._write_lock.release()

    def _exclusive(self) -> RatingStore._FileLock:
        """The writers' lock: this process's threads, then every process on the file."""
        return RatingStore._FileLock(self)

    _exclusive_file = _exclusive

    # ------------------------------------------------------------------ reading
    def replay(self, after_seq: int = 0, batch: int = 10_000) -> Iterator[StoredRating]:
        """Every stored rating with ``seq > after_seq``, in log order."""
        last = after_seq
        while True:
            with self._read_lock:
                rows = self._read.execute(
                    "SELECT seq, user, item, rating, timestamp, event_id FROM ratings WHERE seq > ? "
                    "ORDER BY seq LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                yield StoredRating(*row)
            last = rows[-1][0]

    def committed_after(self, after_seq: int, limit: int = 10_000) -> list[StoredRating]:
        """The ratings committed after ``after_seq``, in log order, as `replay` reads them but
        at most about ``limit`` (the next ones; none: nothing new is committed), without
        reading back from the file the rows this process committed lately: those come from
        memory (the last `max_recent`), the rest (other processes' commits in between, older
        rows) from the file. Seqs have no gaps, so the gap between two of our transactions is
        exactly other writers' rows; should the file not hold them all, the file alone
        answers."""
        own: list[tuple[int, list[StoredRating]]] = []
        with self._recent_lock:
            for first, rows in reversed(self._recent):  # newest first: a follower is near the end
                if first + len(rows) - 1 <= after_seq:
                    break
                own.append((first, rows))
        own.reverse()
        out: list[StoredRating] = []
        cursor = after_seq
        for first, rows in own:
            if len(out) >= limit:
                return out
            if first > cursor + 1:
                want = min(first - 1 - cursor, limit - len(out))
                between = self._read_range(cursor, first - 1, want)
                if len(between) != want:  # not expected; the file is the truth
                    return self._read_range(after_seq, None, limit)
                out += between
                if want < first - 1 - cursor:
                    return out
            out += rows[cursor + 1 - first:] if cursor >= first else rows
            cursor = first + len(rows) - 1
        if len(out) < limit:
            out += self._read_range(cursor, None, limit - len(out))
        return out

    def _read_range(self, after_seq: int, last_seq: int | None, limit: int) -> list[StoredRating]:
        """The first ``limit`` ratings with ``after_seq < seq <= last_seq`` (None: no upper
        bound), in order."""
        with self._read_lock:
            rows = self._read.execute(
                "SELECT seq, user, item, rating, timestamp, event_id FROM ratings WHERE seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?", (after_seq, 2**63 - 1 if last_seq is None else last_seq, limit)).fetchall()
        return [StoredRating(*row) for row in rows]

    def users(self) -> list[str]:
        """Users created through `add_user`, in creation order."""
        return [u for _, u in self.new_users()]

    def new_users(self, after: int = 0) -> list[tuple[int, str]]:
        """``(position, user)`` of the users created through `add_user` after position
        ``after`` (0: all), in creation order; positions are increasing row ids."""
        with self._read_lock:
            return self._read.execute("SELECT rowid, user FROM users WHERE rowid > ? ORDER BY rowid",
                                      (after,)).fetchall()

    def choose_model(self, path: str) -> int:
        """Record that every process on this store should serve the artefact at ``path``;
        returns the new generation (1, 2, ...)."""
        with self._exclusive():
            cur = self._conn.execute("INSERT INTO models(path, chosen_at) VALUES (?, ?)", (path, time.time()))
            return int(cur.lastrowid)

    def chosen_model(self) -> tuple[int, str] | None:
        """``(generation, path)`` of the last `choose_model`, None if there was none."""
        with self._read_lock:
            row = self._read.execute("SELECT generation, path FROM models ORDER BY generation DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), row[1])

    def last_seq(self) -> int:
        """The ``seq`` of the last committed rating (0: none); cheap enough to poll."""
        with self._read_lock:
            row = self._read.execute("SELECT seq FROM sqlite_sequence WHERE name = 'ratings'").fetchone()
        return int(row[0]) if row else 0

    def last_user(self) -> int:
        """The position of the last user created through `add_user` (0: none)."""
        with self._read_lock:
            row = self._read.execute("SELECT MAX(rowid) FROM users").fetchone()
        return int(row[0] or 0)

    def count(self) -> int:
        with self._read_lock:
            return int(self._read.execute("SELECT COUNT(*) FROM ratings").fetchone()[0])

    def close(self) -> None:
        """Finish pending writes and close."""
        if self._closed:
            return
        with self._writes_changed:
            self._closed = True
            self._writes_changed.wait_for(lambda: not self._writes, timeout=30)
        self._conn.close()
        self._read.close()
        self._lock_file.close()

    def __enter__(self) -> RatingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

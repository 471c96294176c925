"""The live interaction rows an item-item model scores from: per user, the items interacted
with, their values and the example ids (rows of the `Ratings`) they came from.

Built from a `Ratings` (training, or training + live); a (user, item) pair that occurs more
than once keeps its latest row (the largest example id), as a rating given again replaces the
earlier one. Online interactions are queued per user (`add`, O(new)) and merged into a user's
sorted row when the row is next read, or once the queue is long, with no rebuild of the whole
matrix.
"""

from __future__ import annotations

import threading
from array import array

import numpy as np
import scipy.sparse as sp

from recsys.ratings import Ratings


class UserRows:
    """Per-user interactions: ``row(u) -> (items int64 [m], values float32 [m], examples int64
    [m])``, sorted by item. ``n_rows`` is the number of `Ratings` rows taken in (the next
    example id to expect)."""

    #: a user's queue of example ids not merged yet is merged by `add` at this length
    merge_at = 256

    def __init__(self, ratings: Ratings) -> None:
        csr = ratings.by_user
        n_users = ratings.n_users
        users = np.repeat(np.arange(n_users, dtype=np.int64), csr.degrees())
        keep = np.ones(len(users), dtype=bool)
        # entries are sorted by (user, item) and, within a repeated pair, by example id: the
        # last of a run is the latest
        keep[:-1] = ~((users[1:] == users[:-1]) & (csr.columns[1:] == csr.columns[:-1]))
        self.indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users[keep], minlength=n_users), out=self.indptr[1:])
        self.items = csr.columns[keep].astype(np.int64)
        self.values = csr.values[keep].astype(np.float32)
        self.examples = csr.examples[keep].astype(np.int64)
        self.n_users = n_users
        self.n_rows = len(ratings)
        #: users whose rows changed online: user -> (items, values, examples)
        self.changed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        #: example ids learnt online and not merged into their user's row yet (`add`, `row`)
        self._pending: dict[int, array] = {}
        self._ratings = ratings
        self._lock = threading.Lock()

    def row(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The interactions of index ``user`` (empty arrays for a user with none), with what
        `add` queued for them merged in first."""
        if self._pending:
            with self._lock:
                if user in self._pending:
                    self._merge(user)
        if user in self.changed:
            return self.changed[user]
        if not 0 <= user < len(self.indptr) - 1:
            empty = np.zeros(0, dtype=np.int64)
            return empty, np.zeros(0, dtype=np.float32), empty
        s = slice(int(self.indptr[user]), int(self.indptr[user + 1]))
        return self.items[s], self.values[s], self.examples[s]

    def degree(self, user: int) -> int:
        return len(self.row(user)[0])

    def add(self, ratings: Ratings, new: np.ndarray) -> np.ndarray:
        """Take the example ids ``new`` of ``ratings`` into the rows (a pair given again takes
        the new value and example id); users beyond ``n_users`` are added. Returns the users
        whose rows changed, ``int64 [k]``.

        O(new): each example id is queued on its user and merged into the user's row when
        the row is next read (`row`, `matrix`, `degree`), all of that user's queue at once.
        Rebuilding every touched user's whole row here instead (as this did) cost 3.6 us a
        rating at 100 ratings a batch on u1, growing with the rows (5.9 us once the served
        users had a few hundred interactions each), on every worker applying the ratings."""
        new = np.asarray(new, dtype=np.int64)
        users = ratings.users[new]
        with self._lock:
            self.n_users = max(self.n_users, ratings.n_users)
            self.n_rows = len(ratings)
            self._ratings = ratings  # rows are only appended: it holds every example queued
            pending = self._pending
            full = []
            for example, user in zip(new.tolist(), users.tolist(), strict=True):
                queued = pending.get(user)
                if queued is None:
                    pending[user] = array("q", (example,))
                else:
                    queued.append(example)
                    if len(queued) == self.merge_at:
                        full.append(user)
            for user in full:  # a user rated often and not read: merge now, so queues stay short
                self._merge(user)
        return np.unique(users)

    def _merge(self, user: int) -> None:
        """Merge the example ids queued for ``user`` into their row, sorted by item (of a pair
        given more than once, the largest example id wins); the caller holds the lock."""
        examples = np.frombuffer(self._pending.pop(user), dtype=np.int64)
        ratings = self._ratings
        order = np.lexsort((examples, ratings.items[examples]))  # by item, then example id
        sorted_items = ratings.items[examples[order]].astype(np.int64, copy=False)
        last = np.ones(len(order), dtype=bool)
        last[:-1] = sorted_items[1:] != sorted_items[:-1]
        new_items, new_examples = sorted_items[last], examples[order[last]]
        new_values = ratings.values[new_examples].astype(np.float32, copy=False)
        if user in self.changed:
            items, values, examples = self.changed[user]
        elif 0 <= user < len(self.indptr) - 1:
            s = slice(int(self.indptr[user]), int(self.indptr[user + 1]))
            items, values, examples = self.items[s], self.values[s], self.examples[s]
        else:
            items, values, examples = np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
        at = np.searchsorted(items, new_items)
        present = at < len(items)
        present[present] = items[at[present]] == new_items[present]
        values, examples = values.copy(), examples.copy()  # a row is never written in place: readers may hold it
        values[at[present]] = new_values[present]
        examples[at[present]] = new_examples[present]
        absent = ~present
        self.changed[user] = (np.insert(items, at[absent], new_items[absent]),
                              np.insert(values, at[absent], new_values[absent]),
                              np.insert(examples, at[absent], new_examples[absent]))

    def matrix(self, users: np.ndarray, n_items: int, weights) -> sp.csr_matrix:
        """The rows of ``users`` as a weighted CSR matrix ``[len(users), n_items]`` (``weights``
        maps interaction values to input weights); users ``-1`` or beyond the rows are empty."""
        users = np.asarray(users, dtype=np.int64)
        rows = [self.row(int(u)) for u in users.tolist()] if self.changed or self._pending or (users < 0).any() or \
            (users >= len(self.indptr) - 1).any() else None
        if rows is None:  # the common case: a vectorised gather of stored rows
            starts, ends = self.indptr[users], self.indptr[users + 1]
            counts = ends - starts
            idx = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + \
                np.arange(int(counts.sum()), dtype=np.int64)
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            return sp.csr_matrix((weights(self.values[idx]), self.items[idx], indptr), shape=(len(users), n_items))
        indptr = np.concatenate([[0], np.cumsum([len(r[0]) for r in rows])]).astype(np.int64)
        items = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int64)
        values = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.float32)
        return sp.csr_matrix((weights(values), items, indptr), shape=(len(users), n_items))

    def degrees(self, users: np.ndarray) -> np.ndarray:
        """Interactions per user of ``users``, ``int64 [B]`` (0 for ``-1`` and users beyond)."""
        return np.array([self.degree(int(u)) for u in np.asarray(users).tolist()], dtype=np.int64) \
            if self.changed or self._pending else _stored_degrees(self.indptr, np.asarray(users, dtype=np.int64))


def _stored_degrees(indptr: np.ndarray, users: np.ndarray) -> np.ndarray:
    n = len(indptr) - 1
    inside = (users >= 0) & (users < n)
    safe = np.where(inside, users, 0)
    return np.where(inside, indptr[safe + 1] - indptr[safe], 0)


__all__ = ["UserRows"]

"""The live interaction rows an item-item model scores from: per user, the items interacted
with, their values and the example ids (rows of the `Ratings`) they came from.

Built from a `Ratings` (training, or training + live); a (user, item) pair that occurs more
than once keeps its latest row (the largest example id), as a rating given again replaces the
earlier one. Online interactions are merged per user (`add`), in O(new + the user's row), with
no rebuild of the whole matrix.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsys.ratings import Ratings


class UserRows:
    """Per-user interactions: ``row(u) -> (items int64 [m], values float32 [m], examples int64
    [m])``, sorted by item. ``n_rows`` is the number of `Ratings` rows taken in (the next
    example id to expect)."""

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

    def row(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The interactions of index ``user`` (empty arrays for a user with none)."""
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
        """Merge the example ids ``new`` of ``ratings`` into the rows (a pair given again takes
        the new value and example id); users beyond ``n_users`` are added. Returns the users
        whose rows changed, ``int64 [k]``."""
        new = np.asarray(new, dtype=np.int64)
        self.n_users = max(self.n_users, ratings.n_users)
        self.n_rows = len(ratings)
        users = ratings.users[new]
        order = np.argsort(users, kind="stable")  # by user, in example order within a user
        touched, starts = np.unique(users[order], return_index=True)
        bounds = np.append(starts, len(order))
        for j, u in enumerate(touched.tolist()):
            mine = new[order[bounds[j]:bounds[j + 1]]]
            items, values, examples = self.row(u)
            all_items = np.concatenate([items, ratings.items[mine]])
            all_values = np.concatenate([values, ratings.values[mine].astype(np.float32)])
            all_examples = np.concatenate([examples, mine])
            # the last occurrence of an item wins: first in the reversed arrays
            keys, first = np.unique(all_items[::-1], return_index=True)
            last = len(all_items) - 1 - first
            self.changed[u] = (keys.astype(np.int64), all_values[last], all_examples[last])
        return touched

    def matrix(self, users: np.ndarray, n_items: int, weights) -> sp.csr_matrix:
        """The rows of ``users`` as a weighted CSR matrix ``[len(users), n_items]`` (``weights``
        maps interaction values to input weights); users ``-1`` or beyond the rows are empty."""
        users = np.asarray(users, dtype=np.int64)
        rows = [self.row(int(u)) for u in users.tolist()] if self.changed or (users < 0).any() or \
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
            if self.changed else _stored_degrees(self.indptr, np.asarray(users, dtype=np.int64))


def _stored_degrees(indptr: np.ndarray, users: np.ndarray) -> np.ndarray:
    n = len(indptr) - 1
    inside = (users >= 0) & (users < n)
    safe = np.where(inside, users, 0)
    return np.where(inside, indptr[safe + 1] - indptr[safe], 0)


__all__ = ["UserRows"]

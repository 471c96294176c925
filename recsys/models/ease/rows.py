"""The live interaction rows an item-item model scores from: per user, the items interacted
with, their values and the example ids (rows of the `Ratings`) they came from.

Built from a `Ratings` (training, or training + live); a (user, item) pair that occurs more
than once keeps its latest row (the largest example id), as a rating given again replaces the
earlier one. Online interactions are merged per batch (`add`: the new entries sorted once and
merged into the touched users' sorted rows), with no rebuild of the whole matrix.
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
        whose rows changed, ``int64 [k]``.

        Vectorised over the batch: the new entries are sorted by (user, item) once (the
        latest example of a pair repeated in the batch wins) and merged into the touched
        users' rows, which are already sorted, by one ``searchsorted`` (pairs present: new
        value and example id) and one ``insert`` (new pairs): O(new log new + the touched
        rows), with no sort of the rows and no per-user numpy call but the final split."""
        new = np.asarray(new, dtype=np.int64)
        self.n_users = max(self.n_users, ratings.n_users)
        self.n_rows = len(ratings)
        if len(new) == 0:
            return np.zeros(0, dtype=np.int64)
        if len(new) == 1:  # one rating (a request of one): a binary search in the user's row
            return self._add_one(ratings, int(new[0]))
        width = np.int64(max(ratings.n_items, 1))  # key = user * width + item: (user, item) order
        new_keys = ratings.users[new] * width + ratings.items[new]
        order = np.lexsort((new, new_keys))  # by key, the latest example last
        sorted_keys = new_keys[order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
        pick = order[last]
        new_keys, new_examples = sorted_keys[last], new[pick]
        new_values = ratings.values[new_examples].astype(np.float32, copy=False)
        touched = np.unique(new_keys // width)
        old = [self.row(u) for u in touched.tolist()]
        counts = np.fromiter((len(r[0]) for r in old), dtype=np.int64, count=len(old))
        keys = np.repeat(touched * width, counts) + np.concatenate([r[0] for r in old])
        values = np.concatenate([r[1] for r in old]).astype(np.float32, copy=False)
        examples = np.concatenate([r[2] for r in old]).astype(np.int64, copy=False)
        at = np.searchsorted(keys, new_keys)
        present = at < len(keys)
        present[present] = keys[at[present]] == new_keys[present]
        values[at[present]] = new_values[present]  # concatenate made fresh arrays: ours to write
        examples[at[present]] = new_examples[present]
        absent = ~present
        keys = np.insert(keys, at[absent], new_keys[absent])
        values = np.insert(values, at[absent], new_values[absent])
        examples = np.insert(examples, at[absent], new_examples[absent])
        items = keys % width
        bounds = np.searchsorted(keys, touched * width).tolist() + [len(keys)]
        for j, u in enumerate(touched.tolist()):
            s = slice(bounds[j], bounds[j + 1])  # copies: a row must not pin the batch's arrays
            self.changed[u] = (items[s].copy(), values[s].copy(), examples[s].copy())
        return touched

    def _add_one(self, ratings: Ratings, example: int) -> np.ndarray:
        """`add` of the single example id ``example``."""
        user, item = int(ratings.users[example]), int(ratings.items[example])
        value = np.float32(ratings.values[example])
        items, values, examples = self.row(user)
        at = int(np.searchsorted(items, item))
        if at < len(items) and items[at] == item:  # given again: the new value and example id
            values, examples = values.copy(), examples.copy()
            values[at], examples[at] = value, example
        else:
            items, values, examples = (  # slices joined: np.insert costs several times more
                np.concatenate((items[:at], np.array([item], np.int64), items[at:])),
                np.concatenate((values[:at], np.array([value], np.float32), values[at:])),
                np.concatenate((examples[:at], np.array([example], np.int64), examples[at:])))
        self.changed[user] = (items.astype(np.int64, copy=False), values.astype(np.float32, copy=False),
                              examples.astype(np.int64, copy=False))
        return np.array([user], dtype=np.int64)

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

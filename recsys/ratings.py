"""`Ratings`: the one currency of recsys.

Row ``k`` of a training `Ratings` is training example ``k`` everywhere: in samplers, in the
rollback log and in explanations. Users and items are dense ``int64`` indices into `IdMap`s
that translate to and from the raw ids of the source (always kept as strings, so ``"196"``
and ``196`` name the same user). Splits of one dataset share its id maps, so an index means
the same user in the training and the test part.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from recsys.errors import DuplicateRatingsWarning, RatingsFormatError, UnknownIdError


class _IdStore:
    """The raw ids and ``raw id -> index`` dict shared by a chain of `IdMap.extend` results:
    ``raw[:length]`` are the ids in index order (over-allocated, so an extend appends in
    amortised O(new ids)); each map sees the first ``len(map)`` of them. Only the map whose
    length is ``length`` (the newest) appends; ids are never changed or removed."""

    def __init__(self, values: np.ndarray) -> None:
        self.raw = values
        self.length = len(values)
        self.positions: dict[str, int] = dict(zip(values.tolist(), range(len(values)), strict=True))

    def append(self, ids: list[str]) -> None:
        end = self.length + len(ids)
        if end > len(self.raw):
            grown = np.empty(max(2 * end, 64), dtype=object)
            grown[:self.length] = self.raw[:self.length]
            self.raw = grown
        self.raw[self.length:end] = ids
        self.positions.update(zip(ids, range(self.length, end), strict=True))
        self.length = end


class IdMap:
    """A bijection between raw ids (strings) and dense indices ``0..n-1``.

    Built once from the raw ids in index order; lookups are O(1) per id (a dict, for many
    ids at once too: faster than a pandas index at every size measured, 10 to 10^6 ids).
    Raw ids are normalised with ``str()`` so callers may pass ints. `extend` appends in O(new
    ids): the extended map shares this one's storage (this map still sees only its own ids).
    """

    def __init__(self, raw_ids: Iterable[object]) -> None:
        values = np.asarray([str(x) for x in raw_ids], dtype=object)
        store = _IdStore(values)
        if len(store.positions) != len(values):
            seen: set[str] = set()
            dup = next(v for v in values.tolist() if v in seen or seen.add(v))
            raise ValueError(f"IdMap raw ids must be unique; {dup!r} repeats")
        self._attach(store, len(values))

    def _attach(self, store: _IdStore, n: int) -> None:
        self._store, self._n, self._raw = store, n, store.raw[:n]
        self._positions = store.positions

    def __len__(self) -> int:
        return self._n

    def _position(self, raw_id: object) -> int | None:
        i = self._positions.get(raw_id if type(raw_id) is str else str(raw_id))
        return i if i is not None and i < self._n else None

    def __contains__(self, raw_id: object) -> bool:
        return self._position(raw_id) is not None

    def table(self) -> tuple[Mapping[str, int], int]:
        """``(positions, n)`` for looking many ids up in a loop, one dict lookup each: an id
        (a ``str``; other types are not normalised here, use `get`) is in this map at index
        ``i = positions.get(raw_id)`` only when ``i is not None and i < n`` (the dict is
        shared with later `extend` results, which add ids past ``n``). Read-only use."""
        return self._positions, self._n

    def extends(self, other: IdMap) -> bool:
        """Whether this map holds ``other``'s ids at the same indices (and maybe more)."""
        if self._n < other._n:
            return False
        if self._store is other._store or self._raw is other._raw:
            return True
        return bool(np.array_equal(self._raw[:other._n], other._raw))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and len(self) == len(other) and self.extends(other)

    def __hash__(self) -> int:  # identity hash: maps are compared by content only in tests
        return id(self)

    def __repr__(self) -> str:
        return f"IdMap(n={len(self)})"

    @property
    def raw_ids(self) -> np.ndarray:
        """Raw ids in index order, ``object`` array of ``str``, shape ``[n]`` (read-only use)."""
        return self._raw

    def index(self, raw_id: object, kind: str = "id") -> int:
        """The index of one raw id; `UnknownIdError` if it was never seen."""
        i = self._position(raw_id)
        if i is None:
            raise UnknownIdError(kind, raw_id)
        return i

    def get(self, raw_id: object) -> int | None:
        """The index of one raw id, or None when unknown."""
        return self._position(raw_id)

    def indices(self, raw_ids: Iterable[object]) -> np.ndarray:
        """Indices of many raw ids, ``int64 [n]``, ``-1`` where an id is unknown."""
        if not isinstance(raw_ids, np.ndarray | pd.Index) and not isinstance(raw_ids, Sequence):
            raw_ids = list(raw_ids)
        positions, n = self._positions, self._n  # a dict lookup per id beats pandas' get_indexer at every size
        arr = np.fromiter((positions.get(x if type(x) is str else str(x), -1) for x in raw_ids), dtype=np.int64,
                          count=len(raw_ids))
        if len(arr) and self._store.length > n:
            arr[arr >= n] = -1  # ids a later extend added: not in this map
        return arr

    def raw(self, index: int) -> str:
        """The raw id of one index."""
        return str(self._raw[index])

    def extend(self, raw_ids: Iterable[object]) -> IdMap:
        """A map with the unseen ``raw_ids`` appended in first-seen order (existing indices
        unchanged); ``self`` when every id is known. O(new ids) when this is the newest map of
        its chain (the usual case), else a fresh map."""
        positions, n = self._positions, self._n
        unseen = [x for x in dict.fromkeys(map(str, raw_ids)) if positions.get(x, n) >= n]
        if not unseen:
            return self
        store = self._store
        if store.length != self._n or any(x in store.positions for x in unseen):
            return IdMap(np.concatenate([self._raw, np.asarray(unseen, dtype=object)]))
        store.append(unseen)
        out = object.__new__(IdMap)
        out._attach(store, store.length)
        return out


class CSR(NamedTuple):
    """Compressed rows of a ratings matrix (by user or by item).

    ``indptr [n_rows+1]``; for the ratings of row ``r`` at ``indptr[r]:indptr[r+1]``:
    ``columns`` (the other side's index), ``values`` (the ratings) and ``examples`` (the row
    numbers ``k`` of those ratings in the `Ratings` they came from).
    """

    indptr: np.ndarray
    columns: np.ndarray
    values: np.ndarray
    examples: np.ndarray

    def row(self, r: int) -> slice:
        return slice(int(self.indptr[r]), int(self.indptr[r + 1]))

    def degrees(self) -> np.ndarray:
        """Number of ratings per row, ``int64 [n_rows]``."""
        return np.diff(self.indptr)


def _build_csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int) -> CSR:
    order = np.lexsort((cols, rows))  # by row, then column: stable and deterministic
    counts = np.bincount(rows, minlength=n_rows)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return CSR(indptr, cols[order], values[order], order.astype(np.int64))


class _Tail:
    """Over-allocated arrays behind a chain of `Ratings.append` results: each result views
    the first ``length`` rows; only the newest (the one whose length is ``length``) writes
    past them, so older results never see a row change."""

    def __init__(self, users: np.ndarray, items: np.ndarray, values: np.ndarray,
                 timestamps: np.ndarray | None) -> None:
        self.users, self.items, self.values, self.timestamps = users, items, values, timestamps
        self.length = 0

    @classmethod
    def allocate(cls, capacity: int, timestamps: bool) -> _Tail:
        return cls(np.empty(capacity, np.int64), np.empty(capacity, np.int64), np.empty(capacity, np.float32),
                   np.empty(capacity, np.int64) if timestamps else None)

    @property
    def capacity(self) -> int:
        return len(self.users)

    def write(self, at: int, users: np.ndarray, items: np.ndarray, values: np.ndarray,
              timestamps: np.ndarray | None) -> None:
        end = at + len(users)
        self.users[at:end], self.items[at:end], self.values[at:end] = users, items, values
        if self.timestamps is not None:
            self.timestamps[at:end] = timestamps


@dataclass(frozen=True, eq=False)
class Ratings:
    """Explicit ratings: parallel arrays, one entry per (user, item) pair.

    Attributes:
        users: ``int64 [n]`` user indices into ``user_ids``.
        items: ``int64 [n]`` item indices into ``item_ids``.
        values: ``float32 [n]`` ratings.
        timestamps: ``int64 [n]`` seconds since the epoch, or None when the source has none.
        user_ids, item_ids: raw id <-> index maps; may hold ids with no rating here (a test
            split shares its training split's maps).
        rating_scale: ``(lowest, highest)`` rating the source allows; predictions are clipped
            to it.
        item_titles: raw item id -> display title, when the source has titles.
    """

    users: np.ndarray
    items: np.ndarray
    values: np.ndarray
    timestamps: np.ndarray | None
    user_ids: IdMap
    item_ids: IdMap
    rating_scale: tuple[float, float]
    item_titles: Mapping[str, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.users)
        for name in ("items", "values"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Ratings.{name} has {len(getattr(self, name))} rows, users has {n}")
        if self.timestamps is not None and len(self.timestamps) != n:
            raise ValueError(f"Ratings.timestamps has {len(self.timestamps)} rows, users has {n}")
        if n and (self.users.min() < 0 or self.users.max() >= len(self.user_ids)):
            raise ValueError("Ratings.users holds an index outside user_ids")
        if n and (self.items.min() < 0 or self.items.max() >= len(self.item_ids)):
            raise ValueError("Ratings.items holds an index outside item_ids")
        lo, hi = self.rating_scale
        if not lo < hi:
            raise ValueError(f"rating_scale must be (low, high) with low < high, got {self.rating_scale}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        users: Sequence[object] | np.ndarray,
        items: Sequence[object] | np.ndarray,
        values: Sequence[float] | np.ndarray,
        timestamps: Sequence[int] | np.ndarray | None = None,
        *,
        rating_scale: tuple[float, float] | None = None,
        item_titles: Mapping[str, str] | None = None,
        user_ids: IdMap | None = None,
        item_ids: IdMap | None = None,
        source: str = "<arrays>",
    ) -> Ratings:
        """Ratings from raw ids, building id maps unless given.

        Raw ids are indexed in sorted order (numerically when they are all integers), so the
        same file always gives the same indices. Duplicate (user, item) pairs keep the latest
        rating (largest timestamp, else the last row) and raise one `DuplicateRatingsWarning`
        with their count. ``rating_scale`` defaults to the observed min and max. Values that
        are NaN or infinite raise `RatingsFormatError` naming the row (``source`` line ``k+1``).
        """
        vals = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(vals)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise RatingsFormatError("rating is not a finite number", path=source, line=k + 1, value=values[k])
        if len(vals) == 0:
            raise RatingsFormatError("no ratings", path=source)
        u_idx, umap = _factorize(users, user_ids, "user")
        i_idx, imap = _factorize(items, item_ids, "item")
        ts = None if timestamps is None else np.asarray(timestamps, dtype=np.int64)
        keep = _latest_of_duplicates(u_idx, i_idx, ts, len(imap))
        n_dup = len(u_idx) - len(keep)
        if n_dup:
            warnings.warn(
                f"{source}: {n_dup} duplicate (user, item) ratings; kept the latest of each",
                DuplicateRatingsWarning,
                stacklevel=2,
            )
            u_idx, i_idx, vals = u_idx[keep], i_idx[keep], vals[keep]
            ts = None if ts is None else ts[keep]
        scale = rating_scale if rating_scale is not None else (float(vals.min()), float(vals.max()))
        if scale[0] == scale[1]:
            scale = (scale[0] - 0.5, scale[1] + 0.5)
        return cls(u_idx, i_idx, vals.astype(np.float32), ts, umap, imap, tuple(map(float, scale)),
                   dict(item_titles) if item_titles is not None else None)

    # ------------------------------------------------------------------ basic views
    def __len__(self) -> int:
        return len(self.users)

    @property
    def n_users(self) -> int:
        """Size of the user index space (users with no rating here included)."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @cached_property
    def global_mean(self) -> float:
        return float(self.values.mean(dtype=np.float64)) if len(self) else float(np.mean(self.rating_scale))

    @cached_property
    def by_user(self) -> CSR:
        """Ratings grouped by user: ``columns`` are item indices."""
        return _build_csr(self.users, self.items, self.values, self.n_users)

    @cached_property
    def by_item(self) -> CSR:
        """Ratings grouped by item: ``columns`` are user indices."""
        return _build_csr(self.items, self.users, self.values, self.n_items)

    def user_counts(self) -> np.ndarray:
        """Ratings per user, ``int64 [n_users]``."""
        return np.bincount(self.users, minlength=self.n_users)

    def item_counts(self) -> np.ndarray:
        return np.bincount(self.items, minlength=self.n_items)

    def subset(self, rows: np.ndarray) -> Ratings:
        """The ratings at ``rows`` (bool mask or int indices), keeping the id maps."""
        rows = np.asarray(rows)
        return Ratings(
            self.users[rows], self.items[rows], self.values[rows],
            None if self.timestamps is None else self.timestamps[rows],
            self.user_ids, self.item_ids, self.rating_scale, self.item_titles,
        )

    def with_id_maps(self, user_ids: IdMap, item_ids: IdMap) -> Ratings:
        """The same ratings re-indexed into (larger) maps that contain these maps' ids."""
        u = user_ids.indices(self.user_ids.raw_ids)[self.users]
        i = item_ids.indices(self.item_ids.raw_ids)[self.items]
        if (u < 0).any() or (i < 0).any():
            raise ValueError("with_id_maps: the new maps lack some ids of these ratings")
        return Ratings(u, i, self.values, self.timestamps, user_ids, item_ids, self.rating_scale,
                       self.item_titles)

    def append(self, other: Ratings) -> Ratings:
        """These ratings followed by ``other``'s as new rows: row ``k`` here keeps its example
        id, row ``j`` of ``other`` becomes row ``len(self) + j`` (ratings received after
        training join the training ratings this way, so a log or an explanation keeps its
        meaning). ``other``'s id maps must extend these (the same ids at the same indices,
        possibly more: users or items added since); the result takes ``other``'s maps, this
        rating scale and these titles. Timestamps are kept when both sides have them (or ``other``
        is empty). Returns
        ``self`` when there is nothing to add."""
        if tuple(other.rating_scale) != tuple(self.rating_scale):
            raise ValueError(f"append: ratings on the scale {other.rating_scale} cannot join ratings on "
                             f"{self.rating_scale}")
        for kind, mine, theirs in (("user", self.user_ids, other.user_ids), ("item", self.item_ids, other.item_ids)):
            if theirs is not mine and not theirs.extends(mine):
                raise ValueError(f"append: the new ratings' {kind} ids must extend these ratings' "
                                 f"(same ids at the same indices)")
        if len(other) == 0 and other.user_ids is self.user_ids and other.item_ids is self.item_ids:
            return self
        keep_ts = self.timestamps is not None and (other.timestamps is not None or len(other) == 0)
        n, total = len(self), len(self) + len(other)
        tail: _Tail | None = self.__dict__.get("_tail")
        if tail is None or tail.length != n or tail.capacity < total or (tail.timestamps is not None) != keep_ts:
            # a fresh tail with room to grow: appending is amortised O(len(other)), not O(len(self))
            tail = _Tail.allocate(max(2 * total, 1024), keep_ts)
            tail.write(0, self.users, self.items, self.values, self.timestamps)
        more_ts = None
        if keep_ts:
            more_ts = np.zeros(0, np.int64) if other.timestamps is None else other.timestamps
        tail.write(n, other.users, other.items, other.values, more_ts)
        tail.length = total
        # both sides were validated against maps that ``other``'s extend: no O(n) re-check
        out = object.__new__(Ratings)
        for name, value in (("users", tail.users[:total]), ("items", tail.items[:total]),
                            ("values", tail.values[:total]),
                            ("timestamps", None if tail.timestamps is None else tail.timestamps[:total]),
                            ("user_ids", other.user_ids), ("item_ids", other.item_ids),
                            ("rating_scale", self.rating_scale), ("item_titles", self.item_titles),
                            ("_tail", tail)):
            object.__setattr__(out, name, value)
        return out

    def reserve(self, rows: int) -> Ratings:
        """The same ratings (same rows, maps and scale) backed by arrays with room for ``rows``
        more, so that appends up to that many rows copy nothing: the O(len) copy `append`
        makes the first time happens now (the service does it while warming, not in the
        first write). ``self`` when it already has that room."""
        tail: _Tail | None = self.__dict__.get("_tail")
        n = len(self)
        if tail is not None and tail.length == n and tail.capacity >= n + rows:
            return self
        tail = _Tail.allocate(max(n + int(rows), 1024), self.timestamps is not None)
        tail.write(0, self.users, self.items, self.values, self.timestamps)
        tail.length = n
        out = object.__new__(Ratings)
        for name, value in (("users", tail.users[:n]), ("items", tail.items[:n]), ("values", tail.values[:n]),
                            ("timestamps", None if tail.timestamps is None else tail.timestamps[:n]),
                            ("user_ids", self.user_ids), ("item_ids", self.item_ids),
                            ("rating_scale", self.rating_scale), ("item_titles", self.item_titles),
                            ("_tail", tail)):
            object.__setattr__(out, name, value)
        for name in ("by_user", "by_item", "global_mean"):  # the same rows: what was derived holds
            if name in self.__dict__:
                out.__dict__[name] = self.__dict__[name]
        return out

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(users int64 [n], items int64 [n], values float32 [n])`` on ``device``."""
        return (
            torch.from_numpy(self.users).to(device),
            torch.from_numpy(self.items).to(device),
            torch.from_numpy(self.values).to(device),
        )

    def to_frame(self) -> pd.DataFrame:
        """A DataFrame with raw ``user``, ``item``, ``rating`` and (if known) ``timestamp``."""
        frame = pd.DataFrame({
            "user": self.user_ids.raw_ids[self.users],
            "item": self.item_ids.raw_ids[self.items],
            "rating": self.values,
        })
        if self.timestamps is not None:
            frame["timestamp"] = self.timestamps
        return frame

    def title(self, raw_item: object) -> str | None:
        """Display title of an item, when the source has titles."""
        return None if self.item_titles is None else self.item_titles.get(str(raw_item))

    def describe(self) -> str:
        density = len(self) / max(1, self.n_users * self.n_items)
        return (f"{len(self):,} ratings, {self.n_users:,} users, {self.n_items:,} items, "
                f"density {density:.4%}, scale {self.rating_scale[0]:g}..{self.rating_scale[1]:g}")

    def __repr__(self) -> str:
        return f"Ratings({self.describe()})"


def _factorize(raw: Sequence[object] | np.ndarray, given: IdMap | None, kind: str) -> tuple[np.ndarray, IdMap]:
    arr = np.asarray(raw)
    if given is not None:
        idx = given.indices(arr)
        if (idx < 0).any():
            raise UnknownIdError(kind, arr[np.flatnonzero(idx < 0)[0]])
        return idx, given
    if arr.dtype.kind in "iu":
        codes, uniques = pd.factorize(arr, sort=True)
        return codes.astype(np.int64), IdMap(uniques.astype(str))
    as_str = arr.astype(str).astype(object)
    numeric = pd.to_numeric(pd.Series(as_str), errors="coerce")
    if numeric.notna().all() and (numeric == numeric.round()).all():
        # integer-looking strings: sort numerically, keep the original spelling
        order = np.unique(as_str)
        order = order[np.argsort(pd.to_numeric(pd.Series(order)).to_numpy(), kind="stable")]
        imap = IdMap(order)
        return imap.indices(as_str), imap
    codes, uniques = pd.factorize(as_str, sort=True)
    return codes.astype(np.int64), IdMap(uniques)


def _latest_of_duplicates(users: np.ndarray, items: np.ndarray, ts: np.ndarray | None, n_items: int) -> np.ndarray:
    """Row indices to keep: for each (user, item), the row with the largest (timestamp, row)."""
    key = users * np.int64(max(n_items, 1)) + items
    row = np.arange(len(key))
    order = np.lexsort((row, key)) if ts is None else np.lexsort((row, ts, key))
    sorted_key = key[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = sorted_key[1:] != sorted_key[:-1]
    return np.sort(order[last])

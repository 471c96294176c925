"""MF's online learning (`recsys.models.base.OnlineLearner`): what `MatrixFactorization.learn`
does with ratings received after training, and which path answers each user since.

- a user the model was trained on: incremental SGD over their new ratings, in arrival order,
  ``passes`` times at the online learning rate (the final training rate), on the same
  kernel as training (`recsys.models.mf.log.online_sgd`), logged into the artefact's
  gradient-rollback log when it has one (grown to cover the new rows first); path ``online``;
- any other user: a fresh fold-in (`MatrixFactorization.fold_in_user`, a ridge solve on the
  fixed item factors) from all of that user's ratings, redone whenever they rate again;
  path ``fold-in``;
- users with no rating: the bias-only fallback, path ``fallback``; trained users with no
  new rating: ``model``.

New users (and items) grow the tables first (amortised: at least doubling the user table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from recsys.models.base import RatingModel, UpdateLog
from recsys.models.mf.log import online_sgd
from recsys.ratings import Ratings

#: online SGD passes over a trained user's new ratings (what the service has always used)
ONLINE_PASSES = 3
#: the online learning rate when none is given (the `TrainConfig` default rate)
DEFAULT_ONLINE_LR = 0.01


@dataclass
class OnlineState:
    """What a model learning online remembers: ``n_trained`` rows of the ratings it was
    trained on (later rows were learnt online), which users had training ratings
    (``trained``, bool), which users received ratings online (``live``), the update ``log``
    and the online ``learning_rate`` and ``passes``."""

    n_trained: int
    trained: np.ndarray
    log: UpdateLog | None = None
    learning_rate: float = DEFAULT_ONLINE_LR
    passes: int = ONLINE_PASSES
    live: set[int] = field(default_factory=set)
    #: users from this index on had no place in the training ratings (None: unknown), so all
    #: their rows are rows learnt online, kept in ``new_user_rows`` while ``next_row`` (the
    #: row after the last learnt) shows every row since ``n_trained`` went through `learn`
    first_new_user: int | None = None
    new_user_rows: dict[int, list[int]] = field(default_factory=dict)
    next_row: int | None = None

    @classmethod
    def start(cls, model: RatingModel, train: Ratings, log: UpdateLog | None = None,
              learning_rate: float | None = None, passes: int = ONLINE_PASSES) -> OnlineState:
        trained = train.user_counts()[: model.n_users] > 0
        return cls(len(train), trained, log, DEFAULT_ONLINE_LR if learning_rate is None else float(learning_rate),
                   passes, first_new_user=train.n_users, next_row=len(train))

    def is_trained(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        out = np.zeros(len(users), dtype=bool)
        inside = (users >= 0) & (users < len(self.trained))
        out[inside] = self.trained[users[inside]]
        return out


def learn(model: RatingModel, state: OnlineState, ratings: Ratings, new: np.ndarray) -> None:
    """Apply the example ids ``new`` of ``ratings`` (training + live) to ``model`` in place."""
    if ratings.n_users > model.n_users or ratings.n_items > model.n_items:
        model.grow(max(ratings.n_users, 2 * model.n_users) if ratings.n_users > model.n_users else model.n_users,
                   max(ratings.n_items, model.n_items))
    new = np.asarray(new, dtype=np.int64)
    if len(new) == 0:
        _load_kernels(model, state, ratings)
        return
    log = state.log
    if log is not None and log.n_examples < len(ratings):
        log.extend(len(ratings) - log.n_examples)  # row k of the log stays example k
    users = ratings.users[new]
    trained = state.is_trained(users)
    state.live.update(users.tolist())
    if trained.any():
        mine = new[trained]
        if log is None and model.device.type == "cpu":
            _sgd_passes_cpu(model, state, ratings, mine)
        else:
            online_sgd(model, log, ratings, mine, state.learning_rate, epochs=state.passes, shuffle=False)
    indexed = state.first_new_user is not None and state.next_row == new[0] and \
        np.array_equal(new, np.arange(new[0], new[0] + len(new)))
    if indexed:  # every row since training went through here: the new users' rows are all known
        state.next_row = int(new[-1]) + 1
        fresh = users >= state.first_new_user
        for u, row in zip(users[fresh].tolist(), new[fresh].tolist(), strict=True):
            state.new_user_rows.setdefault(u, []).append(row)
    else:
        state.first_new_user = None  # rows came another way: find users' rows by a scan from now on
    folded = np.unique(users[~trained]) if not trained.all() else users[:0]
    if len(folded):
        scanned = folded if state.first_new_user is None else folded[folded < state.first_new_user]
        # all their ratings, in row order: a user new since training from the index (O(their rows)), any other
        # by a scan of all ratings
        mine = np.flatnonzero(np.isin(ratings.users, scanned)) if len(scanned) else new[:0]
        owners = ratings.users[mine]
        for u in folded.tolist():
            if state.first_new_user is not None and u >= state.first_new_user:
                rows = np.asarray(state.new_user_rows[u], dtype=np.int64)
            else:
                rows = mine[owners == u]
            p, b = model.fold_in_user(torch.from_numpy(ratings.items[rows]), torch.from_numpy(ratings.values[rows]))
            model.set_user(u, p, b)


def _sgd_passes_cpu(model: RatingModel, state: OnlineState, ratings: Ratings, ids: np.ndarray) -> None:
    """`online_sgd`'s updates for an unlogged model on the CPU (bitwise the same weights)
    without its fixed cost per call (about 70 µs: a seeded generator, torch index assignments,
    one kernel call per pass), which a request of one rating pays in full: the users and items
    are flagged known through numpy views of the flags, and the ``passes`` passes in arrival
    order run as one kernel call over the ids repeated."""
    users, items = ratings.users[ids], ratings.items[ids]
    if (users >= model.n_users).any() or (items >= model.n_items).any():
        raise ValueError("online learning: a rating's user or item has no row in the model")
    model.known_users.numpy()[users] = True
    model.known_items.numpy()[items] = True
    model.sgd_examples(ratings, np.tile(ids, state.passes), state.learning_rate)


#: whether this process has loaded the compiled online-SGD kernels (`_load_kernels`)
_kernels_loaded = False


def _load_kernels(model: RatingModel, state: OnlineState, ratings: Ratings) -> None:
    """Load the compiled kernels of online SGD with a pass over no example (nothing changes),
    once per process: numba's first call loads its registries and the cached kernels (about
    0.7 s), which a service warming its model (`learn` of no rows) pays before its first
    write instead of in it. Skipped with an update log (the first real pass loads its logged
    twin of the kernel) and off the CPU."""
    global _kernels_loaded
    if _kernels_loaded or model.device.type != "cpu" or state.log is not None:
        return
    online_sgd(model, None, ratings, np.zeros(0, dtype=np.int64), state.learning_rate, epochs=1, shuffle=False)
    _kernels_loaded = True


def path(model: RatingModel, state: OnlineState | None, user: int) -> str:
    """``model``, ``online``, ``fold-in`` or ``fallback`` for index ``user`` (``-1``: unknown).
    Asked on every prediction: the flags are read through numpy on the CPU (a torch scalar
    index costs microseconds)."""
    if user < 0 or user >= model.n_users:
        return "fallback"
    known = model.known_users
    if not (known.numpy()[user] if known.device.type == "cpu" else bool(known[user])):
        return "fallback"
    if state is None:
        return "model"
    if user < len(state.trained) and state.trained[user]:
        return "online" if user in state.live else "model"
    return "fold-in"

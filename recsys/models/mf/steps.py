"""MF's own training steps for the `recsys.train.Trainer` (`MatrixFactorization.stepper`):
plain SGD without autograd.

- `KernelStepper` (``kernel``; ``kernel-hogwild`` with ``hogwild``): batch size 1 on the CPU,
  the compiled per-example kernel (`MatrixFactorization.sgd_examples`) over a chunk of the
  epoch's order per step group.
- `ClosedFormStepper` (``closed-form``): minibatches on any device, gather, closed-form
  gradient, scatter-add (`MatrixFactorization.sgd_batch`); data-parallel with
  `parallel_sgd_batch`.

Both write an attached gradient-rollback log (`recsys.models.mf.log`) while they step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import torch

from recsys.models.base import RatingModel
from recsys.ratings import Ratings

if TYPE_CHECKING:
    from recsys.models.mf.log import CompactRollbackLog, RollbackLog

#: a `recsys.models.mf.MatrixFactorization` (not imported: the model imports this module)
MatrixFactorization = RatingModel

#: the MF tables a closed-form step touches and the index (users or items) that selects rows
TABLES: tuple[tuple[str, str], ...] = (
    ("user_factors", "user"), ("user_bias", "user"), ("item_factors", "item"), ("item_bias", "item"),
)


class KernelStepper:
    """Per-example SGD with the compiled kernel, ``chunk_size`` examples per step group
    (see the module docstring); ``config`` is the trainer's `recsys.train.TrainConfig`."""

    def __init__(self, model: MatrixFactorization, train: Ratings | None, config: Any) -> None:
        self.model, self.train = model, train
        self.group_size = config.chunk_size
        self.hogwild = bool(config.hogwild)
        self.threads = config.threads
        self.kind = "kernel-hogwild" if self.hogwild else "kernel"
        self.log: RollbackLog | CompactRollbackLog | None = None

    def attach_log(self, log: RollbackLog | CompactRollbackLog) -> None:
        self.log = log

    def step(self, example_ids: np.ndarray, learning_rate: float) -> float:
        assert self.train is not None, "a stepper made for its kind only cannot step"
        threads = (self.threads or numba.get_num_threads()) if self.hogwild else 0
        return self.model.sgd_examples(self.train, example_ids, learning_rate, hogwild_threads=threads,
                                       log=self.log)

    def end_epoch(self) -> None:
        pass

    def close(self) -> None:
        pass


class ClosedFormStepper:
    """Minibatch SGD in closed form, ``batch_size`` examples per step (see the module
    docstring); data-parallel over ``parallel`` (a `recsys.distributed.DataParallel`)."""

    kind = "closed-form"

    def __init__(self, model: MatrixFactorization, train: Ratings | None, config: Any, *,
                 parallel: Any = None) -> None:
        self.model, self.train, self.parallel = model, train, parallel
        self.group_size = config.batch_size
        self.device = torch.device(config.device)
        self.log: RollbackLog | None = None
        self._tensors: tuple[torch.Tensor, ...] | None = None

    def attach_log(self, log: RollbackLog) -> None:
        self.log = log

    def step(self, example_ids: np.ndarray, learning_rate: float) -> float:
        assert self.train is not None, "a stepper made for its kind only cannot step"
        if self._tensors is None:
            self._tensors = self.train.tensors(self.device)
        dp = self.parallel
        mine, weight = (example_ids, 1.0) if dp is None else dp.shard(example_ids)
        idx = torch.from_numpy(mine).to(self.device)
        u, i, r = (t[idx] for t in self._tensors)
        if dp is not None:
            return parallel_sgd_batch(dp, self.model, u, i, r, learning_rate, weight, log=self.log, example_ids=idx)
        if self.log is None:
            return self.model.sgd_batch(u, i, r, learning_rate)
        return self.model.sgd_batch(u, i, r, learning_rate, log=self.log, example_ids=idx)

    def end_epoch(self) -> None:
        pass

    def close(self) -> None:
        pass


@torch.no_grad()
def parallel_sgd_batch(parallel: Any, model: MatrixFactorization, users: torch.Tensor, items: torch.Tensor,
                       values: torch.Tensor, learning_rate: float, weight: float, *,
                       log: RollbackLog | None = None, example_ids: torch.Tensor | None = None) -> float:
    """One data-parallel closed-form SGD step (`MatrixFactorization.sgd_batch`) on this rank's
    shard ``users, items, values [n_rank]`` of the global batch, whose share is ``weight =
    n_rank / n_batch``; ``parallel``: this rank's `recsys.distributed.DataParallel`. Returns
    the global batch's mean squared block error.

    The shard's step is applied with ``learning_rate · weight`` (so each example moves by
    ``lr · ∇ℓ / n_batch``, as in one process, and a rollback ``log`` gets the same credit per
    example), its change on the touched rows is read and undone, and every rank then adds
    the sum over ranks of those changes (`DataParallel.exchange_rows`): all updates are
    computed from the same pre-step weights, as in one process."""
    index = {"user": torch.unique(users), "item": torch.unique(items)}
    weights = [getattr(model, name).weight for name, _ in TABLES]
    saved = [w.index_select(0, index[side]) for w, (_, side) in zip(weights, TABLES, strict=True)]
    loss = 0.0
    if len(users):
        kw = {} if log is None else {"log": log, "example_ids": example_ids}
        loss = float(model.sgd_batch(users, items, values, learning_rate * weight, **kw))
    deltas = []
    for w, s, (_, side) in zip(weights, saved, TABLES, strict=True):
        rows = index[side]
        deltas.append(w.index_select(0, rows) - s)
        w.index_copy_(0, rows, s)
    rows_all, deltas_all, metas = parallel.exchange_rows([index[side] for _, side in TABLES], deltas,
                                                         [loss * weight])
    for w, r, d in zip(weights, rows_all, deltas_all, strict=True):
        w.index_add_(0, r, d)
    return float(sum(float(m[0]) for m in metas))

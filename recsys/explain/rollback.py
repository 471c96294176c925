"""`RollbackCallback`: the `Trainer` plug-in that records a model's gradient-rollback update
log while it trains. The log, and how each step path writes it, belong to the model family
(`RatingModel.new_update_log`, its `Stepper.attach_log` and `RatingModel.update_recorder`;
for MF: `recsys.models.mf.log`)."""

from __future__ import annotations

import warnings

import torch

from recsys.models.base import RatingModel, UpdateLog
from recsys.optim.credit import optimizer_name
from recsys.ratings import Ratings
from recsys.train import Callback, EpochRecord, Trainer, TrainResult


class RollbackCallback(Callback):
    """Trainer plug-in that records the model's update log (`UpdateLog`) while training.

    At the start of training it asks the model for an empty log fitting the trainer's step
    path and optimizer (`RatingModel.new_update_log`) and offers it as ``update_log``; the
    trainer hands it to its stepper, which records every example's update while it steps
    (MF: the compiled kernel and closed-form steps log while they update; the autograd step
    credits each example its gradient through the optimizer, see `recsys.optim.credit`).

    Args:
        store_dtype: dtype the log is cast to when training ends (float16 halves it).
        mode: ``compact`` (default): the family may store the log approximately where it can
            (MF: a `~recsys.models.mf.log.CompactRollbackLog` on the compiled-kernel path,
            about 1.1x the training time of an unlogged fit against about 2x for the exact
            log, factor updates reconstructed with about 2% error); other paths always log
            exactly. ``exact``: the exact log on every path.
    """

    def __init__(self, store_dtype: torch.dtype = torch.float32, mode: str = "compact") -> None:
        if mode not in ("compact", "exact"):
            raise ValueError(f"rollback mode must be 'compact' or 'exact', got {mode!r}")
        self.store_dtype = store_dtype
        self.mode = mode
        self.log: UpdateLog | None = None
        self._warned_restore = False

    def on_train_begin(self, trainer: Trainer, model: RatingModel, train: Ratings) -> None:
        optimizer = trainer.config.optimizer if trainer.optimizer_factory is None else optimizer_name(trainer.optimizer)
        self.log = model.new_update_log(train, kind=trainer.step_kind(model), optimizer=optimizer, mode=self.mode,
                                        planned_passes=trainer.config.epochs)
        self.update_log = self.log

    def on_epoch_end(self, record: EpochRecord) -> bool | None:
        return None

    def on_train_end(self, result: TrainResult) -> None:
        if result.best_epoch is not None and result.best_epoch != len(result.history) and not self._warned_restore:
            warnings.warn(f"rollback: the weights of epoch {result.best_epoch} were restored, but the log holds "
                          f"all {len(result.history)} epochs; train without early stopping for faithful "
                          "explanations", stacklevel=2)
            self._warned_restore = True
        if self.log is not None:
            self.log.close()
            if self.store_dtype != self.log.dtype:
                self.log.compact(self.store_dtype)

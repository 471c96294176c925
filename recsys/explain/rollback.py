"""`RollbackCallback`: the `Trainer` plug-in that records a model's gradient-rollback update
log while it trains (the log itself lives with its model family: `recsys.models.mf.log`)."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from torch import nn

from recsys.models.base import RatingModel
from recsys.models.mf.log import SLOTS, CompactRollbackLog, RollbackLog
from recsys.optim.credit import credit, optimizer_name
from recsys.ratings import Ratings
from recsys.train import Callback, EpochRecord, Trainer, TrainResult


class RollbackCallback(Callback):
    """Trainer plug-in that records a `RollbackLog` while training.

    On the compiled-kernel and closed-form paths the trainer hands the log to the step
    itself (``update_log``), which logs while it updates. On the autograd path the callback
    hooks the model's embedding lookups, keeps the gradient of every gathered row
    (row ``b`` of ``d loss / d gathered`` is example ``b``'s share, even when a user appears
    twice in the batch) and, after the optimizer step, credits each example that gradient
    passed through the optimizer's preconditioner (see the module docstring).

    Args:
        store_dtype: dtype the log is cast to when training ends (float16 halves it).
        mode: ``compact`` (default): on the compiled-kernel path, a `CompactRollbackLog`
            (about 1.1x the training time of an unlogged fit, against about 2x for the exact
            log; factor updates reconstructed with about 2% error); other paths always log
            exactly. ``exact``: a `RollbackLog` on every path.
    """

    def __init__(self, store_dtype: torch.dtype = torch.float32, mode: str = "compact") -> None:
        if mode not in ("compact", "exact"):
            raise ValueError(f"rollback mode must be 'compact' or 'exact', got {mode!r}")
        self.store_dtype = store_dtype
        self.mode = mode
        self.log: RollbackLog | CompactRollbackLog | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._trainer: Trainer | None = None
        self._model: RatingModel | None = None
        self._kind = ""
        self._warned_restore = False
        self._paused = False

    def on_train_begin(self, trainer: Trainer, model: RatingModel, train: Ratings) -> None:
        self._trainer, self._model = trainer, model
        self._kind = trainer.step_kind(model)
        optimizer = trainer.config.optimizer if trainer.optimizer_factory is None else optimizer_name(trainer.optimizer)
        if self._kind == "kernel" and self.mode == "compact":
            self.log = CompactRollbackLog.for_model(model, train, optimizer=optimizer,
                                                    planned_passes=trainer.config.epochs)
        else:
            self.log = RollbackLog.for_model(model, len(train), optimizer=optimizer)
        if self._kind == "autograd":
            self._install_hooks(model)
            self.update_log = None
        else:
            self.update_log = self.log

    def _install_hooks(self, model: RatingModel) -> None:
        for name, _ in SLOTS:
            module = getattr(model, name)
            if not isinstance(module, nn.Embedding):
                raise TypeError(f"rollback on the autograd path needs {name} to be an nn.Embedding")
            self._captured[name] = []

            def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                if torch.is_grad_enabled() and output.requires_grad and mod.training and not self._paused:
                    entry = [inputs[0], None]

                    def keep(grad: torch.Tensor, entry: list = entry) -> None:
                        # the last gradient delivered is the loss's: K-FAC's sampled-target
                        # (Fisher) pass back-propagates through the same lookups before it
                        entry[1] = grad

                    output.register_hook(keep)
                    self._captured[name].append(entry)

            self._hooks.append(module.register_forward_hook(hook))

    @contextlib.contextmanager
    def paused(self):
        """Lookups inside are not logged (the trainer's extra passes, e.g. SALR's)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @torch.no_grad()
    def on_batch_end(self, example_ids: np.ndarray, loss: float) -> None:
        if self._kind != "autograd":
            return
        assert self.log is not None and self._model is not None and self._trainer is not None
        ids = torch.as_tensor(example_ids, device=self.log.user_factors.device)
        updates = []
        for name, _ in SLOTS:
            captured = self._captured[name]
            if not captured:
                raise RuntimeError(f"rollback: the step never looked up {name}")
            if any(grad is None for _, grad in captured):
                raise RuntimeError(f"rollback: a lookup of {name} got no gradient")
            # the lookups of one forward pass (the loss may look a row up more than once) are
            # summed; sub-batches (covariance noise) come as passes in turn, in batch order
            passes: list[list[torch.Tensor]] = []
            for idx, g in captured:
                if passes and len(passes[-1][0]) == len(idx) and torch.equal(passes[-1][0], idx):
                    passes[-1][1] = passes[-1][1] + g
                else:
                    passes.append([idx, g])
            rows = torch.cat([idx for idx, _ in passes])
            grad = torch.cat([g for _, g in passes])
            if len(rows) != len(ids):
                raise RuntimeError(f"rollback: {name} lookups do not follow the batch's examples")
            updates.append(-credit(self._trainer.optimizer, self._trainer.preconditioner, name, getattr(self._model, name).weight, rows, grad))
            captured.clear()
        self.log.add(ids, *updates)

    def on_epoch_end(self, record: EpochRecord) -> bool | None:
        return None

    def on_train_end(self, result: TrainResult) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if result.best_epoch is not None and result.best_epoch != len(result.history) and not self._warned_restore:
            warnings.warn(f"rollback: the weights of epoch {result.best_epoch} were restored, but the log holds "
                          f"all {len(result.history)} epochs; train without early stopping for faithful "
                          "explanations", stacklevel=2)
            self._warned_restore = True
        if self.log is not None:
            self.log.close()
            if self.store_dtype != self.log.dtype:
                self.log.compact(self.store_dtype)

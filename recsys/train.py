"""`Trainer`: epochs, example samplers, validation, early stopping and callbacks, for any
`RatingModel` and any ``torch.optim`` optimizer.

Three step implementations share the loop, chosen by `Trainer.step_kind`:

- ``"kernel"``: MF with plain SGD, batch size 1, on the CPU: the compiled per-example kernel
  (`MatrixFactorization.sgd_examples`) runs a chunk of the epoch at a time.
- ``"closed-form"``: MF with plain SGD and larger batches, any device: gather, closed-form
  gradient, scatter-add (`MatrixFactorization.sgd_batch`); no autograd.
- ``"autograd"``: everything else: ``model.loss`` → ``backward`` → ``optimizer.step``.

All three minimise the same objective (``model.loss``), and the tests check they agree.
Callbacks see the example ids (rows of the training `Ratings`) of every step group, so that
update logging (gradient rollback) plugs in without forking the loop.

Data-parallel training (``Trainer(parallel=...)``, see `recsys.distributed`): every rank
visits the same order and takes its contiguous slice of every global batch; the closed-form
and autograd steps then sum their updates or gradients over the ranks, so the result is that
of one process on the same global batches (up to rounding). The compiled batch-1 kernel stays
single-process. Callbacks see their rank's slice of each batch (not called when it is empty).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numba
import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.errors import TrainingDivergedError
from recsys.models.base import RatingModel
from recsys.optim.factory import NOISE_ESTIMATORS, build_optimizer, build_preconditioner
from recsys.optim.noise import SubBatchNoise
from recsys.optim.salr import SALR
from recsys.optim.sampling import SAMPLERS, make_sampler
from recsys.ratings import Ratings

if TYPE_CHECKING:
    from recsys.distributed import DataParallel


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``learning_rate`` decays by ``lr_decay`` after every epoch.

    ``patience``: epochs without a better validation RMSE before stopping (None: never stop
    early); the weights of the best validation epoch are restored at the end.
    ``chunk_size``: examples per kernel call on the compiled path (one callback call each).
    ``hogwild``: on the compiled path, split every chunk across ``threads`` (default: all)
    threads updating shared rows without locks: about twice as fast on two cores, but no
    longer bit-for-bit reproducible.
    """

    # MF's defaults: the cheapest schedule within 0.0005 validation RMSE of the best
    # (`python benchmarks/tune_mf.py --schedules`); other models bring their own.
    epochs: int = 32
    learning_rate: float = 0.018
    lr_decay: float = 0.94
    batch_size: int = 1
    optimizer: str = "sgd"
    sampler: str = "reshuffle"
    patience: int | None = 5
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    chunk_size: int = 1 << 18
    hogwild: bool = False
    progress: bool | None = None
    #: wrap the optimizer in `recsys.optim.salr.SALR` (autograd path)
    salr: bool = False
    salr_every: int = 10
    #: ``cov-noise``: the small batch whose noise is restored, the noise structure and scale
    noise_batch: int = 256
    noise_structure: str = "diag"
    noise_scale: float = 1.0
    #: ``cov-noise``: where the noise comes from (``per-example`` gradients: SGD only, see
    #: `recsys.optim.noise.CovNoiseSGD`; ``sub-batch`` gradients: any ``noise_base``, see
    #: `recsys.optim.noise.SubBatchNoise`) and the optimizer that steps
    noise_estimator: str = "per-example"
    noise_base: str = "sgd"
    #: K-FAC family: damping relative to the factors' mean eigenvalue (see `recsys.optim.kfac`)
    damping: float = 1.0
    #: K-FAC and TKFAC: update the curvature factors (and run the Fisher's sampled-target
    #: pass) every this many steps, preconditioning with the last ones in between
    stats_freq: int = 1
    #: K-FAC family: per-row trust region κ on embedding rows (None: no cap; see `recsys.optim.kfac`)
    visit_gain: float | None = 0.1

    @classmethod
    def for_model(cls, model: type[RatingModel] | RatingModel, **overrides: object) -> TrainConfig:
        """The config a model trains with by default: these defaults, then the model's
        ``training_defaults``, then its ``optimizer_defaults`` for the chosen optimizer (when
        ``overrides`` names one other than the model's own), then ``overrides``."""
        base = dict(model.training_defaults)
        optimizer = overrides.get("optimizer", base.get("optimizer", cls.optimizer))
        if optimizer != base.get("optimizer", cls.optimizer):
            base.update(model.optimizer_defaults.get(optimizer, {}))
        return cls(**{**base, **overrides})

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if self.noise_structure not in ("diag", "full", "isotropic"):
            raise ValueError(f"noise_structure must be diag, full or isotropic, got {self.noise_structure!r}")
        if self.noise_estimator not in NOISE_ESTIMATORS:
            raise ValueError(f"noise_estimator must be one of {NOISE_ESTIMATORS}, got {self.noise_estimator!r}")
        if not self.damping > 0:
            raise ValueError(f"damping must be > 0, got {self.damping}")
        if self.stats_freq < 1:
            raise ValueError(f"stats_freq must be >= 1, got {self.stats_freq}")
        if self.stats_freq > 1 and self.optimizer in ("ekfac", "tekfac"):
            raise ValueError(f"{self.optimizer} updates its statistics every step: stats_freq must be 1, "
                             f"got {self.stats_freq}")
        if self.visit_gain is not None and not self.visit_gain > 0:
            raise ValueError(f"visit_gain must be > 0 or None (no cap), got {self.visit_gain}")
        if self.noise_batch < 1 or self.noise_scale < 0 or self.salr_every < 1:
            raise ValueError("need noise_batch >= 1, noise_scale >= 0, salr_every >= 1")


@dataclass
class EpochRecord:
    epoch: int
    learning_rate: float
    train_mse: float
    validation_rmse: float | None
    seconds: float


@dataclass
class TrainResult:
    """What happened: per-epoch history, the epoch whose weights were kept, timings."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    best_validation_rmse: float | None = None
    fit_seconds: float = 0.0
    stopped_early: bool = False
    step_kind: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Callback:
    """Hooks into the training loop; override what you need.

    ``update_log``: a callback that records per-example updates (gradient rollback) sets it
    to its log; the trainer then hands the log to fused step implementations (the compiled
    kernel, closed-form minibatch SGD), which record each example's update while applying
    it. None (the default) for callbacks that only observe. A callback with a ``paused()``
    context manager is paused during the trainer's extra passes (SALR's closure).
    """

    update_log: object | None = None

    def on_train_begin(self, trainer: Trainer, model: RatingModel, train: Ratings) -> None:
        """Before the first step, after ``model.prepare``."""

    def on_batch_end(self, example_ids: np.ndarray, loss: float) -> None:
        """After each step group: ``example_ids int64 [m]`` are the rows of the training
        `Ratings` just applied (one batch, or one kernel chunk of per-example steps)."""

    def on_epoch_end(self, record: EpochRecord) -> bool | None:
        """After validation; return True to stop training."""

    def on_train_end(self, result: TrainResult) -> None:
        """After the best weights were restored."""


class Trainer:
    """Trains a `RatingModel` on a training `Ratings` (see the module docstring).

    ``parallel``: this rank's `recsys.distributed.DataParallel` for data-parallel training
    (every rank runs ``fit`` with the same data and config); None for one process.
    """

    def __init__(self, config: TrainConfig | None = None, *, callbacks: Sequence[Callback] = (),
                 optimizer_factory: Callable[[RatingModel], torch.optim.Optimizer] | None = None,
                 parallel: DataParallel | None = None) -> None:
        self.config = config or TrainConfig()
        self.callbacks = list(callbacks)
        self.optimizer_factory = optimizer_factory
        self.parallel = parallel
        self.optimizer: torch.optim.Optimizer | None = None
        #: the K-FAC-family preconditioner of the last autograd fit (None otherwise)
        self.preconditioner = None
        #: the sub-batch covariance-noise source of the last fit (None otherwise)
        self.sub_batch_noise = None

    def step_kind(self, model: RatingModel) -> str:
        c = self.config
        plain_sgd = c.optimizer == "sgd" and self.optimizer_factory is None and not c.salr
        if plain_sgd and hasattr(model, "sgd_examples") and c.batch_size == 1 and torch.device(c.device).type == "cpu":
            return "kernel"
        if plain_sgd and hasattr(model, "sgd_batch"):
            return "closed-form"
        return "autograd"

    def fit(self, model: RatingModel, train: Ratings, validation: Ratings | None = None) -> TrainResult:
        """Train ``model`` in place on ``train``; validate on ``validation`` after every epoch
        (early stopping needs it). Returns the history; raises `TrainingDivergedError` when
        the loss stops being finite."""
        c = self.config
        if len(train) == 0:
            raise ValueError("cannot train on an empty Ratings")
        if validation is not None and (validation.user_ids is not train.user_ids
                                       and validation.user_ids != train.user_ids):
            raise ValueError("validation ratings must share the training ratings' id maps")
        torch.manual_seed(c.seed)
        if c.threads:
            torch.set_num_threads(c.threads)
            from recsys.models.mf.kernels import set_threads
            set_threads(c.threads)
        device = torch.device(c.device)
        model.to(device)
        model.prepare(train)
        kind = self.step_kind(model)
        dp = self.parallel
        if dp is not None:
            if c.batch_size == 1:
                raise ValueError(f"data-parallel training ({dp.world_size} processes) needs minibatches: each "
                                 "rank takes a slice of every batch; give a batch size > 1 (the compiled "
                                 "batch-1 SGD kernel is single-process)")
            dp.check_same("the training", examples=len(train), batch_size=c.batch_size, seed=c.seed,
                          epochs=c.epochs, learning_rate=c.learning_rate)
            dp.broadcast_module(model)
        result = TrainResult(step_kind=kind + ("-hogwild" if kind == "kernel" and c.hogwild else ""))
        hogwild_threads = (c.threads or numba.get_num_threads()) if c.hogwild else 0
        sampler = make_sampler(c.sampler, len(train), c.seed)
        tensors = train.tensors(device)
        self.preconditioner = None
        self.sub_batch_noise = None
        if kind == "autograd":
            self.optimizer = (self.optimizer_factory(model) if self.optimizer_factory
                              else build_optimizer(c.optimizer, model, c.learning_rate,
                                                   noise_batch=c.noise_batch, noise_structure=c.noise_structure,
                                                   noise_scale=c.noise_scale, noise_base=c.noise_base,
                                                   noise_estimator=c.noise_estimator, seed=c.seed))
            if self.optimizer_factory is None:
                self.preconditioner = build_preconditioner(c.optimizer, model, damping=c.damping,
                                                           visit_gain=c.visit_gain, stats_freq=c.stats_freq,
                                                           seed=c.seed)
            if c.optimizer == "cov-noise" and c.noise_estimator == "sub-batch":
                if dp is not None:
                    raise ValueError("sub-batch covariance noise is single-process; use the per-example "
                                     "estimator (MF) for data-parallel training")
                self.sub_batch_noise = SubBatchNoise(model.parameters(), noise_batch=c.noise_batch,
                                                     structure=c.noise_structure, noise_scale=c.noise_scale,
                                                     seed=c.seed)
            scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=c.lr_decay)
            if c.salr:
                self.optimizer = SALR(self.optimizer, every=c.salr_every)
        for cb in self.callbacks:
            cb.on_train_begin(self, model, train)
        update_log = next((cb.update_log for cb in self.callbacks if cb.update_log is not None), None)
        log_kw = {} if update_log is None or kind == "autograd" else {"log": update_log}

        best_state: dict[str, torch.Tensor] | None = None
        best_rmse = math.inf
        since_best = 0
        start = time.perf_counter()
        bar = tqdm(total=c.epochs * len(train), unit="rating", unit_scale=True,
                   disable=True if c.progress is False or (dp is not None and not dp.is_main)
                   else (None if c.progress is None else False),
                   leave=False,
                   desc=f"train {model.name}")
        try:
            for epoch in range(c.epochs):
                t0 = time.perf_counter()
                lr = c.learning_rate * c.lr_decay ** epoch
                model.train()
                order = sampler.epoch_order(epoch)
                if kind == "kernel":
                    step = c.chunk_size
                else:
                    step = c.batch_size
                sq_sum, count = 0.0, 0
                for batch_no, s in enumerate(range(0, len(order), step)):
                    ids = order[s:s + step]
                    # this rank's slice of the global batch and its share of the batch mean
                    mine, weight = (ids, 1.0) if dp is None else dp.shard(ids)
                    if kind == "kernel":
                        loss = model.sgd_examples(train, ids, lr, hogwild_threads=hogwild_threads, **log_kw)
                    else:
                        idx = torch.from_numpy(mine).to(device)
                        u, i, r = tensors[0][idx], tensors[1][idx], tensors[2][idx]
                        if kind == "closed-form" and dp is not None:
                            loss = dp.sgd_batch_step(model, u, i, r, lr, weight, log=update_log, example_ids=idx)
                        elif kind == "closed-form":
                            loss = model.sgd_batch(u, i, r, lr, **log_kw,
                                                   **({"example_ids": idx} if log_kw else {}))
                        else:
                            self.optimizer.zero_grad(set_to_none=True)
                            sampling = model.sampling_state() if c.salr else None
                            loss = self._backward(model, u, i, r, weight, examples=len(ids))
                            if self.preconditioner is not None:
                                # KL clipping needs the step's learning rate
                                self.preconditioner.param_groups[0]["lr"] = self.optimizer.param_groups[0]["lr"]
                                self.preconditioner.step()
                            if c.salr:
                                self.optimizer.step(self._closure(model, u, i, r, weight, sampling))
                            else:
                                self.optimizer.step()
                    if not math.isfinite(loss):
                        raise TrainingDivergedError(
                            f"training loss became {loss} at epoch {epoch + 1}, batch {batch_no + 1} "
                            f"(learning rate {lr:g}); lower the learning rate or raise the regularisation"
                        )
                    sq_sum += loss * len(ids)
                    count += len(ids)
                    if len(mine):
                        for cb in self.callbacks:
                            cb.on_batch_end(mine, loss)
                    bar.update(len(ids))
                if kind == "autograd":
                    scheduler.step()
                val_rmse = self._validate(model, validation) if validation is not None else None
                record = EpochRecord(epoch + 1, lr, sq_sum / max(count, 1), val_rmse, time.perf_counter() - t0)
                result.history.append(record)
                bar.set_postfix(val_rmse=f"{val_rmse:.4f}" if val_rmse is not None else "-")
                stop = any(cb.on_epoch_end(record) for cb in self.callbacks)
                if val_rmse is not None:
                    if val_rmse < best_rmse - 1e-6:
                        best_rmse, since_best = val_rmse, 0
                        result.best_epoch, result.best_validation_rmse = epoch + 1, val_rmse
                        if c.patience is not None and epoch + 1 < c.epochs:
                            best_state = copy.deepcopy(model.state_dict())
                        else:
                            best_state = None  # the current weights are the best
                    else:
                        since_best += 1
                        if c.patience is not None and since_best >= c.patience:
                            result.stopped_early = True
                            stop = True
                if stop:
                    break
        finally:
            bar.close()
            for hooked in (self.preconditioner, getattr(self.optimizer, "base", self.optimizer)):
                if hasattr(hooked, "remove_hooks"):
                    hooked.remove_hooks()
        if best_state is not None and result.best_epoch != len(result.history):
            model.load_state_dict(best_state)
        model.eval()
        result.fit_seconds = time.perf_counter() - start
        for cb in self.callbacks:
            cb.on_train_end(result)
        return result

    def _backward(self, model: RatingModel, u: torch.Tensor, i: torch.Tensor, r: torch.Tensor,
                  weight: float = 1.0, *, statistics: bool = True, examples: int | None = None) -> float:
        """The batch's (``u, i, r [n]``) loss and ``backward`` (through the preconditioner's,
        which also records its statistics, when there is one and ``statistics``); returns the
        batch loss. Data-parallel: this rank's loss and outputs are scaled by its share
        ``weight`` of the global batch (``examples`` ratings), the recorded curvature/noise
        statistics gathered over the ranks, the gradients summed over them, and the global
        batch's loss returned."""
        dp, pre = self.parallel, self.preconditioner if statistics else None
        local = 0.0
        if statistics and self.sub_batch_noise is not None:
            return self._sub_batch_backward(model, u, i, r)
        if dp is None or len(u):
            if pre is not None:
                outputs, batch_loss = model.loss_terms(u, i, r)
                if dp is not None:
                    outputs, batch_loss = outputs * weight, batch_loss * weight
                pre.backward(outputs, batch_loss)
            else:
                batch_loss = model.loss(u, i, r)
                if dp is not None:
                    batch_loss = batch_loss * weight
                batch_loss.backward()
            local = float(batch_loss.detach())
        if dp is None:
            return local
        if statistics:
            hooked = (self.preconditioner, getattr(self.optimizer, "base", self.optimizer))
            dp.gather_captures([h.capture for h in hooked if getattr(h, "capture", None) is not None])
            if self.preconditioner is not None:
                self.preconditioner.records_gathered(examples if examples is not None else len(u))
        tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        return dp.reduce_gradients([p for p in model.parameters() if p.requires_grad], local, row_tables=tables)

    def _sub_batch_backward(self, model: RatingModel, u: torch.Tensor, i: torch.Tensor,
                            r: torch.Tensor) -> float:
        """Back-propagate the batch as sub-batches of ``noise_batch`` ratings and leave their
        mean gradient plus covariance noise (`SubBatchNoise`) in ``.grad``; returns the batch's
        mean loss."""
        noise = self.sub_batch_noise
        total = torch.zeros((), device=u.device)
        for s in range(0, len(u), noise.noise_batch):
            sub = slice(s, s + noise.noise_batch)
            n = len(u[sub])
            loss = model.loss(u[sub], i[sub], r[sub])
            loss.backward()
            noise.record(n)
            total += loss.detach() * n
        noise.apply()
        return float(total) / len(u)  # one device sync per step, not one per sub-batch

    def _closure(self, model: RatingModel, u: torch.Tensor, i: torch.Tensor, r: torch.Tensor,
                 weight: float = 1.0, sampling: object | None = None):
        """Re-evaluates the batch loss with gradients (for SALR's extra passes), without
        feeding the statistics of hooked preconditioners/optimizers. ``sampling``: the
        model's sampling state before the step's own forward (`RatingModel.sampling_state`),
        restored for every pass so that a stochastic model (REC's chains) is compared with
        itself on the same samples."""
        hooked = [h for h in (self.preconditioner, getattr(self.optimizer, "base", None), *self.callbacks)
                  if hasattr(h, "paused")]

        def closure() -> torch.Tensor:
            with contextlib.ExitStack() as stack:
                for h in hooked:
                    stack.enter_context(h.paused())
                self.optimizer.zero_grad(set_to_none=True)
                if sampling is not None:
                    model.set_sampling_state(sampling)
                loss = self._backward(model, u, i, r, weight, statistics=False)
            return torch.tensor(loss)
        return closure

    @staticmethod
    @torch.no_grad()
    def _validate(model: RatingModel, validation: Ratings) -> float:
        model.eval()
        u, i, r = validation.tensors(model.device)
        pred = model.predict(u, i)
        return float(torch.sqrt(torch.mean((pred - r) ** 2)))

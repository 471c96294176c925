"""`Trainer`: epochs, example samplers, validation, early stopping and callbacks, for any
`RatingModel` and any ``torch.optim`` optimizer.

The trainer asks the model for its own step (`RatingModel.stepper`, a `Stepper`): MF brings
its compiled per-example SGD kernel (``"kernel"``: plain SGD, batch size 1, on the CPU) and its
closed-form minibatch SGD (``"closed-form"``: plain SGD, any batch, any device; see
`recsys.models.mf.steps`). When the model has none for the config, the generic
`AutogradStepper` runs (``"autograd"``: ``model.loss`` → ``backward`` → ``optimizer.step``,
with the K-FAC-family preconditioner, SALR, sub-batch covariance noise).

All paths minimise the same objective (``model.loss``), and the tests check they agree.
Callbacks see the example ids (rows of the training `Ratings`) of every step group. Update
logging (gradient rollback) plugs in without forking the loop: a callback's ``update_log``
(made by the model family, `RatingModel.new_update_log`) is handed to the stepper
(`Stepper.attach_log`), which records each example's update while it steps.

Data-parallel training (``Trainer(parallel=...)``, see `recsys.distributed`): every rank
visits the same order and its stepper takes its contiguous slice of every global batch; the
closed-form and autograd steps then sum their updates or gradients over the ranks, so the
result is that of one process on the same global batches (up to rounding). The compiled
batch-1 kernel stays single-process. Callbacks see their rank's slice of each batch (not
called when it is empty).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.errors import TrainingDivergedError
from recsys.models.base import RatingModel, Stepper, UpdateLog, UpdateRecorder
from recsys.optim.factory import (
    PRECONDITIONED,
    build_optimizer,
    build_preconditioner,
    check_optimizer_options,
)
from recsys.optim.kfac import KFACConfig
from recsys.optim.noise import NoiseConfig, SubBatchNoise
from recsys.optim.salr import SALR, SALRConfig
from recsys.optim.sampling import SAMPLERS, make_sampler
from recsys.optim.scaling import KFAC_FAMILY, BatchScaling, Reference, rule_for, scale_schedule
from recsys.ratings import Ratings

if TYPE_CHECKING:
    from recsys.distributed import DataParallel

#: training stops (`TrainingDivergedError`) when the training MSE is not finite, or when
#: `DIVERGENCE_STRIKES` step groups in a row are above `DIVERGENCE_GROWTH` times the first
#: group's and each above the one before: a run that fits never gets there (Adagrad at a
#: large rate spikes to 10x on its first step and falls back), a diverging one within a few steps
DIVERGENCE_GROWTH = 10.0
DIVERGENCE_STRIKES = 3

#: the per-optimizer option groups of `TrainConfig`: field name -> config class
OPTION_GROUPS: dict[str, type] = {"noise": NoiseConfig, "kfac": KFACConfig, "salr": SALRConfig}


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``learning_rate`` decays by ``lr_decay`` after every epoch.

    ``patience``: epochs without a better validation RMSE before stopping (None: never stop
    early); the weights of the best validation epoch are restored at the end.
    ``chunk_size``: examples per kernel call on the compiled path (one callback call each).
    ``hogwild``: on the compiled path, split every chunk across ``threads`` (default: all)
    threads updating shared rows without locks: about twice as fast on two cores, but no
    longer bit-for-bit reproducible.

    Per-optimizer options live in their optimizers' configs: ``noise`` (``cov-noise``,
    `recsys.optim.noise.NoiseConfig`), ``kfac`` (the K-FAC family,
    `recsys.optim.kfac.KFACConfig`) and ``salr`` (`recsys.optim.salr.SALRConfig`: wrap the
    optimizer in SALR; None: don't). Each may be given as its config or as a dict of its
    fields (``noise={"batch": 64}``); ``salr=True`` means ``SALRConfig()``.
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
    #: ``cov-noise``: the small batch whose noise is restored, the noise structure and scale,
    #: the estimator and the optimizer that steps
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    #: the K-FAC family: damping, factor-update frequency, per-row trust region
    kfac: KFACConfig = field(default_factory=KFACConfig)
    #: wrap the optimizer in `recsys.optim.salr.SALR` (autograd path); None: no SALR
    salr: SALRConfig | None = None
    #: learning-rate multipliers by parameter name (autograd path,
    #: `recsys.optim.factory.parameter_groups`): the parameters a key names step at
    #: ``learning_rate × scale``, the others at ``learning_rate``; batch scaling and the decay
    #: move every group together. A model's reference for an optimizer with one rate for all
    #: parameters sets it (REC's SGD: its prototype vectors, which a batch's gradient reaches
    #: through few ratings each, at 30x its shared message networks). None: one rate.
    lr_scales: dict[str, float] | None = None
    #: heavy-ball momentum of SGD (``sgd`` and the K-FAC family's base step; autograd path);
    #: 0: plain SGD
    momentum: float = 0.0
    #: the optimizer's own options (autograd path, `recsys.optim.factory.OPTIMIZER_OPTIONS`):
    #: ``sgd``'s ``input_scaling`` (a fixed input-scale diagonal preconditioner of linear
    #: layers), ``adagrad``'s ``warm_steps`` (its accumulator started from the first gradient);
    #: a model's reference sets them (REC's ``sgd`` and ``adagrad``). None: none
    optimizer_options: dict[str, object] | None = None
    #: how `for_model` scaled the optimizer's reference schedule to ``batch_size``
    #: (`recsys.optim.scaling.BatchScaling`; None: not scaled). A record: the fields above
    #: already hold the scaled values.
    scaling: BatchScaling | None = None

    @classmethod
    def for_model(cls, model: type[RatingModel] | RatingModel, *, lr_scaling: str = "auto",
                  examples: int | None = None, **overrides: object) -> TrainConfig:
        """The config a model trains with by default: these defaults, then the model's
        ``training_defaults``, then its ``optimizer_defaults`` for the chosen optimizer (when
        ``overrides`` names one other than the model's own), then ``overrides``. An option
        group (``noise``, ``kfac``, ``salr``) given as a dict at any layer updates the fields
        of the layers below it; given as a config (or None), it replaces them.

        The layers below ``overrides`` are the optimizer's *reference* schedule. When
        ``overrides`` asks for another ``batch_size``, the learning rate (and, unless given,
        the epochs, decay and the K-FAC family's damping and factor interval) are scaled to it
        by `recsys.optim.scaling.scale_schedule`: ``lr_scaling`` ``auto`` (the optimizer's own
        rule; off when ``overrides`` gives a ``learning_rate``), ``linear`` or ``sqrt`` (scale
        the given or reference rate by that rule), ``none`` (no scaling). ``examples``:
        training examples per epoch, for the scaled schedule's step floor
        (`recsys.optim.scaling.MIN_STEPS`). A model's reference for an optimizer may name the
        rule ``auto`` stands for on that model (``"lr_scaling"`` in its ``optimizer_defaults``
        entry, where it was measured to hold better than the optimizer's own)."""
        base = dict(model.training_defaults)
        layers = [base]
        optimizer = overrides.get("optimizer", base.get("optimizer", cls.optimizer))
        model_rule = None
        if optimizer != base.get("optimizer", cls.optimizer):
            reference_layer = dict(model.optimizer_defaults.get(optimizer, {}))
            model_rule = reference_layer.pop("lr_scaling", None)
            layers.append(reference_layer)
        reference = cls(**_merge_layers([*layers, {"optimizer": optimizer}]))
        config = cls(**_merge_layers([*layers, overrides]))
        if config.batch_size == reference.batch_size and lr_scaling in ("auto", "none"):
            return config
        if lr_scaling == "none" or (lr_scaling == "auto" and "learning_rate" in overrides):
            return config
        kfac = optimizer in KFAC_FAMILY
        ref = Reference(reference.learning_rate, reference.batch_size, reference.epochs, reference.lr_decay,
                        reference.kfac.damping if kfac else None, reference.kfac.stats_freq if kfac else None)
        given_lr = overrides.get("learning_rate")
        if lr_scaling == "auto" and model_rule is not None:
            lr_scaling = model_rule
        elif lr_scaling == "auto" and optimizer == "cov-noise":  # the rule of the optimizer that steps
            lr_scaling = rule_for(config.noise.base)
        scaled = scale_schedule(optimizer, ref, config.batch_size, lr_scaling, examples=examples,
                                learning_rate=None if given_lr is None else float(given_lr))
        changes: dict[str, object] = {"learning_rate": scaled.learning_rate, "scaling": scaled}
        if "epochs" not in overrides:
            changes["epochs"] = scaled.epochs
        if "lr_decay" not in overrides:
            changes["lr_decay"] = scaled.lr_decay
        given_kfac = overrides.get("kfac") if isinstance(overrides.get("kfac"), dict) else {}
        if kfac and not isinstance(overrides.get("kfac"), KFACConfig):
            kfac_changes = {}
            if scaled.damping is not None and "damping" not in given_kfac:
                kfac_changes["damping"] = scaled.damping
            if scaled.stats_freq is not None and "stats_freq" not in given_kfac and optimizer in ("kfac", "tkfac"):
                kfac_changes["stats_freq"] = scaled.stats_freq
            changes["kfac"] = replace(config.kfac, **kfac_changes)
        return replace(config, **changes)

    def __post_init__(self) -> None:
        for name, config_cls in OPTION_GROUPS.items():
            value = getattr(self, name)
            if name == "salr" and isinstance(value, bool):
                value = SALRConfig() if value else None
            elif isinstance(value, dict):
                value = config_cls(**value)
            if not (isinstance(value, config_cls) or (name == "salr" and value is None)):
                raise TypeError(f"TrainConfig.{name} must be a {config_cls.__name__} or a dict of its fields, "
                                f"got {value!r}")
            object.__setattr__(self, name, value)
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
        if self.optimizer in PRECONDITIONED:
            self.kfac.check(self.optimizer)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.momentum and self.optimizer not in ("sgd", *PRECONDITIONED):
            raise ValueError(f"momentum is an option of sgd and the K-FAC family, not of {self.optimizer!r}")
        check_optimizer_options(self.optimizer, self.optimizer_options)
        if self.lr_scales is not None:
            if not isinstance(self.lr_scales, dict) or not all(
                    isinstance(k, str) and isinstance(v, int | float) and math.isfinite(v) and v > 0
                    for k, v in self.lr_scales.items()):
                raise ValueError("lr_scales must map parameter names to positive numbers, got "
                                 f"{self.lr_scales!r}")


def _merge_layers(layers: Sequence[dict]) -> dict[str, object]:
    """The fields of `TrainConfig.for_model`'s layers merged, later layers first."""
    merged: dict[str, object] = {}
    for layer in layers:
        for key, value in layer.items():
            merged[key] = _layer_group(merged.get(key), value) if key in OPTION_GROUPS else value
    return merged


def _layer_group(below: object, value: object) -> object:
    """An option group's value after a layer of `TrainConfig.for_model` (see there)."""
    if not isinstance(value, dict):
        return value
    if is_dataclass(below):
        return replace(below, **value)
    return {**below, **value} if isinstance(below, dict) else dict(value)


@dataclass
class EpochRecord:
    """One epoch: its learning rate, ``train_mse`` (the mean squared error of the model's
    outputs against the epoch's training ratings, each taken before its step, no penalty; the
    same on every step path, `train_mse`), the validation RMSE (None: no validation) and its
    training seconds (validation and callbacks not counted)."""

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
    to its `UpdateLog` in `on_train_begin`; the trainer then hands the log to its stepper
    (`Stepper.attach_log`), which records each example's update while applying it. None (the
    default) for callbacks that only observe. `paused` is entered around the trainer's extra
    passes (SALR's closure): a callback that watches forward passes stops watching there.
    """

    update_log: UpdateLog | None = None

    def on_train_begin(self, trainer: Trainer, model: RatingModel, train: Ratings) -> None:
        """Before the first step, after ``model.prepare`` and after the optimizer is built."""

    def on_batch_end(self, example_ids: np.ndarray, loss: float) -> None:
        """After each step group: ``example_ids int64 [m]`` are the rows of the training
        `Ratings` just applied (one batch, or one kernel chunk of per-example steps)."""

    def on_epoch_end(self, record: EpochRecord) -> bool | None:
        """After validation; return True to stop training."""

    def on_train_end(self, result: TrainResult) -> None:
        """After the best weights were restored."""

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Extra forward/backward passes run inside (nothing to pause by default)."""
        yield


def train_mse(outputs: torch.Tensor, values: torch.Tensor) -> float:
    """The training MSE every step path reports (``EpochRecord.train_mse``): the mean squared
    error of the model's outputs ``[B, m]`` (`RatingModel.loss_terms`; MF: each block's
    prediction) against the ratings ``values [B]``, before the step, without penalties."""
    return float((values.unsqueeze(-1) - outputs).square().mean())


class AutogradStepper:
    """The generic step, for any `RatingModel` and optimizer: ``model.loss`` → ``backward``
    → ``optimizer.step``, with what the config adds around it: the K-FAC-family
    preconditioner (`recsys.optim.kfac`), SALR's extra passes (`recsys.optim.salr`),
    sub-batch covariance noise (`recsys.optim.noise.SubBatchNoise`), the data-parallel
    gradient reduction (`recsys.distributed.DataParallel.reduce_gradients`) and an update
    log's `UpdateRecorder` (`attach_log`).

    ``optimizer_factory``: builds the optimizer instead of ``config.optimizer`` (then no
    preconditioner). ``pausable``: objects with a ``paused()`` context (callbacks) paused
    during SALR's extra passes. The learning rate follows an exponential schedule
    (``lr_decay`` per epoch, `end_epoch`), so `step`'s ``learning_rate`` is informational.
    """

    kind = "autograd"

    def __init__(self, model: RatingModel, train: Ratings, config: TrainConfig, *,
                 parallel: DataParallel | None = None,
                 optimizer_factory: Callable[[RatingModel], torch.optim.Optimizer] | None = None,
                 pausable: Sequence[Any] = ()) -> None:
        c = config
        self.model, self.config, self.parallel = model, c, parallel
        self.group_size = c.batch_size
        self.tensors = train.tensors(torch.device(c.device))
        self.pausable = list(pausable)
        self.optimizer: torch.optim.Optimizer | SALR = (
            optimizer_factory(model) if optimizer_factory
            else build_optimizer(c.optimizer, model, c.learning_rate, noise=c.noise, seed=c.seed,
                                 lr_scales=c.lr_scales, momentum=c.momentum, options=c.optimizer_options))
        #: the K-FAC-family preconditioner (None for other optimizers)
        self.preconditioner = None if optimizer_factory else build_preconditioner(c.optimizer, model, c.kfac,
                                                                                   seed=c.seed)
        #: the sub-batch covariance-noise source (``cov-noise`` with ``noise.estimator="sub-batch"``)
        self.sub_batch_noise: SubBatchNoise | None = None
        if c.optimizer == "cov-noise" and c.noise.estimator == "sub-batch":
            if parallel is not None:
                raise ValueError("sub-batch covariance noise is single-process; use the per-example "
                                 "estimator (MF) for data-parallel training")
            self.sub_batch_noise = SubBatchNoise(model.parameters(), noise_batch=c.noise.batch,
                                                 structure=c.noise.structure, noise_scale=c.noise.scale,
                                                 seed=c.seed)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=c.lr_decay)
        if c.salr is not None:
            self.optimizer = SALR(self.optimizer, every=c.salr.every)
        self.recorder: UpdateRecorder | None = None
        #: whether the model has Gaussian outputs (`RatingModel.loss_terms`) to report the MSE of
        self._outputs = True

    @property
    def _hooked(self) -> list[Any]:
        """The preconditioner and base optimizer (their statistics hooks), when present."""
        base = self.optimizer.base if isinstance(self.optimizer, SALR) else self.optimizer
        return [h for h in (self.preconditioner, base) if h is not None]

    def attach_log(self, log: UpdateLog) -> None:
        """Record every step's per-example updates into ``log`` through the model family's
        `UpdateRecorder` (`RatingModel.update_recorder`)."""
        self.recorder = self.model.update_recorder(log)

    def step(self, example_ids: np.ndarray, learning_rate: float) -> float:
        dp = self.parallel
        mine, weight = (example_ids, 1.0) if dp is None else dp.shard(example_ids)
        idx = torch.from_numpy(mine).to(self.tensors[0].device)
        u, i, r = (t[idx] for t in self.tensors)
        self.optimizer.zero_grad(set_to_none=True)
        sampling = self.model.sampling_state() if self.config.salr is not None else None
        mse = self._backward(u, i, r, weight, examples=len(example_ids), report="mse")
        if self.preconditioner is not None:
            # KL clipping needs the step's learning rate
            self.preconditioner.param_groups[0]["lr"] = self.optimizer.param_groups[0]["lr"]
            self.preconditioner.step()
        if self.config.salr is not None:
            self.optimizer.step(self._closure(u, i, r, weight, sampling))
        else:
            self.optimizer.step()
        if self.recorder is not None and len(mine):
            self.recorder.record(mine, self.optimizer, self.preconditioner)
        return mse

    def end_epoch(self) -> None:
        self.scheduler.step()

    def close(self) -> None:
        for hooked in self._hooked:
            remove = getattr(hooked, "remove_hooks", None)  # torch optimizers have none
            if remove is not None:
                remove()
        if self.recorder is not None:
            self.recorder.remove()

    def _backward(self, u: torch.Tensor, i: torch.Tensor, r: torch.Tensor, weight: float = 1.0, *,
                  statistics: bool = True, examples: int | None = None, report: str = "loss") -> float:
        """The batch's (``u, i, r [n]``) loss and ``backward`` (through the preconditioner's,
        which also records its statistics, when there is one and ``statistics``); returns the
        batch's objective (``report="loss"``: ``model.loss``, penalties included) or its
        training MSE (``"mse"``: `train_mse` of the outputs, no penalty). Data-parallel: this
        rank's loss and outputs are scaled by its share ``weight`` of the global batch
        (``examples`` ratings), the recorded curvature/noise statistics gathered over the
        ranks, the gradients summed over them, and the global batch's figure returned."""
        model, dp = self.model, self.parallel
        pre = self.preconditioner if statistics else None
        local = 0.0
        if statistics and self.sub_batch_noise is not None:
            return self._sub_batch_backward(u, i, r, report)
        if dp is None or len(u):
            outputs, batch_loss = self._loss_terms(u, i, r)
            local = (float(batch_loss.detach()) if report == "loss" or outputs is None
                     else train_mse(outputs.detach(), r))
            if dp is not None:
                batch_loss, local = batch_loss * weight, local * weight
                outputs = None if outputs is None else outputs * weight
            if pre is not None:
                pre.backward(outputs, batch_loss)
            else:
                batch_loss.backward()
        if dp is None:
            return local
        if statistics:
            dp.gather_captures([c for c in (getattr(h, "capture", None) for h in self._hooked) if c is not None])
            if self.preconditioner is not None:
                self.preconditioner.records_gathered(examples if examples is not None else len(u))
        tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        return dp.reduce_gradients([p for p in model.parameters() if p.requires_grad], local, row_tables=tables)

    def _loss_terms(self, u: torch.Tensor, i: torch.Tensor,
                    r: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``model.loss_terms`` (outputs, loss); ``(None, model.loss)`` for a model without
        Gaussian outputs (a ranking loss: its objective is then its training figure)."""
        if self._outputs:
            try:
                return self.model.loss_terms(u, i, r)
            except NotImplementedError:
                if self.preconditioner is not None:
                    raise
                self._outputs = False
        return None, self.model.loss(u, i, r)

    def _sub_batch_backward(self, u: torch.Tensor, i: torch.Tensor, r: torch.Tensor, report: str = "loss") -> float:
        """Back-propagate the batch as sub-batches of ``noise.batch`` ratings and leave their
        mean gradient plus covariance noise (`SubBatchNoise`) in ``.grad``; returns the batch's
        mean loss (``report="loss"``) or training MSE (``"mse"``)."""
        noise = self.sub_batch_noise
        assert noise is not None
        total = torch.zeros((), device=u.device)
        for s in range(0, len(u), noise.noise_batch):
            sub = slice(s, s + noise.noise_batch)
            n = len(u[sub])
            outputs, loss = self._loss_terms(u[sub], i[sub], r[sub])
            loss.backward()
            noise.record(n)
            total += (loss.detach() if report == "loss" or outputs is None
                      else (r[sub].unsqueeze(-1) - outputs.detach()).square().mean()) * n
        noise.apply()
        return float(total) / len(u)  # one device sync per step, not one per sub-batch

    def _closure(self, u: torch.Tensor, i: torch.Tensor, r: torch.Tensor, weight: float = 1.0,
                 sampling: object | None = None) -> Callable[[], torch.Tensor]:
        """Re-evaluates the batch loss with gradients (for SALR's extra passes), without
        feeding the statistics of hooked preconditioners/optimizers, the update recorder or
        the pausable callbacks. ``sampling``: the model's sampling state before the step's own
        forward (`RatingModel.sampling_state`), restored for every pass so that a stochastic
        model (REC's chains) is compared with itself on the same samples."""
        hooked = [h for h in (*self._hooked, self.recorder) if h is not None and callable(getattr(h, "paused", None))]
        hooked += [cb for cb in self.pausable if callable(getattr(cb, "paused", None))]

        def closure() -> torch.Tensor:
            with contextlib.ExitStack() as stack:
                for h in hooked:
                    stack.enter_context(h.paused())
                self.optimizer.zero_grad(set_to_none=True)
                if sampling is not None:
                    self.model.set_sampling_state(sampling)
                loss = self._backward(u, i, r, weight, statistics=False)
            return torch.tensor(loss)
        return closure


class Trainer:
    """Trains a `RatingModel` on a training `Ratings` (see the module docstring).

    ``parallel``: this rank's `recsys.distributed.DataParallel` for data-parallel training
    (every rank runs ``fit`` with the same data and config); None for one process.
    ``optimizer_factory``: builds the optimizer from the model instead of ``config.optimizer``
    (always the autograd step). After `fit`, ``stepper`` is the step path it ran, and for
    the autograd step ``optimizer``, ``preconditioner`` and ``sub_batch_noise`` are its parts.
    """

    def __init__(self, config: TrainConfig | None = None, *, callbacks: Sequence[Callback] = (),
                 optimizer_factory: Callable[[RatingModel], torch.optim.Optimizer] | None = None,
                 parallel: DataParallel | None = None) -> None:
        self.config = config or TrainConfig()
        self.callbacks = list(callbacks)
        self.optimizer_factory = optimizer_factory
        self.parallel = parallel
        self.stepper: Stepper | None = None
        self.optimizer: torch.optim.Optimizer | SALR | None = None
        #: the K-FAC-family preconditioner of the last autograd fit (None otherwise)
        self.preconditioner = None
        #: the sub-batch covariance-noise source of the last fit (None otherwise)
        self.sub_batch_noise: SubBatchNoise | None = None

    @property
    def _autograd_only(self) -> bool:
        """Whether the config needs the autograd step whatever the model brings: a custom
        optimizer factory, or per-parameter rates (``lr_scales``), momentum or optimizer options
        that model steps do not take."""
        c = self.config
        return (self.optimizer_factory is not None or bool(c.lr_scales) or bool(c.momentum)
                or bool(c.optimizer_options))

    def step_kind(self, model: RatingModel) -> str:
        """The `Stepper.kind` that `fit` would run for ``model``: its family's own step for
        this config, or ``autograd``."""
        own = None if self._autograd_only else model.stepper(None, self.config)
        return own.kind if own is not None else AutogradStepper.kind

    def _new_stepper(self, model: RatingModel, train: Ratings) -> Stepper:
        own = None if self._autograd_only else model.stepper(train, self.config, parallel=self.parallel)
        if own is not None:
            return own
        return AutogradStepper(model, train, self.config, parallel=self.parallel,
                               optimizer_factory=self.optimizer_factory, pausable=self.callbacks)

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
            numba.set_num_threads(c.threads)
        model.to(torch.device(c.device))
        model.prepare(train)
        dp = self.parallel
        if dp is not None:
            if c.batch_size == 1:
                raise ValueError(f"data-parallel training ({dp.world_size} processes) needs minibatches: each "
                                 "rank takes a slice of every batch; give a batch size > 1 (the compiled "
                                 "batch-1 SGD kernel is single-process)")
            dp.check_same("the training", examples=len(train), batch_size=c.batch_size, seed=c.seed,
                          epochs=c.epochs, learning_rate=c.learning_rate)
            dp.broadcast_module(model)
        stepper = self.stepper = self._new_stepper(model, train)
        auto = stepper if isinstance(stepper, AutogradStepper) else None
        self.optimizer = auto.optimizer if auto else None
        self.preconditioner = auto.preconditioner if auto else None
        self.sub_batch_noise = auto.sub_batch_noise if auto else None
        result = TrainResult(step_kind=stepper.kind)
        sampler = make_sampler(c.sampler, len(train), c.seed)
        try:
            for cb in self.callbacks:
                cb.on_train_begin(self, model, train)
            update_log = next((cb.update_log for cb in self.callbacks if cb.update_log is not None), None)
            if update_log is not None:
                stepper.attach_log(update_log)
            self._epochs(model, stepper, sampler, train, validation, result)
        finally:
            stepper.close()
        model.eval()
        for cb in self.callbacks:
            cb.on_train_end(result)
        return result

    def _epochs(self, model: RatingModel, stepper: Stepper, sampler: Any, train: Ratings,
                validation: Ratings | None, result: TrainResult) -> None:
        """The epoch loop of `fit`: steps, validation, early stopping (best weights restored)."""
        c, dp = self.config, self.parallel
        best_state: dict[str, torch.Tensor] | None = None
        best_rmse = math.inf
        since_best = 0
        first_loss: float | None = None  # the first step group's training MSE
        previous: float | None = None  # the last step group's
        rising = 0  # consecutive step groups far above the first and rising
        start = time.perf_counter()
        bar = tqdm(total=c.epochs * len(train), unit="rating", unit_scale=True,
                   disable=True if c.progress is False or (dp is not None and not dp.is_main)
                   else (None if c.progress is None else False),
                   leave=False, desc=f"train {model.name}")
        try:
            for epoch in range(c.epochs):
                t0 = time.perf_counter()
                lr = c.learning_rate * c.lr_decay ** epoch
                model.train()
                order = sampler.epoch_order(epoch)
                sq_sum, count = 0.0, 0
                for batch_no, s in enumerate(range(0, len(order), stepper.group_size)):
                    ids = order[s:s + stepper.group_size]
                    loss = stepper.step(ids, lr)
                    if first_loss is None:
                        first_loss = loss
                    # far above the start and still rising: a strike (a spike that falls back,
                    # e.g. Adagrad's first steps at a large rate, is not one)
                    far = math.isfinite(first_loss) and loss > DIVERGENCE_GROWTH * max(first_loss, 1e-3)
                    rising = 0 if not far else (rising + 1 if previous is not None and loss > previous else 1)
                    previous = loss
                    if not math.isfinite(loss) or rising >= DIVERGENCE_STRIKES:
                        raise TrainingDivergedError(self._divergence_message(model, loss, first_loss, epoch,
                                                                             batch_no, lr))
                    sq_sum += loss * len(ids)
                    count += len(ids)
                    mine = ids if dp is None else dp.shard(ids)[0]  # this rank's slice of the group
                    if len(mine):
                        for cb in self.callbacks:
                            cb.on_batch_end(mine, loss)
                    bar.update(len(ids))
                stepper.end_epoch()
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
        if best_state is not None and result.best_epoch != len(result.history):
            model.load_state_dict(best_state)
        result.fit_seconds = time.perf_counter() - start

    def _divergence_message(self, model: RatingModel, loss: float, first_loss: float, epoch: int,
                            batch_no: int, learning_rate: float) -> str:
        """Why training stopped (`TrainingDivergedError`): where, at which rate and batch, and a
        rate to try: the optimizer's reference rate scaled to this batch when it is below
        half of the one that diverged (`TrainConfig.for_model`), else a quarter of it."""
        c = self.config
        what = (f"training MSE {loss:.4g}, more than {DIVERGENCE_GROWTH:g}x the first step's {first_loss:.4g} "
                f"and rising for {DIVERGENCE_STRIKES} steps"
                if math.isfinite(loss) else f"training MSE became {loss}")
        suggestion = learning_rate / 4
        source = "a quarter of it"
        if self.optimizer_factory is None:
            try:
                scaled = TrainConfig.for_model(model, optimizer=c.optimizer, batch_size=c.batch_size)
            except (TypeError, ValueError):
                scaled = None
            if scaled is not None and scaled.learning_rate <= c.learning_rate / 2:
                suggestion = scaled.learning_rate
                rule = scaled.scaling.rule if scaled.scaling is not None else "none"
                source = (f"{c.optimizer}'s reference rate for {model.name} scaled to batch {c.batch_size} "
                          f"by the {rule} rule")
        return (f"training diverged at epoch {epoch + 1}, batch {batch_no + 1}: {what} (optimizer "
                f"{c.optimizer}, learning rate {learning_rate:g}, batch size {c.batch_size}). Try --lr "
                f"{suggestion:.4g} ({source}), or raise the regularisation")

    @staticmethod
    @torch.no_grad()
    def _validate(model: RatingModel, validation: Ratings) -> float:
        model.eval()
        u, i, r = validation.tensors(model.device)
        pred = model.predict(u, i)
        return float(torch.sqrt(torch.mean((pred - r) ** 2)))

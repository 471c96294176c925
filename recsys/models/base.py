"""The contract every model follows, so evaluation, training, explanation and serving are
written once for all models: `RatingModel` (predict, score, train), the capability protocols
a model family implements when it can (`OnlineLearner`, `FoldIn`, `Explainable` with its
`Explainer`, `UpdateLog`, `Stepper`), and the one `Explanation` type every explainer returns.
Callers check a capability with ``isinstance(model, OnlineLearner)`` (a Protocol check),
never against a concrete model class.

Indices are dense ``int64`` tensors into the training `Ratings`' id maps. A user or item
index with no training rating is *unknown* to the model: `predict` answers it with a
documented fallback and `known_users` / `known_items` say which indices those are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from recsys.ratings import Ratings


class RatingModel(nn.Module, ABC):
    """A PyTorch module that predicts explicit ratings for (user, item) index pairs.

    Subclasses implement `forward` (raw scores, differentiable) and `fallback` (the
    prediction for pairs whose user or item has no training rating); `predict` combines them
    and clips to the rating scale.
    """

    #: Short name used on the command line and in artefacts (``mf``, ``rec``).
    name: ClassVar[str]
    #: what the model is for: ``rating`` (predict ratings) or ``ranking`` (`RankingModel`)
    task: ClassVar[str] = "rating"
    #: `TrainConfig` fields this model trains best with (e.g. an optimizer and batch size);
    #: the command line starts from them, explicit flags override them.
    training_defaults: ClassVar[dict[str, object]] = {}
    #: per optimizer name, `TrainConfig` fields that override ``training_defaults`` when that
    #: optimizer is chosen instead of the model's own (see `TrainConfig.for_model`)
    optimizer_defaults: ClassVar[dict[str, dict[str, object]]] = {}

    def __init__(self, n_users: int, n_items: int, rating_scale: tuple[float, float]) -> None:
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items
        self.rating_scale = (float(rating_scale[0]), float(rating_scale[1]))
        # Which indices had training ratings; buffers so they follow .to(device) and save.
        self.register_buffer("known_users", torch.zeros(n_users, dtype=torch.bool))
        self.register_buffer("known_items", torch.zeros(n_items, dtype=torch.bool))
        self.register_buffer("global_mean", torch.tensor(float(sum(rating_scale) / 2)))

    @property
    def device(self) -> torch.device:
        return self.global_mean.device

    def prepare(self, train: Ratings) -> None:
        """Take what the model needs from the training ratings before the first step:
        which users/items are known and the global mean. Subclasses extend it."""
        self.known_users.copy_(torch.from_numpy(train.user_counts() > 0))
        self.known_items.copy_(torch.from_numpy(train.item_counts() > 0))
        self.global_mean.fill_(train.global_mean)
        self.bind_ratings(train)

    def bind_ratings(self, ratings: Ratings) -> None:
        """Give the model the ratings it predicts from (called by `prepare` and, after the
        weights are loaded, by `recsys.artefact.load_artefact`). Models whose vectors are
        computed from the live ratings (``rec``) keep them; the default does nothing."""

    @abstractmethod
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Unclipped predictions ``float32 [B]`` for index tensors ``users, items [B]``."""

    @abstractmethod
    def fallback(self, users: torch.Tensor, items: torch.Tensor, user_known: torch.Tensor,
                 item_known: torch.Tensor) -> torch.Tensor:
        """Predictions ``[B]`` that use only what is known of each pair (e.g. biases);
        ``user_known``/``item_known`` (bool ``[B]``) say which sides have training ratings."""

    def known_mask(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool ``[B]`` masks: does the user / the item have training ratings (``-1`` = never
        seen, as `IdMap.indices` returns for unknown raw ids)."""
        user_known = (users >= 0) & self.known_users[users.clamp_min(0)]
        item_known = (items >= 0) & self.known_items[items.clamp_min(0)]
        return user_known, item_known

    @torch.inference_mode()
    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Clipped predictions ``float32 [B]`` for index tensors ``[B]``. Pairs whose user or
        item has no training rating, or is ``-1`` (an id the model never saw), get the
        fallback. Runs under ``torch.inference_mode`` (less dispatch per operation, which is
        most of a single REC prediction): the result is not for autograd."""
        users = users.to(self.device)
        items = items.to(self.device)
        if bool((users >= self.n_users).any()) or bool((items >= self.n_items).any()):
            raise IndexError("user or item index beyond the model's tables")
        user_known, item_known = self.known_mask(users, items)
        known = user_known & item_known
        safe_u, safe_i = users.clamp_min(0), items.clamp_min(0)
        out = self.forward(safe_u, safe_i)
        if not bool(known.all()):
            out = torch.where(known, out, self.fallback(safe_u, safe_i, user_known, item_known))
        return out.clamp(*self.rating_scale)

    def sampling_state(self) -> object | None:
        """The state of the randomness of a training forward pass (None: deterministic
        model); `set_sampling_state` with it makes the next forward draw the same samples."""
        return None

    def set_sampling_state(self, state: object | None) -> None:
        """Restore a `sampling_state`."""

    def loss_terms(self, users: torch.Tensor, items: torch.Tensor,
                   values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs [B, m], loss)``: the training loss of a batch and the model outputs it
        is a Gaussian likelihood of, ``loss = 0.5·mean_b Σ_m (values_b − outputs_bm)² +
        penalties`` (``m`` outputs per rating). The K-FAC family's Fisher statistic
        (`recsys.optim.kfac`) back-propagates sampled targets through ``outputs``."""
        raise NotImplementedError(f"{type(self).__name__} does not define loss_terms")

    def loss(self, users: torch.Tensor, items: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The batch's scalar training loss (see `loss_terms`)."""
        return self.loss_terms(users, items, values)[1]

    @abstractmethod
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each user, ``float32 [B, n_items]``, for top-k ranking
        (higher is better; unclipped). A user index of ``-1`` or one with no training
        rating gets the model's non-personalised ranking."""

    def config_dict(self) -> dict:
        """The constructor arguments, JSON-serialisable, saved with the artefact."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training seams
    def stepper(self, train: Ratings | None, config: Any, *, parallel: Any = None) -> Stepper | None:
        """The model family's own training step for ``config`` (a `recsys.train.TrainConfig`)
        over the training ratings ``train``, or None: the `Trainer`'s generic autograd step
        (``loss`` → ``backward`` → optimizer). ``parallel``: this rank's
        `recsys.distributed.DataParallel` when training data-parallel. A stepper must not
        read ``train`` before its first step: the trainer asks with ``train=None`` only to
        learn its `Stepper.kind`. The default: None."""
        return None

    def new_update_log(self, train: Ratings, *, kind: str, optimizer: str, mode: str = "compact",
                       planned_passes: int | None = None) -> UpdateLog:
        """An empty gradient-rollback `UpdateLog` for training on ``train`` with the step
        path ``kind`` (`Stepper.kind`, ``autograd`` for the generic step) and the optimizer
        named ``optimizer``; ``mode`` ``compact`` lets the family store it approximately where
        it can (``exact``: never), ``planned_passes`` the number of epochs. The family's
        stepper writes it (`Stepper.attach_log`), or on the autograd path its
        `update_recorder`. The default: TypeError (no update log for this model)."""
        raise TypeError(f"{type(self).__name__} keeps no gradient-rollback update log")

    def update_recorder(self, log: UpdateLog) -> UpdateRecorder:
        """The `UpdateRecorder` that fills ``log`` (made by `new_update_log`) on the generic
        autograd step. The default: TypeError."""
        raise TypeError(f"{type(self).__name__} cannot log its updates on the autograd path")


class RankingModel(nn.Module, ABC):
    """A PyTorch module that ranks items for users (top-N recommendation): its scores order
    the items a user is likely to pick first; they are not ratings.

    Fitted on *interactions*: a `Ratings` whose rows say which items each user chose (clicks,
    plays, purchases, or the items they rated) and whose values are the interactions'
    weights (1 for plain implicit feedback; for explicit data, whatever weighting the model's
    config asks for). Row ``k`` is interaction (example) ``k``, as for ratings. A user index of
    ``-1``, or one with no interaction, gets the popularity ranking (`popularity_scores`).
    State lives in parameters and buffers of fixed shapes (given ``n_users``, ``n_items`` and
    the config), so artefacts save and load it like any model's.
    """

    #: Short name used on the command line and in artefacts (``ease``, ``als``, ...).
    name: ClassVar[str]
    task: ClassVar[str] = "ranking"

    def __init__(self, n_users: int, n_items: int, rating_scale: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items
        #: the interactions' value range (kept with the artefact; scores are not on it)
        self.rating_scale = (float(rating_scale[0]), float(rating_scale[1]))
        self.register_buffer("known_users", torch.zeros(n_users, dtype=torch.bool))
        self.register_buffer("known_items", torch.zeros(n_items, dtype=torch.bool))
        #: interactions per item in the fitted data, float32 [n_items]: the popularity ranking
        self.register_buffer("item_counts", torch.zeros(n_items))

    @property
    def device(self) -> torch.device:
        return self.item_counts.device

    def prepare(self, interactions: Ratings) -> None:
        """Take what every ranker needs before fitting: known users and items, popularity."""
        self.known_users.copy_(torch.from_numpy(interactions.user_counts() > 0))
        self.known_items.copy_(torch.from_numpy(interactions.item_counts() > 0))
        self.item_counts.copy_(torch.from_numpy(interactions.item_counts().astype(np.float32)))
        self.bind_ratings(interactions)

    def bind_ratings(self, ratings: Ratings) -> None:
        """Give the model the interactions it scores from (called by `prepare` and, after the
        weights are loaded, by `recsys.artefact.load_artefact`). Models whose scores are a
        function of the user's own interactions (item-item models) keep them; the default
        does nothing."""

    @abstractmethod
    def fit(self, interactions: Ratings, *, progress: bool | None = None) -> dict:
        """Fit on ``interactions`` in place (calls `prepare` first); returns a JSON-ready
        summary (at least ``fit_seconds``)."""

    @abstractmethod
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each user, ``float32 [B, n_items]`` (higher: ranked
        earlier). Users ``-1`` or with no interaction get `popularity_scores`."""

    def popularity_scores(self, n: int) -> torch.Tensor:
        """The non-personalised ranking, ``float32 [n, n_items]``: interaction counts."""
        return self.item_counts.expand(n, -1).clone()

    def config_dict(self) -> dict:
        """The constructor arguments, JSON-serialisable, saved with the artefact."""
        raise NotImplementedError


# --------------------------------------------------------------------------- explanations
@dataclass(frozen=True)
class Contribution:
    """One rating's estimated effect on a score: ``effect`` in the explanation's ``units``
    (how much higher the score is because this rating is there; negative: it lowered it).
    ``example`` is the rating's row in the ratings the explanation was computed against
    (training ratings first, then those received online); ``shares`` says how it reaches
    the score (``user``, ``item`` or ``both`` rows for MF, ``hop 1``.. for evidence chains)."""

    example: int
    user: str
    item: str
    rating: float
    timestamp: int | None
    title: str | None
    effect: float
    shares: str


@dataclass
class Explanation:
    """The top contributions behind the score of raw ``user`` for raw ``item``: what every
    explainer returns, whatever the model. ``method`` names the estimate (``none: ...`` with
    the reason when no rating explains the score, e.g. the fallback path); ``terms`` holds the
    parts of the score no rating is credited with (biases, priors), where the model has them."""

    user: str
    item: str
    title: str | None
    prediction: float
    method: str
    contributions: list[Contribution] = field(default_factory=list)
    n_candidates: int = 0
    units: str = "rating points"
    attribution: str | None = None
    terms: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- capabilities
@runtime_checkable
class UpdateLog(Protocol):
    """A gradient-rollback log: per training example, the parameter updates it caused
    (sparse: only the rows the example touched). Saved with the artefact; grows with
    online updates (`extend`)."""

    optimizer: str

    @property
    def n_examples(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def attribution(self) -> str: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def extend(self, n_new: int) -> UpdateLog: ...

    def close(self) -> UpdateLog: ...

    def compact(self, dtype: torch.dtype) -> UpdateLog:
        """Cast the stored updates to ``dtype`` (e.g. float16 after training), in place."""
        ...

    def merge(self, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Data-parallel training: each rank logged only its shards' examples; replace the
        log's summable tensors by ``all_sum`` of them over the ranks, in place."""
        ...

    def save(self, path: str | Path) -> None: ...


@runtime_checkable
class UpdateRecorder(Protocol):
    """Fills an `UpdateLog` on the `Trainer`'s generic autograd step (made by
    `RatingModel.update_recorder`): it watches the model's forward/backward passes and,
    after each optimizer step, `record` credits each example of the step its share of the
    update (``recsys.optim.credit.credit`` with the step's ``optimizer`` and K-FAC-family
    ``preconditioner``, None when there is none). Passes inside `paused` are not watched
    (SALR's extra passes); `remove` detaches it from the model."""

    def record(self, example_ids: np.ndarray, optimizer: Any, preconditioner: Any) -> None: ...

    def paused(self) -> AbstractContextManager[None]: ...

    def remove(self) -> None: ...


@runtime_checkable
class Stepper(Protocol):
    """A training step path for the `Trainer`: a model family's own (e.g. MF's compiled SGD
    kernel, from `RatingModel.stepper`) or the generic autograd one (`recsys.train`).

    ``kind`` names the path (``kernel``, ``kernel-hogwild``, ``closed-form``, ``autograd``;
    reported as ``TrainResult.step_kind``); ``group_size`` is how many examples of the
    epoch's order one `step` takes (a batch, or a chunk of per-example steps). `step` applies
    the step group ``example_ids`` (rows of the training `Ratings`; data-parallel: the global
    group, the same on every rank, of which the stepper takes its rank's share) at
    ``learning_rate`` and returns the group's training MSE (squared error of the outputs
    before the step, no penalty: the same ``train_mse`` on every path). `attach_log` makes the steps record each example's
    update into an `UpdateLog` (gradient rollback); `end_epoch` runs after every epoch
    (learning-rate schedules); `close` when training ends (hooks removed)."""

    kind: str
    group_size: int

    def step(self, example_ids: np.ndarray, learning_rate: float) -> float: ...

    def attach_log(self, log: UpdateLog) -> None: ...

    def end_epoch(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class OnlineLearner(Protocol):
    """A model that learns from ratings received after training, with no retraining.

    ``learn(ratings, new)``: ``ratings`` are all ratings known now (training first, then
    those received online, as one `Ratings` whose rows keep their example ids), ``new`` the
    example ids ``int64 [m]`` just appended; the model applies them (MF: online SGD for
    trained users, a fold-in for others; evidence chains: insertion into the live graph).
    ``path(user)`` says which path answers that user now: ``model``, ``online``,
    ``fold-in`` or ``fallback``. ``start_online(train, log=, learning_rate=)`` is called once
    before the first ``learn`` by whoever serves a trained model (the `Recommender`): ``train``
    the training ratings (the first rows of every later ``ratings``), ``log`` the artefact's
    update log (online updates are logged into it, where the family logs), ``learning_rate``
    the rate of online gradient steps (the final training rate; ignored where there are none).
    Without it, ``learn`` takes the rows before ``new`` as the training ratings."""

    def start_online(self, train: Ratings, *, log: UpdateLog | None = None,
                     learning_rate: float | None = None) -> None: ...

    def learn(self, ratings: Ratings, new: np.ndarray) -> None: ...

    def path(self, user: int) -> str: ...


@runtime_checkable
class FoldIn(Protocol):
    """A model that can place a user it was not trained on from that user's ratings alone,
    holding everything else fixed (MF: a ridge solve on the item factors)."""

    def fold_in_user(self, items: torch.Tensor, values: torch.Tensor) -> Any: ...


@runtime_checkable
class Explainer(Protocol):
    """Explains scores by ratings, against one `Ratings` (training + live): `explain` returns
    the ``k`` contributions largest in absolute effect; `update` is called after online
    learning appended the example ids ``new`` to the ratings (caches are refreshed); `warm`
    precomputes what later explanations need (a no-op where nothing is cached), so that a
    server pays it at load rather than on its first request."""

    method: str

    def warm(self) -> None: ...

    def explain(self, user: int, item: int, k: int) -> Explanation: ...

    def update(self, ratings: Ratings, new: np.ndarray) -> None: ...


@runtime_checkable
class Explainable(Protocol):
    """A model that can build an `Explainer` over ``ratings`` (with its update ``log``, if
    it was trained with one; ``method`` None: the family's most faithful default)."""

    def explainer(self, ratings: Ratings, log: UpdateLog | None = None,
                  method: str | None = None) -> Explainer: ...

"""The project's own ranking MF: ``s(u, i) = p_u · q_i + b_i``, trained for top-N ranking.

Each training interaction ``z = (u, i+)`` of weight ``w_z`` draws ``negatives`` items ``j``
uniformly from the catalogue (from the model's own seeded ``torch.Generator``, so a retrain
with the same seed draws the same negatives) and contributes

- ``loss="bpr"`` (Rendle et al. 2009, pairwise): ``mean_j −log σ(s_ui+ − s_uj)``;
- ``loss="softmax"`` (sampled softmax): ``−log [exp s_ui+ / (exp s_ui+ + Σ_j exp s_uj)]``
  (uniform proposals, so the log-Q correction is a constant and dropped);

plus per-example L2 on the rows the example touches, ``0.5·reg·(|p_u|² + |q_i+|² +
mean_j |q_j|²) + 0.5·bias_reg·(b_i+² + mean_j b_j²)``; the whole per-example term is
multiplied by ``w_z`` (an interaction of weight ``w`` counts as ``w`` copies; weight 0 is
the same as the interaction being absent, which the leave-one-out harness relies on). A
batch's loss is the mean over its examples.

Training goes through the shared `recsys.train.Trainer` (generic autograd step) with the
shared optimizers by name (``sgd``, ``adagrad``, ``adam``, ``sparse-adam``), so that
`recsys.explain.rollback.RollbackCallback` logs each interaction's updates
(`recsys.models.rankmf.log`) and `recsys.models.rankmf.explain` turns the log into
explanations. The K-FAC family and covariance noise are not supported: their statistics
assume the Gaussian rating likelihood of `RatingModel.loss_terms`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.models.base import RankingModel, Stepper
from recsys.ratings import Ratings

if TYPE_CHECKING:
    from recsys.models.base import UpdateLog
    from recsys.models.rankmf.explain import RankMFExplainer
    from recsys.models.rankmf.log import RankAutogradRecorder, RankRollbackLog

LOSSES = ("bpr", "softmax")
#: the shared optimizers (`recsys.optim.factory`) this model trains with
OPTIMIZERS = ("sgd", "adagrad", "adam", "sparse-adam")
WEIGHTINGS = ("binary", "values", "liking")


@dataclass(frozen=True)
class RankMFConfig:
    """Hyper-parameters of `RankingMF`. Validation only, never a test file: on a random 10%
    of MovieLens-100K u1.base held out (``benchmarks/rankmf_faithfulness.py --tune``), BPR
    beat sampled softmax at the other defaults (NDCG@10 0.179 against 0.162); the rest of
    that grid (optimizer, reg, epochs, weighting, size) was not finished, so the other
    defaults are reasonable starting points rather than tuned values.

    ``negatives``: items drawn per positive interaction. ``weighting``: how the interaction
    values become example weights: ``binary`` (every interaction 1), ``values`` (the values
    as given, e.g. play counts), ``liking`` (1 for values >= ``like_threshold``,
    ``dislike_weight`` below: for explicit ratings). ``optimizer`` is a shared optimizer's
    name; ``lr_decay`` the per-epoch learning-rate factor."""

    embedding_size: int = 64
    reg: float = 0.005
    bias_reg: float = 0.005
    init_std: float = 0.1
    learning_rate: float = 0.01
    lr_decay: float = 0.95
    epochs: int = 30
    batch_size: int = 1024
    negatives: int = 4
    loss: str = "bpr"
    optimizer: str = "adam"
    weighting: str = "binary"
    like_threshold: float = 4.0
    dislike_weight: float = 0.35
    seed: int = 0

    def __post_init__(self) -> None:
        if self.embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {self.embedding_size}")
        if self.reg < 0 or self.bias_reg < 0:
            raise ValueError("reg and bias_reg must be >= 0")
        if not (self.learning_rate > 0) or not 0 < self.lr_decay <= 1:
            raise ValueError("learning_rate must be > 0 and lr_decay in (0, 1]")
        if self.epochs < 1 or self.batch_size < 1 or self.negatives < 1:
            raise ValueError("epochs, batch_size and negatives must be >= 1")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"rank-mf trains with one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r} "
                             "(the K-FAC family and covariance noise assume a Gaussian rating likelihood)")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if self.dislike_weight < 0:
            raise ValueError("dislike_weight must be >= 0")


class RankingMF(RankingModel):
    """Ranking MF over dense user/item indices; see the module docstring.

    Parameters (``D = embedding_size``): ``user_factors [n_users, D]``, ``item_factors
    [n_items, D]``, ``item_bias [n_items, 1]`` (``nn.Embedding`` tables, sparse gradients
    where the optimizer takes them). Buffers (from `RankingModel`): ``known_users``,
    ``known_items``, ``item_counts``. Scores are unitless (higher: ranked earlier)."""

    name = "rank-mf"

    def __init__(self, n_users: int, n_items: int, rating_scale: tuple[float, float] = (0.0, 1.0),
                 config: RankMFConfig | None = None) -> None:
        super().__init__(n_users, n_items, rating_scale)
        self.config = c = config or RankMFConfig()
        gen = torch.Generator().manual_seed(c.seed)
        self.user_factors = nn.Embedding(n_users, c.embedding_size, sparse=True)
        self.item_factors = nn.Embedding(n_items, c.embedding_size, sparse=True)
        self.item_bias = nn.Embedding(n_items, 1, sparse=True)
        with torch.no_grad():
            self.user_factors.weight.normal_(0.0, c.init_std, generator=gen)
            self.item_factors.weight.normal_(0.0, c.init_std, generator=gen)
            self.item_bias.weight.zero_()
        #: the negative sampler's generator (CPU; reseeded by `prepare`)
        self._sampler = torch.Generator().manual_seed(c.seed + 1)
        #: online learning: the number of fitted interactions (None before `start_online`)
        #: and the users whose rows were solved online since
        self._n_train: int | None = None
        self._folded: set[int] = set()

    def config_dict(self) -> dict:
        return asdict(self.config)

    # ------------------------------------------------------------------ data
    def example_weights(self, values: np.ndarray) -> np.ndarray:
        """Example weights ``float32 [n]`` from interaction values, by ``config.weighting``."""
        c = self.config
        values = np.asarray(values, dtype=np.float32)
        if c.weighting == "binary":
            return np.ones_like(values)
        if c.weighting == "values":
            if (values < 0).any():
                raise ValueError("weighting='values' needs non-negative interaction values")
            return values
        return np.where(values >= c.like_threshold, 1.0, c.dislike_weight).astype(np.float32)

    def weighted(self, interactions: Ratings) -> Ratings:
        """``interactions`` with its values replaced by the example weights (rows kept)."""
        return Ratings(interactions.users, interactions.items, self.example_weights(interactions.values),
                       interactions.timestamps, interactions.user_ids, interactions.item_ids,
                       interactions.rating_scale, interactions.item_titles)

    def prepare(self, interactions: Ratings) -> None:
        """Known rows, popularity, and the negative sampler reseeded from ``config.seed``."""
        if interactions.n_users != self.n_users or interactions.n_items != self.n_items:
            raise ValueError(f"the interactions have {interactions.n_users} users and {interactions.n_items} "
                             f"items, the model's tables {self.n_users} and {self.n_items}")
        super().prepare(interactions)
        self._sampler.manual_seed(self.config.seed + 1)

    # ------------------------------------------------------------------ scores
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``float32 [B]`` of index pairs ``users, items [B]``."""
        return (self.user_factors(users) * self.item_factors(items)).sum(-1) + self.item_bias(items)[..., 0]

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """``float32 [B, n_items]``: ``p_u · Q + b`` for known users, the popularity ranking
        (`popularity_scores`) for ``-1`` and users with no interaction."""
        users = torch.as_tensor(users, dtype=torch.int64).to(self.device)
        if bool((users >= self.n_users).any()):
            raise IndexError("user index beyond the model's tables")
        known = (users >= 0) & self.known_users[users.clamp_min(0)]
        p = self.user_factors.weight[users.clamp_min(0)]
        scores = p @ self.item_factors.weight.T + self.item_bias.weight[:, 0]
        if not bool(known.all()):
            scores[~known] = self.popularity_scores(int((~known).sum()))
        return scores

    # ------------------------------------------------------------------ training loss
    def sampling_state(self) -> torch.Tensor:
        """The negative sampler's state (`set_sampling_state` replays the same draws)."""
        return self._sampler.get_state()

    def set_sampling_state(self, state: object | None) -> None:
        if state is not None:
            self._sampler.set_state(state)

    def sample_negatives(self, n: int) -> torch.Tensor:
        """``int64 [n, negatives]`` uniform item indices from the model's generator."""
        return torch.randint(0, self.n_items, (n, self.config.negatives), generator=self._sampler)

    def loss(self, users: torch.Tensor, items: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The batch's mean weighted loss (module docstring): ``users, items [B]`` the
        interactions (positive items), ``values [B]`` their example weights. Draws
        ``[B, negatives]`` negatives from the model's generator. One lookup per table
        (``item_factors``/``item_bias`` with the index ``[B, 1 + negatives]``: column 0 the
        positive), which `recsys.models.rankmf.log.RankAutogradRecorder` relies on."""
        c = self.config
        neg = self.sample_negatives(len(users)).to(users.device)
        idx = torch.cat([items.unsqueeze(1), neg], dim=1)  # [B, 1+n]
        p = self.user_factors(users)  # [B, D]
        q = self.item_factors(idx)  # [B, 1+n, D]
        b = self.item_bias(idx)[..., 0]  # [B, 1+n]
        s = torch.einsum("bd,bkd->bk", p, q) + b
        if c.loss == "bpr":
            rank = F.softplus(s[:, 1:] - s[:, :1]).mean(1)
        else:
            rank = torch.logsumexp(s, dim=1) - s[:, 0]
        sq = q.square().sum(-1)
        bsq = b.square()
        penalty = 0.5 * c.reg * (p.square().sum(-1) + sq[:, 0] + sq[:, 1:].mean(1)) + \
            0.5 * c.bias_reg * (bsq[:, 0] + bsq[:, 1:].mean(1))
        return (values.to(s.dtype) * (rank + penalty)).mean()

    def loss_terms(self, users: torch.Tensor, items: torch.Tensor,
                   values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("rank-mf has no Gaussian outputs for the K-FAC family's Fisher statistic; "
                                  f"train it with one of {', '.join(OPTIMIZERS)}")

    # ------------------------------------------------------------------ training seams
    def stepper(self, train: Ratings | None, config: Any, *, parallel: Any = None) -> Stepper | None:
        """None: the `Trainer`'s generic autograd step."""
        return None

    def train_config(self, *, progress: bool | None = False, device: str = "cpu") -> Any:
        """The `recsys.train.TrainConfig` `fit` trains with (from this model's config: no
        early stopping, no validation)."""
        from recsys.train import TrainConfig

        c = self.config
        return TrainConfig(epochs=c.epochs, learning_rate=c.learning_rate, lr_decay=c.lr_decay,
                           batch_size=c.batch_size, optimizer=c.optimizer, patience=None, seed=c.seed,
                           progress=progress, device=device)

    def fit(self, interactions: Ratings, *, progress: bool | None = None, device: str | None = None,
            callbacks: Sequence[Any] = ()) -> dict:
        """Train in place on ``interactions`` (values weighted by ``config.weighting``) through
        the shared `recsys.train.Trainer`; ``callbacks`` are the Trainer's (e.g.
        `recsys.explain.rollback.RollbackCallback` to log the updates; its example ids are rows
        of ``interactions``). Returns ``{fit_seconds, epochs, final_loss, step_kind}``."""
        from recsys.train import Trainer  # function-level: recsys.train imports recsys.models.base

        if len(interactions) == 0:
            raise ValueError("cannot fit rank-mf on no interactions")
        config = self.train_config(progress=False if progress is None else progress,
                                   device=device or str(self.device))
        t0 = time.perf_counter()
        result = Trainer(config, callbacks=callbacks).fit(self, self.weighted(interactions))
        return {"fit_seconds": time.perf_counter() - t0, "epochs": len(result.history),
                "final_loss": result.history[-1].train_mse, "step_kind": result.step_kind}

    # ------------------------------------------------------------------ fold-in, online learning
    def fold_in_user(self, items: torch.Tensor, values: torch.Tensor, *, start: torch.Tensor | None = None,
                     max_iter: int = 50) -> torch.Tensor:
        """A user's factors ``[D]`` from their interactions with ``items [m]`` (weights from
        ``values [m]`` by ``config.weighting``), the item factors and biases fixed: the
        minimiser of the training objective restricted to the user's row, with the expectation
        over the uniform negatives taken exactly over the catalogue (bpr: ``Σ_i w_i ·
        mean_j softplus(s_j − s_i)``; softmax: ``Σ_i w_i · (log(e^{s_i} + n·mean_j e^{s_j}) −
        s_i)`` with ``n`` negatives) plus the per-example L2 ``0.5·reg·Σ_i w_i·|p|²``, by
        L-BFGS from ``start`` (default zeros). Deterministic; with no interaction: zeros."""
        c = self.config
        d = self.user_factors.weight.shape[1]
        items = torch.as_tensor(items, dtype=torch.int64, device=self.device)
        if len(items) == 0:
            return torch.zeros(d, device=self.device)
        w = torch.from_numpy(self.example_weights(np.asarray(values, dtype=np.float32))).to(self.device).double()
        q_all = self.item_factors.weight.detach().double()  # [n, D]
        b_all = self.item_bias.weight.detach().double()[:, 0]  # [n]
        q_pos, b_pos = q_all[items], b_all[items]
        p = (torch.zeros(d, dtype=torch.float64, device=self.device) if start is None
             else start.detach().to(self.device, torch.float64).clone()).requires_grad_(True)
        solver = torch.optim.LBFGS([p], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                   line_search_fn="strong_wolfe")

        def objective() -> torch.Tensor:
            solver.zero_grad()
            s_pos = q_pos @ p + b_pos  # [m]
            s_all = q_all @ p + b_all  # [n]
            if c.loss == "bpr":
                rank = F.softplus(s_all.unsqueeze(0) - s_pos.unsqueeze(1)).mean(1)
            else:
                log_mean_neg = torch.logsumexp(s_all, 0) - np.log(len(s_all))
                rank = torch.logaddexp(s_pos, log_mean_neg + np.log(c.negatives)) - s_pos
            loss = (w * (rank + 0.5 * c.reg * p.square().sum())).sum()
            loss.backward()
            return loss

        solver.step(objective)
        return p.detach().float()

    @torch.no_grad()
    def grow(self, n_users: int) -> None:
        """Enlarge the user table to at least ``n_users`` rows (zero, unknown until a
        fold-in fills them); items are fixed by the fit."""
        if n_users <= self.n_users:
            return
        old = self.user_factors.weight.data
        extra = torch.zeros(n_users - old.shape[0], old.shape[1], dtype=old.dtype, device=old.device)
        self.user_factors = nn.Embedding.from_pretrained(torch.cat([old, extra]), freeze=False, sparse=True)
        self.known_users = torch.cat([self.known_users, torch.zeros(n_users - self.n_users, dtype=torch.bool,
                                                                    device=self.device)])
        self.n_users = n_users

    def start_online(self, train: Ratings, *, log: UpdateLog | None = None,
                     learning_rate: float | None = None) -> None:
        """Before the first `learn`: ``train`` are the fitted interactions (the first rows of
        every later ratings). ``log`` and ``learning_rate`` are not used: a fold-in is a solve
        of the user's row, not logged gradient steps (explanations of folded-in users use the
        Newton estimate, which needs no log)."""
        self._n_train = len(train)
        self._folded = set()

    def learn(self, ratings: Ratings, new: np.ndarray) -> None:
        """Apply the new example ids ``new`` of ``ratings`` (training + live): the user table
        grows to the ratings' users (at least doubling), and every user with a new interaction
        gets their row re-solved by `fold_in_user` from all their interactions in ``ratings``
        (from their current row: a fitted user's row moves, a new user's is solved from zero);
        the item factors are not touched. Items beyond the fitted catalogue are an error."""
        new = np.asarray(new, dtype=np.int64)
        if ratings.n_items > self.n_items:
            raise ValueError(f"rank-mf was fitted on {self.n_items} items; {ratings.n_items} need a refit")
        if self._n_train is None:  # not started: the rows before the new ones were fitted
            self._n_train = int(new.min()) if len(new) else len(ratings)
        if ratings.n_users > self.n_users:
            self.grow(max(ratings.n_users, 2 * self.n_users))
        csr = ratings.by_user
        for u in np.unique(ratings.users[new]):
            rows = csr.examples[csr.row(int(u))]
            if len(rows) == 0:
                continue
            start = self.user_factors.weight[int(u)] if bool(self.known_users[int(u)]) else None
            p = self.fold_in_user(torch.from_numpy(ratings.items[rows]), torch.from_numpy(ratings.values[rows]),
                                  start=start)
            with torch.no_grad():
                self.user_factors.weight[int(u)] = p
                self.known_users[int(u)] = True
        self._folded.update(int(u) for u in np.unique(ratings.users[new]))

    def path(self, user: int) -> str:
        """``model`` (fitted user), ``fold-in`` (a user whose row was solved online),
        ``popularity`` (no interaction)."""
        if user < 0 or user >= self.n_users or not bool(self.known_users[user]):
            return "popularity"
        return "fold-in" if user in self._folded else "model"

    # ------------------------------------------------------------------ gradient rollback
    def new_update_log(self, train: Ratings, *, kind: str, optimizer: str, mode: str = "compact",
                       planned_passes: int | None = None) -> RankRollbackLog:
        """The gradient-rollback log (`recsys.models.rankmf.log.RankRollbackLog`): ``exact``
        also keeps each interaction's updates of the negatives it drew (a ledger), ``compact``
        only their per-item sum (attributed to nobody)."""
        from recsys.models.rankmf.log import RankRollbackLog

        if kind != "autograd":
            raise ValueError(f"rank-mf logs on the autograd step, not {kind!r}")
        return RankRollbackLog.for_model(self, len(train), optimizer=optimizer, negatives=mode == "exact")

    @classmethod
    def load_update_log(cls, path: Any, device: Any = "cpu") -> RankRollbackLog:
        """Read a log written by `RankRollbackLog.save` (what `recsys.artefact` calls)."""
        from recsys.models.rankmf.log import RankRollbackLog

        return RankRollbackLog.load(path, device=device)

    def update_recorder(self, log: UpdateLog) -> RankAutogradRecorder:
        from recsys.models.rankmf.log import RankAutogradRecorder

        return RankAutogradRecorder(self, log)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ explanations
    def explainer(self, ratings: Ratings, log: UpdateLog | None = None,
                  method: str | None = None) -> RankMFExplainer:
        """An `recsys.models.base.Explainer` of scores over ``ratings`` (the interactions the
        model was fitted on): see `recsys.models.rankmf.explain`."""
        from recsys.models.rankmf.explain import RankMFExplainer

        return RankMFExplainer(self, ratings, log, method)

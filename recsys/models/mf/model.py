"""Biased matrix factorisation: ``r̂(u, i) = μ + b_u + b_i + p_u · q_i``.

The factors are trained as ``n_blocks`` independent blocks of ``embedding_size / n_blocks``
columns (each block has its own bias slot): block ``b`` is fitted to the ratings on its own,
``r ≈ μ + b_u[b] + b_i[b] + p_u[b]·q_i[b]``, and the model predicts the blocks' average.
That is a bagged ensemble of small MF models, stored and served as one biased MF of
``embedding_size`` dimensions (``p·q / n_blocks`` and bias means): averaging cancels much of
SGD's run-to-run variance: on MovieLens-100K's validation slices, 0.004 RMSE over the best
single-block configuration (`benchmarks/tune_mf.py`), at a similar cost per epoch.
``n_blocks=1`` is classic biased MF.

Regularisation is per example on the rows the example touches (so a step touches only the
rows of its batch), scaled by row frequency: a row seen ``n`` times gets
``reg · (n / n̄)^(-reg_exponent)`` per visit (0 = plain per-visit L2, whose total grows with
``n``; 1 = a fixed total per row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from recsys.models.base import RatingModel, Stepper
from recsys.ratings import Ratings

if TYPE_CHECKING:
    from recsys.models.mf.log import AutogradRecorder, CompactRollbackLog, RollbackLog

if TYPE_CHECKING:  # online learning and explanations (`learn`, `path`, `explainer`)
    from recsys.models.base import UpdateLog
    from recsys.models.mf.explain import MFExplainer
    from recsys.models.mf.online import OnlineState


@dataclass(frozen=True)
class MFConfig:
    """Hyper-parameters of `MatrixFactorization` (defaults tuned on validation slices of
    MovieLens-100K's training folds; see ``benchmarks/tune_mf.py``)."""

    embedding_size: int = 128
    n_blocks: int = 4
    reg: float = 0.1
    bias_reg: float = 0.02
    reg_exponent: float = 0.5
    init_std: float = 0.1
    #: Ridge weights of `fold_in_user` / `fold_in_item` on the factors and on the bias
    #: (chosen on a cold-start split of MovieLens-100K, seed 1: 20% of users folded in from
    #: 1..20 revealed ratings; `python benchmarks/tune_mf.py --fold-in`).
    fold_in_reg: float = 1.0
    fold_in_bias_reg: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.embedding_size < 1 or self.n_blocks < 1:
            raise ValueError("embedding_size and n_blocks must be positive")
        if self.embedding_size % self.n_blocks:
            raise ValueError(
                f"embedding_size ({self.embedding_size}) must be a multiple of n_blocks ({self.n_blocks})"
            )
        if self.reg < 0 or self.bias_reg < 0:
            raise ValueError("reg and bias_reg must be >= 0")


class MatrixFactorization(RatingModel):
    """Biased MF over dense user/item indices; see the module docstring for the model.

    Parameters (``D = embedding_size``, ``K = n_blocks``):
        user_factors ``[n_users, D]``, item_factors ``[n_items, D]``,
        user_bias ``[n_users, K]``, item_bias ``[n_items, K]``.
    Buffers: per-row regularisation weights ``reg_user [n_users]`` etc., set by `prepare`.
    """

    name = "mf"
    #: Each optimizer's own starting point on MF (minibatches for the autograd optimizers);
    #: chosen on a validation slice of u1 (`benchmarks/optim_curvature.py`, `optim_noise.py`).
    #: Option groups (``kfac``, ``noise``) are dicts of their configs' fields.
    optimizer_defaults: ClassVar[dict[str, dict[str, object]]] = {
        "adam": {"batch_size": 256, "learning_rate": 3e-3, "epochs": 20, "lr_decay": 0.9},
        "sparse-adam": {"batch_size": 256, "learning_rate": 3e-3, "epochs": 20, "lr_decay": 0.9},
        "adagrad": {"batch_size": 256, "learning_rate": 0.1, "epochs": 20, "lr_decay": 0.9},
        # K-FAC family: it fits the training objective faster than Adam and then overfits it
        # (validation worse after ~3 epochs), so a short schedule; EKFAC's per-touched-step row
        # statistic takes smaller steps, hence its larger lr; K-FAC and TKFAC refresh their
        # factors every 10 steps, which leaves the validation curve as it was with every step
        # and saves the Fisher pass (`benchmarks/optim_curvature.py`)
        **{kind: {"batch_size": 256, "learning_rate": lr, "epochs": 5, "lr_decay": 0.7,
                  "kfac": {"damping": 0.01, **({"stats_freq": 10} if kind in ("kfac", "tkfac") else {})}}
           for kind, lr in (("kfac", 0.01), ("tkfac", 0.01), ("ekfac", 0.03), ("tekfac", 0.03))},
        # noise 0.1: the largest scale within the seed spread of the plain batch on validation
        # (`benchmarks/results/optim_noise_mf_scales.json`); noise did not help MF
        "cov-noise": {"batch_size": 4096, "learning_rate": 32.0, "epochs": 40, "lr_decay": 1.0,
                      "noise": {"scale": 0.1}},
    }

    def __init__(self, n_users: int, n_items: int, rating_scale: tuple[float, float],
                 config: MFConfig | None = None) -> None:
        super().__init__(n_users, n_items, rating_scale)
        self.config = config or MFConfig()
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        self.user_factors = nn.Embedding(n_users, c.embedding_size, sparse=True)
        self.item_factors = nn.Embedding(n_items, c.embedding_size, sparse=True)
        self.user_bias = nn.Embedding(n_users, c.n_blocks, sparse=True)
        self.item_bias = nn.Embedding(n_items, c.n_blocks, sparse=True)
        with torch.no_grad():
            self.user_factors.weight.normal_(0.0, c.init_std, generator=gen)
            self.item_factors.weight.normal_(0.0, c.init_std, generator=gen)
            self.user_bias.weight.zero_()
            self.item_bias.weight.zero_()
        for name, n in (("user", n_users), ("item", n_items)):
            self.register_buffer(f"reg_{name}", torch.full((n,), c.reg))
            self.register_buffer(f"bias_reg_{name}", torch.full((n,), c.bias_reg))

    @property
    def block_size(self) -> int:
        return self.config.embedding_size // self.config.n_blocks

    def config_dict(self) -> dict:
        return asdict(self.config)

    # ------------------------------------------------------------------ training set-up
    def prepare(self, train: Ratings) -> None:
        """Global mean, known rows and the frequency-scaled per-row regularisation."""
        super().prepare(train)
        c = self.config
        for name, counts in (("user", train.user_counts()), ("item", train.item_counts())):
            n = counts.astype(np.float64) + 1.0
            scale = torch.from_numpy((n / n.mean()) ** (-c.reg_exponent)).float()
            getattr(self, f"reg_{name}").copy_(c.reg * scale)
            getattr(self, f"bias_reg_{name}").copy_(c.bias_reg * scale)

    # ------------------------------------------------------------------ predictions
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        p = self.user_factors(users)
        q = self.item_factors(items)
        bias = self.user_bias(users).mean(-1) + self.item_bias(items).mean(-1)
        return self.global_mean + bias + (p * q).sum(-1) / self.config.n_blocks

    def fallback(self, users: torch.Tensor, items: torch.Tensor, user_known: torch.Tensor,
                 item_known: torch.Tensor) -> torch.Tensor:
        """μ plus whichever biases are known: μ + b_i for an unknown user, μ + b_u for an
        unknown item, μ when both are unknown."""
        bu = self.user_bias(users).mean(-1) * user_known
        bi = self.item_bias(items).mean(-1) * item_known
        return self.global_mean + bu + bi

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        users = users.to(self.device)
        unknown_users = ~((users >= 0) & self.known_users[users.clamp_min(0)])
        users = users.clamp_min(0)
        p = self.user_factors.weight[users]
        scores = p @ self.item_factors.weight.T / self.config.n_blocks
        scores += self.item_bias.weight.mean(-1)
        scores += self.user_bias.weight[users].mean(-1, keepdim=True)
        if bool(unknown_users.any()):  # popularity-by-bias ranking for users with no data
            scores[unknown_users] = self.item_bias.weight.mean(-1)
        return scores + self.global_mean

    # ------------------------------------------------------------------ training loss
    def block_predictions(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Each block's own prediction ``[B, n_blocks]`` (what each block is fitted to)."""
        return self._blocks(*self._rows(users, items))

    def _rows(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The pairs' table rows ``(p, q [B, D], b_u, b_i [B, n_blocks])``, one lookup per table."""
        return self.user_factors(users), self.item_factors(items), self.user_bias(users), self.item_bias(items)

    def _blocks(self, p: torch.Tensor, q: torch.Tensor, bu: torch.Tensor, bi: torch.Tensor) -> torch.Tensor:
        k, d = self.config.n_blocks, self.block_size
        return self.global_mean + bu + bi + (p.view(-1, k, d) * q.view(-1, k, d)).sum(-1)

    def loss_terms(self, users: torch.Tensor, items: torch.Tensor,
                   values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block predictions [B, K], loss)`` with the loss the mean over the batch of the
        per-example objective ``0.5 Σ_blocks [(r - r̂_b)² + reg_u|p_u,b|² + reg_i|q_i,b|² +
        bias terms]``. Its gradient for a batch of one is exactly the update of the compiled
        SGD kernel."""
        p, q, bu, bi = self._rows(users, items)  # each table read once: one sparse gradient entry per pair
        outputs = self._blocks(p, q, bu, bi)
        err = values.unsqueeze(-1) - outputs
        penalty = (
            self.reg_user[users] * p.square().sum(-1)
            + self.reg_item[items] * q.square().sum(-1)
            + self.bias_reg_user[users] * bu.square().sum(-1)
            + self.bias_reg_item[items] * bi.square().sum(-1)
        )
        return outputs, 0.5 * (err.square().sum(-1) + penalty).mean()

    def curvature_l2(self) -> dict[str, torch.Tensor]:
        """Per table, each row's L2 weight per visit (the Hessian of `loss_terms`' penalty per
        example is ``l2_r · I``): the K-FAC family adds it to the tables' curvature
        (`recsys.optim.kfac`)."""
        return {"user_factors": self.reg_user, "item_factors": self.reg_item,
                "user_bias": self.bias_reg_user, "item_bias": self.bias_reg_item}

    # ------------------------------------------------------------------ training seams
    def stepper(self, train: Ratings | None, config: Any, *, parallel: Any = None) -> Stepper | None:
        """MF's own steps for plain SGD (``config.optimizer == "sgd"``, no SALR): the compiled
        per-example kernel for batch size 1 on the CPU, closed-form minibatch SGD otherwise
        (any device, data-parallel over ``parallel``); None (the trainer's autograd step)
        for every other optimizer. See `recsys.models.mf.steps`."""
        from recsys.models.mf.steps import ClosedFormStepper, KernelStepper

        if config.optimizer != "sgd" or config.salr is not None:
            return None
        if config.batch_size == 1 and torch.device(config.device).type == "cpu" and parallel is None:
            return KernelStepper(self, train, config)
        return ClosedFormStepper(self, train, config, parallel=parallel)

    def new_update_log(self, train: Ratings, *, kind: str, optimizer: str, mode: str = "compact",
                       planned_passes: int | None = None) -> RollbackLog | CompactRollbackLog:
        """MF's gradient-rollback log (`recsys.models.mf.log`): the compact log on the
        compiled-kernel path when ``mode`` is ``compact``, the exact `RollbackLog` otherwise."""
        from recsys.models.mf.log import CompactRollbackLog, RollbackLog

        if kind.startswith("kernel") and mode == "compact":
            return CompactRollbackLog.for_model(self, train, optimizer=optimizer, planned_passes=planned_passes)
        return RollbackLog.for_model(self, len(train), optimizer=optimizer)

    def update_recorder(self, log: RollbackLog) -> AutogradRecorder:
        """Fills the exact ``log`` on the autograd path (`recsys.models.mf.log.AutogradRecorder`)."""
        from recsys.models.mf.log import AutogradRecorder

        return AutogradRecorder(self, log)

    # ------------------------------------------------------------------ fast paths
    def sgd_examples(self, train: Ratings, order: np.ndarray, learning_rate: float,
                     bias_learning_rate: float | None = None, *, hogwild_threads: int = 0,
                     log: RollbackLog | None = None) -> float:
        """Incremental SGD over the examples ``order`` (rows of ``train``) with the compiled
        kernel, in place; returns the mean squared training error of the blocks seen in the
        pass (before each update). Deterministic (`mf_kernels.sgd_examples_interleaved`, one
        thread) unless ``hogwild_threads > 1`` (lock-free parallel updates, see
        `mf_kernels.sgd_examples_hogwild`). CPU only: see `sgd_batch` for any device.

        ``log``: a gradient-rollback log (`recsys.models.mf.log.RollbackLog`, exact, or
        `~recsys.models.mf.log.CompactRollbackLog`) that records the updates of visit ``k``
        as example ``order[k]``'s (the same weights as without a log, up to float32 rounding)."""
        from recsys.models.mf.kernels import sgd_examples_hogwild, sgd_examples_interleaved
        from recsys.optim.shuffle import gather_examples
        from recsys.threads import torch_threads_kept

        if self.device.type != "cpu":
            raise RuntimeError("the compiled SGD kernel runs on the CPU; use sgd_batch on other devices")
        order = np.ascontiguousarray(order, dtype=np.int64)
        users, items = np.empty(len(order), np.int64), np.empty(len(order), np.int64)
        values = np.empty(len(order), np.float32)
        gather_examples(train.users, train.items, train.values, order, users, items, values)
        # one squared-error slot per thread shard (Hogwild) or a single one (the interleaved default)
        sq = np.zeros(hogwild_threads if hogwild_threads > 1 else 1)
        lr_b = learning_rate if bias_learning_rate is None else bias_learning_rate
        tables = (
            self.user_factors.weight.data.numpy(), self.item_factors.weight.data.numpy(),
            self.user_bias.weight.data.numpy(), self.item_bias.weight.data.numpy(),
            np.float32(self.global_mean), np.float32(learning_rate), np.float32(lr_b),
            self.reg_user.numpy(), self.reg_item.numpy(),
            self.bias_reg_user.numpy(), self.bias_reg_item.numpy(), sq,
        )
        if log is None and hogwild_threads <= 1:  # deterministic; every block of each example in turn
            sgd_examples_interleaved(users, items, values, *tables)
        else:
            with torch_threads_kept():  # a parallel kernel (see recsys.threads)
                if log is None:
                    sgd_examples_hogwild(users, items, values, *tables)
                else:  # the log runs its logged twin of the kernel (exact or compact, see RollbackLog.record)
                    log.record(self, users, items, values, order, tables, hogwild_threads=hogwild_threads)
        return float(sq.sum() / max(1, len(order) * self.config.n_blocks))

    @torch.no_grad()
    def sgd_batch(self, users: torch.Tensor, items: torch.Tensor, values: torch.Tensor,
                  learning_rate: float, bias_learning_rate: float | None = None, *,
                  log: RollbackLog | None = None, example_ids: torch.Tensor | None = None) -> float:
        """One minibatch SGD step on ``loss`` without autograd, on any device: gathers the
        batch's rows, computes their gradients in closed form and scatter-adds them
        (duplicate rows in a batch accumulate, as with autograd). Returns the batch's mean
        squared block error.

        ``log`` with ``example_ids [B]`` (training example ids of the batch): also add each
        example's share of the step, ``lr·(−∇ℓ_b)/B`` on its gathered rows, to its log row."""
        k, d = self.config.n_blocks, self.block_size
        lr_b = learning_rate if bias_learning_rate is None else bias_learning_rate
        P, Q = self.user_factors.weight, self.item_factors.weight
        BU, BI = self.user_bias.weight, self.item_bias.weight
        p, q = P.index_select(0, users), Q.index_select(0, items)
        bu, bi = BU.index_select(0, users), BI.index_select(0, items)
        pb, qb = p.view(-1, k, d), q.view(-1, k, d)
        err = values.unsqueeze(-1) - (self.global_mean + bu + bi + (pb * qb).sum(-1))  # [B, K]
        scale = 1.0 / len(users)
        grad_p = (err.unsqueeze(-1) * qb).view(-1, k * d) - self.reg_user[users, None] * p
        grad_q = (err.unsqueeze(-1) * pb).view(-1, k * d) - self.reg_item[items, None] * q
        grad_bu = err - self.bias_reg_user[users, None] * bu
        grad_bi = err - self.bias_reg_item[items, None] * bi
        P.index_add_(0, users, grad_p, alpha=learning_rate * scale)
        Q.index_add_(0, items, grad_q, alpha=learning_rate * scale)
        BU.index_add_(0, users, grad_bu, alpha=lr_b * scale)
        BI.index_add_(0, items, grad_bi, alpha=lr_b * scale)
        if log is not None:
            if example_ids is None or len(example_ids) != len(users):
                raise ValueError("sgd_batch with a log needs example_ids, one per rating of the batch")
            log.add(example_ids, grad_p * (learning_rate * scale), grad_bu * (lr_b * scale),
                    grad_q * (learning_rate * scale), grad_bi * (lr_b * scale))
        return float(err.square().mean())

    # ------------------------------------------------------------------ fold-in
    @torch.no_grad()
    def fold_in_user(self, items: torch.Tensor, values: torch.Tensor, *, reg: float | None = None,
                     bias_reg: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``[D]`` and bias (scalar tensor) for a new user from their ratings of
        known ``items [m]``, by a ridge solve on the fixed item factors and biases:
        ``min Σ_j (r_j - μ - b_j - b - p·q_j/K)² + reg|p|² + bias_reg b²`` (defaults:
        ``config.fold_in_reg`` and ``config.fold_in_bias_reg``). With no ratings this gives
        ``p = 0, b = 0``: the bias-only prediction."""
        return self._fold_in(self.item_factors.weight, self.item_bias.weight, items, values, reg, bias_reg)

    @torch.no_grad()
    def fold_in_item(self, users: torch.Tensor, values: torch.Tensor, *, reg: float | None = None,
                     bias_reg: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The symmetric solve for a new item from its ratings by known ``users``."""
        return self._fold_in(self.user_factors.weight, self.user_bias.weight, users, values, reg, bias_reg)

    def _fold_in(self, factors: torch.Tensor, biases: torch.Tensor, rows: torch.Tensor,
                 values: torch.Tensor, reg: float | None, bias_reg: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        rows = rows.to(self.device)
        values = values.to(self.device, torch.float64)
        lam = c.fold_in_reg if reg is None else reg
        lam_b = c.fold_in_bias_reg if bias_reg is None else bias_reg
        x = torch.cat([factors[rows].double() / c.n_blocks,
                       torch.ones(len(rows), 1, dtype=torch.float64, device=self.device)], dim=1)
        target = values - float(self.global_mean) - biases[rows].double().mean(-1)
        penalty = torch.full((x.shape[1],), lam, dtype=torch.float64, device=self.device)
        penalty[-1] = lam_b
        gram = x.T @ x + torch.diag(penalty)
        sol = torch.linalg.solve(gram, x.T @ target)
        return sol[:-1].float(), sol[-1].float()

    @torch.no_grad()
    def set_user(self, user: int, factors: torch.Tensor, bias: torch.Tensor) -> None:
        """Install a folded-in user's row (every block's bias gets the same value)."""
        self.user_factors.weight[user] = factors.to(self.device)
        self.user_bias.weight[user] = bias.to(self.device)
        self.known_users[user] = True

    @torch.no_grad()
    def grow(self, n_users: int, n_items: int) -> None:
        """Enlarge the tables to at least ``n_users`` / ``n_items`` rows (never shrinks). New
        rows are zero and unknown until a fold-in or an online update fills them."""
        n_users, n_items = max(n_users, self.n_users), max(n_items, self.n_items)
        if (n_users, n_items) == (self.n_users, self.n_items):
            return

        def extend(t: torch.Tensor, n: int, fill: float = 0.0) -> torch.Tensor:
            extra = torch.full((n - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            return torch.cat([t, extra])

        c = self.config
        for emb, n in ((self.user_factors, n_users), (self.item_factors, n_items),
                       (self.user_bias, n_users), (self.item_bias, n_items)):
            emb.weight = nn.Parameter(extend(emb.weight.data, n))
            emb.num_embeddings = n
        self.known_users = extend(self.known_users, n_users, False)
        self.known_items = extend(self.known_items, n_items, False)
        self.reg_user = extend(self.reg_user, n_users, c.reg)
        self.reg_item = extend(self.reg_item, n_items, c.reg)
        self.bias_reg_user = extend(self.bias_reg_user, n_users, c.bias_reg)
        self.bias_reg_item = extend(self.bias_reg_item, n_items, c.bias_reg)
        self.n_users, self.n_items = n_users, n_items

    @torch.no_grad()
    def set_item(self, item: int, factors: torch.Tensor, bias: torch.Tensor) -> None:
        self.item_factors.weight[item] = factors.to(self.device)
        self.item_bias.weight[item] = bias.to(self.device)
        self.known_items[item] = True

    # ------------------------------------------------------------------ online learning
    # (`recsys.models.base.OnlineLearner`; the rules are in `recsys.models.mf.online`)
    #: what online learning remembers (None until `start_online` or the first `learn`)
    _online: OnlineState | None = None

    def start_online(self, train: Ratings, *, log: UpdateLog | None = None,
                     learning_rate: float | None = None) -> None:
        """Prepare to learn online after training on ``train`` (its rows are the first example
        ids of every later `learn`): ``log`` the gradient-rollback log online SGD logs into
        (grown to cover new rows), ``learning_rate`` the online SGD rate (the final training
        rate; default `recsys.models.mf.online.DEFAULT_ONLINE_LR`)."""
        from recsys.models.mf.online import OnlineState

        self._online = OnlineState.start(self, train, log, learning_rate)

    def learn(self, ratings: Ratings, new: np.ndarray) -> None:
        """Apply the example ids ``new`` of ``ratings`` (training + live, `Ratings.append`):
        online SGD for users the model was trained on, a fold-in for others; grows the tables
        to the ratings' id maps first (``new`` may be empty: users were added). Without
        `start_online`, the rows before ``new`` count as the training ratings and the users
        known now as the trained ones."""
        from recsys.models.mf.online import OnlineState, learn

        if self._online is None:
            known = self.known_users.detach().cpu().numpy().copy()
            self._online = OnlineState(len(ratings) - len(new), known)
        learn(self, self._online, ratings, new)

    def path(self, user: int) -> str:
        """Which path answers index ``user`` now: ``model``, ``online``, ``fold-in`` or ``fallback``."""
        from recsys.models.mf.online import path

        return path(self, self._online, user)

    @property
    def trained_examples(self) -> int | None:
        """Rows of the online ratings the model was trained on (None: not learning online)."""
        return None if self._online is None else self._online.n_trained

    # ------------------------------------------------------------------ explanations
    def explainer(self, ratings: Ratings, log: UpdateLog | None = None,
                  method: str | None = None) -> MFExplainer:
        """An `recsys.models.base.Explainer` over ``ratings`` (training first, then those
        learnt online): ``method`` None, the cached one-row Newton the service uses; a named
        method of `recsys.models.mf.explain.METHODS`, computed per query (``rollback`` needs
        ``log``). See `recsys.models.mf.explain.MFExplainer`."""
        from recsys.models.mf.explain import MFExplainer

        n_trained = self.trained_examples
        return MFExplainer(self, ratings, log, method, n_trained=None if n_trained is None else min(n_trained, len(ratings)))

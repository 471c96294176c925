"""The evidence-chain model (REC), after Tragas, Luo, Gazeau, Luk, Duvenaud, "Scalable
Recommender Systems through Recursive Evidence Chains" (arXiv 1807.02150).

``r̂(u, i) = μ + b_u + b_i + u · v`` where only the ``p`` most-rated users and items
(*prototypes*) have free vectors. Every other vector is generated on demand from the live
ratings by recursive evidence chains: a non-prototype user's vector at depth ``d`` is the
mean, over at most ``fanouts[d]`` sampled items it rated (prototypes first), of a message
``φ_U([v_item^(d+1) ; enc(r) ; r - μ - b_u - b_i])``; items are symmetric with ``φ_V``.
Non-prototypes at the last depth have no evidence and drop out of their parent's mean; a node
whose every message dropped out drops out too, and a root (the user or item of a prediction)
with no evidence at all takes a learned fallback vector. A learned gate on the evidence count
``n`` shrinks a generated vector towards the fallback, ``g(n)·mean + (1-g(n))·fallback``,
``g(n) = σ(a·log n + c)``, so that a vector built from one rating is not trusted like one
built from sixteen.

The biases ``b_u, b_i`` are not parameters: they are a regularised baseline fitted to the live
ratings (alternating ridge sweeps, ``bias_reg`` on users, ``item_bias_reg`` on items),
recomputed when the model is bound to ratings and updated locally when ratings are inserted.
In training a rating is predicted with the biases solved without it (``target_free_bias``),
and with probability ``cold_roots`` its user or item is made *new*: it keeps a random 1..F of
its ratings as its only first-hop evidence and its bias is re-solved from those alone, as
`add_ratings` does for a new user, so that cold-start vectors and biases are seen in training. So the parameter count is fixed:
``2·p·K`` prototype entries, two MLPs, two fallback vectors and the gates (see
`EvidenceChainModel.parameter_count`); it does not grow with users, items or ratings.

The target rating is never its own evidence: a batch's (user, item) pairs are removed from the
graph for the whole batch's chains. The immediate parent is skipped at every hop: a memoised
child shared by several parents gets, for each parent, its mean with that parent's message
subtracted (exact, see `recsys.models.rec.chains`). Sampling is level by level and vectorised on
the device of the model's tensors (`recsys.models.rec.chains.sample_chains`).

Cold start and online learning: `EvidenceChainModel.add_ratings` (and `add_user`/`add_item`)
insert into the live ratings, growing the id maps, and the next prediction uses them with no
parameter update. `EvidenceChainModel.explain` returns the evidence ratings of a prediction
with their shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from recsys.models.base import RatingModel
from recsys.models.rec.chains import Chains, EvidenceGraph, row_positions, rows, sample_chains
from recsys.models.rec.kernels import aggregate_compiled, aggregate_levels
from recsys.ratings import Ratings

if TYPE_CHECKING:  # the explainer of `explainer`
    from recsys.models.rec.explain import EvidenceChainExplainer

#: ``observer(graph, roots, chains, targets, kwargs)``, called by an `EvidenceChainModel` after
#: every chain sampling (see `EvidenceChainModel.observing`)
SamplingObserver = Callable[[EvidenceGraph, torch.Tensor, Chains, "torch.Tensor | None", dict], None]


@dataclass(frozen=True)
class RECConfig:
    """Hyper-parameters of `EvidenceChainModel` (defaults chosen on a validation slice of
    MovieLens-100K u1.base, and the bias ridge weights, ``cold_roots`` and
    ``target_free_bias`` on a seed-1 cold-start split; see ``docs/evidence_chain.md``).

    ``embedding_size``: K, size of every user/item vector. ``hidden_size``: width of the
    message MLPs. ``prototypes``: p users and p items with free vectors (the most rated).
    ``fanouts``: neighbours sampled per node at each depth (its length is the depth); 32,8,4
    had a better validation RMSE than 16,8,4 on all five folds (by 0.002-0.009), at about
    1.5x the training time and, on the CPU's compiled inference, about 1.1x the latency of a
    single prediction (1.6x with the tensor code).
    ``reg``: L2 weight on the mean squared norm of the prototype vectors (0.005 chosen on the
    u1 validation slice: 0.05 held validation at 0.928, 0.005 reached 0.921, 0 0.925);
    ``mlp_reg``: L2 on the MLP weights. ``dropout``: on the MLPs' hidden layer. ``evidence_dropout``: in
    training, probability that a node keeps only a random 1..m of its m sampled neighbours.
    ``cold_roots``: in training, probability that the user or item of a training rating is
    treated as new: it keeps a uniformly random 1..``fanouts[0]`` of its ratings as its only
    first-hop evidence and its baseline bias is re-solved from those alone, as `add_ratings`
    solves a new user's (teaches the model the vectors and biases of cold start).
    ``target_free_bias``: in training, a rating is predicted with baseline biases that leave
    it out (the ridge solution without it, one side at a time), as a test rating is: the
    target rating is no more part of its own bias than of its own evidence.
    ``bias_reg``: ridge weight of the baseline user biases; ``item_bias_reg``: of the item
    biases (``None``: ``bias_reg``). ``rating_levels``: the rating is
    encoded on that many evenly spaced levels of the scale (hat functions; one-hot for
    integer 1..5 ratings with 5 levels). ``eval_passes``: independent samplings averaged at
    prediction time. ``chain_group``: in training, a batch's pairs are sampled in groups of at
    most this many, each group's chains excluding its own target ratings, so that the
    evidence a rating is predicted from does not shrink with the batch size (one group of
    16,384 would hide a fifth of MovieLens-100K u1 from every chain). ``cold_shrink``:
    prediction-time evidence shrinkage (inference only, 0 = off): outside training, a root
    vector (the user's or the item's, per pass) built from ``n >= 1`` sampled first-hop
    ratings is multiplied by ``1 - exp(-n / cold_shrink)``, moving a prediction from little
    evidence towards its bias-only baseline; roots with no first-hop evidence (prototypes,
    fallbacks) are untouched. 3.0 was chosen on the seed-1 cold-start split (2 and 5 were
    within 0.0004 there); on held-out splits 0, 2 and 3 it takes k=1 from 1.000 to 0.990 and costs
    warm users and items with few ratings a little (u1 test +0.0003, u2 +0.0006; see
    ``docs/evidence_chain.md``). ``seed``: initialisation and sampling.
    """

    embedding_size: int = 32
    hidden_size: int = 64
    prototypes: int = 100
    fanouts: tuple[int, ...] = (32, 8, 4)
    reg: float = 0.005
    mlp_reg: float = 0.0
    dropout: float = 0.0
    evidence_dropout: float = 0.2
    cold_roots: float = 0.5
    target_free_bias: bool = True
    bias_reg: float = 5.0
    item_bias_reg: float | None = 2.0
    rating_levels: int = 5
    eval_passes: int = 3
    chain_group: int = 256
    cold_shrink: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fanouts", tuple(int(f) for f in self.fanouts))
        if self.embedding_size < 1 or self.hidden_size < 1 or self.prototypes < 1:
            raise ValueError("embedding_size, hidden_size and prototypes must be positive")
        if not self.fanouts or min(self.fanouts) < 1:
            raise ValueError(f"fanouts must be one or more positive integers, got {self.fanouts}")
        if self.reg < 0 or self.mlp_reg < 0 or self.bias_reg < 0 or (self.item_bias_reg or 0) < 0:
            raise ValueError("reg, mlp_reg, bias_reg and item_bias_reg must be >= 0")
        if not 0 <= self.dropout < 1 or not 0 <= self.evidence_dropout <= 1 or not 0 <= self.cold_roots <= 1:
            raise ValueError("dropout must be in [0, 1), evidence_dropout and cold_roots in [0, 1]")
        if self.rating_levels < 2 or self.eval_passes < 1 or self.chain_group < 1:
            raise ValueError("rating_levels must be >= 2, eval_passes and chain_group >= 1")
        if not self.cold_shrink >= 0:
            raise ValueError(f"cold_shrink must be >= 0, got {self.cold_shrink}")

    @property
    def item_reg(self) -> float:
        """The ridge weight of the item biases."""
        return self.bias_reg if self.item_bias_reg is None else self.item_bias_reg


def fit_baseline(users: np.ndarray, items: np.ndarray, values: np.ndarray, n_users: int,
                 n_items: int, mean: float, reg: float, sweeps: int = 8,
                 item_reg: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Regularised baseline biases ``(b_u float64 [n_users], b_i float64 [n_items])`` by
    alternating ridge solves of ``r ≈ mean + b_u + b_i`` (each sweep: items then users;
    ridge weight ``reg`` on the users, ``item_reg`` on the items, default ``reg``)."""
    item_reg = reg if item_reg is None else item_reg
    cu = np.bincount(users, minlength=n_users)
    ci = np.bincount(items, minlength=n_items)
    bu = np.zeros(n_users)
    bi = np.zeros(n_items)
    resid = values.astype(np.float64) - mean
    for _ in range(sweeps):
        bi = np.bincount(items, weights=resid - bu[users], minlength=n_items) / (item_reg + ci)
        bu = np.bincount(users, weights=resid - bi[items], minlength=n_users) / (reg + cu)
    return bu, bi


#: inference on fewer edges than this runs both message networks on all of a level's edges
#: (fewer operations; above it, splitting the edges by side halves the networks' arithmetic,
#: which is then the larger cost)
_BOTH_NETS_BELOW = 256


class _Message(nn.Sequential):
    """φ: ``[B, K + L + 1] -> [B, K]``, one hidden ReLU layer."""

    def __init__(self, n_in: int, hidden: int, n_out: int, dropout: float) -> None:
        super().__init__(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


class EvidenceChainModel(RatingModel):
    """REC; see the module docstring.

    Parameters (``K = embedding_size``, ``p_u = min(p, n_users)``, ``p_i = min(p, n_items)``):
        prototype_vectors ``[p_u + p_i, K]`` (user prototypes first), phi_user / phi_item
        (item->user and user->item message MLPs), fallback_vectors ``[2, K]`` (user, item),
        gate ``[2, 2]`` (per side: slope and offset on log evidence count).
    Buffers: prototype_users ``int64 [p_u]``, prototype_items ``int64 [p_i]`` (which users and
    items are prototypes; chosen by `prepare`), draw_sizes ``int64 [2]`` (the training ratings'
    users and items, which key the chain draws), plus the base class's known masks and mean.
    Live state (not in the state dict, rebuilt by `bind_ratings`): the ratings, their graph
    and the baseline biases.
    """

    name = "rec"
    #: on the CPU, sample chains (always) and aggregate them (inference) with the compiled
    #: kernels of `recsys.models.rec.kernels`; off: the tensor code everywhere (the reference
    #: the kernels are tested against)
    compiled_kernels: bool = True
    training_defaults: ClassVar[dict[str, object]] = {
        "optimizer": "adam", "learning_rate": 3e-3, "batch_size": 512, "epochs": 30, "lr_decay": 0.96,
    }
    #: (chosen with ``reg`` on the validation slice of MovieLens-100K u1.base, see
    #: ``docs/evidence_chain.md``: batch 512 at lr 3e-3 matched batch 256 at 2e-3 in half the
    #: time; with the weaker prototype L2 the best epoch came at 15–25, so 30 epochs with
    #: early stopping)
    #: ``cov-noise`` on REC: Adam at batch 4096 fed the batch's gradient plus noise estimated
    #: from its 256-rating sub-batches (`recsys.optim.noise.SubBatchNoise`): REC has no
    #: per-rating gradients. lr 8e-3 was B=4,096's validation-best (= 2e-3 at B=256 scaled by
    #: √16). Noise at scale 1 made REC worse on validation and test; scale 0.1 is within the
    #: seed spread of the plain large batch (validation 0.92692 against 0.92675), so it is
    #: kept: not worse, not better (`benchmarks/results/optim_noise_rec.json`).
    #: ``kfac`` and ``tkfac`` on REC: the preconditioner covers the message networks'
    #: ``nn.Linear`` layers only (the prototype table and fallback vectors are plain
    #: parameters, stepped by the base SGD), so those take 100x the base rate (``lr_scales``);
    #: damping 10 (relative): at 1 the first steps blow up (REC's Adam rate scaled linearly,
    #: 0.024 at 4,096, diverges in the first epoch). lr 1 at 4,096 was the best of the probes
    #: on the validation slice after 3 epochs (K-FAC 0.9455, TKFAC 0.9466, Adam 0.9434).
    #: K-FAC and TKFAC scale to other batches by the square root (``lr_scaling``), not SGD's
    #: linear rule: at 256 the linear rule's lr 0.0625 ended at test 0.9321 (0.9504 after 3
    #: epochs); the square root's lr 0.25 (damping raised to 40 by the K-FAC damping rule)
    #: reached validation 0.9321 after 3 epochs.
    #: ``ekfac``/``tekfac``: K-FAC's reference, with the eigenbases refreshed every step
    #: (``update_freq`` 1, so the per-entry second moments stay in a current basis). EKFAC's
    #: dense layers take K-FAC's damping of the two factors (`recsys.optim.kfac`): with the
    #: earlier ``damping · mean(s)`` EKFAC's validation spiked at damping 10–60 and at 100 it
    #: trained slowly (test 0.9349 at 4,096; best probe then, lr 0.5 with the vectors at 400x:
    #: test 0.9323 at 4,096, 0.9403 at 256). With K-FAC's damping, lr 1, damping 10: validation
    #: 0.9523, 0.9470, 0.9456 in the first 3 epochs (K-FAC 0.9507, 0.9489, 0.9455), 0.9307 after
    #: 6 (the earlier best 0.9369). TEKFAC takes EKFAC's reference, not probed on its own; both
    #: scale by the square root, as K-FAC (the square root's lr 0.125 beat the linear rule's
    #: 0.031 at 256 also under the earlier damping: validation 0.9470 against 0.9509 after 3).
    #: ``sgd``: the message networks' first layers take a fixed input-scale diagonal
    #: preconditioner (`recsys.optim.input_scaling.InputScaledSGD`: each weight column's step
    #: divided by its input's mean square, measured on the first batch), so that the child
    #: vector's columns (mean square 0.01) are not left still beside the residual's (0.84),
    #: and the prototype and fallback vectors step at 30x: lr 3 at 4,096 (validation after 30
    #: epochs 0.9237; the vectors at 100x 0.9300, at 10x slower; preconditioning every linear
    #: layer diverged at lr 1: the hidden layer's near-dead units took huge steps). Without the
    #: preconditioner no rate trained the networks (``docs/optimizers.md``, *Figures*, REC).
    #: ``adagrad``: `recsys.optim.adagrad.WarmAdagrad`, each coordinate's accumulator kept at
    #: least 100x its largest squared gradient, so that no step exceeds lr/√101 (torch's
    #: Adagrad moved every parameter by 60-90% on its first step and froze): lr 0.2 at 4,096
    #: (validation after 30 epochs 0.9221, Adam's 0.9217; lr 0.4 spiked in the first epoch,
    #: 0.1 was slower: 0.9429 after 6, 0.2 0.9384). Its rate is kept at other batches
    #: (``lr_scaling`` none): Adagrad's own ``1/√steps`` already lowers the rate per example
    #: seen by the square root of the batch ratio; the square root on top underfit at 256 (lr
    #: 0.05: validation 0.9433 after 3 epochs, test 0.92788 after 30; lr 0.2: 0.9301 after 3,
    #: 0.9227 after 6; lr 0.1: 0.9263 after 6).
    optimizer_defaults: ClassVar[dict[str, dict[str, object]]] = {
        "adagrad": {"batch_size": 4096, "learning_rate": 0.2, "optimizer_options": {"warm_steps": 100.0},
                    "lr_scaling": "none"},
        "sgd": {"batch_size": 4096, "learning_rate": 3.0,
                "lr_scales": {"prototype_vectors": 30.0, "fallback_vectors": 30.0},
                "optimizer_options": {"input_scaling": {"layers": ["phi_user.0", "phi_item.0"]}}},
        "cov-noise": {"batch_size": 4096, "learning_rate": 8e-3,
                      "noise": {"estimator": "sub-batch", "base": "adam", "batch": 256, "scale": 0.1}},
        **{kind: {"batch_size": 4096, "learning_rate": 1.0,
                  "kfac": {"damping": 10.0, **({"update_freq": 1} if kind in ("ekfac", "tekfac") else {})},
                  "lr_scales": {"prototype_vectors": 100.0, "fallback_vectors": 100.0}, "lr_scaling": "sqrt"}
           for kind in ("kfac", "tkfac", "ekfac", "tekfac")},
    }

    def __init__(self, n_users: int, n_items: int, rating_scale: tuple[float, float],
                 config: RECConfig | None = None) -> None:
        super().__init__(n_users, n_items, rating_scale)
        self.config = c = config or RECConfig()
        gen = torch.Generator().manual_seed(c.seed)
        self.p_users, self.p_items = min(c.prototypes, n_users), min(c.prototypes, n_items)
        k, n_in = c.embedding_size, c.embedding_size + c.rating_levels + 1
        torch.manual_seed(c.seed)  # the MLPs' default initialisation draws from the global stream
        self.phi_user = _Message(n_in, c.hidden_size, k, c.dropout)
        self.phi_item = _Message(n_in, c.hidden_size, k, c.dropout)
        self.prototype_vectors = nn.Parameter(torch.randn(self.p_users + self.p_items, k, generator=gen) * 0.1)
        self.fallback_vectors = nn.Parameter(torch.randn(2, k, generator=gen) * 0.1)
        self.gate = nn.Parameter(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
        self.register_buffer("prototype_users", torch.arange(self.p_users, dtype=torch.int64))
        self.register_buffer("prototype_items", torch.arange(self.p_items, dtype=torch.int64))
        #: users and items of the training ratings: the sizes chain draws are keyed by
        #: (`EvidenceGraph.draw_ids`), so that users and items added later move no draw; 0: unset
        self.register_buffer("draw_sizes", torch.zeros(2, dtype=torch.int64))
        lo, hi = self.rating_scale
        self.register_buffer("rating_levels", torch.linspace(lo, hi, c.rating_levels), persistent=False)
        self.ratings: Ratings | None = None
        self._graph: EvidenceGraph | None = None
        self._node_bias: torch.Tensor | None = None  # float32 [n_users + n_items]
        self._train_generator: torch.Generator | None = None
        self._pair_index: tuple[torch.Tensor, torch.Tensor] | None = None  # sorted pair keys, values
        #: how this model samples its chains (`recsys.models.rec.chains.sample_chains`'s signature)
        self.chain_sampler = sample_chains
        #: extension point: called after every chain sampling of this model, in order (see
        #: `observing`); tools that watch one model's sampling (`recsys.experiments.rec_rollback`)
        #: register here and leave every other model alone
        self.sampling_observers: list[SamplingObserver] = []
        self._hidden_pairs: torch.Tensor | None = None  # pair keys hidden from every sampling
        self._prototype_override: torch.Tensor | None = None  # see `substituted`

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        # an artefact saved before draws were keyed has no draw_sizes: keyed by its own sizes
        state_dict.setdefault(prefix + "draw_sizes", torch.zeros(2, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def config_dict(self) -> dict:
        d = asdict(self.config)
        d["fanouts"] = list(self.config.fanouts)
        return d

    def warm(self) -> None:
        """Make one prediction so that the compiled inference kernels are loaded (on a
        machine's first use they are compiled, about 17 s on 2 cores; numba caches them on
        disk) before a caller waits for an answer."""
        graph, _ = self._live()
        if graph.n_users and graph.n_items:
            was_training = self.training
            self.eval()
            try:
                self.predict(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
            finally:
                self.train(was_training)

    def parameter_count(self) -> int:
        """Number of trained scalars (independent of the number of users, items, ratings)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ live ratings
    def prepare(self, train: Ratings) -> None:
        """Choose the prototypes (the most-rated users and items of ``train``, ties by index),
        then bind to ``train`` (known masks, mean, graph, baseline biases)."""
        order_u = np.argsort(-train.user_counts(), kind="stable")[: self.p_users]
        order_i = np.argsort(-train.item_counts(), kind="stable")[: self.p_items]
        self.prototype_users.copy_(torch.from_numpy(order_u.astype(np.int64)))
        self.prototype_items.copy_(torch.from_numpy(order_i.astype(np.int64)))
        self.draw_sizes.copy_(torch.tensor([train.n_users, train.n_items]))
        super().prepare(train)
        self._train_generator = None

    def bind_ratings(self, ratings: Ratings) -> None:
        """Make ``ratings`` the live ratings: rebuild the graph, refit the baseline biases
        (with the model's global mean) and the known masks. Their id maps may be larger than
        the model's (new users/items), never smaller."""
        if ratings.n_users < self.n_users or ratings.n_items < self.n_items:
            raise ValueError(f"live ratings have {ratings.n_users} users and {ratings.n_items} items; "
                             f"the model already has {self.n_users} and {self.n_items}")
        if ratings.rating_scale != self.rating_scale:
            raise ValueError(f"live ratings are on the scale {ratings.rating_scale}, the model on {self.rating_scale}")
        self._set_ratings(ratings)
        bu, bi = fit_baseline(ratings.users, ratings.items, ratings.values, ratings.n_users,
                              ratings.n_items, float(self.global_mean), self.config.bias_reg,
                              item_reg=self.config.item_reg)
        self._node_bias = torch.from_numpy(np.concatenate([bu, bi]).astype(np.float32)).to(self.device)

    def _set_ratings(self, ratings: Ratings, graph: EvidenceGraph | None = None) -> None:
        """Make ``ratings`` live with ``graph`` (their graph; built when None)."""
        dev = self.device
        if ratings.n_users != self.n_users or ratings.n_items != self.n_items:
            self.n_users, self.n_items = ratings.n_users, ratings.n_items
        if graph is None:
            graph = EvidenceGraph.build(ratings, self.prototype_users.cpu().numpy(),
                                        self.prototype_items.cpu().numpy(), seed=self.config.seed,
                                        key_sizes=tuple(int(v) for v in self.draw_sizes.tolist()), device=dev)
        has = graph.degrees() > 0
        self.known_users = has[:ratings.n_users].to(dev)
        self.known_items = has[ratings.n_users:].to(dev)
        self.ratings = ratings
        self._pair_index = None
        self._graph = graph.to(dev)

    def live(self) -> tuple[EvidenceGraph, torch.Tensor]:
        """The live ratings' graph and baseline biases ``float32 [n_users + n_items]`` (by
        global node id), on the model's device."""
        return self._live()

    # ------------------------------------------------------------------ extension points
    # (public hooks for tools that re-run or watch the model's own computation, e.g. the
    # gradient-rollback harness `recsys.experiments.rec_rollback`; none changes a parameter)
    @property
    def prototype_table(self) -> torch.Tensor:
        """The prototype table ``[p_u + p_i, K]`` the forward pass computes with:
        `prototype_vectors`, or the table given to `substituted` within its block."""
        return self.prototype_vectors if self._prototype_override is None else self._prototype_override

    @contextlib.contextmanager
    def substituted(self, *, graph: EvidenceGraph | None = None, biases: torch.Tensor | None = None,
                    prototype_vectors: torch.Tensor | None = None,
                    hidden_pairs: torch.Tensor | None = None) -> Iterator[None]:
        """Within the block the model computes with this graph, these baseline biases
        ``[N]`` and/or this prototype table ``[p_u + p_i, K]`` (any tensor, e.g. one requiring
        grad per copy; read through `prototype_table`, the parameter is untouched) in place of
        its own, and hides the ratings ``hidden_pairs`` (pair keys ``user·n_items + item``,
        `EvidenceGraph.pair_keys`) from every chain it samples, as it hides a batch's own
        targets; restored on exit (blocks nest). For tools that re-run the model's own
        computation on modified evidence (`recsys.experiments.rec_rollback`)."""
        self._live()
        saved = (self._graph, self._node_bias, self._prototype_override, self._hidden_pairs)
        if graph is not None:
            self._graph = graph
        if biases is not None:
            self._node_bias = biases
        if prototype_vectors is not None:
            self._prototype_override = prototype_vectors
        if hidden_pairs is not None and len(hidden_pairs):
            self._hidden_pairs = (hidden_pairs if self._hidden_pairs is None
                                  else torch.cat([self._hidden_pairs, hidden_pairs.to(self._hidden_pairs.device)]))
        try:
            yield
        finally:
            self._graph, self._node_bias, self._prototype_override, self._hidden_pairs = saved

    @contextlib.contextmanager
    def observing(self, observer: SamplingObserver) -> Iterator[None]:
        """Within the block, ``observer(graph, roots, chains, targets, kwargs)`` is called
        after every chain sampling of this model (training and inference): ``roots`` the
        sorted global node ids sampled from, ``chains`` what was drawn (all passes;
        `Chains.split_passes`), ``targets`` the pair keys the model itself excluded (a training
        batch's pairs in batch order, an evaluation batch's rated pairs; None when it excluded
        none), ``kwargs`` the sampler's other keyword arguments (``root_keep``, ``passes``,
        ...). Registered in `sampling_observers`; removed on exit. Other models are untouched."""
        self.sampling_observers.append(observer)
        try:
            yield
        finally:
            self.sampling_observers.remove(observer)

    def _sample(self, graph: EvidenceGraph, roots: torch.Tensor, generator: torch.Generator, *,
                exclude: torch.Tensor | None = None, **kwargs: object) -> Chains:
        """Chains from `chain_sampler` with the model's fanouts, ``exclude`` plus the pairs
        hidden by `substituted`; then the `sampling_observers`."""
        targets = exclude
        hidden = self._hidden_pairs
        if hidden is not None and len(hidden):
            hidden = hidden.to(roots.device)
            exclude = hidden if exclude is None else torch.cat([exclude, hidden])
        kwargs["compiled"] = self.compiled_kernels
        chains = self.chain_sampler(graph, roots, self.config.fanouts, generator, exclude=exclude, **kwargs)
        for observer in tuple(self.sampling_observers):
            observer(graph, roots, chains, targets, kwargs)
        return chains

    def _live(self) -> tuple[EvidenceGraph, torch.Tensor]:
        if self._graph is None or self._node_bias is None:
            raise RuntimeError("the evidence-chain model has no live ratings: train it, or call "
                               "prepare/bind_ratings, or load it with recsys.artefact.load_artefact")
        if self._graph.device != self.device:
            self._graph = self._graph.to(self.device)
            self._node_bias = self._node_bias.to(self.device)
        return self._graph, self._node_bias

    def add_user(self, raw_id: object) -> int:
        """Index of user ``raw_id``, adding it (with no ratings: fallback) when new."""
        return self._add_ids([raw_id], [])[0]

    def add_item(self, raw_id: object) -> int:
        """Index of item ``raw_id``, adding it (with no ratings: fallback) when new."""
        return self._add_ids([], [raw_id])[1]

    def _add_ids(self, users: Sequence[object], items: Sequence[object]) -> tuple[int, int]:
        r = self._require_ratings()
        user_ids, item_ids = r.user_ids.extend(users), r.item_ids.extend(items)
        if user_ids is not r.user_ids or item_ids is not r.item_ids:
            self._regrow(r.with_id_maps(user_ids, item_ids))
        return (user_ids.index(users[0]) if users else -1, item_ids.index(items[0]) if items else -1)

    def _regrow(self, ratings: Ratings, graph: EvidenceGraph | None = None) -> None:
        """Make ``ratings`` (the live ones, possibly with more users, items and ratings) live
        with ``graph`` (default: the live graph grown to their sides, no new edges); the
        baseline biases of existing nodes are kept, new nodes get 0."""
        old_n = self.n_users
        old_graph, bias = self._live()
        if graph is None:
            empty = np.zeros(0, dtype=np.int64)
            graph = old_graph.insert(empty, empty, np.zeros(0), empty, ratings.n_users, ratings.n_items)
        self._set_ratings(ratings, graph)
        bu = torch.zeros(ratings.n_users, device=self.device)
        bu[:old_n] = bias[:old_n]
        bi = torch.zeros(ratings.n_items, device=self.device)
        bi[: len(bias) - old_n] = bias[old_n:]
        self._node_bias = torch.cat([bu, bi])

    def _require_ratings(self) -> Ratings:
        if self.ratings is None:
            self._live()
        assert self.ratings is not None
        return self.ratings

    def add_ratings(self, users: Sequence[object], items: Sequence[object],
                    values: Sequence[float] | np.ndarray, timestamps: Sequence[int] | None = None) -> dict:
        """Insert ratings (raw ids; new users and items are added) into the live ratings with
        no parameter update; the next prediction uses them. A (user, item) pair already rated
        takes the new value (all its ratings, if it has several). Costs one pass over the live
        arrays (`EvidenceGraph.insert`) plus the touched rows, not a re-sort. The baseline biases of the touched users, then items, are
        re-solved with the others fixed. Returns counts ``{"added", "replaced", "new_users",
        "new_items"}``."""
        r = self._require_ratings()
        vals = np.asarray(values, dtype=np.float64)
        if not (len(users) == len(items) == len(vals)):
            raise ValueError("add_ratings: users, items and values must have the same length")
        lo, hi = self.rating_scale
        if len(vals) and (not np.isfinite(vals).all() or vals.min() < lo or vals.max() > hi):
            raise ValueError(f"add_ratings: ratings must be finite and within the scale {lo:g}..{hi:g}")
        user_ids, item_ids = r.user_ids.extend(users), r.item_ids.extend(items)
        new_users, new_items = len(user_ids) - r.n_users, len(item_ids) - r.n_items
        base = r if (new_users == 0 and new_items == 0) else r.with_id_maps(user_ids, item_ids)
        u, i = user_ids.indices(users), item_ids.indices(items)
        # the last occurrence of a pair within the insertion wins
        keys = u * base.n_items + i
        _, last = np.unique(keys[::-1], return_index=True)
        pick = np.sort(len(keys) - 1 - last)
        u, i, vals = u[pick], i[pick], vals[pick]
        graph, _ = self._live()
        # already-rated pairs (every rating of a repeated pair): found in the live graph's rows
        old = np.flatnonzero((u < r.n_users) & (i < r.n_items))
        exists = np.zeros(len(u), dtype=bool)
        values_all = base.values
        if len(old):
            dev = graph.device
            pair, edges = graph.pair_edges(torch.from_numpy(u[old]).to(dev), torch.from_numpy(i[old]).to(dev))
            if len(pair):
                pair_np = old[pair.cpu().numpy()]
                exists[pair_np] = True
                values_all = base.values.copy()
                values_all[graph.examples[edges].cpu().numpy()] = vals[pair_np]
                graph_values = graph.values.clone()
                graph_values[edges] = torch.from_numpy(vals[pair_np].astype(np.float32)).to(dev)
                graph = dataclasses.replace(graph, values=graph_values)
        fresh = ~exists
        ts = None
        if base.timestamps is not None:
            ts = np.full(int(fresh.sum()), int(time.time()), dtype=np.int64)
            if timestamps is not None:
                ts = np.asarray(timestamps, dtype=np.int64)[pick][fresh]
        if values_all is not base.values:  # re-rated pairs carry their new value in place
            base = dataclasses.replace(base, values=values_all)
        live = base.append(Ratings(u[fresh], i[fresh], vals[fresh].astype(np.float32), ts, user_ids, item_ids,
                                   base.rating_scale))
        n_old = len(base)
        graph = graph.insert(u[fresh], i[fresh], vals[fresh], np.arange(n_old, n_old + int(fresh.sum())),
                             live.n_users, live.n_items)
        self._regrow(live, graph)
        self._update_biases(np.unique(u), np.unique(i))
        return {"added": int(fresh.sum()), "replaced": int(exists.sum()), "new_users": int(new_users),
                "new_items": int(new_items)}

    def _update_biases(self, users: np.ndarray, items: np.ndarray) -> None:
        """Re-solve the baseline biases of ``users`` (item biases fixed), then ``items``, from
        their rows of the live graph."""
        graph, bias = self._live()
        indptr = graph.indptr.cpu().numpy()
        nb, vals = graph.neighbours.cpu().numpy(), graph.values.cpu().numpy()
        b = bias.cpu().numpy().astype(np.float64)
        nu, mu = graph.n_users, float(self.global_mean)
        for nodes, lam in ((np.asarray(users, np.int64), self.config.bias_reg),
                           (nu + np.asarray(items, np.int64), self.config.item_reg)):
            if len(nodes) == 0:
                continue
            owner, pos = row_positions(indptr, nodes)
            resid = np.bincount(owner, weights=vals[pos] - mu - b[nb[pos]], minlength=len(nodes))
            b[nodes] = resid / (lam + indptr[nodes + 1] - indptr[nodes])
        self._node_bias = torch.from_numpy(b.astype(np.float32)).to(self.device)

    # ------------------------------------------------------------------ vectors
    def _generator(self, fresh: bool) -> torch.Generator:
        """The sampling stream: in training one stream continued across steps; otherwise a
        fresh stream per call, so the same query always gets the same answer."""
        if fresh:
            return torch.Generator(device=self.device).manual_seed(self.config.seed + 1)
        if self._train_generator is None or self._train_generator.device != self.device:
            self._train_generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        return self._train_generator

    def sampling_state(self) -> torch.Tensor:
        """The training sampling stream's state (chains are drawn from it)."""
        return self._generator(fresh=False).get_state()

    def set_sampling_state(self, state: object | None) -> None:
        if state is not None:
            self._generator(fresh=False).set_state(state)

    def _encode(self, values: torch.Tensor) -> torch.Tensor:
        """Hat-function encoding of ratings ``[E] -> [E, L]``."""
        step = self.rating_levels[1] - self.rating_levels[0]
        return (1 - (values.unsqueeze(1) - self.rating_levels).abs() / step).clamp(min=0)

    def _gated(self, mean: torch.Tensor, count: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
        """Shrink generated vectors ``mean [n, K]`` with evidence ``count [n]`` towards the
        fallback of their side (``is_item [n]`` bool)."""
        side = is_item.long()
        ac = rows(self.gate, side)
        g = torch.sigmoid(ac[:, :1] * torch.log(count.clamp(min=1)).unsqueeze(1) + ac[:, 1:])
        return torch.lerp(rows(self.fallback_vectors, side), mean, g)

    def aggregate(self, chains: Chains, record: dict | None = None,
                  root_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors ``[n_0, K]`` of the chains' root nodes, computed from the leaves up: one
        message-MLP call per side and level, scatter-mean to the parents, the immediate
        parent's message removed from a child's mean. ``record``, when given, collects
        ``(level, messages [E, K], used [E] bool)`` under ``"levels"`` and the roots' evidence
        counts under ``"root_counts"``, for `explain`. ``root_bias [n_0]``, when given, replaces
        the roots' baseline biases in their first-hop residuals (cold roots in training).
        Multi-pass chains give every pass's roots, pass by pass (``[passes·n_0, K]``).
        Inference on the CPU (no autograd, no record) runs the compiled kernel
        `recsys.models.rec.kernels.aggregate_compiled` (same result up to float32 rounding)
        unless ``compiled_kernels`` is off."""
        if (self.compiled_kernels and record is None and not self.training and not torch.is_grad_enabled()
                and self.device.type == "cpu" and self.prototype_table.dtype == torch.float32):
            return aggregate_compiled(self, chains, root_bias)
        graph, bias = self._live()
        nu, k = graph.n_users, self.config.embedding_size
        protos = self.prototype_table

        def free(nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Free vectors (zero for non-prototypes) and the prototype mask of graph nodes."""
            slot = rows(graph.proto_slot, nodes)
            is_proto = slot >= 0
            return rows(protos, slot.clamp(min=0)) * is_proto.unsqueeze(1), is_proto

        vec, valid = free(chains.base(chains.leaves))
        below: tuple[torch.Tensor, ...] | None = None  # sums, counts, messages, edge validity
        depth = len(chains.levels)
        for d in reversed(range(depth)):
            lvl = chains.levels[d]
            level_nodes = chains.base(lvl.nodes)
            if len(lvl.parent) == 0:  # no evidence at this level: only prototypes are valid
                vec, valid = free(level_nodes)
                if record is not None:
                    record["root_counts"] = torch.zeros(len(level_nodes), device=vec.device)
                below = None
                continue
            child_vec, child_ok = rows(vec, lvl.child), rows(valid, lvl.child)
            children = chains.base(rows(chains.nodes(d + 1), lvl.child))
            if below is not None and len(below[2]):
                sums, counts, msgs, edge_ok = below
                has = lvl.reverse_edge >= 0
                rev = lvl.reverse_edge.clamp(min=0)
                used = (rows(edge_ok, rev) & has).float()
                cnt = rows(counts, lvl.child) - used
                mean = (rows(sums, lvl.child) - rows(msgs, rev) * used.unsqueeze(1)) / cnt.clamp(min=1).unsqueeze(1)
                skipped = self._gated(mean, cnt, children >= nu)
                swap = has & (rows(graph.proto_slot, children) < 0)
                child_vec = torch.where(swap.unsqueeze(1), skipped, child_vec)
                child_ok = torch.where(swap, cnt > 0, child_ok)
            parents = rows(level_nodes, lvl.parent)
            parent_bias = rows(root_bias, lvl.parent) if d == 0 and root_bias is not None else rows(bias, parents)
            resid = lvl.values - self.global_mean - parent_bias - rows(bias, children)
            x = torch.cat([child_vec, self._encode(lvl.values), resid.unsqueeze(1)], dim=1)
            into_item = parents >= nu
            if len(x) <= _BOTH_NETS_BELOW and not torch.is_grad_enabled():
                # a few edges (a single prediction): both networks on every edge and a select
                # cost fewer operations than splitting the edges by side
                msg = torch.where(into_item.unsqueeze(1), self.phi_item(x), self.phi_user(x))
            else:
                msg = torch.zeros(len(x), k, device=x.device, dtype=x.dtype)
                for net, side_mask in ((self.phi_user, ~into_item), (self.phi_item, into_item)):
                    idx = torch.nonzero(side_mask).squeeze(1)
                    if len(idx):
                        msg = msg.index_put((idx,), net(rows(x, idx)))
            ok = child_ok.float()
            msg = msg * ok.unsqueeze(1)
            n_l = len(lvl.nodes)
            sums = torch.zeros(n_l, k, device=x.device, dtype=x.dtype).index_add(0, lvl.parent, msg)
            counts = torch.zeros(n_l, device=x.device).index_add(0, lvl.parent, ok)
            node_is_item = level_nodes >= nu
            generated = self._gated(sums / counts.clamp(min=1).unsqueeze(1), counts, node_is_item)
            pv, is_proto = free(level_nodes)
            vec = torch.where(is_proto.unsqueeze(1), pv, generated)
            valid = is_proto | (counts > 0)
            if record is not None:
                record["levels"].append((d, msg, ok * ~rows(is_proto, lvl.parent)))
                record["root_counts"] = counts
            below = (sums, counts, msg, child_ok)
        # roots with no evidence at all take their side's fallback vector
        roots_item = chains.base(chains.nodes(0)) >= nu
        return torch.where(valid.unsqueeze(1), vec, rows(self.fallback_vectors, roots_item.long()))

    def root_vectors(self, chains: Chains, record: dict | None = None,
                     root_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The chains' root vectors as predictions use them (``[passes·n_0, K]``, pass by
        pass): `aggregate`'s, times `evidence_scale` outside training."""
        vec = self.aggregate(chains, record, root_bias)
        scale = self.evidence_scale(chains)
        return vec if scale is None else vec * scale.unsqueeze(1)

    def evidence_scale(self, chains: Chains) -> torch.Tensor | None:
        """The ``cold_shrink`` factor of each root of ``chains`` (``[passes·n_0]``, pass by
        pass, as `aggregate` returns them): ``1 - exp(-n / cold_shrink)`` for a root with
        ``n >= 1`` sampled first-hop edges in its pass, 1 for a root with none. None (no
        scaling) in training or when ``cold_shrink`` is 0."""
        c = self.config.cold_shrink
        if self.training or c <= 0:
            return None
        lvl = chains.levels[0]
        n = torch.bincount(lvl.parent, minlength=len(lvl.nodes)).to(torch.float32)
        return torch.where(n > 0, -torch.expm1(-n / c), torch.ones_like(n))

    def _pair_scores(self, users: torch.Tensor, items: torch.Tensor, generator: torch.Generator,
                     record: dict | None = None, passes: int = 1,
                     rated: torch.Tensor | None = None) -> tuple[torch.Tensor, Chains, torch.Tensor, torch.Tensor]:
        """``passes`` samplings drawn together: predictions ``[B]`` (unclipped, the mean over
        the passes), the chains, and the root vectors of the users and items ``[passes, B, K]``
        each. ``rated [B]``: which pairs are live ratings, when the caller has looked them up
        (evaluation only; looked up here otherwise)."""
        graph, bias = self._live()
        nu = graph.n_users
        roots, inverse = torch.unique(torch.cat([users, items + nu]), return_inverse=True)
        c = self.config
        root_keep = None
        if self.training and c.cold_roots > 0:
            cold = (torch.rand(len(roots), generator=generator, device=roots.device) < c.cold_roots)
            cold &= graph.proto_slot[roots] < 0
            size = (torch.rand(len(roots), generator=generator, device=roots.device) * c.fanouts[0]).long() + 1
            root_keep = torch.where(cold, size, torch.zeros_like(size))
        exclude = graph.pair_keys(users, items)
        if not self.training:  # an unrated pair has no edge to hide: exclude the rated ones only
            exclude = exclude[self._lookup(users, items)[0] if rated is None else rated]
        chains = self._sample(graph, roots, generator, exclude=exclude,
                              evidence_dropout=c.evidence_dropout if self.training else 0.0,
                              root_keep=root_keep, passes=passes)
        root_bias = None if root_keep is None else self.cold_root_bias(chains, root_keep > 0)
        vec = self.root_vectors(chains, record, root_bias).reshape(passes, len(roots), -1)
        b = len(users)
        vu, vi = vec[:, inverse[:b]], vec[:, inverse[b:]]
        rb = self.prediction_biases(users, items, inverse, root_keep, root_bias)
        pred = self.global_mean + rb[:b] + rb[b:] + (vu * vi).sum(-1).mean(0)
        return pred, chains, vu, vi

    def prediction_biases(self, users: torch.Tensor, items: torch.Tensor, inverse: torch.Tensor,
                          root_keep: torch.Tensor | None = None,
                          root_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The baseline biases ``[2B]`` (users', then items') that a pass adds for the pairs
        ``(users, items)``: the live baseline; in training with ``target_free_bias``, the
        biases without the pair's own rating; for roots made cold (``root_keep [n_0] > 0``),
        their re-solved ``root_bias [n_0]``. ``inverse [2B]``: position of each pair's user,
        then item, among the pass's roots. (What a re-computation of a training pass, such as
        the rollback log's, must add to ``u·v``.)"""
        graph, bias = self._live()
        rb = torch.cat([bias[users], bias[graph.n_users + items]])
        if self.training and self.config.target_free_bias:
            rb = self._target_free_bias(users, items, rb)
        if root_keep is not None and root_bias is not None:  # solved without the target already
            rb = torch.where(root_keep[inverse] > 0, root_bias[inverse], rb)
        return rb

    def _target_free_bias(self, users: torch.Tensor, items: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
        """Baseline biases ``[2B]`` (users', then items') of the pairs ``(users, items)`` with
        the pair's own live rating left out: ``b' = (b·(λ + n) - (r - μ - b_other)) / (λ + n - 1)``
        per side, the other side fixed (the ridge solve without that rating). Pairs with no
        live rating keep ``rb``."""
        graph, _ = self._live()
        found, r = self._lookup(users, items)
        if not bool(found.any()):
            return rb
        b = len(users)
        bu, bi = rb[:b], rb[b:]
        deg = graph.degrees().to(rb.dtype)
        nu_, ni_ = deg[users], deg[graph.n_users + items]
        lu, li = self.config.bias_reg, self.config.item_reg
        mu = self.global_mean
        bu_free = (bu * (lu + nu_) - (r - mu - bi)) / (lu + nu_ - 1).clamp(min=1e-6)
        bi_free = (bi * (li + ni_) - (r - mu - bu)) / (li + ni_ - 1).clamp(min=1e-6)
        # no ridge weight and a single rating: the bias without it is 0
        bu_free = torch.where(lu + nu_ - 1 > 0, bu_free, torch.zeros_like(bu))
        bi_free = torch.where(li + ni_ - 1 > 0, bi_free, torch.zeros_like(bi))
        return torch.cat([torch.where(found, bu_free, bu), torch.where(found, bi_free, bi)])

    def _lookup(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rated [B] bool, value [B])`` of the pairs in the live ratings (value undefined
        where not rated), from a sorted index of the pair keys built on first use."""
        graph, _ = self._live()
        if self._pair_index is None:
            r = self._require_ratings()
            # built as normal tensors even when the first use is under `predict`'s inference mode
            with torch.inference_mode(False):
                keys = torch.from_numpy(r.users.astype(np.int64) * r.n_items + r.items)
                order = torch.argsort(keys)
                self._pair_index = (keys[order].to(self.device), torch.from_numpy(r.values)[order].to(self.device))
        sorted_keys, sorted_vals = self._pair_index
        if len(sorted_keys) == 0:
            return torch.zeros(len(users), dtype=torch.bool, device=users.device), torch.zeros(len(users), device=users.device)
        keys = graph.pair_keys(users, items)
        pos = torch.searchsorted(sorted_keys, keys).clamp(max=len(sorted_keys) - 1)
        return sorted_keys[pos] == keys, sorted_vals[pos]

    def cold_root_bias(self, chains: Chains, cold: torch.Tensor) -> torch.Tensor:
        """Baseline biases ``[n_0]`` of the chains' roots, those flagged ``cold [n_0]`` re-solved
        from their sampled first-hop ratings alone (the other side's biases fixed, ridge weight
        of their side), as `add_ratings` solves the bias of a new user or item."""
        graph, bias = self._live()
        lvl = chains.levels[0]
        roots, nu = lvl.nodes, graph.n_users
        other = chains.nodes(1)[lvl.child]
        resid = lvl.values - self.global_mean - bias[other]
        n0 = len(roots)
        sums = torch.zeros(n0, device=resid.device).index_add(0, lvl.parent, resid)
        counts = torch.zeros(n0, device=resid.device).index_add(0, lvl.parent, torch.ones_like(resid))
        lam = torch.where(roots >= nu, self.config.item_reg, self.config.bias_reg)
        return torch.where(cold, sums / (lam + counts), bias[roots])

    # ------------------------------------------------------------------ RatingModel
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Predictions ``[B]``: one sampling pass in training, the mean of ``eval_passes``
        passes (drawn together) otherwise (deterministic for a given batch and live ratings). A batch larger
        than ``chain_group`` is predicted group by group when it is training or holds rated
        pairs (each group's ratings are hidden from its own chains only); otherwise in one
        go, memoising the chains of the whole batch."""
        if len(users) == 0:
            return torch.zeros(0, device=self.device)
        rated = None if self.training else self._lookup(users, items)[0]
        passes = 1 if self.training else self.config.eval_passes
        group = self.config.chain_group
        if len(users) <= group or (rated is not None and not bool(rated.any())):
            return self._pair_scores(users, items, self._generator(fresh=not self.training), passes=passes,
                                     rated=rated)[0]
        return torch.cat([self._pair_scores(users[s:s + group], items[s:s + group],
                                            self._generator(fresh=not self.training), passes=passes,
                                            rated=None if rated is None else rated[s:s + group])[0]
                          for s in range(0, len(users), group)])

    @torch.no_grad()
    def masked_predictions(self, user: int, item: int, hidden_pairs: torch.Tensor,
                           biases: torch.Tensor) -> torch.Tensor:
        """Evaluation predictions (unclipped, rating points) of indices ``(user, item)``, one
        per hidden rating: entry ``c`` is what the model predicts in eval mode within
        ``substituted(hidden_pairs=hidden_pairs[c:c+1], biases=biases[c])`` (``hidden_pairs
        [C]`` pair keys, ``biases [C, n_users + n_items]``), float32 ``[C]``, equal up to
        float32 rounding. Each entry's chains are what `forward` draws with its rating hidden:
        on the CPU with the compiled kernels, the chains are drawn once and each entry drops its
        rating's edges from copies of them (the draws are keyed by node, so hiding an edge
        changes nothing else), and the C copies are aggregated in one kernel call, each under
        its own baseline (`_aggregate_candidates`).
        For `recsys.models.rec.explain`."""
        was = self.training
        if was:  # (switching modes walks every submodule: skipped when already evaluating)
            self.eval()
        try:
            graph, _ = self._live()
            users = torch.tensor([user], device=self.device)
            items = torch.tensor([item], device=self.device)
            rated = self._lookup(users, items)[0]
            passes = self.config.eval_passes
            batched = (self.compiled_kernels and self.device.type == "cpu"
                       and self.prototype_table.dtype == torch.float32 and len(hidden_pairs) > 1)
            if not batched:
                out = torch.empty(len(hidden_pairs))
                for c in range(len(hidden_pairs)):
                    with self.substituted(hidden_pairs=hidden_pairs[c:c + 1], biases=biases[c]):
                        out[c] = self._pair_scores(users, items, self._generator(fresh=True),
                                                   passes=passes, rated=rated)[0][0]
                return out
            # what _pair_scores does in evaluation: the chains drawn once, then each hidden
            # rating's edges dropped from them (keyed draws: what sampling without it draws)
            roots, inverse = torch.unique(torch.cat([users, items + graph.n_users]), return_inverse=True)
            exclude = graph.pair_keys(users, items)[rated]
            chains = self._sample(graph, roots, self._generator(fresh=True), exclude=exclude,
                                  evidence_dropout=0.0, root_keep=None, passes=passes)
            keep = [k[None, :] != hidden_pairs.cpu().numpy()[:, None] for k in chains.edge_pair_keys(graph)]
            vec = self._aggregate_candidates(chains, keep, biases)  # [C, passes·n_0, K]
            n_c = len(hidden_pairs)
            if self.config.cold_shrink > 0:  # evidence_scale of each entry's chains
                n_0 = vec.shape[1]
                cand, edge = np.nonzero(keep[0])
                first_hop = torch.from_numpy(cand * n_0 + chains.levels[0].parent.numpy()[edge])
                n = torch.bincount(first_hop, minlength=n_c * n_0).to(torch.float32)
                scale = torch.where(n > 0, -torch.expm1(-n / self.config.cold_shrink), torch.ones_like(n))
                vec = vec * scale.reshape(n_c, -1, 1)
            vec = vec.reshape(n_c, passes, len(roots), -1)
            vu, vi = vec[:, :, inverse[:1]], vec[:, :, inverse[1:]]
            rb = biases[:, torch.cat([users, graph.n_users + items])]
            return (self.global_mean + rb[:, :1] + rb[:, 1:] + (vu * vi).sum(-1).mean(1))[:, 0]
        finally:
            if was:
                self.train(True)

    def _aggregate_candidates(self, chains: Chains, keep: list[np.ndarray], biases: torch.Tensor) -> torch.Tensor:
        """`aggregate` of C copies of ``chains`` (one query's), copy ``c`` keeping the edges
        ``keep[d][c]`` of each level ``d`` (``bool [C, E_d]``; a hidden rating's edges dropped)
        under its own baseline ``biases[c]`` (``[C, N]``), in one call of the compiled kernel:
        copy ``c``'s graph node ``g`` gets its own id (users ``c·n_users + u``, items
        ``C·n_users + c·n_items + i``, so the kernel's side test and bias look-up hold), its
        passes stay ``n_nodes`` apart in the C-times-larger id space. Nodes reached only
        through a dropped edge stay (they reach no root). Root vectors ``[C, passes·n_0, K]``."""
        graph, _ = self._live()
        nu, ni, n = graph.n_users, graph.n_items, graph.n_nodes
        n_c = len(biases)
        big = n_c * n
        depth = len(chains.levels)
        slot = graph.proto_slot.numpy()
        big_slot = np.concatenate([np.tile(slot[:nu], n_c), np.tile(slot[nu:], n_c)])
        b = biases.detach().to(torch.float32).numpy()
        big_bias = np.ascontiguousarray(np.concatenate([b[:, :nu].reshape(-1), b[:, nu:].reshape(-1)]))
        copy = np.arange(n_c)[:, None]
        nodes, parent, child, values, reverse = [], [], [], [], []
        node_off, edge_off = [0], [0]
        # each level's kept edges numbered in copy-major order: where the next level's reverse edges point
        numbered = [np.where(k, np.cumsum(k.reshape(-1)).reshape(k.shape) - 1, -1) for k in keep]
        for d in range(depth + 1):
            ids = chains.nodes(d).numpy()
            g, p = ids % n, ids // n
            user = g < nu
            relabelled = (np.where(user, g, n_c * nu + (g - nu)) + p * big)[None, :] + copy * np.where(user, nu, ni)
            nodes.append(relabelled.reshape(-1))
            node_off.append(node_off[-1] + relabelled.size)
            if d == depth:
                break
            lvl = chains.levels[d]
            cand, edge = np.nonzero(keep[d])
            n_here, n_next = len(ids), len(chains.nodes(d + 1))
            parent.append(lvl.parent.numpy()[edge] + cand * n_here)
            child.append(lvl.child.numpy()[edge] + cand * n_next)
            values.append(lvl.values.numpy()[edge])
            rev = lvl.reverse_edge.numpy()[edge]
            if d + 1 < depth and numbered[d + 1].shape[1]:
                rev = np.where(rev >= 0, numbered[d + 1][cand, np.maximum(rev, 0)], -1)
            else:  # no next level, or it sampled no edge: nothing to point back to
                rev = np.full(len(edge), -1, np.int64)
            reverse.append(rev)
            edge_off.append(edge_off[-1] + len(edge))
        first, last = self.phi_user[0], self.phi_user[-1]
        first_i, last_i = self.phi_item[0], self.phi_item[-1]
        weights = [t.detach().numpy() for t in (first.weight.T, first.bias, last.weight.T, last.bias,
                                                 first_i.weight.T, first_i.bias, last_i.weight.T, last_i.bias)]
        vec = aggregate_levels(
            np.array(node_off, np.int64), np.concatenate(nodes).astype(np.int64), np.array(edge_off, np.int64),
            np.concatenate(parent).astype(np.int64), np.concatenate(child).astype(np.int64),
            np.concatenate(values).astype(np.float32), np.concatenate(reverse).astype(np.int64), big, n_c * nu,
            big_slot, big_bias, np.empty(0, np.float32), np.float32(float(self.global_mean)),
            self.prototype_table.detach().numpy(), self.fallback_vectors.detach().numpy(),
            self.gate.detach().numpy(), self.rating_levels.numpy(), *weights)
        return torch.from_numpy(vec).reshape(n_c, -1, vec.shape[1])

    def fallback(self, users: torch.Tensor, items: torch.Tensor, user_known: torch.Tensor,
                 item_known: torch.Tensor) -> torch.Tensor:
        """μ plus the baseline bias of whichever side has live ratings."""
        graph, bias = self._live()
        return self.global_mean + bias[users] * user_known + bias[graph.n_users + items] * item_known

    def loss_terms(self, users: torch.Tensor, items: torch.Tensor,
                   values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predictions [B, 1], loss)``, the loss ``0.5 (mean squared error +
        reg·mean|prototype|² + mlp_reg·Σ|W|²)`` of one batch, each rating predicted from chains
        that exclude the batch's own ratings."""
        outputs = self.forward(users, items)
        err = values - outputs
        c = self.config
        penalty = c.reg * self.prototype_table.square().sum(-1).mean()
        if c.mlp_reg:
            penalty = penalty + c.mlp_reg * sum(m.weight.square().sum() for m in self.modules()
                                                if isinstance(m, nn.Linear))
        return outputs.unsqueeze(-1), 0.5 * (err.square().mean() + penalty)

    @torch.no_grad()
    def node_vectors(self, nodes: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
        """Vectors ``[n, K]`` of global node ids (users ``u``, items ``n_users + i``), averaged
        over ``eval_passes`` samplings, with no rating excluded (``cold_shrink`` applied per
        pass outside training, as in predictions)."""
        graph, _ = self._live()
        gen = self._generator(fresh=True)
        out = torch.zeros(len(nodes), self.config.embedding_size, device=self.device)
        passes = self.config.eval_passes
        for s in range(0, len(nodes), chunk):
            roots, inverse = torch.unique(nodes[s:s + chunk], return_inverse=True)
            chains = self._sample(graph, roots, gen, passes=passes)
            out[s:s + chunk] = self.root_vectors(chains).reshape(passes, len(roots), -1).mean(0)[inverse]
        return out

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        graph, bias = self._live()
        nu = graph.n_users
        users = users.to(self.device)
        known = (users >= 0) & self.known_users[users.clamp_min(0)]
        users = users.clamp_min(0)
        items = torch.arange(graph.n_items, device=self.device)
        vi = self.node_vectors(items + nu)
        vu = self.node_vectors(users)
        item_bias = bias[nu:] + self.global_mean
        scores = vu @ vi.T + bias[users].unsqueeze(1) + item_bias
        return torch.where(known.unsqueeze(1), scores, item_bias.expand_as(scores))

    # ------------------------------------------------------------------ explanation
    def explain(self, user: object, item: object, *, top: int | None = 10) -> dict:
        """Why the model predicts what it does for raw ids ``(user, item)``.

        Returns ``prediction`` (as `predict` gives it), ``path`` (``"model"`` or
        ``"fallback (...)"``), the baseline ``terms`` (``global_mean``, ``user_bias``,
        ``item_bias``, ``prior``: the part of ``u·v`` from the fallback vectors) and
        ``evidence``: dicts ``{hop, user, item, rating, example, share}`` with raw ids, the
        rating, its row in the live ratings and its share of the prediction, largest first
        (at most ``top`` per hop). Shares of hop 1 plus ``prior`` plus the terms sum to the
        unclipped prediction exactly (``u·v`` is split half to each side's messages, exact
        for a bilinear form); deeper hops get first-order (gradient × input) shares on the
        same scale, which say how much of the hop-1 evidence came from each deeper rating.
        Shares are averaged over the ``eval_passes`` samplings.
        """
        r = self._require_ratings()
        graph, bias = self._live()
        u, i = r.user_ids.get(user), r.item_ids.get(item)
        uidx = torch.tensor([-1 if u is None else u], device=self.device)
        iidx = torch.tensor([-1 if i is None else i], device=self.device)
        prediction = float(self.predict(uidx, iidx)[0])
        user_known, item_known = (bool(x) for x in self.known_mask(uidx, iidx))
        terms = {"global_mean": float(self.global_mean),
                 "user_bias": float(bias[u]) if user_known else 0.0,
                 "item_bias": float(bias[graph.n_users + i]) if item_known else 0.0,
                 "prior": 0.0, "prototype": 0.0}
        if not (user_known and item_known):
            path = "fallback (unknown user)" if not user_known else "fallback (item has no ratings)"
            return {"user": str(user), "item": str(item), "prediction": prediction, "path": path,
                    "terms": terms, "evidence": []}
        was_training = self.training
        self.eval()
        shares: dict[tuple[int, int], float] = {}
        gen = self._generator(fresh=True)
        passes = self.config.eval_passes
        try:
            record: dict = {"levels": []}
            with torch.enable_grad():
                _, chains, vu, vi = self._pair_scores(uidx, iidx, gen, record, passes=passes)
                score = (vu * vi).sum()
                msgs = [m for _, m, _ in record["levels"]]
                grads = torch.autograd.grad(score, msgs, allow_unused=True) if msgs else []
            for (d, msg, weight), grad in zip(record["levels"], grads, strict=True):
                if grad is None or len(msg) == 0:
                    continue
                share = 0.5 * (grad * msg).sum(1).detach()
                examples = chains.levels[d].examples
                nz = torch.nonzero(weight > 0).squeeze(1)
                for ex, s in zip(examples[nz].tolist(), share[nz].tolist(), strict=True):
                    shares[(d + 1, ex)] = shares.get((d + 1, ex), 0.0) + s / passes
            # what is not hop-1 evidence: the fallback part of a generated root vector, or
            # a prototype's free vector; half of u·v belongs to each side
            roots = chains.levels[0].nodes
            counts = record["root_counts"]
            scale = self.evidence_scale(chains)  # cold_shrink: the own side's factor, in vu/vi already
            for p in range(passes):
                for side, (node, own, other) in enumerate(((int(uidx[0]), vu[p, 0], vi[p, 0]),
                                                           (graph.n_users + int(iidx[0]), vi[p, 0], vu[p, 0]))):
                    half = 0.5 * float((own @ other).detach())
                    if int(graph.proto_slot[node]) >= 0:
                        terms["prototype"] += half / passes
                        continue
                    pos = int(torch.searchsorted(roots, torch.tensor(node + p * graph.n_nodes, device=self.device)))
                    n = float(counts[pos])
                    g = 0.0 if n == 0 else float(torch.sigmoid(self.gate[side, 0] * np.log(n) + self.gate[side, 1]).detach())
                    shrink = 1.0 if scale is None else float(scale[pos])
                    terms["prior"] += shrink * (1 - g) * 0.5 * float((self.fallback_vectors[side] @ other).detach()) / passes
        finally:
            self.train(was_training)
        evidence = []
        for hop in sorted({h for h, _ in shares}):
            rows = sorted(((ex, s) for (h, ex), s in shares.items() if h == hop), key=lambda t: -abs(t[1]))
            for ex, s in rows[:top] if top else rows:
                evidence.append({"hop": hop, "user": r.user_ids.raw(int(r.users[ex])),
                                 "item": r.item_ids.raw(int(r.items[ex])), "rating": float(r.values[ex]),
                                 "example": int(ex), "share": s})
        return {"user": str(user), "item": str(item), "prediction": prediction, "path": "model",
                "terms": terms, "evidence": evidence}

    # ------------------------------------------------------------------ serving protocols
    # (`recsys.models.base.OnlineLearner` and `Explainable`)
    def start_online(self, train: Ratings, *, log: object | None = None,
                     learning_rate: float | None = None) -> None:
        """Nothing to prepare: online learning is insertion into the live ratings (no
        parameter update, so no learning rate and nothing to log)."""

    def learn(self, ratings: Ratings, new: np.ndarray) -> None:
        """Insert the example ids ``new`` of ``ratings`` (training + live) into the live
        ratings (`add_ratings`: no parameter update; a pair rated again takes the new value).
        Users and items the ratings' id maps hold beyond the model's are added first, in the
        maps' order, so that an index means the same user here and there."""
        r = self._require_ratings()
        if ratings.n_users > r.n_users or ratings.n_items > r.n_items:
            self._add_ids(list(ratings.user_ids.raw_ids[r.n_users:]), list(ratings.item_ids.raw_ids[r.n_items:]))
        new = np.asarray(new, dtype=np.int64)
        if len(new):
            self.add_ratings(ratings.user_ids.raw_ids[ratings.users[new]], ratings.item_ids.raw_ids[ratings.items[new]],
                             ratings.values[new], None if ratings.timestamps is None else ratings.timestamps[new])

    def path(self, user: int) -> str:
        """``model`` for a user with live ratings (vectors are built from them: ratings
        learnt online are native), ``fallback`` otherwise (``-1``: unknown)."""
        if user < 0 or user >= len(self.known_users) or not bool(self.known_users[user]):
            return "fallback"
        return "model"

    def explainer(self, ratings: Ratings | None = None, log: object | None = None,
                  method: str | None = None) -> EvidenceChainExplainer:
        """The evidence-chain explainer (`recsys.models.rec.explain`): each first-hop evidence
        rating credited with its exact leave-one-out effect under the trained parameters and
        the evaluation seed (baselines refitted). It explains against the live ratings (which
        `learn` keeps in step with ``ratings``); ``log`` is not used; ``method`` None, the
        explainer's own name or ``"shares"`` (the earlier name, same explainer)."""
        from recsys.models.rec.explain import METHOD, EvidenceChainExplainer

        if method not in (None, METHOD, "shares"):
            raise ValueError(f"the evidence-chain model explains by {METHOD!r}, not {method!r}")
        return EvidenceChainExplainer(self)

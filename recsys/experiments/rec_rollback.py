"""Gradient rollback for the evidence-chain model (REC), combined with the chain's own evidence.

REC (`recsys.models.rec.model`) has one row-indexed parameter table, the prototype
vectors ``[p_u + p_i, K]``; everything else (the message MLPs ``φ_U``/``φ_V``, the fallback
vectors, the evidence gate) is shared by every example. So the log keeps what is sparse:

**The log** (`RECRollbackLog`, recorded by `RECRollbackCallback` through the normal
`recsys.train.Trainer`, autograd path): for every training example ``z``, the sum over all
steps of the update ``z`` caused on each prototype row its chains reached, as compact CSR
arrays (``indptr [n+1]``, ``slots int32 [nnz]``, ``updates [nnz, K]``; no Python object per
example). Per step:

- *Per-example gradients through shared chains.* Within a batch the chains are memoised: a
  node (and a prototype leaf) reached from several roots is computed once and its gradient is
  the sum over every example that reached it, so the batch gradient cannot be split after the
  fact. The callback therefore recomputes the step's forward once more on the *same sampled
  chains* (captured from the model's sampler) expanded per example: every example gets its own
  copy of the sub-tree under its user and its item (nodes shared *within* the example stay
  shared, as in the batch), and every prototype leaf of that copy gets its own row of a
  temporary table. One backward of ``Σ_b pred_b`` then gives ``∂pred_b/∂θ_row`` separately for
  every example ``b`` and every prototype row it reached, including rows it shares with other
  examples of the batch. The recomputation runs the model's own ``aggregate`` on the expanded
  chains, so the gate, the parent skip and the means are the model's; tests check that its
  predictions equal the batch's and that the per-example gradients sum to the batch gradient
  of the prototype table (completeness).
- *Credit.* Example ``b``'s share of the loss gradient is ``a_b·∂pred_b/∂θ`` with
  ``a_b = −(r_b − pred_b)/|B|`` (REC's loss is half the batch-mean squared error). Plain SGD:
  credited ``−lr·a_b·∂pred_b/∂θ`` (exact per step); Adagrad / Adam: that gradient passed
  through the optimizer's preconditioner after the step (`recsys.optim.credit.optimizer_factor`,
  the same rule and the same approximation as for MF: Adam's momentum is credited at its step
  under that step's ``v̂``).

**Not attributed:** the shared MLPs, the fallback vectors and the gate (every example touches
them; their updates are in no example's log), the L2 penalty on the prototype table (REC
applies it to every prototype row every step: it belongs to no example), Adam's momentum moves
of rows no example of the current batch reached, and MLP dropout (the recomputation runs the
MLPs without dropout: exact only for ``dropout = 0``, the default).

**Explanations** of a prediction ``x = (u, i)`` combine two parts, each measured separately:

- *evidence effect* (`evidence_effects`): the exact change of the prediction when ``z`` is
  removed from the live ratings, without retraining: ``z``'s edge is masked out of the graph
  (the way the model masks a batch's targets) under the same evaluation sampling seed, and the
  baseline biases are refitted without ``z``. (Rebuilding the graph instead would reshuffle
  every CSR row and resample every chain, so the change would be sampling noise.) Nonzero
  through the chains only for ratings that fed the prediction; every candidate moves the
  baseline a little.
- *training effect* (`rollback_effects`): ``f(x; θ) − f(x; θ − Δ_z)``, ``Δ_z`` the logged
  prototype-row updates of ``z``, computed exactly (no linearisation) for all candidates in
  one expanded forward over the prediction's chains.
- *combined*: their sum.

`explain_rec` ranks the candidate ratings (by default the ratings that fed the prediction,
optionally the user's and item's own ratings too) by the combined effect, in rating points.
Faithfulness against same-trajectory retraining: `retrain` here, `benchmarks/rollback_rec.py`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recsys.models.rec.chains import Chains, EvidenceGraph, Level
from recsys.models.rec.explain import baselines_without, leave_one_out_effects
from recsys.models.rec.model import EvidenceChainModel, RECConfig, SamplingObserver, fit_baseline
from recsys.optim.credit import ATTRIBUTION, optimizer_factor, optimizer_name
from recsys.optim.factory import build_optimizer
from recsys.optim.sampling import make_sampler
from recsys.ratings import Ratings
from recsys.train import Callback, EpochRecord, TrainConfig, Trainer, TrainResult

FORMAT = "recsys-rec-rollback-1"


# ----------------------------------------------------------------------------- the log
class RECRollbackLog:
    """Per-example accumulated prototype-row updates of a REC model, as CSR arrays.

    ``indptr int64 [n+1]``: example ``z``'s entries are ``indptr[z]:indptr[z+1]``, sorted by
    slot; ``slots int32 [nnz]``: prototype rows (user prototypes ``0..p_u-1``, then items);
    ``updates [nnz, K]``: the summed update of that row credited to ``z``, in parameter units.
    ``optimizer`` names the optimizer whose updates were logged.
    """

    def __init__(self, n_examples: int, n_slots: int, embedding_size: int, *, optimizer: str = "adam",
                 device: str | torch.device = "cpu") -> None:
        self.n_slots, self.embedding_size, self.optimizer = n_slots, embedding_size, optimizer
        self.indptr = torch.zeros(n_examples + 1, dtype=torch.int64, device=device)
        self.slots = torch.zeros(0, dtype=torch.int32, device=device)
        self.updates = torch.zeros(0, embedding_size, dtype=torch.float32, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._keys: torch.Tensor | None = None

    @property
    def n_examples(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.slots)

    @property
    def dtype(self) -> torch.dtype:
        return self.updates.dtype

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in (self.indptr, self.slots, self.updates))

    @property
    def bytes_per_example(self) -> float:
        return self.nbytes / max(1, self.n_examples)

    @property
    def attribution(self) -> str:
        return ATTRIBUTION.get(self.optimizer, "approximate: gradient through the optimizer's preconditioner")

    def __repr__(self) -> str:
        return (f"RECRollbackLog(n_examples={self.n_examples}, nnz={self.nnz}, n_slots={self.n_slots}, "
                f"K={self.embedding_size}, dtype={self.dtype}, optimizer={self.optimizer!r})")

    # -- writing
    @torch.no_grad()
    def add(self, examples: torch.Tensor, slots: torch.Tensor, updates: torch.Tensor) -> None:
        """Queue updates ``[m, K]`` for ``(examples [m], slots [m])`` (repeats accumulate);
        `flush` merges the queue into the CSR arrays."""
        self._pending.append((examples.long(), slots.long(), updates.detach().float()))

    @torch.no_grad()
    def flush(self) -> RECRollbackLog:
        """Merge queued updates into the CSR arrays (one sort of the keys); returns self."""
        if not self._pending:
            return self
        n = self.n_examples
        ex_old = torch.repeat_interleave(torch.arange(n, device=self.indptr.device), self.indptr.diff())
        ex = torch.cat([ex_old] + [p[0] for p in self._pending])
        sl = torch.cat([self.slots.long()] + [p[1] for p in self._pending])
        up = torch.cat([self.updates.float()] + [p[2] for p in self._pending])
        self._pending.clear()
        self._keys = None
        keys, inverse = torch.unique(ex * self.n_slots + sl, return_inverse=True)
        self.updates = torch.zeros(len(keys), self.embedding_size, device=up.device).index_add_(0, inverse, up)
        self.slots = (keys % self.n_slots).to(torch.int32)
        counts = torch.bincount(keys // self.n_slots, minlength=n)
        self.indptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=counts.device), counts.cumsum(0)])
        return self

    def compact(self, dtype: torch.dtype = torch.float16) -> RECRollbackLog:
        """Cast the updates to ``dtype`` (float16 halves them); returns self."""
        self.flush()
        self.updates = self.updates.to(dtype)
        return self

    def extend(self, n_new: int) -> RECRollbackLog:
        """Append ``n_new`` examples with empty logs (ratings appended to the training
        `Ratings`); returns self."""
        self.flush()
        self.indptr = torch.cat([self.indptr, self.indptr[-1:].expand(n_new)])
        self._keys = None
        return self

    # -- reading
    def rows(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots int64 [m], updates float32 [m, K])`` of example ``example``."""
        lo, hi = int(self.indptr[example]), int(self.indptr[example + 1])
        return self.slots[lo:hi].long(), self.updates[lo:hi].float()

    def lookup(self, examples: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Updates ``float32 [m, K]`` of ``(examples [m], slots [m])`` pairs, zero where the
        example never touched the row."""
        self.flush()
        if self._keys is None or len(self._keys) != self.nnz:
            self._keys = torch.repeat_interleave(torch.arange(self.n_examples, device=self.indptr.device),
                                                 self.indptr.diff()) * self.n_slots + self.slots.long()
        keys = self._keys
        want = examples.long() * self.n_slots + slots.long()
        at = torch.searchsorted(keys, want).clamp(max=max(len(keys) - 1, 0))
        out = torch.zeros(len(want), self.embedding_size)
        if len(keys):
            hit = keys[at] == want
            out[hit] = self.updates[at[hit]].float()
        return out

    def row_sums(self) -> torch.Tensor:
        """The log summed per prototype row, ``[n_slots, K]`` (for plain SGD without the L2
        penalty: each row's total change over training, the completeness check)."""
        self.flush()
        return torch.zeros(self.n_slots, self.embedding_size).index_add_(0, self.slots.long(), self.updates.float())

    def reached_per_example(self) -> np.ndarray:
        """How many prototype rows each example's log holds, ``int64 [n]``."""
        return self.indptr.diff().cpu().numpy()

    # -- persistence
    def save(self, path: str | Path) -> None:
        self.flush()
        save_file({"indptr": self.indptr.cpu(), "slots": self.slots.cpu(), "updates": self.updates.cpu().contiguous()},
                  str(path), metadata={"format": FORMAT, "optimizer": self.optimizer, "n_slots": str(self.n_slots)})

    @classmethod
    def load(cls, path: str | Path) -> RECRollbackLog:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a REC rollback log")
        t = load_file(str(path))
        log = cls(len(t["indptr"]) - 1, int(meta["n_slots"]), t["updates"].shape[1], optimizer=meta["optimizer"])
        log.indptr, log.slots, log.updates = t["indptr"], t["slots"], t["updates"]
        return log


def _baseline_regs(model: EvidenceChainModel) -> tuple[float, float]:
    """Ridge weights of the user and item baseline biases."""
    c = model.config
    return float(c.bias_reg), float(getattr(c, "item_reg", c.bias_reg))


def _fit_baseline(model: EvidenceChainModel, r: Ratings, keep: np.ndarray) -> torch.Tensor:
    """The model's baseline biases ``float32 [n_users + n_items]`` fitted to ``r[keep]``."""
    reg, item_reg = _baseline_regs(model)
    kw = {} if item_reg == reg else {"item_reg": item_reg}
    bu, bi = fit_baseline(r.users[keep], r.items[keep], r.values[keep], r.n_users, r.n_items,
                          float(model.global_mean), reg, **kw)
    return torch.from_numpy(np.concatenate([bu, bi]).astype(np.float32)).to(model.device)


# ----------------------------------------------------------------------------- chains capture
def training_baseline(model: EvidenceChainModel, graph: EvidenceGraph, roots: torch.Tensor, chains: Chains,
                      users: torch.Tensor, items: torch.Tensor, root_keep: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What a training pass adds to ``u·v`` for the pairs ``(users, items) [B]`` whose roots
    (sorted) and chains were sampled with ``root_keep``: ``(root_bias [n_roots] or None, μ +
    b_u + b_i [B])``, the biases as the model's pass computes them (`prediction_biases`:
    target-free biases, re-solved biases of the roots made cold)."""
    root_bias = None
    if root_keep is not None and bool((root_keep > 0).any()):  # cold-root training re-solves root biases
        root_bias = model.cold_root_bias(chains, root_keep > 0)
    inverse = torch.searchsorted(roots, torch.cat([users, items + graph.n_users]))
    rb = model.prediction_biases(users, items, inverse, root_keep, root_bias)
    b = len(users)
    return root_bias, model.global_mean + rb[:b] + rb[b:]


class ChainTap:
    """Watches one REC model's chain sampling while active, through the model's public hooks
    (`EvidenceChainModel.observing`, `EvidenceChainModel.substituted`): records every
    sampling pass's ``(roots, chains)`` in ``calls`` (and the sampler's other keyword
    arguments, e.g. ``root_keep``, in ``kwargs``) when ``record``, calls ``on_sample(graph,
    roots, chains, targets, kwargs)`` after every sampling (``targets``: the pair keys the
    model excluded itself, a training batch's pairs in order), and hides the pair keys
    ``hidden`` from every chain (the removal mask). Other models are untouched."""

    def __init__(self, model: EvidenceChainModel, on_sample: SamplingObserver | None = None, *,
                 hidden: torch.Tensor | None = None, record: bool = True) -> None:
        self.model = model
        self.calls: list[tuple[torch.Tensor, Chains]] = []
        self.kwargs: list[dict] = []  # each call's other keyword arguments (e.g. root_keep)
        self.hidden = hidden
        self.recording = record
        self.on_sample = on_sample
        self._stack: contextlib.ExitStack | None = None

    def _observe(self, graph: EvidenceGraph, roots: torch.Tensor, chains: Chains,
                 targets: torch.Tensor | None, kwargs: dict) -> None:
        if self.recording:  # one entry per sampling pass
            for single in chains.split_passes():
                self.calls.append((roots, single))
                self.kwargs.append(kwargs)
        if self.on_sample is not None:
            self.on_sample(graph, roots, chains, targets, kwargs)

    def __enter__(self) -> ChainTap:
        stack = contextlib.ExitStack()
        stack.enter_context(self.model.observing(self._observe))
        if self.hidden is not None:
            stack.enter_context(self.model.substituted(hidden_pairs=self.hidden))
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


@contextlib.contextmanager
def removed(model: EvidenceChainModel, example_ids: Sequence[int] | np.ndarray, *,
            refit_baseline: bool = True, mask_evidence: bool = True) -> Iterator[None]:
    """Within the block, the model predicts (and trains) as if the training ratings
    ``example_ids`` (rows of its live ratings) were removed: their edges are masked out of
    every sampled chain and the baseline biases are refitted without them. Parameters are
    untouched."""
    r = model.ratings
    ids = np.asarray(example_ids, dtype=np.int64)
    graph, _ = model.live()
    hidden = None
    if mask_evidence and len(ids):
        hidden = torch.from_numpy(r.users[ids] * graph.n_items + r.items[ids])
    biases = None
    if refit_baseline and len(ids):
        keep = np.ones(len(r), dtype=bool)
        keep[ids] = False
        biases = _fit_baseline(model, r, keep)
    with model.substituted(biases=biases, hidden_pairs=hidden):
        yield


# ----------------------------------------------------------------------------- expanded forward
@dataclass
class _Expanded:
    """Chains expanded per group, with a shadow graph: every prototype copy has its own slot."""

    chains: Chains
    graph: EvidenceGraph
    bias: torch.Tensor
    copy_group: torch.Tensor  # [n_copies] group of each prototype copy
    copy_slot: torch.Tensor  # [n_copies] real prototype row of each copy
    root_copies: torch.Tensor  # [G, 2] position in the expanded level 0 of each group's (user, item)


def _expand(chains: Chains, graph: EvidenceGraph, bias: torch.Tensor, group_roots: torch.Tensor) -> _Expanded:
    """Expand ``chains`` so that each group (row of ``group_roots [G, 2]``: positions of its
    user and item root among ``chains.levels[0].nodes``) has a private copy of its roots'
    sub-trees; nodes reached twice within a group stay shared (as in the batch)."""
    dev = group_roots.device
    levels = chains.levels
    depth = len(levels)
    n_groups = len(group_roots)
    grp = torch.arange(n_groups, device=dev).repeat_interleave(2)
    pos = group_roots.reshape(-1)
    copies = [(grp, pos)]
    raw_edges = []
    for d in range(depth):
        lvl = levels[d]
        n_here = len(lvl.nodes)
        order = torch.argsort(lvl.parent, stable=True)
        deg = torch.bincount(lvl.parent, minlength=n_here)
        start = deg.cumsum(0) - deg
        g, p = copies[d]
        cnt = deg[p]
        parent_copy = torch.repeat_interleave(torch.arange(len(p), device=dev), cnt)
        first = torch.repeat_interleave(cnt.cumsum(0) - cnt, cnt)
        offs = torch.arange(len(parent_copy), device=dev) - first
        e = order[start[p][parent_copy] + offs]
        eg = g[parent_copy]
        n_next = len(chains.nodes(d + 1))
        ukey, child_copy = torch.unique(eg * n_next + lvl.child[e], return_inverse=True)
        copies.append((ukey // n_next, ukey % n_next))
        raw_edges.append((parent_copy, child_copy, e, eg))
    # reverse edges: expanded edge (group g, original e) -> expanded (g, reverse_edge[e]) one level down
    reverse = []
    for d in range(depth):
        parent_copy, child_copy, e, eg = raw_edges[d]
        rev = levels[d].reverse_edge[e]
        out = torch.full_like(rev, -1)
        if d + 1 < depth and len(rev):
            _, _, e2, eg2 = raw_edges[d + 1]
            n_e2 = max(len(levels[d + 1].parent), 1)
            keys2 = eg2 * n_e2 + e2
            srt, idx = torch.sort(keys2)
            want = eg * n_e2 + rev.clamp(min=0)
            at = torch.searchsorted(srt, want).clamp(max=max(len(srt) - 1, 0))
            ok = (rev >= 0) & (len(srt) > 0)
            if len(srt):
                ok = ok & (srt[at] == want)
                out = torch.where(ok, idx[at], out)
        reverse.append(out)
    # shadow ids: every copy at every level gets its own id, users first
    real = [chains.nodes(d)[copies[d][1]] for d in range(depth + 1)]
    allreal = torch.cat(real)
    nu = graph.n_users
    is_item = allreal >= nu
    shadow = torch.empty_like(allreal)
    n_user_copies = int((~is_item).sum())
    shadow[~is_item] = torch.arange(n_user_copies, device=dev)
    shadow[is_item] = n_user_copies + torch.arange(int(is_item.sum()), device=dev)
    slot_real = graph.proto_slot[allreal]
    # prototype copies: one table row per (group, real slot) would merge within-group repeats;
    # one row per copy is simpler and the gradients are summed per (group, slot) later
    is_proto = slot_real >= 0
    proto_slot = torch.full((len(allreal),), -1, dtype=torch.int64, device=dev)
    proto_slot[shadow[is_proto]] = torch.arange(int(is_proto.sum()), device=dev)
    groups_all = torch.cat([copies[d][0] for d in range(depth + 1)])
    # order the copy table by shadow id so proto_slot[shadow] indexes it consistently
    copy_group = torch.empty(int(is_proto.sum()), dtype=torch.int64, device=dev)
    copy_slot = torch.empty_like(copy_group)
    copy_group[proto_slot[shadow[is_proto]]] = groups_all[is_proto]
    copy_slot[proto_slot[shadow[is_proto]]] = slot_real[is_proto]
    shadow_bias = torch.empty(len(allreal), dtype=bias.dtype, device=dev)
    shadow_bias[shadow] = bias[allreal]
    bounds = np.cumsum([0] + [len(x) for x in real])
    sh = [shadow[bounds[d]:bounds[d + 1]] for d in range(depth + 1)]
    new_levels = []
    for d in range(depth):
        parent_copy, child_copy, e, _ = raw_edges[d]
        lvl = levels[d]
        new_levels.append(Level(sh[d], parent_copy, child_copy, lvl.values[e], lvl.examples[e], reverse[d]))
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    n_items_shadow = len(allreal) - n_user_copies
    shadow_graph = EvidenceGraph(torch.zeros(len(allreal) + 1, dtype=torch.int64, device=dev), empty,
                                 torch.zeros(0, device=dev), empty, torch.zeros(len(allreal), dtype=torch.int64, device=dev),
                                 proto_slot, n_user_copies, n_items_shadow)
    root_copies = torch.arange(2 * n_groups, device=dev).reshape(n_groups, 2)
    return _Expanded(Chains(new_levels, sh[depth]), shadow_graph, shadow_bias, copy_group, copy_slot, root_copies)


@contextlib.contextmanager
def _shadow(model: EvidenceChainModel, ex: _Expanded, table: torch.Tensor) -> Iterator[None]:
    """Run the model's own aggregation on expanded chains: swap in the shadow graph, its
    biases and a per-copy prototype table; MLPs without dropout. Restored on exit."""
    modes = [(m, m.training) for m in (model.phi_user, model.phi_item)]
    for m, _ in modes:
        m.eval()
    try:
        with model.substituted(graph=ex.graph, biases=ex.bias, prototype_vectors=table):
            yield
    finally:
        for m, was in modes:
            m.train(was)


def _expanded_scores(model: EvidenceChainModel, ex: _Expanded, table: torch.Tensor,
                     root_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``u·v`` per group ``[G]`` from the expanded chains with prototype copies ``table``
    (``root_bias``: biases of the expanded roots, when the step replaced them)."""
    with _shadow(model, ex, table):
        vec = model.aggregate(ex.chains) if root_bias is None else model.aggregate(ex.chains, None, root_bias)
    vu, vi = vec[ex.root_copies[:, 0]], vec[ex.root_copies[:, 1]]
    return (vu * vi).sum(-1)


def per_example_gradients(model: EvidenceChainModel, chains: Chains, roots: torch.Tensor, users: torch.Tensor,
                          items: torch.Tensor, root_bias: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a batch predicted from ``chains`` (rooted at the sorted unique global ids
    ``roots``): ``(group [m], slot [m], grad [m, K], scores [B])``: ``grad`` is
    ``∂pred_b/∂θ_slot`` of example ``group`` (one row per prototype copy in its sub-trees;
    repeats of a (group, slot) pair are to be summed) and ``scores`` the ``u·v`` parts of the
    predictions recomputed from the expanded chains (equal to the batch's). ``root_bias
    [n_0]``: the roots' biases when the step replaced some (REC's cold-root training)."""
    graph, bias = model.live()
    pos = torch.stack([torch.searchsorted(roots, users), torch.searchsorted(roots, items + graph.n_users)], 1)
    ex = _expand(chains, graph, bias, pos)
    table = model.prototype_vectors.detach()[ex.copy_slot].clone().requires_grad_(True)
    rb = None if root_bias is None else root_bias[pos.reshape(-1)]
    with torch.enable_grad():
        scores = _expanded_scores(model, ex, table, rb)
        (grad,) = torch.autograd.grad(scores.sum(), [table], allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(table)
    return ex.copy_group, ex.copy_slot, grad, scores.detach()


# ----------------------------------------------------------------------------- the callback
class RECRollbackCallback(Callback):
    """Trainer plug-in that records a `RECRollbackLog` (see the module docstring).

    While training, the callback observes the model's chain sampling
    (`EvidenceChainModel.observing`): right after a training step samples its chains (before the aggregation, so with the step's pre-update weights), the
    per-example prototype-row gradients are recomputed on those chains
    (`per_example_gradients`); ``on_batch_end`` credits them through the optimizer's
    preconditioner. The batch's examples are read from the target pairs the model excludes
    (training `Ratings` hold each (user, item) pair once). Logged updates are merged into the
    CSR arrays at every epoch end.

    Args:
        store_dtype: dtype of the updates after training (float16 halves them).
        record_sampling: keep the sampling state before every step (`sampling_states`), so
            that `retrain` can replay the same chains step by step.
    """

    def __init__(self, store_dtype: torch.dtype = torch.float32, *, record_sampling: bool = False) -> None:
        self.store_dtype = store_dtype
        self.record_sampling = record_sampling
        self.log: RECRollbackLog | None = None
        self.sampling_states: list[torch.Tensor] = []
        self.seconds = 0.0  # time spent in the logging itself
        self._observing: contextlib.ExitStack | None = None
        self._pending: tuple | None = None
        self._model: EvidenceChainModel | None = None
        self._trainer: Trainer | None = None
        self._values: torch.Tensor | None = None

    def on_train_begin(self, trainer: Trainer, model: EvidenceChainModel, train: Ratings) -> None:
        if not isinstance(model, EvidenceChainModel):
            raise TypeError(f"RECRollbackCallback logs evidence-chain models; got {type(model).__name__}")
        if trainer.step_kind(model) != "autograd" or trainer.config.salr or trainer.sub_batch_noise is not None \
                or trainer.preconditioner is not None or trainer.parallel is not None:
            raise ValueError("REC rollback logs plain autograd steps (SGD, Adagrad, Adam); not SALR, K-FAC, "
                             "sub-batch noise or data-parallel training")
        self._trainer, self._model = trainer, model
        opt = trainer.config.optimizer if trainer.optimizer_factory is None else optimizer_name(trainer.optimizer)
        self.log = RECRollbackLog(len(train), len(model.prototype_vectors), model.config.embedding_size,
                                  optimizer=opt, device=model.device)
        self._values = torch.as_tensor(train.values, dtype=torch.float32, device=model.device)
        self.sampling_states = [model.sampling_state().clone()] if self.record_sampling else []
        self._observing = contextlib.ExitStack()
        self._observing.enter_context(model.observing(self._on_sample))

    def _on_sample(self, graph: EvidenceGraph, roots: torch.Tensor, chains: Chains,
                   targets: torch.Tensor | None, kwargs: dict) -> None:
        model = self._model
        if model is None or not (model.training and torch.is_grad_enabled()) or targets is None:
            return
        t0 = time.perf_counter()
        users, items = targets // graph.n_items, targets % graph.n_items
        root_bias, baseline = training_baseline(model, graph, roots, chains, users, items, kwargs.get("root_keep"))
        group, slot, grad, scores = per_example_gradients(model, chains, roots, users, items, root_bias)
        # a step samples one pass per group of `chain_group` pairs, in batch order
        if self._pending is None:
            self._pending = (group, slot, grad, baseline + scores)
        else:
            g0, s0, d0, o0 = self._pending
            self._pending = (torch.cat([g0, group + len(o0)]), torch.cat([s0, slot]), torch.cat([d0, grad]),
                             torch.cat([o0, baseline + scores]))
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def on_batch_end(self, example_ids: np.ndarray, loss: float) -> None:
        t0 = time.perf_counter()
        if self._pending is None:
            raise RuntimeError("REC rollback: a step ran without a training forward")
        group, slot, grad, out = self._pending
        self._pending = None
        assert self.log is not None and self._model is not None and self._trainer is not None
        ids = torch.as_tensor(example_ids, device=out.device)
        if len(ids) != len(out):
            raise RuntimeError("REC rollback: the batch's predictions do not follow its examples")
        a = -(self._values[ids] - out) / len(ids)  # d loss / d pred_b
        pre = optimizer_factor(self._trainer.optimizer, self._model.prototype_vectors, slot)
        self.log.add(ids[group], slot, -pre * a[group].unsqueeze(1) * grad)
        if self.record_sampling:
            self.sampling_states.append(self._model.sampling_state().clone())
        self.seconds += time.perf_counter() - t0

    def on_epoch_end(self, record: EpochRecord) -> bool | None:
        t0 = time.perf_counter()
        if self.log is not None:
            self.log.flush()
        self.seconds += time.perf_counter() - t0
        return None

    def on_train_end(self, result: TrainResult) -> None:
        if self._observing is not None:
            self._observing.close()
            self._observing = None
        if self.log is not None:
            self.log.flush()
            if self.store_dtype != self.log.dtype:
                self.log.compact(self.store_dtype)


# ----------------------------------------------------------------------------- queries
def prediction_chains(model: EvidenceChainModel, user: int, item: int) -> tuple[float, list[tuple[torch.Tensor, Chains]]]:
    """The unclipped prediction for indices ``(user, item)`` and the chains of each of its
    evaluation passes."""
    was = model.training
    model.eval()
    try:
        with ChainTap(model) as tap, torch.no_grad():
            pred = float(model(torch.tensor([user], device=model.device), torch.tensor([item], device=model.device))[0])
    finally:
        model.train(was)
    return pred, tap.calls


def raw_prediction(model: EvidenceChainModel, user: int, item: int) -> float:
    """The unclipped evaluation prediction (mean of ``eval_passes`` samplings)."""
    return prediction_chains(model, user, item)[0]


def evidence_candidates(model: EvidenceChainModel, user: int, item: int) -> tuple[np.ndarray, np.ndarray]:
    """The training ratings that fed the prediction: ``(example ids [m], hop [m])`` (the
    smallest hop at which each appeared in any evaluation pass)."""
    _, calls = prediction_chains(model, user, item)
    best: dict[int, int] = {}
    ex = torch.cat([lvl.examples for _, ch in calls for lvl in ch.levels])
    hop = torch.cat([torch.full_like(lvl.examples, d + 1) for _, ch in calls for d, lvl in enumerate(ch.levels)])
    if len(ex) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = torch.argsort(ex * 100 + hop)
    ex, hop = ex[order], hop[order]
    first = torch.ones(len(ex), dtype=torch.bool)
    first[1:] = ex[1:] != ex[:-1]
    del best
    return ex[first].cpu().numpy(), hop[first].cpu().numpy()


def neighbourhood_candidates(train: Ratings, user: int, item: int) -> np.ndarray:
    """The user's and the item's training ratings (example ids), as MF's candidates."""
    return np.union1d(np.flatnonzero(train.users == user), np.flatnonzero(train.items == item))


@dataclass
class EvidenceEffects:
    """``total`` = prediction minus prediction with the rating removed from the live ratings
    (chains masked and baseline refitted); ``chain`` = with the chains masked only;
    ``baseline`` = with the baseline refitted only. Rating points, ``[C]`` each."""

    total: np.ndarray
    chain: np.ndarray | None = None
    baseline: np.ndarray | None = None


def evidence_effects(model: EvidenceChainModel, user: int, item: int, example_ids: np.ndarray, *,
                     components: bool = False) -> EvidenceEffects:
    """Evidence effect of each candidate (see the module docstring): exact, one masked
    evaluation per candidate, baselines refitted for all candidates at once (the served
    explainer's `recsys.models.rec.explain.leave_one_out_effects`)."""
    return EvidenceEffects(*leave_one_out_effects(model, user, item, example_ids, components=components))


def rollback_effects(model: EvidenceChainModel, log: RECRollbackLog, user: int, item: int,
                     example_ids: np.ndarray) -> np.ndarray:
    """Training effect of each candidate through the prototype rows, ``f(x; θ) − f(x; θ − Δ_z)``
    in rating points ``[C]``, exact (one expanded forward over the prediction's chains with
    every candidate's table, averaged over the evaluation passes)."""
    ids = torch.as_tensor(np.asarray(example_ids, dtype=np.int64))
    n_c = len(ids)
    if n_c == 0:
        return np.zeros(0)
    _, calls = prediction_chains(model, user, item)
    graph, bias = model.live()
    theta = model.prototype_vectors.detach()
    out = torch.zeros(n_c)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for roots, chains in calls:
                pos = torch.stack([torch.searchsorted(roots, torch.tensor([user])),
                                   torch.searchsorted(roots, torch.tensor([item + graph.n_users]))], 1)
                ex = _expand(chains, graph, bias, pos.expand(n_c + 1, 2).contiguous())
                delta = torch.zeros(len(ex.copy_slot), theta.shape[1])
                cand = ex.copy_group > 0  # group 0: the unchanged model
                if cand.any():
                    delta[cand] = log.lookup(ids[ex.copy_group[cand] - 1], ex.copy_slot[cand])
                scores = _expanded_scores(model, ex, theta[ex.copy_slot] - delta)
                scale = model.evidence_scale(chains)  # cold_shrink: the prediction's root factors
                if scale is not None:
                    scores = scores * scale[pos[0, 0]] * scale[pos[0, 1]]
                out += (scores[0] - scores[1:]) / len(calls)
    finally:
        model.train(was)
    return out.numpy().astype(np.float64)


@dataclass
class RECExplanation:
    """A REC prediction explained by training ratings: effects in rating points (prediction
    with the rating minus prediction without it), evidence + training (rollback) parts."""

    user: str
    item: str
    prediction: float
    method: str
    candidates: int
    contributions: list[dict] = field(default_factory=list)
    attribution: str = ""

    def to_dict(self) -> dict:
        return {"user": self.user, "item": self.item, "prediction": self.prediction, "method": self.method,
                "units": "rating points", "candidates": self.candidates, "attribution": self.attribution,
                "contributions": self.contributions}


def explain_rec(model: EvidenceChainModel, log: RECRollbackLog | None, user: object, item: object, k: int = 5, *,
                neighbourhood: bool = False) -> RECExplanation:
    """Top-``k`` training ratings by |combined effect| on the prediction for raw ids
    ``(user, item)``. Candidates: the ratings that fed the prediction (and, with
    ``neighbourhood``, the user's and item's own ratings). Without a log, evidence only."""
    r = model.ratings
    u, i = r.user_ids.get(user), r.item_ids.get(item)
    if u is None or i is None or not (model.known_users[u] and model.known_items[i]):
        pred = float(model.predict(torch.tensor([-1 if u is None else u]), torch.tensor([-1 if i is None else i]))[0])
        return RECExplanation(str(user), str(item), pred, "fallback (no evidence)", 0)
    ids, hops = evidence_candidates(model, u, i)
    if neighbourhood:
        extra = np.setdiff1d(neighbourhood_candidates(r, u, i), ids)
        ids, hops = np.concatenate([ids, extra]), np.concatenate([hops, np.zeros(len(extra), np.int64)])
    ev = evidence_effects(model, u, i, ids).total
    rb = rollback_effects(model, log, u, i, ids) if log is not None else np.zeros(len(ids))
    total = ev + rb
    top = np.argsort(-np.abs(total), kind="stable")[:k]
    contribs = []
    for j in top:
        z = int(ids[j])
        contribs.append({"example": z, "user": r.user_ids.raw(int(r.users[z])), "item": r.item_ids.raw(int(r.items[z])),
                         "rating": float(r.values[z]),
                         "timestamp": None if r.timestamps is None else int(r.timestamps[z]),
                         "hop": int(hops[j]) or None, "effect": float(total[j]), "evidence_effect": float(ev[j]),
                         "training_effect": float(rb[j])})
    return RECExplanation(str(user), str(item), raw_prediction(model, u, i),
                          "evidence+rollback" if log is not None else "evidence", len(ids), contribs,
                          log.attribution if log is not None else "")


# ----------------------------------------------------------------------------- same-trajectory retraining
def retrain(train: Ratings, model_config: RECConfig, train_config: TrainConfig,
            removed_ids: Sequence[int] | np.ndarray = (), *, sampling_states: Sequence[torch.Tensor] | None = None,
            evidence: bool = True) -> EvidenceChainModel:
    """Retrain REC without the training ratings ``removed_ids``, as close to the same
    trajectory as REC allows: the same initial weights, prototypes and global mean (chosen on
    the full ratings), every epoch's order from the same seed with the removed examples kept
    in their batches at loss weight 0 (so batch boundaries, roots and the batch's target mask
    are unchanged), every step's sampler restarted from the full run's state before that step
    (``sampling_states`` from `RECRollbackCallback(record_sampling=True)`), and, with
    ``evidence`` (default), the removed ratings masked out of every chain and the baseline
    refitted without them (the model then predicts under `removed`). The chains' draws are
    keyed by node (`recsys.models.rec.chains.keyed_uniform`), so a masked edge changes a step's
    chains only below itself, and every step takes the same one key from the sampling stream:
    the stream stays in step with the full run without ``sampling_states``. With nothing
    removed it reproduces ``Trainer.fit`` bit for bit (tested)."""
    c = train_config
    if c.threads:
        torch.set_num_threads(c.threads)
    model = EvidenceChainModel(train.n_users, train.n_items, train.rating_scale, model_config)
    torch.manual_seed(c.seed)
    model.prepare(train)
    ids = np.asarray(removed_ids, dtype=np.int64)
    weight = np.ones(len(train), dtype=np.float32)
    weight[ids] = 0.0
    optimizer = build_optimizer(c.optimizer, model, c.learning_rate)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=c.lr_decay)
    sampler = make_sampler(c.sampler, len(train), c.seed)
    tensors = train.tensors(model.device)
    step = 0
    ctx = removed(model, ids) if (evidence and len(ids)) else contextlib.nullcontext()
    with ctx:
        for epoch in range(c.epochs):
            model.train()
            order = sampler.epoch_order(epoch)
            for s in range(0, len(order), c.batch_size):
                batch = order[s:s + c.batch_size]
                if sampling_states is not None:
                    model.set_sampling_state(sampling_states[step])
                idx = torch.from_numpy(batch)
                u, i, r = tensors[0][idx], tensors[1][idx], tensors[2][idx]
                optimizer.zero_grad(set_to_none=True)
                outputs, loss = model.loss_terms(u, i, r)
                w = weight[batch]
                if (w == 0).any():
                    gone = torch.from_numpy(w == 0)
                    loss = loss - 0.5 * (r[gone] - outputs[gone, 0]).square().sum() / len(batch)
                loss.backward()
                optimizer.step()
                step += 1
            scheduler.step()
    model.eval()
    return model


def predict_without(model: EvidenceChainModel, user: int, item: int, removed_ids: Sequence[int] | np.ndarray) -> float:
    """The unclipped prediction of ``model`` with the ratings ``removed_ids`` removed from its
    live ratings (see `removed`)."""
    with removed(model, removed_ids):
        return raw_prediction(model, user, item)


__all__ = [
    "ChainTap", "EvidenceEffects", "RECExplanation", "RECRollbackCallback", "RECRollbackLog", "baselines_without",
    "evidence_candidates", "evidence_effects", "explain_rec", "neighbourhood_candidates", "per_example_gradients",
    "predict_without", "prediction_chains", "raw_prediction", "removed", "retrain", "rollback_effects",
]

"""The gradient-rollback update log (Lawrence, Sztyler, Niepert, arXiv 2010.05516).

For every training example ``z`` (row ``z`` of the training `Ratings`) the log holds Δ_z, the
sum over all training steps of the parameter update that ``z`` caused, restricted to the rows
``z`` touches. For biased MF those are its user's factor row and bias slots and its item's
factor row and bias slots: ``2·D + 2·K`` numbers per example (``D`` factors, ``K`` blocks).
`recsys.explain.influence` turns the log into explanations, ``f(x; θ) − f(x; θ − Δ_z)``.

Attribution per optimizer (what a step's update is split into):

- plain SGD (the compiled kernel, closed-form minibatches, or ``torch.optim.SGD`` through
  autograd): example ``b`` of a batch ``B`` is credited ``−lr·∇ℓ_b/|B|`` on its gathered rows.
  Exact: the credits of a step sum to the step (per-example L2 on the touched rows is part of
  ℓ_b, so it is credited too).
- Adagrad: ``−lr_t·∇ℓ_b/|B| / (√G_t + ε)`` with the accumulator after the step: exact per step
  given the optimizer's state.
- Adam, AdamW, SparseAdam: ``−lr·∇ℓ_b/|B| / (√v̂_t + ε)``: the gradient passed through the
  preconditioner of its step, i.e. the whole momentum the gradient will carry is credited at
  once (the sum of its geometric tail is 1). Approximate: later steps apply that momentum
  under a different ``v̂``, bias correction is ignored, and momentum carried into rows that
  no example of the current batch touches (dense Adam moves every row every step) is
  attributed to nobody but the example that created it.
- The K-FAC family (`recsys.optim.kfac`, over plain SGD): ``−lr · P_r(∇ℓ_b/|B|)`` with ``P_r``
  the step's preconditioner of row ``r`` (`KFACPreconditioner.precondition_rows`), which is
  linear in the row's gradient: exact per step given the factors (the factors themselves,
  estimated from every example's statistics, are not attributed).
- Covariance-noise SGD (``cov-noise``): ``−lr·∇ℓ_b/|B|``, as SGD; with the sub-batch
  estimator, the base optimizer's rule. The injected noise belongs to no example.
- SALR: the base optimizer's rule at the step's scaled learning rate.

Never attributed to any example: weight decay applied to whole tables, injected noise,
momentum of ``torch.optim.SGD(momentum>0)`` beyond the current step, and anything done to
the weights outside the optimizer (restoring an early-stopping checkpoint leaves later
epochs' updates in the log: the callback warns).

Two storages (`RollbackCallback(mode=...)`):

- exact (`RollbackLog`): one preallocated tensor on the model's device, example-major
  ``[n, K, 2d+2]`` (``d = D/K``; `RollbackLog.data` is its ``[K, n, 2d+2]`` view), so that a
  kernel visit read-modify-writes one contiguous stretch. Every step path can write it.
  Accumulation is float32; `compact` casts to float16 for storage (half the bytes). On the
  compiled kernel the visit's 1 KB read-modify-write (D=128) lands at a random place of a log
  far larger than the cache (prefetched a few visits ahead): measured about 2x the training
  time of an unlogged fit.
- compact (`CompactRollbackLog`, the default on the compiled-kernel path): the kernel adds
  only ``lr·e`` per block to a small per-example accumulator, and the log keeps
  snapshots of the tables at a few knots (after passes 0, 1, 2, 4, 8, … and at the end);
  Δ_z is reconstructed on demand for the examples an explanation needs, with the rows the
  error multiplies interpolated between knots. Approximate (about 2% relative error on the
  factor updates on MovieLens-100K, measured against the exact log by
  ``benchmarks/rollback_faithfulness.py``), about 1.1x the training time of an unlogged fit,
  a quarter of the exact log's bytes. Updates after training (online) are logged exactly
  into an overlay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recsys.models.base import RatingModel
from recsys.optim.capture import LookupGradients
from recsys.optim.credit import ATTRIBUTION, batch_passes, credit
from recsys.ratings import Ratings

SLOTS: tuple[tuple[str, str], ...] = (
    ("user_factors", "user"), ("user_bias", "user"), ("item_factors", "item"), ("item_bias", "item"),
)

#: How each optimizer's updates are split among examples (saved with the log, shown by explain).


class RollbackLog:
    """Exact per-example accumulated updates of an MF model (see the module docstring).

    Storage: one tensor, example-major ``[n, K, 2d+2]`` (``K`` blocks, ``n`` examples, block
    size ``d``) so that the compiled kernel's visit writes one contiguous stretch; `data` is
    its ``[K, n, 2d+2]`` view, ``data[b, z] = [Δp_u (d) | Δq_i (d) | Δb_u | Δb_i]`` for block
    ``b`` of example ``z``, in parameter units (the same units as the weights they were added
    to). The properties `user_factors`, `item_factors` (``[K, n, d]``), `user_bias`,
    `item_bias` (``[K, n]``) are views of it. ``optimizer`` names the optimizer whose updates
    were logged.
    """

    mode = "exact"

    def __init__(self, n_examples: int, n_blocks: int, block_size: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 optimizer: str = "sgd") -> None:
        if n_examples < 0 or n_blocks < 1 or block_size < 1:
            raise ValueError("RollbackLog needs n_examples >= 0, n_blocks >= 1 and block_size >= 1")
        self._store = torch.zeros(n_examples, n_blocks, 2 * block_size + 2, dtype=dtype, device=device)
        self.optimizer = optimizer

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, model: RatingModel, n_examples: int, *, optimizer: str = "sgd",
                  dtype: torch.dtype = torch.float32) -> RollbackLog:
        """An empty log for ``model`` (MF: ``n_blocks``, ``block_size``) on its device."""
        _check_mf(model)
        return cls(n_examples, model.config.n_blocks, model.block_size, dtype=dtype,
                   device=model.device, optimizer=optimizer)

    @property
    def data(self) -> torch.Tensor:
        """The log as a ``[K, n, 2d+2]`` view (writes go to the log)."""
        return self._store.permute(1, 0, 2)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self._store = value.permute(1, 0, 2).contiguous()

    @property
    def n_examples(self) -> int:
        return self._store.shape[0]

    @property
    def n_blocks(self) -> int:
        return self._store.shape[1]

    @property
    def block_size(self) -> int:
        return (self._store.shape[2] - 2) // 2

    @property
    def dtype(self) -> torch.dtype:
        return self._store.dtype

    @property
    def user_factors(self) -> torch.Tensor:
        """``[K, n, d]`` view: each example's accumulated update of its user's factors."""
        return self.data[:, :, : self.block_size]

    @property
    def item_factors(self) -> torch.Tensor:
        return self.data[:, :, self.block_size: 2 * self.block_size]

    @property
    def user_bias(self) -> torch.Tensor:
        """``[K, n]`` view: each example's accumulated update of its user's bias slots."""
        return self.data[:, :, 2 * self.block_size]

    @property
    def item_bias(self) -> torch.Tensor:
        return self.data[:, :, 2 * self.block_size + 1]

    @property
    def attribution(self) -> str:
        return ATTRIBUTION.get(self.optimizer, "approximate: gradient through the optimizer's preconditioner")

    @property
    def nbytes(self) -> int:
        return int(self._store.numel() * self._store.element_size())

    @property
    def bytes_per_example(self) -> float:
        return self.nbytes / max(1, self.n_examples)

    def __repr__(self) -> str:
        return (f"RollbackLog(n_examples={self.n_examples}, n_blocks={self.n_blocks}, "
                f"block_size={self.block_size}, dtype={self.dtype}, optimizer={self.optimizer!r})")

    # ------------------------------------------------------------------ writing
    def kernel_array(self, model: RatingModel) -> np.ndarray:
        """The log as a writable float32 numpy view ``[n, K, 2d+2]`` for the compiled kernel."""
        if self.dtype != torch.float32 or self._store.device.type != "cpu":
            raise ValueError("the compiled kernel logs into a float32 CPU log; compact() only after training")
        if (self.n_blocks, self.block_size) != (model.config.n_blocks, model.block_size):
            raise ValueError(f"log shaped for {self.n_blocks} blocks of {self.block_size}, model has "
                             f"{model.config.n_blocks} of {model.block_size}")
        return self._store.numpy()

    def record(self, model: RatingModel, users: np.ndarray, items: np.ndarray, values: np.ndarray,
               example_ids: np.ndarray, tables: tuple, *, hogwild_threads: int = 0) -> None:
        """Run the compiled SGD kernel (``tables``: `MatrixFactorization.sgd_examples`'s
        arguments after the examples) over the visits ``users/items/values`` of examples
        ``example_ids``, adding every visit's updates to its example's row."""
        from recsys.models.mf.log_kernels import sgd_examples_hogwild_logged, sgd_examples_logged

        log = self.kernel_array(model)
        ids = np.ascontiguousarray(example_ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_examples):
            raise ValueError(f"example ids outside the log's {self.n_examples} rows")
        kernel = sgd_examples_hogwild_logged if hogwild_threads > 1 else sgd_examples_logged
        kernel(users, items, values, ids, *tables, log)

    @torch.no_grad()
    def add(self, example_ids: torch.Tensor | np.ndarray, user_factors: torch.Tensor,
            user_bias: torch.Tensor, item_factors: torch.Tensor, item_bias: torch.Tensor) -> None:
        """Add per-example updates: ``example_ids [B]``; factors ``[B, D]``, biases ``[B, K]``
        (parameter units). Repeated ids accumulate."""
        ids = torch.as_tensor(example_ids, device=self._store.device)
        self._store.index_add_(0, ids, _stack_rows(self.n_blocks, self.block_size, user_factors, user_bias,
                                                   item_factors, item_bias).to(self.dtype))

    def extend(self, n_new: int) -> RollbackLog:
        """Append ``n_new`` zero rows (for ratings appended to the training `Ratings`), in
        place; returns self."""
        if n_new < 0:
            raise ValueError(f"extend needs n_new >= 0, got {n_new}")
        pad = torch.zeros((n_new, *self._store.shape[1:]), dtype=self.dtype, device=self._store.device)
        self._store = torch.cat([self._store, pad], dim=0)
        return self

    def compact(self, dtype: torch.dtype = torch.float16) -> RollbackLog:
        """Cast the log to ``dtype`` in place (float16 halves the bytes); returns self."""
        self._store = self._store.to(dtype).contiguous()
        return self

    def close(self) -> RollbackLog:
        """Nothing to finish for the exact log (the compact log takes its last snapshot)."""
        return self

    @torch.no_grad()
    def merge(self, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Data-parallel training: sum the ranks' logs into this one, in place (``all_sum``:
        a SUM all-reduce, e.g. `recsys.distributed.DataParallel.all_sum`). Each rank logged
        only its shards' examples, so the logs are disjoint by example and the sum is the
        single-process log (up to rounding). Summed in float32 whatever the storage dtype."""
        dtype = self.dtype
        self.data = all_sum(self.data.float()).to(dtype)

    # ------------------------------------------------------------------ reading
    def rows(self, example_ids: np.ndarray) -> np.ndarray:
        """float64 numpy copy ``[K, m, 2d+2]`` of the log rows of ``example_ids [m]``."""
        ids = torch.as_tensor(np.asarray(example_ids, dtype=np.int64), device=self._store.device)
        return self._store.index_select(0, ids).permute(1, 0, 2).cpu().numpy().astype(np.float64)

    def projected(self, example_ids: np.ndarray, shares_user: np.ndarray, shares_item: np.ndarray,
                  user: int, item: int, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, ...]:
        """For the prediction ``(user, item)`` with factors ``p, q [K, d]``: ``(Δp_z·q, p·Δq_z,
        Δb_u,z, Δb_i,z)``, each ``float64 [K, m]``, for the candidates ``example_ids [m]``.
        (The exact log computes every term; the compact log only those of the row each
        candidate shares: the others are zero.)"""
        rows = self.rows(example_ids)
        d = self.block_size
        return (np.einsum("kmd,kd->km", rows[..., :d], q), np.einsum("kd,kmd->km", p, rows[..., d:2 * d]),
                rows[..., 2 * d], rows[..., 2 * d + 1])

    def row_sums(self, train: Ratings, n_users: int, n_items: int) -> dict[str, torch.Tensor]:
        """The log summed per parameter row: ``user_factors [n_users, D]``, ``user_bias
        [n_users, K]`` etc. For plain SGD this equals each row's total change over training
        (the completeness check)."""
        users = torch.as_tensor(train.users[: self.n_examples], device=self._store.device)
        items = torch.as_tensor(train.items[: self.n_examples], device=self._store.device)
        out = {}
        for name, side in SLOTS:
            t = getattr(self, name).float()
            index, n = (users, n_users) if side == "user" else (items, n_items)
            flat = t.permute(1, 0, 2).reshape(t.shape[1], -1) if t.dim() == 3 else t.T
            out[name] = torch.zeros(n, flat.shape[1], device=t.device).index_add_(0, index, flat)
        return out

    def to_exact(self) -> RollbackLog:
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the log as safetensors (one tensor ``updates [K, n, 2d+2]``; optimizer name
        as metadata)."""
        save_file({"updates": self.data.detach().cpu().contiguous()}, str(path),
                  metadata={"format": "recsys-rollback-1", "optimizer": self.optimizer})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> RollbackLog | CompactRollbackLog:
        """Read a log written by `save` (exact) or `CompactRollbackLog.save`; ValueError when
        the file is not one."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") == CompactRollbackLog.FORMAT:
            return CompactRollbackLog.load(path)
        if meta.get("format") != "recsys-rollback-1":
            raise ValueError(f"{path}: not a recsys rollback log")
        data = load_file(str(path), device=str(device)).get("updates")
        if data is None or data.dim() != 3 or data.shape[2] < 4 or data.shape[2] % 2:
            raise ValueError(f"{path}: rollback log lacks an [blocks, examples, 2d+2] 'updates' tensor")
        log = cls(0, data.shape[0], (data.shape[2] - 2) // 2, dtype=data.dtype, device=device,
                  optimizer=meta.get("optimizer", "sgd"))
        log.data = data
        return log


class CompactRollbackLog:
    """The gradient-rollback log of the compiled SGD kernel, stored compactly and expanded
    lazily: Δ_z is reconstructed for the examples an explanation asks about.

    A batch-1 SGD visit ``t`` of example ``z = (u, i)`` at learning rate ``lr_t`` moves
    ``p_u`` by ``lr_t (e_{z,t} q_i(t) − reg_u p_u(t))`` (per block; the same for ``q_i``, and
    ``lr_b,t (e_{z,t} − reg_b b(t))`` for the bias slots). Everything in it but the error
    ``e`` is a row of the tables at the time of the visit. So, while training, the kernel adds
    only ``lr_t·e_{z,t}`` (``K`` numbers) and ``lr_t`` to ``z``'s row of an accumulator, and
    the log keeps snapshots of the tables at *knots*: the start, after passes 1, 2, 4, 8, …
    and at the end. Between two knots a row is taken to move linearly; the accumulator of
    each segment between knots is split between its two knots by the segment's
    learning-rate-weighted mean position ``ᾱ``, giving per example and knot ``j`` the
    coefficients ``c_{z,j} = Σ_t lr_t e_{z,t} h_j(t)`` and ``v_{z,j} = Σ_t lr_t h_j(t)``; then

        Δp_z ≈ Σ_j c_{z,j} Q_j[i] − reg_u Σ_j v_{z,j} P_j[u]      (per block)
        Δb_u,z ≈ ρ (Σ_j c_{z,j} − breg_u Σ_j v_{z,j} BU_j[u])      (ρ = bias lr / lr)

    and symmetrically for ``q_i`` and ``b_i``. ``Σ_j c_{z,j} = Σ_t lr_t e_{z,t}`` exactly, so
    only the rows the errors multiply are approximated. Measured against the exact log on
    MovieLens-100K u1 (``benchmarks/rollback_faithfulness.py``): about 2% relative error on the
    factor updates, 0.03% on the bias updates, 0.3% on the rollback effects.

    Training cost: one read-modify-write of ``K`` floats per visit (prefetched; the visit
    weights ``Σ lr`` are one number per segment while every epoch visits each example once)
    and a copy of the tables per knot; storage ``(S·(K+1))`` floats per example for ``S`` segments plus
    ``S + 1`` table snapshots (about a quarter of the exact log at D=128).

    After `close` (the end of training), further updates (``online_sgd``, `add`) are logged
    exactly into a sparse overlay: rows for the examples they touch, added to the
    reconstruction. CPU only.
    """

    mode = "compact"
    FORMAT = "recsys-rollback-compact-1"

    def __init__(self, users: np.ndarray, items: np.ndarray, n_blocks: int, block_size: int, *,
                 optimizer: str = "sgd", planned_passes: float | None = None) -> None:
        if n_blocks < 1 or block_size < 1 or len(users) != len(items):
            raise ValueError("CompactRollbackLog needs n_blocks >= 1, block_size >= 1 and one item per user")
        self.users = np.ascontiguousarray(users, dtype=np.int32)
        self.items = np.ascontiguousarray(items, dtype=np.int32)
        self.n_base = len(self.users)
        self._n = self.n_base
        self._k, self._d = n_blocks, block_size
        self.optimizer = optimizer
        self.planned_passes = planned_passes
        self.knot_passes: list[float] = []
        self.knots: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # (P, Q, BU, BI)
        self.segments: list[np.ndarray] = []  # [n_base, K+1] per closed segment
        self.alpha: list[float] = []
        self.regs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.bias_ratio: float | None = None
        self.closed = False
        self.overlay_ids = np.empty(0, dtype=np.int64)
        self.overlay = np.zeros((0, n_blocks, 2 * block_size + 2), dtype=np.float32)
        #: over-allocated ``(ids, rows)`` behind ``overlay_ids`` / ``overlay`` while online
        #: examples arrive in order (each ingestion appends, amortised O(its rows))
        self._overlay_room: tuple[np.ndarray, np.ndarray] | None = None
        self._np_dtype = np.dtype(np.float32)
        self._acc: np.ndarray | None = None
        self._v: np.ndarray | None = None  # per-example Σ lr of the open segment, when calls repeat examples
        self._v_all = 0.0  # Σ lr of the open segment's calls that visited every example once
        self._seg_w = self._seg_wt = 0.0
        self._visits = 0
        self._live: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._stacked: tuple[np.ndarray, ...] | None = None
        self._alpha_cache: np.ndarray | None = None

    @classmethod
    def for_model(cls, model: RatingModel, train: Ratings, *, optimizer: str = "sgd",
                  planned_passes: float | None = None) -> CompactRollbackLog:
        """An empty compact log for ``model`` trained on ``train``; ``planned_passes``: the
        number of epochs (the last knot is taken when they are done)."""
        _check_mf(model)
        return cls(train.users, train.items, model.config.n_blocks, model.block_size, optimizer=optimizer,
                   planned_passes=planned_passes)

    # ------------------------------------------------------------------ shape and size
    @property
    def n_examples(self) -> int:
        return self._n

    @property
    def n_blocks(self) -> int:
        return self._k

    @property
    def block_size(self) -> int:
        return self._d

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self._np_dtype]

    @property
    def n_knots(self) -> int:
        return len(self.knots)

    @property
    def attribution(self) -> str:
        return ("sgd, compact log: -lr*grad per visit with the rows it multiplies interpolated between "
                "table snapshots (about 2% error on the factor updates, measured)")

    @property
    def nbytes(self) -> int:
        arrays = [self.users, self.items, self.overlay_ids, self.overlay, *self.segments,
                  *(t for knot in self.knots for t in knot), *(self.regs or ())]
        arrays += [a for a in (self._acc, self._v) if a is not None]
        return int(sum(a.nbytes for a in arrays))

    @property
    def bytes_per_example(self) -> float:
        return self.nbytes / max(1, self.n_examples)

    def __repr__(self) -> str:
        return (f"CompactRollbackLog(n_examples={self.n_examples}, n_blocks={self.n_blocks}, "
                f"block_size={self.block_size}, knots={self.knot_passes}, dtype={self.dtype}, "
                f"overlay={len(self.overlay_ids)}, optimizer={self.optimizer!r})")

    # ------------------------------------------------------------------ writing
    def record(self, model: RatingModel, users: np.ndarray, items: np.ndarray, values: np.ndarray,
               example_ids: np.ndarray, tables: tuple, *, hogwild_threads: int = 0) -> None:
        """Run the compiled SGD kernel over the visits (see `RollbackLog.record`), logging
        compactly while training and exactly into the overlay after `close`."""
        from recsys.models.mf.log_kernels import (
            is_permutation,
            sgd_examples_compact_logged,
            sgd_examples_hogwild_compact_logged,
        )

        if (self.n_blocks, self.block_size) != (model.config.n_blocks, model.block_size):
            raise ValueError(f"log shaped for {self.n_blocks} blocks of {self.block_size}, model has "
                             f"{model.config.n_blocks} of {model.block_size}")
        ids = np.ascontiguousarray(example_ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_examples):
            raise ValueError(f"example ids outside the log's {self.n_examples} rows; call extend first")
        if self.closed:
            self._record_overlay(users, items, values, ids, tables, hogwild_threads)
            return
        if len(ids) and ids.max() >= self.n_base:
            raise ValueError("the compact log records the examples it was created for; close() it first")
        if self._np_dtype != np.float32:
            raise ValueError("the compact log records in float32; compact() only after training")
        P, Q, BU, BI, _mu, lr, lr_b, reg_u, reg_i, bias_reg_u, bias_reg_i, _sq = tables
        ratio = float(lr_b) / float(lr)
        if self.bias_ratio is None:
            self.bias_ratio = ratio
        elif abs(ratio - self.bias_ratio) > 1e-6 * abs(self.bias_ratio):
            raise ValueError("the compact log needs one bias/factor learning-rate ratio for the whole run; "
                             "use RollbackCallback(mode='exact')")
        self._live = (P, Q, BU, BI)
        if not self.knots:
            self.regs = tuple(np.array(r, dtype=np.float32) for r in (reg_u, reg_i, bias_reg_u, bias_reg_i))
            self._knot()
        if self._acc is None:
            self._acc = np.zeros((self.n_base, self.n_blocks), dtype=np.float32)
            self._v, self._v_all = None, 0.0
            self._seg_w = self._seg_wt = 0.0
        kernel = sgd_examples_hogwild_compact_logged if hogwild_threads > 1 else sgd_examples_compact_logged
        kernel(users, items, values, ids, *tables, self._acc)
        # the visit weights Σ lr: one number while every call is an epoch visiting each example once
        if is_permutation(ids, self.n_base):
            self._v_all += float(lr)
        else:
            if self._v is None:
                self._v = np.zeros(self.n_base, dtype=np.float64)
            np.add.at(self._v, ids, float(lr))
        n = max(1, self.n_base)
        w = float(lr) * len(ids)
        self._seg_w += w
        self._seg_wt += w * (self._visits + len(ids) / 2) / n
        self._visits += len(ids)
        done = self._visits / n
        if self.planned_passes is not None and done >= self.planned_passes - 1e-9:
            self.close()
        elif done >= self._next_knot() - 1e-9:
            self._close_segment()

    def _next_knot(self) -> float:
        last, nxt = self.knot_passes[-1], 1.0
        while nxt <= last + 1e-9:
            nxt *= 2
        return nxt if self.planned_passes is None else min(nxt, float(self.planned_passes))

    def _knot(self) -> None:
        assert self._live is not None
        self.knots.append(tuple(np.array(t, dtype=np.float32) for t in self._live))
        self.knot_passes.append(self._visits / max(1, self.n_base))
        self._stacked = None

    def _close_segment(self) -> None:
        if self._acc is None:
            return
        tau_a = self.knot_passes[-1]
        self._knot()
        tau_b = self.knot_passes[-1]
        mean_t = self._seg_wt / self._seg_w if self._seg_w > 0 else 0.5 * (tau_a + tau_b)
        self.alpha.append(float(np.clip((mean_t - tau_a) / (tau_b - tau_a), 0.0, 1.0)) if tau_b > tau_a else 0.5)
        segment = np.empty((self.n_base, self.n_blocks + 1), dtype=np.float32)
        segment[:, :-1] = self._acc
        segment[:, -1] = self._v_all if self._v is None else self._v + self._v_all
        self.segments.append(segment)
        self._acc = self._v = None

    def close(self) -> CompactRollbackLog:
        """End the compact part (training): snapshot the tables as the last knot. Later
        updates go to the exact overlay. Called by `RollbackCallback` at the end of training
        (and lazily by the readers); returns self."""
        if not self.closed:
            self._close_segment()
            self.closed = True
            self._live = None
        return self

    def _overlay_positions(self, ids: np.ndarray) -> np.ndarray:
        """The overlay rows of example ``ids``, adding zero rows for ids not there yet."""
        unique = np.unique(ids)
        m = len(self.overlay_ids)
        pos = np.minimum(np.searchsorted(self.overlay_ids, unique), max(m - 1, 0))
        new = unique[~(self.overlay_ids[pos] == unique)] if m else unique
        if len(new) and (m == 0 or new[0] > self.overlay_ids[-1]):
            self._append_overlay(new)  # online examples arrive in order: append
        elif len(new):
            merged = np.union1d(self.overlay_ids, new)
            grown = np.zeros((len(merged), *self.overlay.shape[1:]), dtype=np.float32)
            grown[np.searchsorted(merged, self.overlay_ids)] = self.overlay
            self.overlay_ids, self.overlay, self._overlay_room = merged, grown, None
        return np.searchsorted(self.overlay_ids, ids)

    def _append_overlay(self, new: np.ndarray) -> None:
        """Append zero rows for the sorted ids ``new`` (all past the last overlay id), growing
        the backing arrays geometrically."""
        m, total = len(self.overlay_ids), len(self.overlay_ids) + len(new)
        room = self._overlay_room
        if room is None or len(room[0]) < total or self.overlay.base is not room[1]:
            cap = max(2 * total, 1024)
            room = (np.empty(cap, dtype=np.int64), np.zeros((cap, *self.overlay.shape[1:]), dtype=np.float32))
            room[0][:m], room[1][:m] = self.overlay_ids, self.overlay
            self._overlay_room = room
        room[0][m:total], room[1][m:total] = new, 0.0
        self.overlay_ids, self.overlay = room[0][:total], room[1][:total]

    def _record_overlay(self, users: np.ndarray, items: np.ndarray, values: np.ndarray, ids: np.ndarray,
                        tables: tuple, hogwild_threads: int) -> None:
        from recsys.models.mf.log_kernels import sgd_examples_hogwild_logged, sgd_examples_logged

        pos = self._overlay_positions(ids)
        kernel = sgd_examples_hogwild_logged if hogwild_threads > 1 else sgd_examples_logged
        kernel(users, items, values, pos, *tables, self.overlay)

    @torch.no_grad()
    def add(self, example_ids: torch.Tensor | np.ndarray, user_factors: torch.Tensor,
            user_bias: torch.Tensor, item_factors: torch.Tensor, item_bias: torch.Tensor) -> None:
        """Add exact per-example updates to the overlay (after `close`; see `RollbackLog.add`)."""
        self.close()
        ids = np.asarray(torch.as_tensor(example_ids).cpu(), dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_examples):
            raise ValueError(f"example ids outside the log's {self.n_examples} rows; call extend first")
        rows = _stack_rows(self.n_blocks, self.block_size, user_factors, user_bias, item_factors, item_bias)
        pos = self._overlay_positions(ids)  # first: it may replace the overlay array
        np.add.at(self.overlay, pos, rows.float().cpu().numpy())

    def extend(self, n_new: int) -> CompactRollbackLog:
        """Cover ``n_new`` more examples (ratings appended to the training `Ratings`): their
        updates, logged after `close`, live in the overlay. In place; returns self."""
        if n_new < 0:
            raise ValueError(f"extend needs n_new >= 0, got {n_new}")
        self._n += n_new
        return self

    def merge(self, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The compact log is written by the single-process compiled kernel only."""
        raise ValueError("the compact rollback log comes from the single-process compiled kernel; "
                         "data-parallel training logs exactly (RollbackLog)")

    def compact(self, dtype: torch.dtype = torch.float16) -> CompactRollbackLog:
        """Cast the snapshots and the accumulated coefficients to ``dtype`` (float16 halves
        them; the overlay stays float32); returns self."""
        np_dtype = next((k for k, v in _TORCH_DTYPES.items() if v == dtype), None)
        if np_dtype is None:
            raise ValueError(f"the compact log stores float16, float32 or float64, not {dtype}")
        self.close()
        self.knots = [tuple(t.astype(np_dtype) for t in knot) for knot in self.knots]
        self.segments = [s.astype(np_dtype) for s in self.segments]
        self._np_dtype = np.dtype(np_dtype)
        self._stacked = None
        return self

    # ------------------------------------------------------------------ reading
    def _tables(self) -> tuple[np.ndarray, ...]:
        """Knot snapshots stacked float32 row-major over the knots, ``[rows, J, ...]``, and the
        segments ``[n, S, K+1]``, so that one example's knots are contiguous (built once, after
        `close`; a float16 log is read through float32 copies)."""
        self.close()
        if self._stacked is None:
            tables = tuple(np.stack([knot[s] for knot in self.knots], axis=1).astype(np.float32, copy=False)
                           for s in range(4))
            segments = (np.stack(self.segments, axis=1).astype(np.float32, copy=False) if self.segments
                        else np.zeros((self.n_base, 0, self.n_blocks + 1), np.float32))
            if self._np_dtype == np.float32:  # keep one copy: the lists become views of the stacks
                self.knots = [tuple(t[:, j] for t in tables) for j in range(len(self.knots))]
                self.segments = [segments[:, j] for j in range(segments.shape[1])]
            self._stacked = (*tables, segments)
        return self._stacked

    def _alpha_array(self) -> np.ndarray:
        if self._alpha_cache is None or len(self._alpha_cache) != len(self.alpha):
            self._alpha_cache = np.asarray(self.alpha, dtype=np.float64)
        return self._alpha_cache

    def _coefficients(self, ids: np.ndarray) -> np.ndarray:
        """``[J, m, K+1]`` float64: ``c_{z,j}`` per block and ``v_{z,j}`` for ``ids < n_base``."""
        out = np.zeros((len(self.segments) + 1, len(ids), self.n_blocks + 1))
        for s, (acc, a) in enumerate(zip(self.segments, self.alpha, strict=True)):
            g = acc[ids].astype(np.float64)
            out[s] += (1.0 - a) * g
            out[s + 1] += a * g
        return out

    def _overlay_hits(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(positions in ids, overlay rows)`` of the ids the overlay holds."""
        if not len(self.overlay_ids):
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.overlay_ids, ids), len(self.overlay_ids) - 1)
        hit = np.flatnonzero(self.overlay_ids[pos] == ids)
        return hit, pos[hit]

    def rows(self, example_ids: np.ndarray) -> np.ndarray:
        """float64 ``[K, m, 2d+2]``: the reconstructed updates of ``example_ids [m]`` (layout
        of `RollbackLog.rows`)."""
        ids = np.asarray(example_ids, dtype=np.int64)
        k, d = self.n_blocks, self.block_size
        out = np.zeros((k, len(ids), 2 * d + 2))
        self.close()
        base = np.flatnonzero(ids < self.n_base)
        if len(base) and self.segments:
            tables = self._tables()
            z = ids[base]
            m, n_knots = len(z), len(self.knots)
            c = self._coefficients(z)
            ce, v = c[..., :k], c[..., k]
            u, i = self.users[z], self.items[z]
            P = tables[0][u].transpose(1, 0, 2).astype(np.float64).reshape(n_knots, m, k, d)
            Q = tables[1][i].transpose(1, 0, 2).astype(np.float64).reshape(n_knots, m, k, d)
            BU = tables[2][u].transpose(1, 0, 2).astype(np.float64)
            BI = tables[3][i].transpose(1, 0, 2).astype(np.float64)
            reg_u, reg_i, breg_u, breg_i = (r.astype(np.float64) for r in self.regs)
            rho = self.bias_ratio
            sum_c = ce.sum(0)  # [m, K]
            dp = np.einsum("jmk,jmkd->mkd", ce, Q) - reg_u[u][:, None, None] * np.einsum("jm,jmkd->mkd", v, P)
            dq = np.einsum("jmk,jmkd->mkd", ce, P) - reg_i[i][:, None, None] * np.einsum("jm,jmkd->mkd", v, Q)
            dbu = rho * (sum_c - breg_u[u][:, None] * np.einsum("jm,jmk->mk", v, BU))
            dbi = rho * (sum_c - breg_i[i][:, None] * np.einsum("jm,jmk->mk", v, BI))
            out[:, base, :d] = dp.transpose(1, 0, 2)
            out[:, base, d:2 * d] = dq.transpose(1, 0, 2)
            out[:, base, 2 * d] = dbu.T
            out[:, base, 2 * d + 1] = dbi.T
        hit, rows = self._overlay_hits(ids)
        if len(hit):
            out[:, hit] += self.overlay[rows].transpose(1, 0, 2)
        return out

    def projected(self, example_ids: np.ndarray, shares_user: np.ndarray, shares_item: np.ndarray,
                  user: int, item: int, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, ...]:
        """`RollbackLog.projected`, computed only for the row each candidate shares with the
        prediction: one gather of the other side's rows per knot, no full Δ vectors."""
        ids = np.asarray(example_ids, dtype=np.int64)
        k, d = self.n_blocks, self.block_size
        terms = [np.zeros((k, len(ids))) for _ in range(4)]  # Δp·q, p·Δq, Δb_u, Δb_i
        self.close()
        if self.segments:
            from recsys.models.mf.log_kernels import compact_projection

            *tables, segments = self._tables()
            base = ids < self.n_base
            sel_u = np.flatnonzero(np.asarray(shares_user, dtype=bool) & base)
            sel_i = np.flatnonzero(np.asarray(shares_item, dtype=bool) & base)
            z = np.concatenate([ids[sel_u], ids[sel_i]])
            other_rows = np.concatenate([self.items[ids[sel_u]], self.users[ids[sel_i]]]).astype(np.int64)
            side = np.zeros(len(z), dtype=np.bool_)
            side[len(sel_u):] = True
            p32 = np.ascontiguousarray(p, dtype=np.float32)
            q32 = np.ascontiguousarray(q, dtype=np.float32)
            n_knots = len(self.knots)
            own_p = tables[0][user].reshape(n_knots, k, d).astype(np.float64)
            own_q = tables[1][item].reshape(n_knots, k, d).astype(np.float64)
            own_dot = np.stack([np.einsum("jkd,kd->jk", own_p, q32), np.einsum("jkd,kd->jk", own_q, p32)])
            own_bias = np.stack([tables[2][user], tables[3][item]]).astype(np.float64)
            reg_u, reg_i, breg_u, breg_i = self.regs
            own_reg = np.array([[reg_u[user], breg_u[user]], [reg_i[item], breg_i[item]]], dtype=np.float64)
            dots, biases = np.empty((k, len(z))), np.empty((k, len(z)))
            compact_projection(z, other_rows, side, tables[0], tables[1], p32, q32, own_dot, own_bias, own_reg,
                               segments, self._alpha_array(), float(self.bias_ratio), dots, biases)
            n_u = len(sel_u)
            terms[0][:, sel_u], terms[2][:, sel_u] = dots[:, :n_u], biases[:, :n_u]
            terms[1][:, sel_i], terms[3][:, sel_i] = dots[:, n_u:], biases[:, n_u:]
        hit, rows = self._overlay_hits(ids)
        if len(hit):
            extra = self.overlay[rows].astype(np.float64)  # [h, K, 2d+2]
            terms[0][:, hit] += np.einsum("hkd,kd->kh", extra[..., :d], q)
            terms[1][:, hit] += np.einsum("kd,hkd->kh", p, extra[..., d:2 * d])
            terms[2][:, hit] += extra[..., 2 * d].T
            terms[3][:, hit] += extra[..., 2 * d + 1].T
        return tuple(terms)

    def row_sums(self, train: Ratings, n_users: int, n_items: int, chunk: int = 4096) -> dict[str, torch.Tensor]:
        """`RollbackLog.row_sums` of the reconstruction (for plain SGD: each row's total change
        over training, up to the reconstruction's error)."""
        k, d = self.n_blocks, self.block_size
        out = {"user_factors": np.zeros((n_users, k * d)), "user_bias": np.zeros((n_users, k)),
               "item_factors": np.zeros((n_items, k * d)), "item_bias": np.zeros((n_items, k))}
        for lo in range(0, self.n_examples, chunk):
            ids = np.arange(lo, min(self.n_examples, lo + chunk))
            r = self.rows(ids).transpose(1, 0, 2)  # [m, K, 2d+2]
            u, i = train.users[ids], train.items[ids]
            np.add.at(out["user_factors"], u, r[..., :d].reshape(len(ids), -1))
            np.add.at(out["item_factors"], i, r[..., d:2 * d].reshape(len(ids), -1))
            np.add.at(out["user_bias"], u, r[..., 2 * d])
            np.add.at(out["item_bias"], i, r[..., 2 * d + 1])
        return {name: torch.from_numpy(v).float() for name, v in out.items()}

    def to_exact(self, chunk: int = 4096) -> RollbackLog:
        """The fully expanded log (an exact-format `RollbackLog` holding the reconstruction)."""
        log = RollbackLog(self.n_examples, self.n_blocks, self.block_size, optimizer=self.optimizer)
        for lo in range(0, self.n_examples, chunk):
            ids = np.arange(lo, min(self.n_examples, lo + chunk))
            log.data[:, lo:lo + len(ids)] = torch.from_numpy(self.rows(ids)).float()
        return log

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the log as safetensors (closing it first)."""
        self.close()
        tables = tuple(np.stack([knot[s] for knot in self.knots]) for s in range(4)) if self.knots else tuple(
            np.zeros((0, 0, w), np.float32) for w in (self.n_blocks * self.block_size,) * 2 + (self.n_blocks,) * 2)
        segments = (np.stack(self.segments) if self.segments
                    else np.zeros((0, self.n_base, self.n_blocks + 1), dtype=self._np_dtype))
        regs = self.regs or tuple(np.zeros(0, np.float32) for _ in range(4))
        arrays = {"users": self.users, "items": self.items, "segments": segments,
                  "alpha": np.asarray(self.alpha, dtype=np.float64),
                  "knot_passes": np.asarray(self.knot_passes, dtype=np.float64),
                  "overlay_ids": self.overlay_ids, "overlay": self.overlay}
        arrays.update({f"knots_{name}": t for (name, _), t in zip(SLOTS_ORDERED, tables, strict=True)})
        arrays.update({name: r for name, r in zip(_REG_NAMES, regs, strict=True)})
        meta = {"format": self.FORMAT, "optimizer": self.optimizer, "n_examples": str(self.n_examples),
                "n_blocks": str(self.n_blocks), "block_size": str(self.block_size),
                "bias_ratio": repr(self.bias_ratio if self.bias_ratio is not None else 1.0),
                "planned_passes": repr(self.planned_passes)}
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> CompactRollbackLog:
        """Read a log written by `save`; ValueError when the file is not one."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != cls.FORMAT:
            raise ValueError(f"{path}: not a recsys compact rollback log")
        t = {k: v.numpy() for k, v in load_file(str(path)).items()}
        try:
            planned = None if meta.get("planned_passes", "None") == "None" else float(meta["planned_passes"])
            log = cls(t["users"], t["items"], int(meta["n_blocks"]), int(meta["block_size"]),
                      optimizer=meta.get("optimizer", "sgd"), planned_passes=planned)
            log._n = int(meta["n_examples"])
            log.bias_ratio = float(meta["bias_ratio"])
            log.knot_passes = [float(x) for x in t["knot_passes"]]
            log.alpha = [float(x) for x in t["alpha"]]
            log.segments = list(t["segments"])
            stacked = tuple(t[f"knots_{name}"] for name, _ in SLOTS_ORDERED)
            log.knots = [tuple(s[j] for s in stacked) for j in range(len(log.knot_passes))]
            log.regs = tuple(t[name] for name in _REG_NAMES) if log.knots else None
            log.overlay_ids, log.overlay = t["overlay_ids"].astype(np.int64), t["overlay"].astype(np.float32)
            log._np_dtype = np.dtype(t["segments"].dtype)
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"{path}: malformed compact rollback log ({exc})") from None
        if len(log.segments) != len(log.alpha) or (log.knots and len(log.knots) != len(log.segments) + 1):
            raise ValueError(f"{path}: malformed compact rollback log (knots and segments disagree)")
        log.closed = True
        return log


#: Snapshot tables in storage order (P, Q, BU, BI) and the regularisation buffers saved.
SLOTS_ORDERED: tuple[tuple[str, str], ...] = (
    ("user_factors", "user"), ("item_factors", "item"), ("user_bias", "user"), ("item_bias", "item"),
)
_REG_NAMES = ("reg_user", "reg_item", "bias_reg_user", "bias_reg_item")
_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}


def _check_mf(model: RatingModel) -> None:
    if not all(hasattr(model, name) for name, _ in SLOTS) or not hasattr(model, "block_size"):
        raise TypeError(f"gradient rollback logs MF-style models (user/item factors and biases); "
                        f"got {type(model).__name__}")


def _stack_rows(k: int, d: int, user_factors: torch.Tensor, user_bias: torch.Tensor, item_factors: torch.Tensor,
                item_bias: torch.Tensor) -> torch.Tensor:
    """Per-example updates as log rows ``[B, K, 2d+2]``."""
    return torch.cat([user_factors.detach().reshape(-1, k, d), item_factors.detach().reshape(-1, k, d),
                      user_bias.detach().reshape(-1, k, 1), item_bias.detach().reshape(-1, k, 1)], dim=2)

class AutogradRecorder:
    """Fills an exact `RollbackLog` of an MF model on the trainer's autograd step (an
    `recsys.models.base.UpdateRecorder`, made by `MatrixFactorization.update_recorder`).

    Hooks the model's embedding lookups and keeps the gradient of every gathered row (row
    ``b`` of ``d loss / d gathered`` is example ``b``'s share, even when a user appears twice
    in the batch); after the optimizer step, `record` credits each example that gradient
    passed through the step's preconditioner and optimizer (`recsys.optim.credit.credit`;
    see the module docstring for the rules).
    """

    def __init__(self, model: RatingModel, log: RollbackLog) -> None:
        _check_mf(model)
        self.model, self.log = model, log
        self.lookups = LookupGradients((name, getattr(model, name)) for name, _ in SLOTS)
        self.paused = self.lookups.paused

    @torch.no_grad()
    def record(self, example_ids: np.ndarray, optimizer: object, preconditioner: object) -> None:
        """Credit the step just taken to its examples ``example_ids [B]`` (the batch, in the
        order its lookups saw them)."""
        ids = torch.as_tensor(example_ids, device=self.log.user_factors.device)
        updates = []
        for name, _ in SLOTS:
            captured = self.lookups.captured[name]
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
            if sum(len(idx) for idx, _ in passes) != len(ids):
                raise RuntimeError(f"rollback: {name} lookups do not follow the batch's examples")
            rows, grad = batch_passes(passes, len(ids))  # each sub-batch by its share of the batch
            updates.append(-credit(optimizer, preconditioner, name, getattr(self.model, name).weight, rows, grad))
            captured.clear()
        self.log.add(ids, *updates)

    def remove(self) -> None:
        self.lookups.remove()


def append_ratings(train: Ratings, new: Ratings) -> tuple[Ratings, np.ndarray]:
    """``train`` with the ratings of ``new`` (same id maps) appended as new examples
    (`Ratings.append`); returns the combined `Ratings` and the new example ids ``int64
    [len(new)]``. Existing example ids keep their meaning, so a log only needs `RollbackLog.extend`."""
    if new.user_ids is not train.user_ids and new.user_ids != train.user_ids:
        raise ValueError("new ratings must share the training ratings' id maps")
    if new.item_ids is not train.item_ids and new.item_ids != train.item_ids:
        raise ValueError("new ratings must share the training ratings' id maps")
    combined = train.append(new)
    return combined, np.arange(len(train), len(combined), dtype=np.int64)


def online_sgd(model: RatingModel, log: RollbackLog | CompactRollbackLog | None, train: Ratings,
               example_ids: Sequence[int] | np.ndarray, learning_rate: float, *, epochs: int = 1, seed: int = 0,
               shuffle: bool = True) -> float:
    """Online update: incremental SGD over ``example_ids`` (rows of ``train``, e.g. ratings just
    appended with `Ratings.append`) for ``epochs`` passes, each in a seeded random order
    (``shuffle=False``: in the order given, e.g. arrival order), logging every update into
    ``log`` when there is one (grown with `extend` to cover the ids first). Returns the last
    pass's mean squared block error. The users and items must already have rows in the model.

    On the CPU each pass is the compiled per-example kernel (`sgd_examples`); on other devices
    one closed-form step over the pass's examples (`sgd_batch`, logged per example). This is
    the online learning of `MatrixFactorization.learn` (the serving path)."""
    ids = np.asarray(example_ids, dtype=np.int64)
    if log is not None and len(ids) and (ids.min() < 0 or ids.max() >= log.n_examples):
        raise ValueError(f"example ids outside the log's {log.n_examples} rows; call log.extend first")
    if len(ids) and (ids.min() < 0 or ids.max() >= len(train)):
        raise ValueError("example ids outside the training ratings")
    if log is not None and log.dtype != torch.float32:
        log.compact(torch.float32)
    u, i = train.users[ids], train.items[ids]
    if len(ids) and ((u >= model.n_users).any() or (i >= model.n_items).any()):
        raise ValueError("online_sgd: a rating's user or item has no row in the model")
    with torch.no_grad():
        model.known_users[torch.from_numpy(u).to(model.device)] = True
        model.known_items[torch.from_numpy(i).to(model.device)] = True
    rng = np.random.default_rng(seed)
    loss = 0.0
    for _ in range(epochs):
        order = ids[rng.permutation(len(ids))] if shuffle else ids
        if model.device.type == "cpu":
            loss = model.sgd_examples(train, order, learning_rate, log=log)
        else:
            idx = torch.from_numpy(order).to(model.device)
            users, items, values = (torch.from_numpy(a[order]).to(model.device)
                                    for a in (train.users, train.items, train.values))
            loss = model.sgd_batch(users, items, values, learning_rate, log=log,
                                   example_ids=None if log is None else idx)
    return loss

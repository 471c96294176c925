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
  only ``lr·ē`` (the block-mean error) and ``lr`` to a two-column per-example accumulator,
  and the log keeps int8 snapshots of the tables at a few knots (after passes 0, 1, 2, 4,
  8, … and at the end); per segment between knots an example keeps one float16. Δ_z is
  reconstructed on demand for the examples an explanation needs, with the rows the error
  multiplies and the blocks' deviations from the mean error interpolated between knots.
  Approximate (errors against the exact log and bytes per rating at 10^7 ratings measured
  by ``benchmarks/rollback_log_size.py``). Updates after training (online) are logged
  exactly into an overlay.
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
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             examples: Ratings | None = None) -> RollbackLog | CompactRollbackLog:
        """Read a log written by `save` (exact) or `CompactRollbackLog.save`; ``examples``:
        the training ratings, for a compact log saved without them (inside an artefact).
        ValueError when the file is not one."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if str(meta.get("format", "")).startswith("recsys-rollback-compact-"):
            return CompactRollbackLog.load(path, examples)
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

    A batch-1 SGD visit ``t`` of example ``z = (u, i)`` at learning rate ``lr_t`` moves block
    ``b`` of ``p_u`` by ``lr_t (e_{z,t,b} q_i(t) − reg_u p_u(t))`` (the same for ``q_i``, and
    ``lr_b,t (e_{z,t,b} − reg_b b(t))`` for the bias slots). Everything in it but the errors
    ``e`` is a row of the tables at the time of the visit. So, while training, the kernel adds
    only ``lr_t·ē_{z,t}`` (the error averaged over the ``K`` blocks) and ``lr_t`` to ``z``'s
    row of a two-column accumulator, and the log keeps snapshots of the tables at *knots*:
    the start, after passes 1, 2, 4, 8, … and at the end. Between two knots a row is taken to
    move linearly; each segment between knots is split between its two knots by the
    segment's learning-rate-weighted mean position ``ᾱ``.

    Per segment ``s`` (knots ``s``, ``s+1``) an example keeps ``c̄_{z,s} = Σ_t lr_t ē_{z,t}``
    (float16) and the segment keeps ``v_s = Σ_t lr_t`` (one number while every example is
    visited equally often, else per example). A block's error differs from the mean by
    ``pred̄ − pred_b``, a function of the tables only, so it is taken from the knots:

        c_{z,s,b} ≈ c̄_{z,s} + v_s ((1−ᾱ_s) dev_{z,s,b} + ᾱ_s dev_{z,s+1,b}),
        dev_{z,j,b} = mean_b' pred_j,b'(z) − pred_j,b(z)   (block predictions at knot j)

    (exact for ``K = 1``). Spreading ``c`` and ``v`` onto the knots gives ``c_{z,j,b}``,
    ``v_{z,j}``, and then

        Δp_z ≈ Σ_j c_{z,j} Q_j[i] − reg_u Σ_j v_{z,j} P_j[u]      (per block)
        Δb_u,z ≈ ρ (Σ_j c_{z,j} − breg_u Σ_j v_{z,j} BU_j[u])      (ρ = bias lr / lr)

    and symmetrically for ``q_i`` and ``b_i``.

    Storage (format ``recsys-rollback-compact-2``): per example and segment one float16
    (``2·S`` bytes; ``S = 6`` at the default 32 epochs), the example's user and item (int32;
    left out of the file inside an artefact, whose training ratings hold them), and per knot
    the factor tables as int8 with one scale per row (``D + 2`` bytes a row, scale float16)
    and the bias tables in the log's `dtype` (float32 by default, float16 after
    ``compact(torch.float16)``). Measured errors against the exact log and the bytes per
    rating at 10^7 ratings: ``benchmarks/rollback_log_size.py``.

    Training cost: one read-modify-write of two floats per visit (prefetched) and a quantised
    copy of the tables per knot.

    After `close` (the end of training), further updates (``online_sgd``, `add`) are logged
    exactly into a sparse overlay: rows for the examples they touch, added to the
    reconstruction. CPU only.
    """

    mode = "compact"
    FORMAT = "recsys-rollback-compact-2"

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
        #: while training: one quantised snapshot per knot, ``(P int8, P scale, Q int8, Q scale, BU, BI)``;
        #: after `close` stacked knot-minor into `knot_tables`
        self._knot_list: list[tuple[np.ndarray, ...]] = []
        self.knot_tables: dict[str, np.ndarray] | None = None
        #: per closed segment: ``Σ lr·ē`` of each example, float16 ``[n_base]`` (stacked ``[n_base, S]`` after close)
        self._coef_list: list[np.ndarray] = []
        self.coefficients: np.ndarray | None = None
        #: per closed segment: ``Σ lr`` when equal for every example, else NaN and a per-example column
        self.visit_weights: list[float] = []
        self._visit_list: list[np.ndarray] = []
        self.example_visit_weights: np.ndarray | None = None  # float16 [n_base, S'] for the uneven segments
        self.alpha: list[float] = []
        self.regs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.bias_ratio: float | None = None
        self.closed = False
        self.overlay_ids = np.empty(0, dtype=np.int64)
        self.overlay = np.zeros((0, n_blocks, 2 * block_size + 2), dtype=np.float32)
        #: over-allocated ``(ids, rows)`` behind ``overlay_ids`` / ``overlay`` while online
        #: examples arrive in order (each ingestion appends, amortised O(its rows))
        self._overlay_room: tuple[np.ndarray, np.ndarray] | None = None
        self._np_dtype = np.dtype(np.float32)  # the bias snapshots' dtype
        self._acc: np.ndarray | None = None
        self._seg_w = self._seg_wt = 0.0
        self._visits = 0
        self._live: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._reading: dict[str, np.ndarray] | None = None
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
        """The dtype of the bias snapshots (the coefficients are float16 and the factor
        snapshots int8 whatever it is)."""
        return _TORCH_DTYPES[self._np_dtype]

    @property
    def n_knots(self) -> int:
        return len(self.knot_passes)

    @property
    def n_segments(self) -> int:
        return len(self.alpha)

    @property
    def attribution(self) -> str:
        return ("sgd, compact log: -lr*grad per visit, the block-mean error accumulated per segment, the rows it "
                "multiplies and the blocks' deviations interpolated between int8 table snapshots (measured "
                "against the exact log by benchmarks/rollback_log_size.py)")

    def _arrays(self) -> list[np.ndarray]:
        arrays = [self.overlay_ids, self.overlay, *self._coef_list, *self._visit_list, *(self.regs or ())]
        arrays += [t for knot in self._knot_list for t in knot]
        arrays += [a for a in (self.coefficients, self.example_visit_weights, self._acc) if a is not None]
        arrays += list((self.knot_tables or {}).values())
        return arrays

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (the examples' users and items included)."""
        return int(sum(a.nbytes for a in self._arrays()) + self.users.nbytes + self.items.nbytes)

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
        P, Q, BU, BI, _mu, lr, lr_b, reg_u, reg_i, bias_reg_u, bias_reg_i, _sq = tables
        ratio = float(lr_b) / float(lr)
        if self.bias_ratio is None:
            self.bias_ratio = ratio
        elif abs(ratio - self.bias_ratio) > 1e-6 * abs(self.bias_ratio):
            raise ValueError("the compact log needs one bias/factor learning-rate ratio for the whole run; "
                             "use RollbackCallback(mode='exact')")
        self._live = (P, Q, BU, BI)
        if not self.knot_passes:
            self.regs = tuple(np.array(r, dtype=np.float32) for r in (reg_u, reg_i, bias_reg_u, bias_reg_i))
            self._knot()
        if self._acc is None:
            self._acc = np.zeros((self.n_base, 2), dtype=np.float32)
            self._seg_w = self._seg_wt = 0.0
        kernel = sgd_examples_hogwild_compact_logged if hogwild_threads > 1 else sgd_examples_compact_logged
        kernel(users, items, values, ids, *tables, self._acc)
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
        P, Q, BU, BI = self._live
        self._knot_list.append((*_quantise_rows(P), *_quantise_rows(Q), np.array(BU, dtype=self._np_dtype),
                                np.array(BI, dtype=self._np_dtype)))
        self.knot_passes.append(self._visits / max(1, self.n_base))

    def _close_segment(self) -> None:
        if self._acc is None:
            return
        tau_a = self.knot_passes[-1]
        self._knot()
        tau_b = self.knot_passes[-1]
        mean_t = self._seg_wt / self._seg_w if self._seg_w > 0 else 0.5 * (tau_a + tau_b)
        self.alpha.append(float(np.clip((mean_t - tau_a) / (tau_b - tau_a), 0.0, 1.0)) if tau_b > tau_a else 0.5)
        self._coef_list.append(self._acc[:, 0].astype(np.float16))
        v = self._acc[:, 1]
        if len(v) and np.all(v == v[0]):  # every example visited alike (epochs of permutations)
            self.visit_weights.append(float(v[0]))
        else:
            self.visit_weights.append(float("nan"))
            self._visit_list.append(v.astype(np.float16))
        self._acc = None

    def close(self) -> CompactRollbackLog:
        """End the compact part (training): snapshot the tables as the last knot and stack
        the snapshots and coefficients for reading. Later updates go to the exact overlay.
        Called by `RollbackCallback` at the end of training (and lazily by the readers);
        returns self."""
        if not self.closed:
            self._close_segment()
            self.closed = True
            self._live = None
            self._stack()
        return self

    def _stack(self) -> None:
        """Move the per-knot snapshots into knot-minor tables (one row's knots contiguous)
        and the per-segment columns into ``[n_base, S]`` arrays, freeing each list entry
        as it is copied."""
        if self._knot_list:
            names = ("user_factors", "user_scale", "item_factors", "item_scale", "user_bias", "item_bias")
            first = self._knot_list[0]
            tables = {name: np.empty((t.shape[0], len(self._knot_list), *t.shape[1:]), dtype=t.dtype)
                      for name, t in zip(names, first, strict=True)}
            for j in range(len(self._knot_list)):
                for name, t in zip(names, self._knot_list[j], strict=True):
                    tables[name][:, j] = t
                self._knot_list[j] = ()
            self.knot_tables = tables
        self._knot_list = []
        self.coefficients = _columns(self._coef_list, self.n_base, np.float16)
        self.example_visit_weights = _columns(self._visit_list, self.n_base, np.float16)
        self._reading = None

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
        """Cast the bias snapshots to ``dtype`` (float16 halves them; the coefficients and the
        row scales stay float16, the factor snapshots int8 and the overlay float32); returns
        self."""
        np_dtype = next((k for k, v in _TORCH_DTYPES.items() if v == dtype), None)
        if np_dtype is None:
            raise ValueError(f"the compact log stores float16, float32 or float64, not {dtype}")
        self.close()
        if self.knot_tables is not None:
            for name in ("user_bias", "item_bias"):
                self.knot_tables[name] = self.knot_tables[name].astype(np_dtype)
        self._np_dtype = np.dtype(np_dtype)
        self._reading = None
        return self

    # ------------------------------------------------------------------ reading
    def _tables(self) -> dict[str, np.ndarray]:
        """The knot tables for reading: int8 factors as stored, scales and biases as float32
        (built once after `close`)."""
        self.close()
        if self._reading is None:
            t = self.knot_tables or {}
            self._reading = {name: (a if a.dtype == np.int8 else a.astype(np.float32, copy=False))
                             for name, a in t.items()}
        return self._reading

    def _alpha_array(self) -> np.ndarray:
        if self._alpha_cache is None or len(self._alpha_cache) != len(self.alpha):
            self._alpha_cache = np.asarray(self.alpha, dtype=np.float64)
        return self._alpha_cache

    def _segment_terms(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(c̄, v)``, float64 ``[m, S]`` each: the segment coefficients and visit weights of
        examples ``ids < n_base``."""
        coef = self.coefficients[ids].astype(np.float64)
        visits = np.empty_like(coef)
        uneven = 0
        for s, w in enumerate(self.visit_weights):
            if np.isnan(w):
                visits[:, s] = self.example_visit_weights[ids, uneven]
                uneven += 1
            else:
                visits[:, s] = w
        return coef, visits

    def _knot_rows(self, side: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dequantised knot rows of ``side`` (``user`` or ``item``): factors float64
        ``[m, J, K, d]`` and biases ``[m, J, K]``."""
        t = self._tables()
        f = t[f"{side}_factors"][rows].astype(np.float64) * t[f"{side}_scale"][rows][..., None]
        return f.reshape(len(rows), -1, self.n_blocks, self.block_size), t[f"{side}_bias"][rows].astype(np.float64)

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
        if len(base) and self.n_segments:
            z = ids[base]
            u, i = self.users[z], self.items[z]
            P, BU = self._knot_rows("user", u)  # [m, J, K, d], [m, J, K]
            Q, BI = self._knot_rows("item", i)
            alpha = self._alpha_array()[None, :, None]
            pred = BU + BI + np.einsum("mjkd,mjkd->mjk", P, Q)
            dev = pred.mean(-1, keepdims=True) - pred  # [m, J, K]
            coef, visits = self._segment_terms(z)  # [m, S]
            seg = coef[..., None] + visits[..., None] * ((1 - alpha) * dev[:, :-1] + alpha * dev[:, 1:])
            c = np.zeros_like(dev)  # knot coefficients [m, J, K]
            c[:, :-1] += (1 - alpha) * seg
            c[:, 1:] += alpha * seg
            v = np.zeros(dev.shape[:2])
            v[:, :-1] += (1 - alpha[..., 0]) * visits
            v[:, 1:] += alpha[..., 0] * visits
            reg_u, reg_i, breg_u, breg_i = (r.astype(np.float64) for r in self.regs)
            rho = self.bias_ratio
            dp = np.einsum("mjk,mjkd->mkd", c, Q) - reg_u[u][:, None, None] * np.einsum("mj,mjkd->mkd", v, P)
            dq = np.einsum("mjk,mjkd->mkd", c, P) - reg_i[i][:, None, None] * np.einsum("mj,mjkd->mkd", v, Q)
            sum_c = c.sum(1)  # [m, K]
            dbu = rho * (sum_c - breg_u[u][:, None] * np.einsum("mj,mjk->mk", v, BU))
            dbi = rho * (sum_c - breg_i[i][:, None] * np.einsum("mj,mjk->mk", v, BI))
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
        prediction: one pass over the other side's knot rows, no full Δ vectors."""
        ids = np.asarray(example_ids, dtype=np.int64)
        k, d = self.n_blocks, self.block_size
        terms = [np.zeros((k, len(ids))) for _ in range(4)]  # Δp·q, p·Δq, Δb_u, Δb_i
        self.close()
        if self.n_segments:
            from recsys.models.mf.log_kernels import compact_projection

            t = self._tables()
            base = ids < self.n_base
            sel_u = np.flatnonzero(np.asarray(shares_user, dtype=bool) & base)
            sel_i = np.flatnonzero(np.asarray(shares_item, dtype=bool) & base)
            z = np.concatenate([ids[sel_u], ids[sel_i]])
            other_rows = np.concatenate([self.items[ids[sel_u]], self.users[ids[sel_i]]]).astype(np.int64)
            side = np.zeros(len(z), dtype=np.bool_)
            side[len(sel_u):] = True
            p32 = np.ascontiguousarray(p, dtype=np.float32)
            q32 = np.ascontiguousarray(q, dtype=np.float32)
            own_p, own_bu = self._knot_rows("user", np.array([user]))
            own_q, own_bi = self._knot_rows("item", np.array([item]))
            own_rows = np.ascontiguousarray(np.stack([own_p[0], own_q[0]]).reshape(2, self.n_knots, k * d),
                                            dtype=np.float32)
            own_dot = np.stack([np.einsum("jkd,kd->jk", own_p[0], q32), np.einsum("jkd,kd->jk", own_q[0], p32)])
            own_bias = np.stack([own_bu[0], own_bi[0]])
            reg_u, reg_i, breg_u, breg_i = self.regs
            own_reg = np.array([[reg_u[user], breg_u[user]], [reg_i[item], breg_i[item]]], dtype=np.float64)
            coef, visits = self._segment_terms(z)
            dots, biases = np.empty((k, len(z))), np.empty((k, len(z)))
            compact_projection(other_rows, side, t["user_factors"], t["user_scale"], t["user_bias"],
                               t["item_factors"], t["item_scale"], t["item_bias"], p32, q32, own_rows, own_dot,
                               own_bias, own_reg, coef, visits, self._alpha_array(), float(self.bias_ratio),
                               dots, biases)
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
    def save(self, path: str | Path, *, with_examples: bool = True) -> None:
        """Write the log as safetensors (closing it first). ``with_examples=False`` leaves out
        the examples' users and items (inside an artefact, whose training ratings hold them:
        `load` then needs ``examples``)."""
        self.close()
        k = self.n_blocks
        tables = self.knot_tables or {
            "user_factors": np.zeros((0, 0, k * self.block_size), np.int8), "user_scale": np.zeros((0, 0), np.float32),
            "item_factors": np.zeros((0, 0, k * self.block_size), np.int8), "item_scale": np.zeros((0, 0), np.float32),
            "user_bias": np.zeros((0, 0, k), np.float32), "item_bias": np.zeros((0, 0, k), np.float32)}
        regs = self.regs or tuple(np.zeros(0, np.float32) for _ in range(4))
        arrays = {"coefficients": self.coefficients, "example_visit_weights": self.example_visit_weights,
                  "visit_weights": np.asarray(self.visit_weights, dtype=np.float64),
                  "alpha": np.asarray(self.alpha, dtype=np.float64),
                  "knot_passes": np.asarray(self.knot_passes, dtype=np.float64),
                  "overlay_ids": self.overlay_ids, "overlay": self.overlay}
        if with_examples:
            arrays.update(users=self.users, items=self.items)
        arrays.update({f"knots_{name}": t for name, t in tables.items()})
        arrays.update({name: r for name, r in zip(_REG_NAMES, regs, strict=True)})
        meta = {"format": self.FORMAT, "optimizer": self.optimizer, "n_examples": str(self.n_examples),
                "n_base": str(self.n_base), "n_blocks": str(self.n_blocks), "block_size": str(self.block_size),
                "bias_ratio": repr(self.bias_ratio if self.bias_ratio is not None else 1.0),
                "planned_passes": repr(self.planned_passes), "bias_dtype": str(self._np_dtype)}
        save_file({name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in arrays.items()}, str(path),
                  metadata=meta)

    @classmethod
    def load(cls, path: str | Path, examples: Ratings | None = None) -> CompactRollbackLog:
        """Read a log written by `save`; ``examples``: the training ratings whose first rows
        the log was recorded on (needed when it was saved without them). ValueError when the
        file is not one."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") == "recsys-rollback-compact-1":
            raise ValueError(f"{path}: a compact rollback log of an older recsys (format 1); retrain with --rollback")
        if meta.get("format") != cls.FORMAT:
            raise ValueError(f"{path}: not a recsys compact rollback log")
        t = {name: v.numpy() for name, v in load_file(str(path)).items()}
        try:
            n_base = int(meta["n_base"])
            if "users" in t:
                users, items = t["users"], t["items"]
            elif examples is None or len(examples) < n_base:
                raise ValueError(f"saved without its examples: pass the training ratings (>= {n_base} rows)")
            else:
                users, items = examples.users[:n_base], examples.items[:n_base]
            planned = None if meta.get("planned_passes", "None") == "None" else float(meta["planned_passes"])
            log = cls(users, items, int(meta["n_blocks"]), int(meta["block_size"]),
                      optimizer=meta.get("optimizer", "sgd"), planned_passes=planned)
            log._n = int(meta["n_examples"])
            log.bias_ratio = float(meta["bias_ratio"])
            log._np_dtype = np.dtype(meta.get("bias_dtype", "float32"))
            log.knot_passes = [float(x) for x in t["knot_passes"]]
            log.alpha = [float(x) for x in t["alpha"]]
            log.visit_weights = [float(x) for x in t["visit_weights"]]
            log.coefficients, log.example_visit_weights = t["coefficients"], t["example_visit_weights"]
            names = ("user_factors", "user_scale", "item_factors", "item_scale", "user_bias", "item_bias")
            log.knot_tables = {name: t[f"knots_{name}"] for name in names} if log.knot_passes else None
            log.regs = tuple(t[name] for name in _REG_NAMES) if log.knot_passes else None
            log.overlay_ids, log.overlay = t["overlay_ids"].astype(np.int64), t["overlay"].astype(np.float32)
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"{path}: malformed compact rollback log ({exc})") from None
        n_seg = len(log.alpha)
        consistent = (len(log.visit_weights) == n_seg and log.coefficients.shape == (n_base, n_seg)
                      and log.example_visit_weights.shape == (n_base, int(np.isnan(log.visit_weights).sum()))
                      and (not log.knot_passes or log.knot_tables["user_factors"].shape[1] == n_seg + 1))
        if not consistent:
            raise ValueError(f"{path}: malformed compact rollback log (knots and segments disagree)")
        log.closed = True
        return log


def _quantise_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 copy of ``table [rows, D]`` with one float16 scale per row (``row ≈ int8 · scale``;
    the largest entry of a row maps to ±127)."""
    t = np.asarray(table, dtype=np.float32)
    scale = (np.abs(t).max(axis=1) / 127.0).astype(np.float16)
    safe = np.where(scale > 0, scale, np.float16(1.0)).astype(np.float32)
    return np.rint(t / safe[:, None]).clip(-127, 127).astype(np.int8), scale


def _columns(columns: list[np.ndarray], n: int, dtype: type) -> np.ndarray:
    """Stack per-segment columns ``[n]`` into ``[n, len(columns)]``, freeing each as it is copied."""
    out = np.empty((n, len(columns)), dtype=dtype)
    for s in range(len(columns)):
        out[:, s] = columns[s]
        columns[s] = None
    columns.clear()
    return out


#: The regularisation buffers saved with a compact log.
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

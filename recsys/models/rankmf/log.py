"""Gradient rollback for the ranking MF (Lawrence, Sztyler, Niepert, arXiv 2010.05516).

A training interaction ``z = (u, i+)`` touches, at every visit, its user's row ``p_u``, its
positive item's row ``[q_i+; b_i+]`` and the rows of the negatives ``j`` it drew at that
visit (new draws every epoch). `RankRollbackLog` keeps, per interaction, the sum over all
steps of the update it caused:

- ``rows [n, 2D+1]``: ``[Δp_u (D) | Δq_i+ (D) | Δb_i+]``;
- the negatives' updates, **credited to the interaction that drew them**: in the exact log a
  ledger of ``(example, item, [Δq_j; Δb_j])`` entries (coalesced per example and item when
  training ends); in the compact log only their per-item sum ``negative_total [n_items, D+1]``
  (attributed to nobody: explanations then see the negatives only through the user row,
  whose update already includes the pull away from them).

Attribution per optimizer is the shared one (`recsys.optim.credit`): exact for SGD (the
credits of a step sum to the step, per-example L2 included), exact per step given the state
for Adagrad, approximate for Adam/SparseAdam (see `ATTRIBUTION`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.optim.capture import LookupGradients
from recsys.optim.credit import ATTRIBUTION, credit
from recsys.ratings import Ratings

FORMAT = "recsys-rank-rollback-1"
TABLES = ("user_factors", "item_factors", "item_bias")


class RankRollbackLog:
    """Per-interaction accumulated updates of a `RankingMF` (see the module docstring), in
    parameter units. ``negatives``: keep the negatives' ledger (exact) or only their per-item
    sum (compact)."""

    def __init__(self, n_examples: int, n_items: int, embedding_size: int, *, negatives: bool = True,
                 optimizer: str = "sgd", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if n_examples < 0 or n_items < 1 or embedding_size < 1:
            raise ValueError("RankRollbackLog needs n_examples >= 0, n_items >= 1 and embedding_size >= 1")
        d = embedding_size
        self.optimizer = optimizer
        self.negatives = negatives
        self.rows = torch.zeros(n_examples, 2 * d + 1, dtype=dtype, device=device)
        self.negative_total = torch.zeros(n_items, d + 1, dtype=dtype, device=device)
        #: the ledger after `close`: example ids, item ids ``int64 [m]`` (sorted by example,
        #: then item) and updates ``[m, D+1]``
        self.neg_examples = torch.zeros(0, dtype=torch.int64, device=device)
        self.neg_items = torch.zeros(0, dtype=torch.int64, device=device)
        self.neg_updates = torch.zeros(0, d + 1, dtype=dtype, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0

    @classmethod
    def for_model(cls, model: nn.Module, n_examples: int, *, optimizer: str = "sgd",
                  negatives: bool = True) -> RankRollbackLog:
        return cls(n_examples, model.n_items, model.config.embedding_size, negatives=negatives,
                   optimizer=optimizer, device=model.device)

    # ------------------------------------------------------------------ UpdateLog
    @property
    def embedding_size(self) -> int:
        return self.negative_total.shape[1] - 1

    @property
    def n_examples(self) -> int:
        return self.rows.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def attribution(self) -> str:
        rule = ATTRIBUTION.get(self.optimizer, "approximate: gradient through the optimizer's preconditioner")
        where = ("negatives credited to the interaction that drew them" if self.negatives
                 else "negatives' updates summed per item, attributed to nobody")
        return f"{rule}; {where}"

    @property
    def nbytes(self) -> int:
        tensors = (self.rows, self.negative_total, self.neg_examples, self.neg_items, self.neg_updates)
        pending = sum(t.numel() * t.element_size() for entry in self._pending for t in entry)
        return int(sum(t.numel() * t.element_size() for t in tensors) + pending)

    def __repr__(self) -> str:
        return (f"RankRollbackLog(n_examples={self.n_examples}, embedding_size={self.embedding_size}, "
                f"negatives={self.negatives}, ledger={len(self.neg_examples)}, optimizer={self.optimizer!r})")

    @torch.no_grad()
    def add(self, example_ids: torch.Tensor, user: torch.Tensor, positive: torch.Tensor,
            neg_items: torch.Tensor, negative: torch.Tensor) -> None:
        """Add one step's credits: ``example_ids [B]``; ``user [B, D]``; ``positive [B, D+1]``;
        the negatives drawn ``neg_items [B, n]`` and their updates ``negative [B, n, D+1]``."""
        ids = example_ids.to(self.rows.device)
        self.rows.index_add_(0, ids, torch.cat([user, positive], dim=1).to(self.dtype))
        flat_items = neg_items.reshape(-1).to(self.rows.device)
        flat = negative.reshape(-1, negative.shape[-1]).to(self.dtype)
        self.negative_total.index_add_(0, flat_items, flat)
        if self.negatives:
            self._pending.append((ids.repeat_interleave(neg_items.shape[1]), flat_items, flat.clone()))
            self._pending_rows += len(flat_items)
            if self._pending_rows > 1 << 20:
                self._coalesce()

    def _coalesce(self) -> None:
        """Merge the pending ledger entries into the sorted ledger (summing repeats)."""
        if not self._pending:
            return
        ex = torch.cat([self.neg_examples, *(e for e, _, _ in self._pending)])
        it = torch.cat([self.neg_items, *(i for _, i, _ in self._pending)])
        up = torch.cat([self.neg_updates, *(u for _, _, u in self._pending)])
        self._pending, self._pending_rows = [], 0
        n_items = self.negative_total.shape[0]
        keys, inverse = torch.unique(ex * n_items + it, return_inverse=True)
        merged = torch.zeros(len(keys), up.shape[1], dtype=up.dtype, device=up.device).index_add_(0, inverse, up)
        self.neg_examples, self.neg_items, self.neg_updates = keys // n_items, keys % n_items, merged

    def close(self) -> RankRollbackLog:
        self._coalesce()
        return self

    def extend(self, n_new: int) -> RankRollbackLog:
        if n_new < 0:
            raise ValueError(f"extend needs n_new >= 0, got {n_new}")
        pad = torch.zeros(n_new, self.rows.shape[1], dtype=self.dtype, device=self.rows.device)
        self.rows = torch.cat([self.rows, pad])
        return self

    def compact(self, dtype: torch.dtype = torch.float16) -> RankRollbackLog:
        self._coalesce()
        self.rows = self.rows.to(dtype)
        self.negative_total = self.negative_total.to(dtype)
        self.neg_updates = self.neg_updates.to(dtype)
        return self

    @torch.no_grad()
    def merge(self, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError("rank-mf trains single-process; its log has nothing to merge")

    # ------------------------------------------------------------------ reading
    def user_updates(self, example_ids: np.ndarray) -> np.ndarray:
        """float64 ``[m, D]``: each example's accumulated update of its user's row."""
        d = self.embedding_size
        return self.rows[torch.as_tensor(example_ids, device=self.rows.device), :d].double().cpu().numpy()

    def positive_updates(self, example_ids: np.ndarray) -> np.ndarray:
        """float64 ``[m, D+1]``: each example's accumulated update of its positive item's row."""
        d = self.embedding_size
        return self.rows[torch.as_tensor(example_ids, device=self.rows.device), d:].double().cpu().numpy()

    def negative_updates(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """The ledger entries on ``item``'s row: ``(example ids int64 [m], updates float64
        [m, D+1])`` (empty for the compact log)."""
        self._coalesce()
        sel = self.neg_items == item
        return (self.neg_examples[sel].cpu().numpy(), self.neg_updates[sel].double().cpu().numpy())

    def row_sums(self, train: Ratings, n_users: int, n_items: int) -> dict[str, torch.Tensor]:
        """The log summed per parameter row (``user_factors [n_users, D]``, ``item_factors
        [n_items, D]``, ``item_bias [n_items, 1]``), negatives included. For plain SGD this
        equals each row's total change over training (the completeness check)."""
        d = self.embedding_size
        dev = self.rows.device
        users = torch.as_tensor(train.users[: self.n_examples], device=dev)
        items = torch.as_tensor(train.items[: self.n_examples], device=dev)
        rows = self.rows.float()
        item_rows = torch.zeros(n_items, d + 1, device=dev).index_add_(0, items, rows[:, d:])
        item_rows += self.negative_total.float()
        return {"user_factors": torch.zeros(n_users, d, device=dev).index_add_(0, users, rows[:, :d]),
                "item_factors": item_rows[:, :d], "item_bias": item_rows[:, d:]}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        self._coalesce()
        tensors = {"rows": self.rows, "negative_total": self.negative_total, "neg_examples": self.neg_examples,
                   "neg_items": self.neg_items, "neg_updates": self.neg_updates}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": FORMAT, "optimizer": self.optimizer, "negatives": str(self.negatives)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> RankRollbackLog:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a rank-mf rollback log")
        t = load_file(str(path), device=str(device))
        d = t["negative_total"].shape[1] - 1
        log = cls(0, t["negative_total"].shape[0], d, negatives=meta.get("negatives") == "True",
                  optimizer=meta.get("optimizer", "sgd"), dtype=t["rows"].dtype, device=device)
        log.rows, log.negative_total = t["rows"], t["negative_total"]
        log.neg_examples, log.neg_items, log.neg_updates = t["neg_examples"], t["neg_items"], t["neg_updates"]
        return log


class RankAutogradRecorder:
    """Fills a `RankRollbackLog` on the trainer's autograd step (an
    `recsys.models.base.UpdateRecorder`). Hooks the three embedding lookups of
    `RankingMF.loss` and keeps the gradient of every gathered row (row ``b`` of the user
    lookup, and row ``b`` of the ``[B, 1+n]`` item lookups, are example ``b``'s share, even
    when a row appears twice in the batch); after the optimizer step `record` credits each
    example that gradient passed through the optimizer (`recsys.optim.credit.credit`)."""

    def __init__(self, model: nn.Module, log: RankRollbackLog) -> None:
        self.model, self.log = model, log
        self.lookups = LookupGradients((name, getattr(model, name)) for name in TABLES)
        self.paused = self.lookups.paused

    def _take(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        captured = self.lookups.captured[name]
        if len(captured) != 1 or captured[0][1] is None:
            raise RuntimeError(f"rollback: expected one differentiated lookup of {name} per step, "
                               f"got {len(captured)}")
        idx, grad = captured[0]
        captured.clear()
        return idx, grad

    @torch.no_grad()
    def record(self, example_ids: np.ndarray, optimizer: object, preconditioner: object) -> None:
        """Credit the step just taken to its examples ``example_ids [B]`` (batch order)."""
        m = self.model
        users, g_user = self._take("user_factors")
        idx, g_items = self._take("item_factors")
        idx_b, g_bias = self._take("item_bias")
        if len(users) != len(example_ids) or idx.shape[0] != len(example_ids):
            raise RuntimeError("rollback: the lookups do not follow the batch's examples")
        b, k = idx.shape
        d = g_items.shape[-1]
        flat = idx.reshape(-1)
        up_user = -credit(optimizer, preconditioner, "user_factors", m.user_factors.weight, users, g_user)
        up_items = -credit(optimizer, preconditioner, "item_factors", m.item_factors.weight, flat,
                           g_items.reshape(-1, d)).reshape(b, k, d)
        up_bias = -credit(optimizer, preconditioner, "item_bias", m.item_bias.weight, idx_b.reshape(-1),
                          g_bias.reshape(-1, 1)).reshape(b, k, 1)
        up_item_rows = torch.cat([up_items, up_bias], dim=2)  # [B, 1+n, D+1]
        ids = torch.as_tensor(example_ids)
        self.log.add(ids, up_user.expand(b, -1) if up_user.dim() < 2 else up_user, up_item_rows[:, 0],
                     idx[:, 1:], up_item_rows[:, 1:])

    def remove(self) -> None:
        self.lookups.remove()

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

Never attributed to any example: weight decay applied to whole tables, injected noise,
momentum of ``torch.optim.SGD(momentum>0)`` beyond the current step, and anything done to
the weights outside the optimizer (restoring an early-stopping checkpoint leaves later
epochs' updates in the log: the callback warns).

Storage: one preallocated tensor on the model's device, block-major so that each block's
kernel thread writes only its own memory and a visit touches one contiguous stretch:
``[K, n, 2d+2]`` (``d = D/K``). Accumulation is float32; `compact` casts to float16 for
storage (half the bytes).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.models.base import RatingModel
from recsys.ratings import Ratings
from recsys.train import Callback, EpochRecord, Trainer, TrainResult

#: The parameter tables an MF example touches, in log order, and which index selects the row.
SLOTS: tuple[tuple[str, str], ...] = (
    ("user_factors", "user"), ("user_bias", "user"), ("item_factors", "item"), ("item_bias", "item"),
)

#: How each optimizer's updates are split among examples (saved with the log, shown by explain).
ATTRIBUTION = {
    "sgd": "exact: -lr*grad/|B| per example (per-example L2 included)",
    "adagrad": "exact per step given the state: -lr*grad/|B|/(sqrt(G_t)+eps)",
    "adam": "approximate: -lr*grad/|B|/(sqrt(v_hat_t)+eps), momentum credited at its step",
    "adamw": "approximate: as adam; decoupled weight decay not attributed",
    "sparse-adam": "approximate: -lr*grad/|B|/(sqrt(v_hat_t)+eps), momentum credited at its step",
}


class RollbackLog:
    """Per-example accumulated updates of an MF model (see the module docstring).

    Storage: one tensor ``data [K, n, 2d+2]`` (``K`` blocks, ``n`` examples, block size
    ``d``), ``data[b, z] = [Δp_u (d) | Δq_i (d) | Δb_u | Δb_i]`` for block ``b`` of example
    ``z``, in parameter units (the same units as the weights they were added to). The
    properties `user_factors`, `item_factors` (``[K, n, d]``), `user_bias`, `item_bias`
    (``[K, n]``) are views of it. ``optimizer`` names the optimizer whose updates were logged.
    """

    def __init__(self, n_examples: int, n_blocks: int, block_size: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 optimizer: str = "sgd") -> None:
        if n_examples < 0 or n_blocks < 1 or block_size < 1:
            raise ValueError("RollbackLog needs n_examples >= 0, n_blocks >= 1 and block_size >= 1")
        self.data = torch.zeros(n_blocks, n_examples, 2 * block_size + 2, dtype=dtype, device=device)
        self.optimizer = optimizer

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, model: RatingModel, n_examples: int, *, optimizer: str = "sgd",
                  dtype: torch.dtype = torch.float32) -> RollbackLog:
        """An empty log for ``model`` (MF: ``n_blocks``, ``block_size``) on its device."""
        if not all(hasattr(model, name) for name, _ in SLOTS) or not hasattr(model, "block_size"):
            raise TypeError(f"gradient rollback logs MF-style models (user/item factors and biases); "
                            f"got {type(model).__name__}")
        return cls(n_examples, model.config.n_blocks, model.block_size, dtype=dtype,
                   device=model.device, optimizer=optimizer)

    @property
    def n_examples(self) -> int:
        return self.data.shape[1]

    @property
    def n_blocks(self) -> int:
        return self.data.shape[0]

    @property
    def block_size(self) -> int:
        return (self.data.shape[2] - 2) // 2

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

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
        return int(self.data.numel() * self.data.element_size())

    @property
    def bytes_per_example(self) -> float:
        return self.nbytes / max(1, self.n_examples)

    def __repr__(self) -> str:
        return (f"RollbackLog(n_examples={self.n_examples}, n_blocks={self.n_blocks}, "
                f"block_size={self.block_size}, dtype={self.dtype}, optimizer={self.optimizer!r})")

    # ------------------------------------------------------------------ writing
    def kernel_array(self, model: RatingModel) -> np.ndarray:
        """The log as a writable float32 numpy view ``[K, n, 2d+2]`` for the compiled kernel."""
        if self.dtype != torch.float32 or self.data.device.type != "cpu":
            raise ValueError("the compiled kernel logs into a float32 CPU log; compact() only after training")
        if (self.n_blocks, self.block_size) != (model.config.n_blocks, model.block_size):
            raise ValueError(f"log shaped for {self.n_blocks} blocks of {self.block_size}, model has "
                             f"{model.config.n_blocks} of {model.block_size}")
        return self.data.numpy()

    @torch.no_grad()
    def add(self, example_ids: torch.Tensor | np.ndarray, user_factors: torch.Tensor,
            user_bias: torch.Tensor, item_factors: torch.Tensor, item_bias: torch.Tensor) -> None:
        """Add per-example updates: ``example_ids [B]``; factors ``[B, D]``, biases ``[B, K]``
        (parameter units). Repeated ids accumulate."""
        ids = torch.as_tensor(example_ids, device=self.data.device)
        k, d = self.n_blocks, self.block_size
        rows = torch.cat([user_factors.detach().reshape(-1, k, d), item_factors.detach().reshape(-1, k, d),
                          user_bias.detach().reshape(-1, k, 1), item_bias.detach().reshape(-1, k, 1)], dim=2)
        self.data.index_add_(1, ids, rows.transpose(0, 1).to(self.dtype))

    def extend(self, n_new: int) -> RollbackLog:
        """Append ``n_new`` zero rows (for ratings appended to the training `Ratings`), in
        place; returns self."""
        if n_new < 0:
            raise ValueError(f"extend needs n_new >= 0, got {n_new}")
        pad = torch.zeros((self.n_blocks, n_new, self.data.shape[2]), dtype=self.dtype, device=self.data.device)
        self.data = torch.cat([self.data, pad], dim=1)
        return self

    def compact(self, dtype: torch.dtype = torch.float16) -> RollbackLog:
        """Cast the log to ``dtype`` in place (float16 halves the bytes); returns self."""
        self.data = self.data.to(dtype).contiguous()
        return self

    # ------------------------------------------------------------------ reading
    def rows(self, example_ids: np.ndarray) -> np.ndarray:
        """float64 numpy copy ``[K, m, 2d+2]`` of the log rows of ``example_ids [m]``."""
        ids = torch.as_tensor(np.asarray(example_ids, dtype=np.int64), device=self.data.device)
        return self.data.index_select(1, ids).cpu().numpy().astype(np.float64)

    def row_sums(self, train: Ratings, n_users: int, n_items: int) -> dict[str, torch.Tensor]:
        """The log summed per parameter row: ``user_factors [n_users, D]``, ``user_bias
        [n_users, K]`` etc. For plain SGD this equals each row's total change over training
        (the completeness check)."""
        users = torch.as_tensor(train.users[: self.n_examples], device=self.data.device)
        items = torch.as_tensor(train.items[: self.n_examples], device=self.data.device)
        out = {}
        for name, side in SLOTS:
            t = getattr(self, name).float()
            index, n = (users, n_users) if side == "user" else (items, n_items)
            flat = t.permute(1, 0, 2).reshape(t.shape[1], -1) if t.dim() == 3 else t.T
            out[name] = torch.zeros(n, flat.shape[1], device=t.device).index_add_(0, index, flat)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the log as safetensors (one tensor ``updates``; optimizer name as metadata)."""
        save_file({"updates": self.data.detach().cpu().contiguous()}, str(path),
                  metadata={"format": "recsys-rollback-1", "optimizer": self.optimizer})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> RollbackLog:
        """Read a log written by `save`; ValueError when the file is not one."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != "recsys-rollback-1":
            raise ValueError(f"{path}: not a recsys rollback log")
        data = load_file(str(path), device=str(device)).get("updates")
        if data is None or data.dim() != 3 or data.shape[2] < 4 or data.shape[2] % 2:
            raise ValueError(f"{path}: rollback log lacks an [blocks, examples, 2d+2] 'updates' tensor")
        log = cls(0, data.shape[0], (data.shape[2] - 2) // 2, dtype=data.dtype, device=device,
                  optimizer=meta.get("optimizer", "sgd"))
        log.data = data
        return log


class RollbackCallback(Callback):
    """Trainer plug-in that records a `RollbackLog` while training.

    On the compiled-kernel and closed-form paths the trainer hands the log to the step
    itself (``update_log``), which logs while it updates. On the autograd path the callback
    hooks the model's embedding lookups, keeps the gradient of every gathered row
    (row ``b`` of ``d loss / d gathered`` is example ``b``'s share, even when a user appears
    twice in the batch) and, after the optimizer step, credits each example that gradient
    passed through the optimizer's preconditioner (see the module docstring).

    Args:
        store_dtype: dtype the log is cast to when training ends (float16 halves it).
    """

    def __init__(self, store_dtype: torch.dtype = torch.float32) -> None:
        self.store_dtype = store_dtype
        self.log: RollbackLog | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._trainer: Trainer | None = None
        self._model: RatingModel | None = None
        self._kind = ""
        self._warned_restore = False

    def on_train_begin(self, trainer: Trainer, model: RatingModel, train: Ratings) -> None:
        self._trainer, self._model = trainer, model
        self._kind = trainer.step_kind(model)
        optimizer = trainer.config.optimizer if trainer.optimizer_factory is None else _optimizer_name(trainer.optimizer)
        self.log = RollbackLog.for_model(model, len(train), optimizer=optimizer)
        if self._kind == "autograd":
            self._install_hooks(model)
            self.update_log = None
        else:
            self.update_log = self.log

    def _install_hooks(self, model: RatingModel) -> None:
        for name, _ in SLOTS:
            module = getattr(model, name)
            if not isinstance(module, nn.Embedding):
                raise TypeError(f"rollback on the autograd path needs {name} to be an nn.Embedding")
            self._captured[name] = []

            def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                if torch.is_grad_enabled() and output.requires_grad and mod.training:
                    output.retain_grad()
                    self._captured[name].append((inputs[0], output))

            self._hooks.append(module.register_forward_hook(hook))

    @torch.no_grad()
    def on_batch_end(self, example_ids: np.ndarray, loss: float) -> None:
        if self._kind != "autograd":
            return
        assert self.log is not None and self._model is not None and self._trainer is not None
        ids = torch.as_tensor(example_ids, device=self.log.user_factors.device)
        updates = []
        for name, _ in SLOTS:
            captured = self._captured[name]
            if not captured:
                raise RuntimeError(f"rollback: the step never looked up {name}")
            rows = captured[0][0]
            grad = torch.zeros_like(captured[0][1])
            for idx, out in captured:
                if out.grad is None or len(idx) != len(ids) or not torch.equal(idx, rows):
                    raise RuntimeError(f"rollback: {name} lookups do not follow the batch's examples")
                grad += out.grad
            param = getattr(self._model, name).weight
            updates.append(-_preconditioner(self._trainer.optimizer, param, rows) * grad)
            captured.clear()
        self.log.add(ids, *updates)

    def on_epoch_end(self, record: EpochRecord) -> bool | None:
        return None

    def on_train_end(self, result: TrainResult) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if result.best_epoch is not None and result.best_epoch != len(result.history) and not self._warned_restore:
            warnings.warn(f"rollback: the weights of epoch {result.best_epoch} were restored, but the log holds "
                          f"all {len(result.history)} epochs; train without early stopping for faithful "
                          "explanations", stacklevel=2)
            self._warned_restore = True
        if self.log is not None and self.store_dtype != self.log.dtype:
            self.log.compact(self.store_dtype)


def _optimizer_name(optimizer: torch.optim.Optimizer | None) -> str:
    names = {torch.optim.SGD: "sgd", torch.optim.Adagrad: "adagrad", torch.optim.Adam: "adam",
             torch.optim.AdamW: "adamw", torch.optim.SparseAdam: "sparse-adam"}
    return names.get(type(optimizer), type(optimizer).__name__.lower())


def _preconditioner(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The factor ``[B, width]`` (or a scalar) that turns the gradient of the gathered rows
    into the update credited to their examples, read after the optimizer's step."""
    if optimizer is None:
        raise RuntimeError("rollback on the autograd path needs the trainer's optimizer")
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise RuntimeError("rollback: a logged table is not among the optimizer's parameters")
    lr = float(group["lr"])
    state = optimizer.state.get(param, {})
    if isinstance(optimizer, torch.optim.SGD):
        return torch.tensor(lr, device=param.device)
    if isinstance(optimizer, torch.optim.Adagrad):
        step = float(state["step"])
        clr = lr / (1 + (step - 1) * group["lr_decay"])
        return clr / (state["sum"][rows].sqrt() + group["eps"])
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW | torch.optim.SparseAdam):
        step = float(state["step"])
        beta2 = group["betas"][1]
        v_hat = state["exp_avg_sq"][rows] / (1 - beta2 ** step)
        return lr / (v_hat.sqrt() + group["eps"])
    raise NotImplementedError(f"rollback has no attribution rule for {type(optimizer).__name__}; "
                              f"supported: SGD, Adagrad, Adam, AdamW, SparseAdam")


def append_ratings(train: Ratings, new: Ratings) -> tuple[Ratings, np.ndarray]:
    """``train`` with the ratings of ``new`` (same id maps) appended as new examples; returns
    the combined `Ratings` and the new example ids ``int64 [len(new)]``. Existing example ids
    keep their meaning, so a log only needs `RollbackLog.extend`."""
    if new.user_ids is not train.user_ids and new.user_ids != train.user_ids:
        raise ValueError("new ratings must share the training ratings' id maps")
    if new.item_ids is not train.item_ids and new.item_ids != train.item_ids:
        raise ValueError("new ratings must share the training ratings' id maps")
    ts = None
    if train.timestamps is not None and new.timestamps is not None:
        ts = np.concatenate([train.timestamps, new.timestamps])
    combined = Ratings(np.concatenate([train.users, new.users]), np.concatenate([train.items, new.items]),
                       np.concatenate([train.values, new.values]), ts, train.user_ids, train.item_ids,
                       train.rating_scale, train.item_titles)
    return combined, np.arange(len(train), len(combined), dtype=np.int64)


def online_sgd(model: RatingModel, log: RollbackLog, train: Ratings, example_ids: Sequence[int] | np.ndarray,
               learning_rate: float, *, epochs: int = 1, seed: int = 0) -> float:
    """Online update: incremental SGD over ``example_ids`` (rows of ``train``, e.g. ratings just
    appended with `append_ratings`) for ``epochs`` passes in a seeded random order, logging
    every update into ``log`` (grown with `extend` to cover the ids first). Returns the last
    pass's mean squared block error. The users and items must already have rows in the model."""
    ids = np.asarray(example_ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= log.n_examples):
        raise ValueError(f"example ids outside the log's {log.n_examples} rows; call log.extend first")
    if len(ids) and (ids.max() >= len(train)):
        raise ValueError("example ids outside the training ratings")
    if log.dtype != torch.float32:
        log.compact(torch.float32)
    u, i = train.users[ids], train.items[ids]
    if len(ids) and ((u >= model.n_users).any() or (i >= model.n_items).any()):
        raise ValueError("online_sgd: a rating's user or item has no row in the model")
    with torch.no_grad():
        model.known_users[torch.from_numpy(u)] = True
        model.known_items[torch.from_numpy(i)] = True
    rng = np.random.default_rng(seed)
    loss = 0.0
    for _ in range(epochs):
        order = ids[rng.permutation(len(ids))]
        if model.device.type == "cpu" and hasattr(model, "sgd_examples"):
            loss = model.sgd_examples(train, order, learning_rate, log=log)
        else:
            t = train.tensors(model.device)
            sq = 0.0
            for k in order:
                idx = torch.tensor([k], device=model.device)
                sq += model.sgd_batch(t[0][idx], t[1][idx], t[2][idx], learning_rate, log=log, example_ids=idx)
            loss = sq / max(1, len(order))
    return loss

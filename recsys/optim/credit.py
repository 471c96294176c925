"""How each optimizer's step is credited to the examples of its batch (gradient rollback):
the factor that turns an example's gradient on its gathered rows into the update it caused,
read from the optimizer's state after the step. The rules and their exactness are listed in
`ATTRIBUTION` (saved with every update log); `recsys.models.mf.log` explains them in full."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recsys.optim.noise import CovNoiseSGD
from recsys.optim.salr import SALR

ATTRIBUTION = {
    "sgd": "exact: -lr*grad/|B| per example (per-example L2 included)",
    "adagrad": "exact per step given the state: -lr*grad/|B|/(sqrt(G_t)+eps)",
    "adam": "approximate: -lr*grad/|B|/(sqrt(v_hat_t)+eps), momentum credited at its step",
    "adamw": "approximate: as adam; decoupled weight decay not attributed",
    "sparse-adam": "approximate: -lr*grad/|B|/(sqrt(v_hat_t)+eps), momentum credited at its step",
    **{kind: "exact per step given the factors: -lr*P_row(grad/|B|), the step's row preconditioner"
       for kind in ("kfac", "ekfac", "tkfac", "tekfac")},
    "cov-noise": "as sgd (or the sub-batch estimator's base optimizer, each sub-batch credited by its share "
                 "n_j/B of the batch); the injected noise is not attributed",
}


def batch_passes(passes: Sequence[tuple[torch.Tensor, torch.Tensor]], n_examples: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's gathered rows ``[n_examples]`` and their gradients ``[n_examples, width]``
    from its backward passes ``(indices [n_j], gradient [n_j, width])``, in batch order.

    One pass: the batch's own mean loss, each row's gradient is its example's share already.
    Several passes (sub-batch covariance noise, `recsys.optim.noise.SubBatchNoise`): each
    pass back-propagated its own sub-batch's *mean* loss and the step follows the weighted
    mean ``Σ_j (n_j / B) g_j``, so each pass is credited by its share ``n_j / B`` of the batch
    (without it every credit is ``B / n_j`` times too large)."""
    rows = torch.cat([idx for idx, _ in passes])
    if len(rows) != n_examples:
        raise RuntimeError(f"rollback: {len(rows)} lookups in the step's passes for a batch of {n_examples}")
    if len(passes) == 1:
        return rows, passes[0][1]
    return rows, torch.cat([g * (len(idx) / n_examples) for idx, g in passes])


def optimizer_name(optimizer: torch.optim.Optimizer | None) -> str:
    names = {torch.optim.SGD: "sgd", torch.optim.Adagrad: "adagrad", torch.optim.Adam: "adam",
             torch.optim.AdamW: "adamw", torch.optim.SparseAdam: "sparse-adam", CovNoiseSGD: "cov-noise"}
    return names.get(type(optimizer), type(optimizer).__name__.lower())


def credit(optimizer: torch.optim.Optimizer | None, preconditioner: object | None, name: str, param: torch.Tensor,
           rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The step of table ``name`` credited to each example: the gradients ``grad [B, width]``
    of its gathered rows ``rows [B]`` passed through the K-FAC-family ``preconditioner`` (if any)
    and ``optimizer`` as they stood at this step (read after it; see the module docstring)."""
    scale = 1.0
    if isinstance(optimizer, SALR):  # the base optimizer's rule at the step's scaled rate
        optimizer, scale = optimizer.base, float(optimizer.ratio)
    if preconditioner is not None and name in getattr(preconditioner, "last_rows", {}):
        grad = preconditioner.precondition_rows(name, rows, grad).to(grad.dtype)
    return scale * optimizer_factor(optimizer, param, rows) * grad


def optimizer_factor(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The factor ``[B, width]`` (or a scalar) that turns the gradient of the gathered rows
    into the update credited to their examples, read after the optimizer's step."""
    if optimizer is None:
        raise RuntimeError("rollback on the autograd path needs the trainer's optimizer")
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise RuntimeError("rollback: a logged table is not among the optimizer's parameters")
    lr = float(group["lr"])
    state = optimizer.state.get(param, {})
    if isinstance(optimizer, torch.optim.SGD | CovNoiseSGD):
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

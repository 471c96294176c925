"""SGD with a fixed per-input-column diagonal preconditioner of the linear layers.

A linear layer ``y = W x + b`` whose input columns have very different scales is badly
conditioned for one learning rate: the gradient of ``W[:, j]`` is ``E[δ x_j]``, so a column
of small inputs gets small gradients *and* moves the output little per unit of weight, and
plain SGD's largest stable rate (set by the large columns) leaves it almost still. REC's
message networks are such a layer: their input ``[child vector (K); rating encoding (L);
residual (1)]`` has mean squares of about 0.01, 0.2 and 0.84 at initialisation
(``docs/optimizers.md``, *Why SGD and Adagrad stall on REC*).

`InputScaledSGD` steps ``W ← W − lr · ∇_W · diag(s)⁻¹`` with ``s_j = E[x_j²] + damping ·
mean_k E[x_k²]``, the mean square of input column ``j`` measured on the first
``calibration_steps`` training batches and then fixed (the bias, whose input is the constant
1, and every parameter that is not a linear layer's weight step as plain SGD). With ``s``
fixed this is exactly plain SGD on the same network with its linear layers' inputs divided by
``√s`` (and the weights multiplied by it): a change of variables that standardises the inputs
without changing the model's function, its initialisation or any other optimizer (Adam's
per-coordinate normalisation and K-FAC's input factor ``E[x xᵀ]`` already cover it).
It is the diagonal of K-FAC's input factor, frozen after calibration, applied to the gradient
before torch's SGD step (momentum, groups and ``lr_scales`` as ``torch.optim.SGD``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["InputScaledSGD"]


class InputScaledSGD(torch.optim.SGD):
    """``torch.optim.SGD`` whose linear-layer weight gradients are divided, column by input
    column, by the inputs' mean square (see the module docstring).

    ``model``: the module whose ``nn.Linear`` layers (those with a weight among ``params``;
    ``layers``: only those of these module names, `nn.Module.named_modules`) are preconditioned; forward hooks record their inputs' column sums of squares during the
    first ``calibration_steps`` steps (training forwards with autograd on only), then are
    removed. ``damping``: added to every column's mean square, relative to the layer's mean
    over columns (keeps a column of near-zero inputs, e.g. a dead ReLU, from a huge step).
    State: each preconditioned weight's ``input_scale`` ``[in_features]`` and the
    ``calibration_steps`` it was measured over (`state_dict` resumes both; a resumed
    calibrated optimizer does not calibrate again).
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, *, model: nn.Module,
                 layers: Sequence[str] | None = None, calibration_steps: int = 1, damping: float = 1e-2) -> None:
        if calibration_steps < 1:
            raise ValueError(f"calibration_steps must be >= 1, got {calibration_steps}")
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        super().__init__(params, lr=lr, momentum=momentum)
        self.calibration_steps = calibration_steps
        self.damping = float(damping)
        mine = {p for group in self.param_groups for p in group["params"]}
        modules = dict(model.named_modules())
        for name in layers or ():
            if not isinstance(modules.get(name), nn.Linear):
                linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                raise ValueError(f"layers: {name!r} is not an nn.Linear of {type(model).__name__} "
                                 f"(its linear layers: {linear})")
        chosen = [modules[n] for n in layers] if layers else list(modules.values())
        #: the preconditioned layers: weight -> its module
        self.layers: dict[torch.Tensor, nn.Linear] = {
            m.weight: m for m in chosen if isinstance(m, nn.Linear) and m.weight in mine}
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer among the optimized parameters: "
                             "nothing to precondition (use plain sgd)")
        #: per weight: (column sums of x², rows seen) during calibration
        self._sums: dict[torch.Tensor, list] = {w: [torch.zeros(m.in_features, dtype=torch.float64,
                                                                device=w.device), 0]
                                               for w, m in self.layers.items()}
        self._handles = [m.register_forward_hook(self._record(w)) for w, m in self.layers.items()]

    def _record(self, weight: torch.Tensor):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            x = inputs[0].detach().reshape(-1, module.in_features)
            acc = self._sums[weight]
            acc[0] += x.double().square().sum(0)
            acc[1] += x.shape[0]
        return hook

    @property
    def calibrated(self) -> bool:
        """Whether every preconditioned weight's ``input_scale`` is fixed (calibration over)."""
        return all(self.state[w].get("calibration_steps", 0) >= self.calibration_steps for w in self.layers)

    def remove_hooks(self) -> None:
        """Stop recording inputs (done by itself once calibrated)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _calibrate(self) -> None:
        """Set every weight's ``input_scale`` from the inputs recorded so far (this step's
        included); fix it after ``calibration_steps`` steps in which its layer had inputs (a
        layer that has had none yet has no gradient to precondition: it waits), then remove
        the hooks."""
        for weight, (sums, rows) in self._sums.items():
            state = self.state[weight]
            if rows == 0 or state.get("calibration_steps", 0) >= self.calibration_steps:
                continue
            mean_square = sums / rows
            state["input_scale"] = (mean_square + self.damping * mean_square.mean()).to(weight.dtype)
            state["calibration_steps"] = state.get("calibration_steps", 0) + 1
        if self.calibrated:
            self.remove_hooks()
            self._sums = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.calibrated:
            self._calibrate()
        for weight in self.layers:
            if weight.grad is not None and "input_scale" in self.state[weight]:
                weight.grad.div_(self.state[weight]["input_scale"])
        super().step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.calibrated:
            self.remove_hooks()
            self._sums = {}

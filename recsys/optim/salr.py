"""SALR, sharpness-aware learning rates (Yue, Nouiehed, Kontar, arXiv 2011.05348), as a
wrapper around any optimizer: every ``every`` steps the local sharpness is estimated as
``S_t = L(θ⁺) − L(θ⁻)``, with ``θ⁺`` (``θ⁻``) reached by ``n_steps`` normalised gradient ascent
(descent) steps of total length ``radius`` from ``θ_t``; the learning rate of every group is
then ``lr · S_t / median(S_1..S_t)`` for the steps up to the next estimate. Safety (ours, not
the paper's): ``S`` is floored at a tiny positive value and the ratio clipped to
``[min_ratio, max_ratio]``.

Use like SAM: ``loss.backward(); salr.step(closure)`` where ``closure`` zeroes the gradients,
re-evaluates the loss and back-propagates (the gradient already in ``.grad`` is the one the base
optimizer applies; parameters and gradients are restored after the extra passes). The scaled
lr is applied only during the base step, so lr schedulers on ``param_groups`` keep working.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SALRConfig:
    """SALR's options when the trainer wraps its optimizer (`recsys.train.TrainConfig.salr`;
    command line ``--salr``): estimate the sharpness every ``every`` steps."""

    every: int = 10

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"need salr_every >= 1, got {self.every}")


def _grad_norm(params: list[torch.Tensor]) -> float:
    total = 0.0
    for p in params:
        g = p.grad
        if g is None:
            continue
        v = g.coalesce().values() if g.is_sparse else g
        total += float(v.double().square().sum())
    return math.sqrt(total)


class SALR:
    """Sharpness-aware learning-rate wrapper (see the module docstring)."""

    def __init__(self, base: torch.optim.Optimizer, *, every: int = 10, radius: float = 0.05,
                 n_steps: int = 1, min_ratio: float = 0.1, max_ratio: float = 10.0) -> None:
        if every < 1 or n_steps < 1 or radius <= 0 or not 0 < min_ratio <= 1 <= max_ratio:
            raise ValueError("need every >= 1, n_steps >= 1, radius > 0, 0 < min_ratio <= 1 <= max_ratio")
        self.base = base
        self.defaults = dict(every=every, radius=radius, n_steps=n_steps, min_ratio=min_ratio, max_ratio=max_ratio)
        self.history: list[float] = []
        self.ratio = 1.0
        self.steps = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def _walk(self, closure, sign: float) -> float:
        d = self.defaults
        params = self._params()
        loss = math.nan
        for _ in range(d["n_steps"]):
            norm = _grad_norm(params)
            if norm == 0 or not math.isfinite(norm):
                break
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=sign * d["radius"] / d["n_steps"] / norm)
            with torch.enable_grad():
                loss = float(closure())
        return loss

    def sharpness(self, closure) -> float:
        """``L(θ⁺) − L(θ⁻)`` around the current parameters, whose gradients must be in
        ``.grad``; parameters and gradients are left as they were."""
        params = self._params()
        saved = [p.detach().clone() for p in params]
        grads = [None if p.grad is None else p.grad.clone() for p in params]

        def restore() -> None:
            with torch.no_grad():
                for p, s, g in zip(params, saved, grads, strict=True):
                    p.copy_(s)
                    p.grad = None if g is None else g.clone()

        up = self._walk(closure, +1.0)
        restore()
        down = self._walk(closure, -1.0)
        restore()
        return up - down

    def step(self, closure=None):
        """One base step with the sharpness-scaled learning rate (estimated now when due and
        a closure is given)."""
        d = self.defaults
        if closure is not None and self.steps % d["every"] == 0:
            s = self.sharpness(closure)
            if math.isfinite(s):
                self.history.append(max(s, 1e-12))
                med = statistics.median(self.history)
                self.ratio = min(max(self.history[-1] / med, d["min_ratio"]), d["max_ratio"])
        self.steps += 1
        lrs = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * self.ratio
        try:
            self.base.step()
        finally:
            for g, lr in zip(self.param_groups, lrs, strict=True):
                g["lr"] = lr

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "history": list(self.history), "ratio": self.ratio,
                "steps": self.steps, "defaults": dict(self.defaults)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict["base"])
        self.history = list(state_dict["history"])
        self.ratio = float(state_dict["ratio"])
        self.steps = int(state_dict["steps"])
        self.defaults = copy.deepcopy(state_dict["defaults"])

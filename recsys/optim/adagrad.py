"""Adagrad whose steps cannot spike: the accumulator is started, and kept, at least
``warm_steps`` times the largest squared gradient seen.

torch's Adagrad steps ``θ ← θ − lr · g_t / (√(Σ_{s≤t} g_s²) + ε)``. From a zero accumulator the
first step is ``lr · sign(g_1)``: every coordinate moves by the full rate, whatever its
gradient's scale, and a coordinate whose gradient then grows (REC's grow about 10x after the
first step, as its vectors leave their small initial values) keeps stepping at nearly the
full rate until the sum catches up; an accumulator started at a multiple of the first
squared gradient does not help for the same reason. On REC the first step at lr 0.1 moves every
parameter by 60–90% of its norm and the run never recovers (``docs/optimizers.md``); a
constant initial accumulator cannot fix it, since the gradients' scales differ by 100x
between coordinates.

`WarmAdagrad` divides by ``√(Σ_{s≤t} g_s² + warm_steps · max_{s≤t} g_s²) + ε`` per
coordinate: as if ``warm_steps`` steps with the largest gradient seen so far had come first.
So no step of a coordinate exceeds ``lr / √(warm_steps + 1)`` (its first is exactly that), the
per-coordinate normalisation is Adagrad's (the ratio of gradient scales between coordinates
cancels), and once ``t`` is large against ``warm_steps · max g² / mean g²`` it is Adagrad.
``warm_steps = 0`` is torch's Adagrad (no initial accumulator, no decay, no weight decay).
"""

from __future__ import annotations

import torch

__all__ = ["WarmAdagrad"]


class WarmAdagrad(torch.optim.Optimizer):
    """Adagrad with a warm accumulator (see the module docstring). Dense gradients only.

    State per parameter: ``step``, ``sum`` (of squared gradients) and ``peak`` (the largest
    squared gradient so far), like torch's Adagrad's ``sum``; `state_dict` resumes them."""

    def __init__(self, params, lr: float, *, warm_steps: float = 100.0, eps: float = 1e-10) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not warm_steps >= 0:
            raise ValueError(f"warm_steps must be >= 0, got {warm_steps}")
        super().__init__(params, dict(lr=lr, warm_steps=float(warm_steps), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("WarmAdagrad takes dense gradients only (this parameter's is sparse)")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["peak"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                square = p.grad.square()
                state["step"] += 1
                state["sum"].add_(square)
                torch.maximum(state["peak"], square, out=state["peak"])
                denominator = (state["sum"] + group["warm_steps"] * state["peak"]).sqrt_().add_(group["eps"])
                p.addcdiv_(p.grad, denominator, value=-group["lr"])
        return loss

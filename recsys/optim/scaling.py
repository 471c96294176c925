"""Batch-size scaling rules (Granziol, Zohren, Roberts, arXiv 2006.09092): the largest stable
learning rate grows linearly with the batch for SGD and with its square root for adaptive
methods (Adam, Adagrad); second-order methods need damping of at least ``∝ lr / batch``."""

from __future__ import annotations

import math

RULES = ("none", "linear", "sqrt")

#: the rule each optimizer of `recsys.optim.factory` follows
ADAPTIVE = frozenset({"adam", "adagrad", "sparse-adam"})


def rule_for(optimizer: str) -> str:
    """``sqrt`` for adaptive optimizers, ``linear`` for SGD and the SGD-based ones."""
    return "sqrt" if optimizer in ADAPTIVE else "linear"


def scale_lr(learning_rate: float, base_batch: int, batch: int, rule: str) -> float:
    """The learning rate for ``batch`` given one tuned for ``base_batch``."""
    if rule not in RULES:
        raise ValueError(f"unknown lr scaling {rule!r}; choose one of {RULES}")
    if base_batch < 1 or batch < 1:
        raise ValueError("batch sizes must be >= 1")
    if rule == "linear":
        return learning_rate * batch / base_batch
    if rule == "sqrt":
        return learning_rate * math.sqrt(batch / base_batch)
    return learning_rate


def min_damping(learning_rate: float, batch: int, constant: float = 1.0) -> float:
    """The smallest damping for a second-order method, ``constant · lr / batch``."""
    if batch < 1:
        raise ValueError("batch size must be >= 1")
    return constant * learning_rate / batch

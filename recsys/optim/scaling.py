"""Batch-size scaling: from an optimizer's reference schedule to the batch a user asks for.

Every optimizer trains a model from a *reference*: the learning rate, batch size, epochs,
decay (and, for the K-FAC family, damping and factor-update interval) that the model declares
for it (`RatingModel.training_defaults` for its own optimizer, `optimizer_defaults[name]` for
the others). `scale_schedule` moves that reference to another batch size ``B`` with the rule
that fits the optimizer (Granziol, Zohren, Roberts, arXiv 2006.09092: the largest stable
learning rate grows linearly with the batch for SGD and with its square root for adaptive
methods; second-order methods need damping of at least ``∝ lr / B``):

- ``linear`` (``sgd``, ``cov-noise`` and the K-FAC family, whose base step is SGD):
  ``lr = lr_ref · B / B_ref``;
- ``sqrt`` (``adam``, ``adagrad``, ``sparse-adam``): ``lr = lr_ref · √(B / B_ref)``;
- K-FAC family: damping ``∝ lr / B`` (unchanged under the linear rule), and the factors are
  refreshed after the same number of examples (``stats_freq · B`` kept, at least every step).

Above `LIMIT_BATCH` of an optimizer (where the rule was measured to stop holding) the rate
grows only by the square root of the batch ratio beyond the limit (a cap on the growth), and
a warning names the measured limit. A run then covers less distance per epoch than the rule
asks for (``lr / B`` smaller by the factor ``c``), so the epochs are stretched by ``1 / c``,
and stretched further so that training takes at least `MIN_STEPS` steps; the per-epoch decay
is slowed to end at the reference's final fraction of the rate. All measured on MF,
MovieLens-100K u1 (``benchmarks/optim_batch_grid.py``, ``docs/optimizers.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: ``auto``: each optimizer's own rule (`rule_for`); ``none``: no scaling
RULES = ("auto", "none", "linear", "sqrt")

#: the rule each optimizer of `recsys.optim.factory` follows
ADAPTIVE = frozenset({"adam", "adagrad", "sparse-adam"})
#: the Kronecker-factored preconditioners (their damping and factor interval scale too)
KFAC_FAMILY = frozenset({"kfac", "ekfac", "tkfac", "tekfac"})

#: the largest batch up to which an optimizer's rule was measured to hold on MF (u1): SGD's
#: linear rule from batch 1 (lr 0.018) gives lr 73.7 at 4,096 (test RMSE 0.9185) but 295 at
#: 16,384, which diverges (the largest stable rate there is between 128 and 256). Not listed:
#: the rule held at every batch measured (up to 16,384; ``cov-noise`` from its reference
#: batch 4,096: lr 128 at 16,384).
LIMIT_BATCH: dict[str, int] = {"sgd": 4096}

#: the fewest steps a scaled schedule takes (epochs are stretched to reach it): the K-FAC
#: family's 5-epoch reference is 25 steps at B=16,384 (test RMSE 0.955), 200 steps reach 0.920
MIN_STEPS = 200


def rule_for(optimizer: str) -> str:
    """``sqrt`` for adaptive optimizers, ``linear`` for SGD and the SGD-based ones."""
    return "sqrt" if optimizer in ADAPTIVE else "linear"


def scale_lr(learning_rate: float, base_batch: int, batch: int, rule: str) -> float:
    """The learning rate for ``batch`` given one tuned for ``base_batch`` (no limit applied)."""
    if rule not in RULES or rule == "auto":
        raise ValueError(f"unknown lr scaling {rule!r}; choose one of {RULES[1:]}")
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


@dataclass(frozen=True)
class Reference:
    """An optimizer's reference schedule on a model: what it was tuned with (``damping`` and
    ``stats_freq``: the K-FAC family's, else None)."""

    learning_rate: float
    batch_size: int
    epochs: int
    lr_decay: float
    damping: float | None = None
    stats_freq: int | None = None


@dataclass(frozen=True)
class BatchScaling:
    """What `scale_schedule` did: the ``rule`` applied from ``reference`` to ``batch_size``,
    the resulting schedule, the ``limit_batch`` above which the rule's growth was capped (None:
    no limit known or not reached) and a ``warning`` (empty when the rule holds)."""

    rule: str
    reference: Reference
    batch_size: int
    learning_rate: float
    epochs: int
    lr_decay: float
    damping: float | None = None
    stats_freq: int | None = None
    limit_batch: int | None = None
    warning: str = ""


def scale_schedule(optimizer: str, reference: Reference, batch: int, rule: str = "auto", *,
                   examples: int | None = None, learning_rate: float | None = None) -> BatchScaling:
    """The schedule for ``optimizer`` at ``batch`` from its ``reference`` (see the module
    docstring). ``rule``: ``auto`` (the optimizer's own, `rule_for`), ``linear``, ``sqrt`` or
    ``none`` (the reference unchanged). ``examples``: training examples per epoch (for
    `MIN_STEPS`; None: no step floor). ``learning_rate``: scale this rate instead of the
    reference's (a rate the user tuned at the reference batch)."""
    if rule not in RULES:
        raise ValueError(f"unknown lr scaling {rule!r}; choose one of {RULES}")
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    rule = rule_for(optimizer) if rule == "auto" else rule
    base_lr = reference.learning_rate if learning_rate is None else learning_rate
    if rule == "none":
        return BatchScaling(rule, reference, batch, base_lr, reference.epochs, reference.lr_decay,
                            reference.damping, reference.stats_freq)
    ref_b = reference.batch_size
    limit = LIMIT_BATCH.get(optimizer)
    warning = ""
    if limit is not None and batch > max(limit, ref_b):
        # the rule up to the measured limit, the square root of the rest beyond it
        start = max(limit, ref_b)
        lr = scale_lr(scale_lr(base_lr, ref_b, start, rule), start, batch, "sqrt")
        warning = (f"batch size {batch} is above {limit}, the largest at which the {rule} learning-rate rule "
                   f"of {optimizer} was measured to hold (MF, MovieLens-100K); the rate grows by the square "
                   f"root beyond it (lr {lr:.4g} instead of {scale_lr(base_lr, ref_b, batch, rule):.4g}) and "
                   "the epochs are stretched to match; give --lr to choose the rate yourself")
    else:
        lr, limit = scale_lr(base_lr, ref_b, batch, rule), None
    # distance per epoch (lr / B) against the reference's: stretch the epochs by what was lost
    # to a cap; an adaptive rule's smaller per-epoch distance is left as measured
    linear_lr = scale_lr(base_lr, ref_b, batch, "linear")
    stretch = max(1.0, linear_lr / lr) if limit is not None else 1.0
    if examples is not None:
        steps = reference.epochs * stretch * math.ceil(examples / batch)
        stretch *= max(1.0, MIN_STEPS / max(steps, 1))
    epochs = max(reference.epochs, math.ceil(reference.epochs * stretch - 1e-9))
    decay = reference.lr_decay ** (reference.epochs / epochs)
    damping = stats_freq = None
    if reference.damping is not None:  # damping >= ∝ lr / B (Granziol et al.): raised, never lowered
        damping = reference.damping * max(1.0, (lr / batch) / (reference.learning_rate / ref_b))
    if reference.stats_freq is not None:  # refresh the factors after as many examples
        stats_freq = max(1, round(reference.stats_freq * ref_b / batch))
    return BatchScaling(rule, reference, batch, lr, epochs, decay, damping, stats_freq, limit, warning)
